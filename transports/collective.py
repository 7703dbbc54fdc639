"""``collective``: learner rank 0 pushes buckets through torch.distributed to every vLLM worker.

One process group of two per engine rank (learner rank 0 = group rank 0, the engine rank = 1),
each built directly from a ``PrefixStore`` over one ``TCPStore`` that rank 0 serves: NCCL when the
process has a CUDA device, gloo on CPU, the same code. The groups are made apart from the
learner's data-parallel default group and from vLLM's own groups (nothing here touches
``torch.distributed``'s global state), and one group per engine rank rather than one for all
because a broadcast group is fixed at creation: a restarted rollout actor could only re-join by
rebuilding every member's group mid-run, while here it builds its own pair again and no other
actor notices. Rank 0 sends each bucket to all linked peers at once (async ops, then one wait each).

Wire format of one stream (one version), per bucket three broadcasts from rank 0:
``header = int64[MAGIC, version, BUCKET, spec_bytes, payload_bytes, 0]``, the bucket spec as JSON
bytes (``[[name, dtype, shape, offset], ...]``) and the payload (the tensors' bytes back to back);
then ``header = int64[MAGIC, version, END, 0, 0, tensors in the stream]``. The specs travel in-band
because a bucket is sent as soon as the learner's ZeRO-3 gathers fill it, before later layers
exist on rank 0; the worker loads each bucket through vLLM's layer-wise reload.

Joining: an engine rank writes ``join/<rank> = <generation>`` to the store (a fresh generation per
process, so a restarted actor's pair has its own prefix ``pair/<rank>/<generation>/`` and never
meets the keys its dead predecessor left) and builds its side of the group there. Rank 0's watcher
thread sees each new generation once (a generation is never rendezvoused with twice: retrying a
dead peer's key would wait out a whole deadline for a process that is gone) and hands it to a
catch-up thread, which builds rank 0's side and streams the newest staged version to it *outside*
the publish lock, then links it under the lock, or streams again if a newer version was staged
meanwhile. :meth:`CollectiveWeightPublisher.publish` streams only to linked peers and waits for no
rendezvous. Rank 0 sends a version to a peer at most once per link, and a receiver ignores
versions older than the one it waits for, so the two stay in step.

Deadlines: every collective op waits at most what is left of ``timeout_s`` (store connects, group
creation, each broadcast). A peer that dies or stops receiving costs rank 0 at most one deadline:
its link is dropped, named in the manifest's ``failed_peers`` and logged, and the other peers
carry on; a receiver whose learner died raises :class:`transports.base.WeightSyncError` naming
the actor (the rollout worker then refuses to generate and the driver restarts it).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from transports.base import (
    EngineRpc,
    SecondsLeft,
    WeightManifest,
    WeightPublisher,
    WeightReceiver,
    WeightSyncError,
    iter_buckets,
    spec_of,
)

log = logging.getLogger(__name__)

MAGIC = 0x44524654  # "DRFT": a receiver that reads anything else is out of step with rank 0
BUCKET, END = 1, 2
HEADER_LEN = 6
JOIN_POLL_S = 0.2


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def local_address_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (gloo binds its pairs there; loopback stays on lo)."""
    if is_loopback(host):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # UDP connect sends nothing; it only picks the route
        return str(probe.getsockname()[0])


def transport_device() -> Any:
    """The device buckets travel on: this process's CUDA device (NCCL), else the CPU (gloo)."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pair_group(store: Any, prefix: str, rank: int, address: str, timeout_s: float, device: Any) -> Any:
    """A two-member process group (rank 0: the learner) on ``store`` under ``prefix``.

    Built directly, not through ``init_process_group``/``new_group``: it must not become (or need)
    the process's default group, which is the learner's data-parallel group on rank 0 and vLLM's
    world in the worker.
    """
    import torch.distributed as dist

    prefixed = dist.PrefixStore(prefix, store)
    timeout = datetime.timedelta(seconds=max(timeout_s, 0.001))
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, 2, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
    return dist.ProcessGroupGloo(prefixed, rank, 2, options)


def _broadcast(group: Any, tensor: Any, deadline: float) -> None:
    """Broadcast from group rank 0, bounded by what is left before ``deadline`` (the op's own timeout:
    gloo and NCCL apply it inside the op, where ``Work.wait``'s argument alone is not enough)."""
    work = start_broadcast(group, tensor, deadline)
    if not work.wait(datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001))):
        raise TimeoutError("the collective did not finish before the sync deadline")


def start_broadcast(group: Any, tensor: Any, deadline: float) -> Any:
    """Start a broadcast from group rank 0 with the sync's remaining time as its timeout; returns the work."""
    import torch.distributed as dist

    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the sync deadline passed")
    options = dist.BroadcastOptions()
    options.rootRank = 0
    options.timeout = datetime.timedelta(seconds=left)
    return group.broadcast([tensor], options)


def _wait(work: Any, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the sync deadline passed")
    if not work.wait(datetime.timedelta(seconds=left)):
        raise TimeoutError("the collective did not finish before the sync deadline")


def _header(version: int, kind: int, spec_bytes: int, payload_bytes: int, tensors: int) -> Any:
    import torch

    return torch.tensor([MAGIC, version, kind, spec_bytes, payload_bytes, tensors], dtype=torch.int64)


def reusable_buffer(pool: list[Any], index: int, nbytes: int, device: Any) -> Any:
    """``pool[index]`` if it holds ``nbytes`` bytes, else a new uint8 tensor put there.

    Kept across syncs: a fresh page costs a page fault, which on a small VM makes writing fresh
    memory many times slower than writing memory already mapped (transports/ray_bytes.py measured
    ~20x), and a sync writes the whole model.
    """
    import torch

    while len(pool) <= index:
        pool.append(None)
    buffer = pool[index]
    if buffer is None or buffer.numel() != nbytes or buffer.device != device:
        buffer = pool[index] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return buffer


def pack_bucket(version: int, bucket: list[tuple[str, Any]], payload: Any = None) -> list[Any]:
    """``[header, spec, payload]`` of one bucket on the CPU (payload: the tensors' bytes back to back,
    written into ``payload`` when given, which must hold the bucket's bytes)."""
    import torch

    spec = spec_of(bucket, None)
    described = [
        [name, dtype, list(shape), offset]
        for name, dtype, shape, offset in zip(spec.names, spec.dtypes, spec.shapes, spec.offsets, strict=True)
    ]
    spec_bytes = torch.frombuffer(bytearray(json.dumps(described).encode()), dtype=torch.uint8)
    payload = torch.empty(spec.nbytes, dtype=torch.uint8) if payload is None else payload
    for (_, tensor), offset in zip(bucket, spec.offsets, strict=True):
        flat = tensor.reshape(-1).view(torch.uint8)
        payload[offset : offset + flat.numel()].copy_(flat)
    return [_header(version, BUCKET, spec_bytes.numel(), spec.nbytes, len(bucket)), spec_bytes, payload]


@dataclass
class _Link:
    """Rank 0's end of one engine rank's pair group."""

    peer_rank: int
    actor_id: str
    generation: str
    group: Any
    served_version: int = 0


@dataclass
class _Staged:
    """The newest published version, packed, for late joiners; ``readers``: catch-up streams reading it.

    Immutable once staged: the next publication packs into buffers no reader holds.
    """

    version: int
    messages: list[list[Any]]
    pool: list[Any]
    readers: int = 0


class CollectiveWeightPublisher(WeightPublisher):
    """Learner rank 0: serves the rendezvous store and streams buckets to every linked engine rank.

    Threads: :meth:`publish` (the learner's) streams to the linked peers under ``_lock``; the join
    watcher builds a late joiner's pair group and a catch-up thread per joiner streams it the staged
    version **outside** the lock (the healthy peers' next publication never waits for a joiner),
    then links it under the lock if nothing newer was staged meanwhile, else streams that too.
    A generation is tried once: a dead peer's join key is never rendezvoused with again.

    Args:
        bucket_bytes: tensor bytes per bucket.
        host: address the engine ranks reach this process at (the store and gloo bind there only).
        peers: engine rank (1, 2, ...) -> the rollout actor that owns it (for messages).
        timeout_s: the sync deadline; also bounds a late joiner's rendezvous and each catch-up stream.
        port: store port (0: a free one).
    """

    def __init__(
        self, bucket_bytes: int, host: str, peers: dict[int, str], timeout_s: float, port: int = 0
    ) -> None:
        import torch
        import torch.distributed as dist

        super().__init__(bucket_bytes)
        self.peers = dict(peers)
        self.timeout_s = timeout_s
        self.device = transport_device()
        self.address = local_address_towards(host) if not is_loopback(host) else "127.0.0.1"
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        self.endpoint = (host, int(listener.getsockname()[1]))
        # handed a bound socket, TCPStore listens on that address only (not on every interface)
        self._store = dist.TCPStore(
            host,
            self.endpoint[1],
            None,
            True,
            datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
            master_listen_fd=listener.detach(),
        )
        self._links: dict[int, _Link] = {}
        self._tried: dict[int, str] = {}  # engine rank -> newest generation a rendezvous was tried with
        self._staged: _Staged | None = None
        self._spare_pools: list[list[Any]] = []  # packed-bucket buffers no one reads, reused
        self._cpu = torch.device("cpu")
        self.failures: dict[str, str] = {}  # actor id -> why its link was dropped (latest)
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._joins_seen = 0
        self._catch_ups: list[threading.Thread] = []
        self._watcher = threading.Thread(target=self._watch_joins, name="weight-join-watcher", daemon=True)
        self._watcher.start()

    def announcement(self) -> WeightManifest:
        return WeightManifest(
            version=0,
            transport="collective",
            buckets=(),
            num_tensors=0,
            total_bytes=0,
            published_at=time.time(),
            endpoint=self.endpoint,
        )

    def linked_peers(self) -> dict[int, int]:
        """Engine rank -> the newest version it was sent (tests, diagnostics)."""
        with self._lock:
            return {rank: link.served_version for rank, link in self._links.items()}

    def _free_pool(self) -> list[Any]:
        """Buffers for the next version's packed buckets: the staged version's when no catch-up reads
        them (it is replaced by the new one), else a spare pool or a fresh one (caller holds the lock)."""
        staged = self._staged
        if staged is not None and staged.readers == 0:
            self._staged = None
            return staged.pool
        return self._spare_pools.pop() if self._spare_pools else []

    def _retire(self, staged: _Staged | None) -> None:
        """``staged`` is no longer the newest: its buffers become spare once its readers finished."""
        if staged is not None and staged.readers == 0 and staged is not self._staged:
            self._spare_pools.append(staged.pool)
            del self._spare_pools[:-2]  # at most two spare model copies kept

    def publish(self, version: int, named_tensors: Iterable[tuple[str, Any]]) -> WeightManifest:
        """Stream ``version`` to every linked peer while ``named_tensors`` is still being produced.

        Never raises for a peer: a peer that fails is dropped and named in ``failed_peers`` (it
        re-joins when its actor restarts). Stages the packed buckets on the CPU for late joiners.
        Waits for no rendezvous: late joiners are linked by the watcher.
        """
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            failed: list[str] = []
            targets = [link for link in self._links.values() if link.served_version < version]
            previous = self._staged
            pool = self._free_pool()
            messages: list[list[Any]] = []
            specs = []
            tensors = 0
            try:
                for index, bucket in enumerate(iter_buckets(named_tensors, self.bucket_bytes)):
                    nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
                    cpu = reusable_buffer(pool, index, nbytes, self._cpu)
                    message = pack_bucket(version, bucket, cpu)
                    messages.append(message)
                    specs.append(spec_of(bucket, None))
                    tensors += len(bucket)
                    targets = self._send(targets, message, deadline, failed)
            except BaseException as err:
                # the learner failed mid-stream: closing the peers' links ends their receive now,
                # not at the deadline, and they re-join; the previous staged version stays staged
                # unless its buffers were just rewritten
                for link in targets:
                    self._drop(link, err, failed)
                if previous is not None and previous.pool is not pool:
                    self._staged = previous
                self._spare_pools.append(pool)
                raise
            messages.append([_header(version, END, 0, 0, tensors)])
            targets = self._send(targets, messages[-1], deadline, failed)
            for link in targets:
                link.served_version = version
            self._staged = _Staged(version, messages, pool)
            if previous is not None and previous.pool is not pool:
                self._retire(previous)
        manifest = WeightManifest(
            version=version,
            transport="collective",
            buckets=tuple(specs),
            num_tensors=tensors,
            total_bytes=sum(s.nbytes for s in specs),
            published_at=time.time(),
            endpoint=self.endpoint,
            failed_peers=tuple(failed),
        )
        self._latest = manifest
        return manifest

    def _send(
        self, targets: list[_Link], message: list[Any], deadline: float, failed: list[str]
    ) -> list[_Link]:
        """Broadcast each tensor of ``message`` to every target at once; returns the targets still linked."""
        for tensor in message:
            on_device = tensor.to(self.device, non_blocking=True)
            started = []
            for link in targets:
                try:
                    started.append((link, start_broadcast(link.group, on_device, deadline)))
                except Exception as err:
                    self._drop(link, err, failed)
            targets = []
            for link, work in started:
                try:
                    _wait(work, deadline)
                    targets.append(link)
                except Exception as err:
                    self._drop(link, err, failed)
        return targets

    def _drop(self, link: _Link, err: BaseException, failed: list[str]) -> None:
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        message = (
            f"weight sync to {link.actor_id} (collective engine rank {link.peer_rank}) failed, link dropped "
            f"until it re-joins: {reason}"
        )
        log.warning(message)
        self.failures[link.actor_id] = message
        failed.append(link.actor_id)
        with self._lock:  # re-entrant: publish holds it already, a catch-up thread does not
            if self._links.get(link.peer_rank) is link:
                del self._links[link.peer_rank]

    def _new_generations(self) -> list[tuple[int, str, str]]:
        """``(engine rank, actor id, generation)`` of every join not tried yet (watcher thread only)."""
        fresh = []
        for peer_rank, actor_id in self.peers.items():
            key = f"join/{peer_rank}"
            if not self._store.check([key]):
                continue
            generation = self._store.get(key).decode()
            with self._lock:
                if self._tried.get(peer_rank) == generation:
                    continue  # linked, being caught up, or failed: a dead peer's key is never retried
                self._tried[peer_rank] = generation
            fresh.append((peer_rank, actor_id, generation))
        return fresh

    def _watch_joins(self) -> None:
        """Start a catch-up thread for each new join (a restarted actor catching up from the weight board)."""
        while not self._closed.wait(JOIN_POLL_S):
            try:
                joins = int(self._store.add("joins", 0))
                if joins == self._joins_seen:
                    continue
                self._joins_seen = joins
                for peer_rank, actor_id, generation in self._new_generations():
                    thread = threading.Thread(
                        target=self._catch_up,
                        args=(peer_rank, actor_id, generation),
                        name=f"weight-catch-up-{peer_rank}",
                        daemon=True,
                    )
                    self._catch_ups = [t for t in self._catch_ups if t.is_alive()] + [thread]
                    thread.start()
            except Exception:  # the watcher must outlive any one peer's failure
                if self._closed.is_set():
                    return
                log.exception("collective weight publisher: join watcher")

    def _catch_up(self, peer_rank: int, actor_id: str, generation: str) -> None:
        """Rendezvous with a new generation, stream it the staged version(s) outside the lock, link it.

        Each stage (the rendezvous, each catch-up stream) has its own ``timeout_s`` deadline; a
        failure drops the peer, named, until its actor joins again.
        """
        failed: list[str] = []
        link = _Link(peer_rank, actor_id, generation, None)
        try:
            link.group = pair_group(
                self._store, f"pair/{peer_rank}/{generation}/", 0, self.address, self.timeout_s, self.device
            )
        except Exception as err:
            self._drop(link, err, failed)
            return
        while not self._closed.is_set():
            with self._lock:
                staged = self._staged
                if self._tried.get(peer_rank) != generation:
                    return  # a newer incarnation joined meanwhile
                if staged is None or staged.version <= link.served_version:
                    self._links[peer_rank] = link  # publish streams to it from now on
                    return
                staged.readers += 1
            try:
                deadline = time.monotonic() + self.timeout_s
                targets = [link]
                for message in staged.messages:
                    targets = self._send(targets, message, deadline, failed)
                    if not targets:
                        return  # dropped and named by _send
                link.served_version = staged.version
            finally:
                with self._lock:
                    staged.readers -= 1
                    self._retire(staged)

    def close(self) -> None:
        self._closed.set()
        self._watcher.join(timeout=5)
        with self._lock:
            self._links.clear()


class CollectivePeer:
    """An engine rank's end of its pair group (lives in the vLLM worker process).

    Args:
        endpoint: ``(host, port)`` of rank 0's store.
        peer_rank: this engine rank's number among the publisher's peers (1, 2, ...).
    """

    def __init__(self, endpoint: tuple[str, int], peer_rank: int) -> None:
        self.endpoint = (str(endpoint[0]), int(endpoint[1]))
        self.peer_rank = peer_rank
        self.device = transport_device()
        self._group: Any = None
        # receive buffers per bucket, reused by the next stream: the engine has loaded them by then
        # (the layer-wise reload copies what it buffered into the parameters when it finishes)
        self._payloads: list[Any] = []

    @property
    def joined(self) -> bool:
        return self._group is not None

    def join(self, timeout_s: float) -> None:
        """Announce a fresh generation and build this side of the pair (rank 0 meets it)."""
        import torch.distributed as dist

        host, port = self.endpoint
        store = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s))
        generation = uuid.uuid4().hex
        store.set(f"join/{self.peer_rank}", generation)
        store.add("joins", 1)
        self._store = store  # kept: the group's prefix store reads through it
        self._group = pair_group(
            store,
            f"pair/{self.peer_rank}/{generation}/",
            1,
            local_address_towards(host),
            timeout_s,
            self.device,
        )

    def receive(
        self,
        min_version: int,
        timeout_s: float,
        load: Callable[[list[tuple[str, Any]]], None],
        begin: Callable[[], None],
        finish: Callable[[], None],
    ) -> tuple[int, int]:
        """Receive streams until one of ``min_version`` or newer is loaded; returns (version, tensors).

        Any failure drops the group (the next call re-joins) and raises with what was reached.
        """
        deadline = time.monotonic() + timeout_s
        try:
            if self._group is None:
                self.join(timeout_s)
            while True:
                version, tensors = self._receive_stream(deadline, load, begin, finish)
                if version >= min_version:
                    return version, tensors
        except BaseException:
            self._group = None
            raise

    def _receive_stream(
        self,
        deadline: float,
        load: Callable[[list[tuple[str, Any]]], None],
        begin: Callable[[], None],
        finish: Callable[[], None],
    ) -> tuple[int, int]:
        import torch

        begin()
        loaded = 0
        buckets = 0
        while True:
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
            self._recv(header, deadline, f"header after {buckets} buckets")
            magic, version, kind, spec_bytes, payload_bytes, tensors = (int(x) for x in header.cpu())
            if magic != MAGIC:
                raise RuntimeError(f"collective stream out of step: header {header.tolist()}")
            if kind == END:
                finish()
                if tensors != loaded:
                    raise RuntimeError(f"version {version}: loaded {loaded} tensors, rank 0 sent {tensors}")
                return version, loaded
            spec = torch.empty(spec_bytes, dtype=torch.uint8, device=self.device)
            self._recv(spec, deadline, f"spec of bucket {buckets + 1}")
            payload = reusable_buffer(self._payloads, buckets, payload_bytes, self.device)
            self._recv(payload, deadline, f"payload of bucket {buckets + 1}")
            weights = []
            for name, dtype_name, shape, offset in json.loads(bytes(spec.cpu().numpy()).decode()):
                dtype = getattr(torch, dtype_name)  # the wire names are torch's ("float32", "bfloat16")
                if not isinstance(dtype, torch.dtype):
                    raise RuntimeError(f"{name}: unknown dtype {dtype_name!r} in the stream")
                numel = 1
                for dim in shape:
                    numel *= dim
                view = payload[offset : offset + numel * dtype.itemsize].view(dtype).view(shape)
                weights.append((name, view))
            load(weights)
            loaded += len(weights)
            buckets += 1

    def _recv(self, tensor: Any, deadline: float, what: str) -> None:
        try:
            _broadcast(self._group, tensor, deadline)
        except Exception as err:
            host, port = self.endpoint
            # not a WeightSyncError: the receiver adds the actor, version and stage to any other error
            raise ConnectionError(
                f"collective receive from learner rank 0 ({host}:{port}) failed at the {what}: "
                f"{type(err).__name__}: {err}"
            ) from err


class CollectiveWeightReceiver(WeightReceiver):
    """Rollout actor side: asks each of its vLLM workers to receive the stream (one RPC per sync).

    Args:
        actor_id: for messages.
        rank_offset: engine rank of this actor's TP rank 0 among the publisher's peers
            (``1 + actor_index * tensor_parallel_size``).
    """

    def __init__(self, actor_id: str, rank_offset: int) -> None:
        super().__init__(actor_id)
        self.rank_offset = rank_offset
        self._manifest: WeightManifest | None = None

    @staticmethod
    def _endpoint(manifest: WeightManifest) -> list[Any]:
        if manifest.endpoint is None:
            raise WeightSyncError(f"collective manifest of version {manifest.version} has no endpoint")
        return list(manifest.endpoint)

    async def attach(self, rpc: EngineRpc, manifest: WeightManifest, timeout_s: float) -> None:
        await rpc(
            "driftrl_collective_join", (self._endpoint(manifest), self.rank_offset, timeout_s), timeout_s
        )

    async def _begin(self, rpc: EngineRpc, manifest: WeightManifest, remaining: SecondsLeft) -> None:
        self._manifest = manifest

    async def _load_bucket(
        self, rpc: EngineRpc, manifest: WeightManifest, index: int, remaining: SecondsLeft
    ) -> int:
        raise AssertionError("collective buckets arrive in the worker, not through the manifest")

    async def receive(self, rpc: EngineRpc, manifest: WeightManifest, timeout_s: float) -> int:
        # the manifest is an announcement (no buckets): the whole stream is the "finish" stage
        return await super().receive(rpc, _without_buckets(manifest), timeout_s)

    async def _finish(self, rpc: EngineRpc, remaining: SecondsLeft, loaded: int) -> int:
        assert self._manifest is not None
        manifest = self._manifest
        timeout_s = remaining()
        results = await rpc(
            "driftrl_collective_receive",
            (self._endpoint(manifest), self.rank_offset, manifest.version, timeout_s),
            timeout_s,
        )
        versions = {int(version) for version, _ in results}
        if len(versions) != 1:
            raise WeightSyncError(f"tensor-parallel ranks loaded different versions {sorted(versions)}")
        self.loaded_version = versions.pop()
        return int(results[0][1])


def _without_buckets(manifest: WeightManifest) -> WeightManifest:
    from dataclasses import replace

    return replace(manifest, buckets=(), num_tensors=0)
