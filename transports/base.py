"""The transport-neutral half of weight sync: manifest, buckets, the two abstract ends, the board.

Layout: ``transports/`` sits below ``actors/`` and ``learner/`` and imports neither (nor the
``driftrl/`` wiring): the learner builds the publishing end, the rollout actors the receiving end,
both through :mod:`transports.factory` from one :class:`transports.config.WeightSyncConfig`. Torch
and Ray are imported where used, so the vLLM worker processes can import the worker-side helpers.

Protocol (same driver code for every transport)::

    publisher = make_publisher(cfg, ...)           # once, on learner rank 0
    announced = publisher.announcement()           # push transports: receivers start from it
    manifest = announced.for_version(v) if announced else <rank 0's publish result>
    board.post(manifest)                           # restarted actors catch up from the board
    refs = [actor.update_weights.remote(manifest) for actor in actors]
    learner.publish_weights(publisher, v)          # all ranks; rank 0 publishes (streams, for push)

Manifest (:class:`WeightManifest`, small, picklable): ``version``, ``transport``, ``buckets`` (one
:class:`BucketSpec` each: names, dtypes, shapes, byte offsets and the payload where the transport
has one), tensor and byte totals, the publication time, the rendezvous ``endpoint`` of a push
transport and, after a publication, the peers it could not reach.

Implementations: :mod:`transports.ray_bytes` (pull, through the object store) and
:mod:`transports.collective` (push, a torch.distributed group per engine rank).

Deadlines: a receiver bounds the whole sync by ``timeout_s`` and raises
:class:`WeightSyncTimeoutError` naming the actor, the version and the stage reached, never a
silent hang.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

# (method, args, timeout_s) -> per-rank results: the rollout worker wraps AsyncLLM.collective_rpc.
EngineRpc = Callable[[str, tuple, float], Awaitable[list[Any]]]
# Seconds left before a sync's deadline; raises TimeoutError once it passed.
SecondsLeft = Callable[[], float]


class WeightSyncError(RuntimeError):
    """A weight sync failed; the engine may hold a mix of versions and must not generate."""


class WeightSyncTimeoutError(WeightSyncError, TimeoutError):
    """A weight sync did not finish within its deadline."""


@dataclass(frozen=True)
class BucketSpec:
    """One bucket of tensors.

    Attributes:
        names: HF parameter names, in bucket order.
        dtypes: torch dtype names (``"float32"``) per tensor.
        shapes: shape per tensor.
        offsets: byte offset of each tensor in the bucket's flat buffer (the collective payload).
        nbytes: tensor bytes of the bucket.
        payload: ``ObjectRef`` of a tuple of uint8 arrays (one per tensor, in bucket order),
            safetensors bytes inline, or None (collective: the bytes travel through the process group).
    """

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    nbytes: int
    payload: Any = None


@dataclass(frozen=True)
class WeightManifest:
    """What a receiver needs to fetch one published version (see the module docstring)."""

    version: int
    transport: Literal["ray_bytes", "collective"]
    buckets: tuple[BucketSpec, ...]
    num_tensors: int
    total_bytes: int
    published_at: float
    endpoint: tuple[str, int] | None = None
    failed_peers: tuple[str, ...] = ()

    def for_version(self, version: int) -> WeightManifest:
        """This manifest re-labelled for ``version`` (a push transport's announcement of the next sync)."""
        return replace(self, version=version, published_at=time.time(), failed_peers=())


def iter_buckets(
    named_tensors: Iterable[tuple[str, Any]], bucket_bytes: int
) -> Iterator[list[tuple[str, Any]]]:
    """Group ``(name, tensor)`` pairs, in order, into buckets of at most ``bucket_bytes`` tensor bytes.

    Lazy: a bucket is yielded as soon as it is full, so a publisher streams while the learner is
    still gathering later layers (ZeRO-3 gathers one module at a time). Tensors are detached and
    made contiguous, and stay on their device (the transport decides where they go). A tensor
    larger than ``bucket_bytes`` gets a bucket of its own rather than being split: vLLM loads
    whole parameters. Order is kept so a decoder layer's parts arrive close together (vLLM's
    layer-wise reload processes a layer as soon as all of its parts are in).
    """
    current: list[tuple[str, Any]] = []
    current_bytes = 0
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} published twice")
        seen.add(name)
        tensor = tensor.detach().contiguous()
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > bucket_bytes:
            yield current
            current, current_bytes = [], 0
        current.append((name, tensor))
        current_bytes += size
    if not seen:
        raise ValueError("nothing to publish: no tensors given")
    yield current


def plan_buckets(named_tensors: Iterable[tuple[str, Any]], bucket_bytes: int) -> list[list[tuple[str, Any]]]:
    """:func:`iter_buckets` as a list."""
    return list(iter_buckets(named_tensors, bucket_bytes))


def spec_of(bucket: list[tuple[str, Any]], payload: Any) -> BucketSpec:
    offsets, offset = [], 0
    for _, tensor in bucket:
        offsets.append(offset)
        offset += tensor.numel() * tensor.element_size()
    return BucketSpec(
        names=tuple(name for name, _ in bucket),
        dtypes=tuple(str(t.dtype).removeprefix("torch.") for _, t in bucket),
        shapes=tuple(tuple(t.shape) for _, t in bucket),
        offsets=tuple(offsets),
        nbytes=offset,
        payload=payload,
    )


class WeightPublisher(ABC):
    """Learner side of a transport."""

    def __init__(self, bucket_bytes: int) -> None:
        self.bucket_bytes = bucket_bytes
        self._latest: WeightManifest | None = None

    @abstractmethod
    def publish(self, version: int, named_tensors: Iterable[tuple[str, Any]]) -> WeightManifest:
        """Stage ``version`` and return the manifest receivers need (keeps it as :meth:`latest`)."""

    def latest(self) -> WeightManifest | None:
        """The newest published manifest (holding it keeps its object-store payload alive)."""
        return self._latest

    def announcement(self) -> WeightManifest | None:
        """A manifest receivers can start from before :meth:`publish` returns (re-label it with
        :meth:`WeightManifest.for_version`), or None: receivers wait for publish's own manifest.

        A push transport needs it (the receivers must be receiving while publish sends); a pull
        transport returns None, its manifest carries the payload.
        """
        return None

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release the transport's resources (sockets, threads)."""


class WeightReceiver(ABC):
    """Actor side of a transport: moves one manifest's buckets into the engine via ``rpc``."""

    def __init__(self, actor_id: str) -> None:
        self.actor_id = actor_id
        # the version the last receive loaded (a push transport may deliver a newer one than asked)
        self.loaded_version: int | None = None

    async def attach(self, rpc: EngineRpc, manifest: WeightManifest, timeout_s: float) -> None:  # noqa: B027
        """Join the transport ahead of the first sync (push transports; default: nothing to join)."""

    async def receive(self, rpc: EngineRpc, manifest: WeightManifest, timeout_s: float) -> int:
        """Load every bucket of ``manifest``; returns tensors loaded. Raises on deadline or error.

        The engine must be paused. Begin/finish bracket the buckets so the engine re-runs each
        layer's weight processing once all of its parts arrived (see :mod:`actors.vllm_extension`).
        """
        deadline = time.monotonic() + timeout_s
        stage = "begin"
        self.loaded_version = None

        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            return left

        try:
            async with asyncio.timeout(timeout_s):
                await self._begin(rpc, manifest, remaining)
                loaded = 0
                for index in range(len(manifest.buckets)):
                    stage = f"bucket {index + 1}/{len(manifest.buckets)}"
                    loaded += await self._load_bucket(rpc, manifest, index, remaining)
                stage = "finish"
                loaded = await self._finish(rpc, remaining, loaded)
        except TimeoutError:
            raise WeightSyncTimeoutError(
                f"rollout actor {self.actor_id}: weight sync to version {manifest.version} "
                f"({manifest.transport}, {manifest.total_bytes} bytes) did not finish within {timeout_s} s "
                f"(stuck at {stage})"
            ) from None
        except WeightSyncError:
            raise
        except Exception as err:
            raise WeightSyncError(
                f"rollout actor {self.actor_id}: weight sync to version {manifest.version} failed at {stage}: "
                f"{type(err).__name__}: {err}"
            ) from err
        if manifest.num_tensors and loaded != manifest.num_tensors:
            raise WeightSyncError(
                f"rollout actor {self.actor_id}: version {manifest.version} loaded {loaded} tensors, "
                f"manifest lists {manifest.num_tensors}"
            )
        if self.loaded_version is None or self.loaded_version < manifest.version:
            self.loaded_version = manifest.version
        return loaded

    async def _begin(self, rpc: EngineRpc, manifest: WeightManifest, remaining: SecondsLeft) -> None:
        """Prepare the engine for the buckets (default: vLLM's layer-wise reload)."""
        await rpc("driftrl_begin_reload", (), remaining())

    async def _finish(self, rpc: EngineRpc, remaining: SecondsLeft, loaded: int) -> int:
        """Complete the load after the last bucket; returns the tensors loaded in all."""
        await rpc("driftrl_finish_reload", (), remaining())
        return loaded

    @abstractmethod
    async def _load_bucket(
        self, rpc: EngineRpc, manifest: WeightManifest, index: int, remaining: SecondsLeft
    ) -> int:
        """Load bucket ``index`` of ``manifest``; returns tensors loaded (per engine rank, they agree)."""


@dataclass
class WeightBoard:
    """Holds the newest manifest so (re)started actors can catch up before generating.

    A plain class; in a Ray run the driver wraps it with :func:`launch_weight_board` and passes
    the handle to every rollout actor (Ray hands the same handle to a restarted actor).
    """

    _latest: WeightManifest | None = field(default=None)

    def post(self, manifest: WeightManifest) -> None:
        """Record ``manifest`` if it is newer than the current one."""
        if self._latest is None or manifest.version > self._latest.version:
            self._latest = manifest

    def latest(self) -> WeightManifest | None:
        """The newest manifest posted, or None before the first publication."""
        return self._latest


def launch_weight_board() -> Any:
    """A Ray actor holding a :class:`WeightBoard` (no CPU reserved: it only stores a manifest)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1)(WeightBoard).remote()
