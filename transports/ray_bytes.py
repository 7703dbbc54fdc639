"""``ray_bytes``: bucketed tensors through the Ray object store (pull; any node, any device).

Each bucket of at most ``bucket_bytes`` (a single larger tensor gets a bucket of its own) is
``ray.put`` once as a tuple of flat uint8 arrays, one per tensor: Ray writes numpy buffers
out-of-band, so publishing is one copy of each tensor into the object store, and ``ray.get`` on the
same node maps the store's memory instead of unpickling a copy. Without Ray the payload is
safetensors bytes. The receiving actor copies each tensor into a shared memory region it shares
with the vLLM worker process, at the offsets the worker asked for, and tells the worker which
bucket is there (:mod:`actors.vllm_extension`: the worker copies the tensors straight into its
parameters).
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import time
import uuid
from collections.abc import Iterable
from typing import Any

from transports.base import (
    BucketSpec,
    EngineRpc,
    SecondsLeft,
    WeightManifest,
    WeightPublisher,
    WeightReceiver,
    iter_buckets,
    spec_of,
)


class BytesWeightPublisher(WeightPublisher):
    """Bucketed tensors through the Ray object store (or inline safetensors bytes without Ray).

    Args:
        bucket_bytes: target tensor bytes per bucket.
        use_object_store: ``ray.put`` each bucket (default: when Ray is initialised).
    """

    def __init__(self, bucket_bytes: int, use_object_store: bool | None = None) -> None:
        super().__init__(bucket_bytes)
        self._use_object_store = use_object_store

    def publish(self, version: int, named_tensors: Iterable[tuple[str, Any]]) -> WeightManifest:
        import torch

        use_store = self._use_object_store
        if use_store is None:
            import ray

            use_store = ray.is_initialized()
        specs = []
        total = 0
        for bucket in iter_buckets(named_tensors, self.bucket_bytes):
            if use_store:
                import ray

                # One flat uint8 view per tensor (no copy; any dtype, bfloat16 included): Ray copies
                # each buffer into the store once, and readers on the node map it (measured: 256 MB
                # put 0.23 s vs 0.66 s as bytes, get 0.008 s vs 0.37 s).
                payload: Any = ray.put(
                    tuple(tensor.reshape(-1).view(torch.uint8).cpu().numpy() for _, tensor in bucket)
                )
            else:
                from safetensors.torch import save

                # safetensors serialises CPU tensors only.
                payload = save({name: tensor.cpu() for name, tensor in bucket})
            spec = spec_of(bucket, payload)
            specs.append(spec)
            total += spec.nbytes
        manifest = WeightManifest(
            version=version,
            transport="ray_bytes",
            buckets=tuple(specs),
            num_tensors=sum(len(s.names) for s in specs),
            total_bytes=total,
            published_at=time.time(),
        )
        self._latest = manifest
        return manifest


def safetensors_views(blob: bytes | bytearray | memoryview) -> dict[str, memoryview]:
    """Each tensor's bytes in a safetensors blob, as views (no copy).

    Format: an 8-byte little-endian header length, a JSON header mapping names to
    ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data that follows it.
    """
    view = memoryview(blob).cast("B")
    header_bytes = int.from_bytes(view[:8], "little")
    header = json.loads(bytes(view[8 : 8 + header_bytes]))
    base = 8 + header_bytes
    return {
        name: view[base + entry["data_offsets"][0] : base + entry["data_offsets"][1]]
        for name, entry in header.items()
        if name != "__metadata__"
    }


class SharedRegion:
    """Anonymous shared memory (a memfd) that the vLLM worker maps through ``/proc/<pid>/fd/<fd>``.

    Kept for the receiver's life and mapped once by each side (``MAP_POPULATE``): a fresh page costs
    a page fault, which on a 2-core VM makes writing fresh memory ~20 times slower than a memcpy
    into memory already mapped. The memory goes when both the actor and the worker unmapped it.

    Args:
        size: bytes.
    """

    def __init__(self, size: int) -> None:
        import weakref

        import numpy as np

        self.size = size
        self.generation = uuid.uuid4().hex
        self._fd = os.memfd_create("driftrl-weights")
        weakref.finalize(self, os.close, self._fd)
        os.ftruncate(self._fd, size)
        mapped = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        self.array = np.frombuffer(mapped, dtype=np.uint8)

    def handle(self) -> list[Any]:
        """``[path, size, generation]``: what the worker needs to map it (msgpack-friendly)."""
        return [f"/proc/{os.getpid()}/fd/{self._fd}", self.size, self.generation]


class BytesWeightReceiver(WeightReceiver):
    """Copies each bucket into a region shared with the vLLM worker, which loads it from there.

    Per sync: ``driftrl_begin_sync`` sends the tensor specs and gets the region layout back (the
    worker places a fused layer's parts side by side), then per bucket one ``ray.get`` (a mapping
    of the object store on the same node), one copy into the region, and a ``driftrl_load_shared``
    RPC carrying only the bucket index and where it lies; ``driftrl_finish_sync`` returns the
    worker's timings. The region has two slots: bucket ``i + 1`` is copied into one while the
    worker loads bucket ``i`` from the other.

    Args:
        actor_id: for messages.
        direct: let the worker copy straight into its parameters where it can; False always uses
            vLLM's layer-wise reload (tests compare the two).
    """

    def __init__(self, actor_id: str, direct: bool = True) -> None:
        super().__init__(actor_id)
        self.direct = direct
        self._region: SharedRegion | None = None
        self._offsets: list[list[int]] = []
        self._slots: list[int] = []
        self._copying: asyncio.Future | None = None
        self.last_stats: dict[str, Any] = {}

    async def _begin(self, rpc: EngineRpc, manifest: WeightManifest, remaining: SecondsLeft) -> None:
        specs = [
            [
                [name, dtype, list(shape)]
                for name, dtype, shape in zip(b.names, b.dtypes, b.shapes, strict=True)
            ]
            for b in manifest.buckets
        ]
        layout = (await rpc("driftrl_begin_sync", (specs, self.direct), remaining()))[0]
        slot_bytes = layout["region_bytes"]
        self._slots = [slot * slot_bytes for slot in range(min(2, len(manifest.buckets)))]
        needed = max(slot_bytes * len(self._slots), 1)
        if self._region is None or self._region.size < needed:
            self._region = SharedRegion(needed)
        self._offsets = layout["offsets"]
        self._copying = None
        self.last_stats = {
            "mode": layout["mode"],
            "reason": layout["reason"],
            "fetch_s": 0.0,
            "copy_in_s": 0.0,
        }

    def _start_copy(self, manifest: WeightManifest, index: int, timeout_s: float) -> asyncio.Future:
        # ray.get and the copy block: run them off the event loop so engine outputs keep flowing.
        return asyncio.get_running_loop().run_in_executor(
            None,
            self._copy_in,
            manifest.buckets[index],
            self._offsets[index],
            self._slots[index % len(self._slots)],
            timeout_s,
        )

    async def _load_bucket(
        self, rpc: EngineRpc, manifest: WeightManifest, index: int, remaining: SecondsLeft
    ) -> int:
        assert self._region is not None
        copying = self._copying or self._start_copy(manifest, index, remaining())
        self._copying = None
        await copying
        load = asyncio.ensure_future(
            rpc(
                "driftrl_load_shared",
                (self._region.handle(), index, self._slots[index % len(self._slots)]),
                remaining(),
            )
        )
        if index + 1 < len(manifest.buckets):
            # the other slot: the worker reads only this one until the RPC returns
            self._copying = self._start_copy(manifest, index + 1, remaining())
        try:
            results = await load
        except BaseException:
            if self._copying is not None:
                # the sync failed: let the copy finish in its thread, its outcome no longer matters
                self._copying.add_done_callback(lambda f: f.cancelled() or f.exception())
                self._copying = None
            raise
        return int(results[0])

    def _copy_in(self, bucket: BucketSpec, offsets: list[int], base: int, timeout_s: float) -> None:
        """Copy the bucket's tensors into the region at ``base`` + the worker's offsets."""
        import numpy as np

        started = time.perf_counter()
        payload = bucket.payload
        if isinstance(payload, bytes | bytearray | memoryview):
            views = safetensors_views(payload)
            tensors = [views[name] for name in bucket.names]
        else:
            import ray

            tensors = ray.get(payload, timeout=timeout_s)
        fetched = time.perf_counter()
        if len(tensors) != len(offsets):
            raise ValueError(f"bucket payload holds {len(tensors)} tensors, its spec lists {len(offsets)}")
        assert self._region is not None
        region = self._region.array
        for data, offset in zip(tensors, offsets, strict=True):
            source = np.frombuffer(data, dtype=np.uint8)
            region[base + offset : base + offset + source.size] = source
        self.last_stats["fetch_s"] += fetched - started
        self.last_stats["copy_in_s"] += time.perf_counter() - fetched

    async def _finish(self, rpc: EngineRpc, remaining: SecondsLeft, loaded: int) -> int:
        self.last_stats["worker"] = (await rpc("driftrl_finish_sync", (), remaining()))[0]
        return loaded
