"""Methods mixed into every vLLM worker (``worker_extension_cls``) to load published weights.

vLLM adds this class to the bases of its worker (``CPUWorker``, ``GPUWorker``), so ``self`` here is
the worker that owns ``self.model_runner``; the engine calls these methods through
``collective_rpc(method, args=...)`` on every tensor-parallel rank at once, between engine steps
(the rollout worker pauses the scheduler first).

Bytes transport (:class:`transports.ray_bytes.BytesWeightReceiver`): ``driftrl_begin_sync(specs)``,
one ``driftrl_load_shared(region, bucket)`` per bucket, then ``driftrl_finish_sync()``. Tensor
bytes never travel through the RPC: on CPU the worker is a process two hops away from the rollout
actor (actor -> engine core -> worker, each hop msgpack/pickle plus a socket copy, measured at
0.14 GB/s), so the actor copies each bucket into a shared memory region (a memfd mapped by both
processes, reused across syncs) at offsets this worker chose in ``driftrl_begin_sync``, and the RPC
carries only the region's path, the bucket index and where in the region it lies.

Two ways to load, chosen per sync by ``driftrl_begin_sync``:

* ``direct`` (tensor parallel size 1, unquantized layers, every HF name maps onto a vLLM module):
  each HF tensor is copied into its vLLM parameter, stacking ``q/k/v_proj`` into ``qkv_proj`` and
  ``gate/up_proj`` into ``gate_up_proj`` by ``packed_modules_mapping`` and the layer's
  ``output_partition_sizes``, then the layer's ``process_weights_after_loading`` runs again. On
  CPU that call is needed: it packs every linear weight into a oneDNN (or sgl) GEMM handle and
  replaces the parameter by an empty one, so there is nothing to ``copy_`` into and the handle
  must be rebuilt from the full checkpoint-format weight. The layout puts a fused layer's parts
  next to each other in the region, so that weight is a view of the region (no staging copy)
  whenever the parts share a bucket and a dtype; the rebuilt handle holds its own packed copy.
* ``reload`` (anything else): vLLM's layer-wise reload (``model_executor/model_loader/reload``)
  restores each layer's checkpoint-format parameters, buffers incoming weights, and re-runs the
  layer's processing once all of its parts have arrived; it copies each buffered tensor first,
  because the region is overwritten by the next bucket.

Between begin and finish the model is partly updated, so the engine must be paused, and a sync
that fails midway leaves it unusable: the rollout worker then refuses to generate (the driver
restarts the actor, which loads the newest weights from scratch).

Collective transport (:mod:`transports.collective`): ``driftrl_collective_join`` once, then one
``driftrl_collective_receive`` per sync, which receives the buckets learner rank 0 streams through a
process group of this worker's own (NCCL on CUDA, gloo on CPU), never vLLM's tensor-parallel groups,
and loads each through the layer-wise reload (the specs arrive with the buckets).

Imports only the standard library, torch and :mod:`transports` (no vLLM-free driftrl wiring):
this module is imported inside vLLM's worker processes.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

# Named by the wire format (manifest specs carry the dtype as this string).
DTYPES_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}

# Start of every tensor (or run of fused parts) in the shared region: a cache line, and a multiple
# of every element size, so a region slice can be viewed as any dtype without a copy.
REGION_ALIGN_BYTES = 64


def align_up(nbytes: int) -> int:
    """``nbytes`` rounded up to :data:`REGION_ALIGN_BYTES`."""
    return -(-nbytes // REGION_ALIGN_BYTES) * REGION_ALIGN_BYTES


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * dtype.itemsize


@dataclass(eq=False)
class _Target:
    """One engine parameter filled by this sync: all of its HF parts, and what happens when complete.

    ``repack``: a CPU linear layer whose weight lives only inside a packed GEMM handle; the full
    weight is assembled in ``full`` (a region view, or a staging tensor) and the handle rebuilt.
    """

    module: torch.nn.Module
    attr: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    repack: bool
    holders: list[torch.nn.Module]
    parts_left: int = 0
    region_offset: int | None = None  # set when the parts lie side by side in the region
    full: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class _Part:
    """One published HF tensor: rows ``row_start:row_start + shape[0]`` of its target."""

    target: _Target
    row_start: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = -1


@dataclass(eq=False)
class DirectLoadPlan:
    """Where each published tensor lies in the region and which engine parameter it fills.

    ``targets_left``: per module, its targets (parameters it holds) not yet complete; the module's
    weight processing runs again when it reaches 0. ``repack``: per CPU linear module, the target
    whose full weight its GEMM handle is rebuilt from.
    """

    buckets: list[list[_Part]]
    region_bytes: int
    targets_left: dict[torch.nn.Module, int]
    repack: dict[torch.nn.Module, _Target]


def _resolve_targets(
    model: torch.nn.Module, specs: list[list[list[Any]]], on_cpu: bool
) -> tuple[list[list[_Part]], str | None]:
    """Map every published ``[name, dtype, shape]`` onto an engine parameter; a reason when one doesn't."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    modules = dict(model.named_modules())
    # HF shard module -> (fused module, shard index, shard count): {"q_proj": ("qkv_proj", 0, 3), ...}
    shard_of = {
        shard: (fused, index, len(shards))
        for fused, shards in getattr(model, "packed_modules_mapping", {}).items()
        if len(shards) > 1
        for index, shard in enumerate(shards)
    }
    holders: dict[int, list[torch.nn.Module]] = defaultdict(list)
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                holders[id(param)].append(module)

    targets: dict[tuple[str, str], _Target] = {}
    rows_seen: dict[_Target, int] = defaultdict(int)
    buckets: list[list[_Part]] = []
    for bucket in specs:
        parts = []
        for name, dtype_name, shape in bucket:
            shape = tuple(shape)
            module_name, _, attr = name.rpartition(".")
            parent, _, leaf = module_name.rpartition(".")
            shard = shard_count = None
            if leaf in shard_of:
                fused, shard, shard_count = shard_of[leaf]
                module_name = f"{parent}.{fused}" if parent else fused
            module = modules.get(module_name)
            param = None if module is None else module._parameters.get(attr)
            if param is None:
                return [], f"{name}: no parameter {attr!r} on a vLLM module {module_name!r}"
            method = getattr(module, "quant_method", None)
            if method is not None and not isinstance(
                method, UnquantizedLinearMethod | UnquantizedEmbeddingMethod
            ):
                # quantised layers transform weights in ways a plain copy cannot redo
                return [], f"{name}: {module_name} uses {type(method).__name__}"
            sizes = getattr(module, "output_partition_sizes", None)
            target = targets.get((module_name, attr))
            if target is None:
                full_shape, repack = tuple(param.shape), False
                if on_cpu and attr == "weight" and param.numel() == 0 and sizes is not None:
                    full_shape = (sum(sizes), module.input_size_per_partition)
                    repack = True
                target = _Target(module, attr, full_shape, param.dtype, repack, holders[id(param)])
                targets[(module_name, attr)] = target
            if shard is None:
                row_start, expected = 0, target.shape
            else:
                if sizes is None or len(sizes) != shard_count:
                    return [], f"{name}: {module_name} has no output partition per shard"
                row_start, expected = sum(sizes[:shard]), (sizes[shard], *target.shape[1:])
            if shape != expected:
                return [], f"{name}: published shape {shape}, the engine expects {expected}"
            target.parts_left += 1
            rows_seen[target] += shape[0] if shape else 1
            parts.append(_Part(target, row_start, shape, DTYPES_BY_NAME[dtype_name]))
        buckets.append(parts)
    for (module_name, attr), target in targets.items():
        if rows_seen[target] != (target.shape[0] if target.shape else 1):
            # a fused weight published in part: the packed handle cannot be rebuilt from it
            return [], f"{module_name}.{attr}: published rows cover {rows_seen[target]} of {target.shape}"
    return buckets, None


def plan_direct_load(
    model: torch.nn.Module, specs: list[list[list[Any]]], on_cpu: bool, views_allowed: bool = True
) -> tuple[DirectLoadPlan | None, str | None]:
    """Plan a direct load of the published ``specs`` (per bucket, ``[name, dtype, shape]`` per tensor).

    Returns the plan, or None and the reason the layer-wise reload must be used instead.
    ``views_allowed``: let a repacked weight be a view of the region (only where the GEMM
    dispatch is known to copy the weight into its own packed buffer).
    """
    resolved, reason = _resolve_targets(model, specs, on_cpu)
    if reason is not None:
        return None, reason
    buckets: list[list[_Part]] = []
    region_bytes = 0
    for parts in resolved:
        by_target: dict[_Target, list[int]] = defaultdict(list)
        for index, part in enumerate(parts):
            by_target[part.target].append(index)
        offsets: dict[int, int] = {}
        cursor = 0
        for target, indices in by_target.items():
            side_by_side = (
                views_allowed
                and target.repack
                and len(indices) == target.parts_left
                and all(parts[i].dtype == target.dtype for i in indices)
            )
            if side_by_side:
                # parts in row order, back to back: the region slice is the fused weight itself
                target.region_offset = cursor
                indices = sorted(indices, key=lambda i: parts[i].row_start)
            for i in indices:
                if not side_by_side:
                    cursor = align_up(cursor)
                offsets[i] = cursor
                cursor += tensor_nbytes(parts[i].dtype, parts[i].shape)
            cursor = align_up(cursor)
        region_bytes = max(region_bytes, cursor)
        buckets.append(
            [_Part(p.target, p.row_start, p.shape, p.dtype, offsets[i]) for i, p in enumerate(parts)]
        )
    targets = {part.target: None for parts in buckets for part in parts}
    targets_left: dict[torch.nn.Module, int] = defaultdict(int)
    for target in targets:
        for holder in target.holders:
            targets_left[holder] += 1
    repack = {target.module: target for target in targets if target.repack}
    return DirectLoadPlan(buckets, region_bytes, dict(targets_left), repack), None


def sequential_layout(specs: list[list[list[Any]]]) -> tuple[list[list[int]], int]:
    """Offsets of each bucket's tensors one after another (aligned), and the largest bucket's size."""
    layouts, region_bytes = [], 0
    for bucket in specs:
        offsets, cursor = [], 0
        for _, dtype_name, shape in bucket:
            offsets.append(cursor)
            cursor = align_up(cursor + tensor_nbytes(DTYPES_BY_NAME[dtype_name], tuple(shape)))
        layouts.append(offsets)
        region_bytes = max(region_bytes, cursor)
    return layouts, region_bytes


class WeightLoaderExtension:
    """Worker mixin: load HF-named tensors into the running model (vLLM fuses q/k/v and gate/up)."""

    model_runner: Any  # provided by the vLLM worker this class is mixed into
    device: Any
    rank: int

    # -- bytes transport: shared region ----------------------------------------------------------

    def driftrl_begin_sync(self, specs: list[list[list[Any]]], allow_direct: bool = True) -> dict[str, Any]:
        """Choose direct or layer-wise loading for one sync and lay out the shared region.

        Args:
            specs: per bucket, ``[hf_name, dtype_name, shape]`` per tensor, in bucket order.
            allow_direct: False forces the layer-wise reload (tests compare both).

        Returns:
            ``mode`` ("direct" or "reload"), ``reason`` (why not direct, or None), ``offsets`` (per
            bucket, the region byte offset of each tensor) and ``region_bytes`` (size needed).
        """
        started = time.perf_counter()
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
        from vllm.platforms import current_platform

        model = self.model_runner.get_model()
        plan, reason = None, "disabled by the caller"
        if allow_direct:
            if get_tensor_model_parallel_world_size() > 1 or get_pp_group().world_size > 1:
                # sharded parameters: vLLM's weight loaders know how to slice them, a copy does not
                reason = "tensor or pipeline parallel engine"
            else:
                # zentorch may keep a reference to the weight it is given instead of packing a copy
                plan, reason = plan_direct_load(
                    model, specs, current_platform.is_cpu(), views_allowed=not current_platform.is_zen_cpu()
                )
        self._driftrl_plan = plan
        self._driftrl_stats: dict[str, Any] = {"copy_s": 0.0, "process_s": 0.0, "tensors": 0}
        if plan is None and allow_direct and not getattr(self, "_driftrl_warned", False):
            # a silently slower sync is what users of the peers' weight sync complain about
            logging.getLogger(__name__).warning(
                "weight sync: direct load not possible (%s); using vLLM's layer-wise reload", reason
            )
            self._driftrl_warned = True
        if plan is None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(model)
            offsets, region_bytes = sequential_layout(specs)
            self._driftrl_reload_layout = (specs, offsets)
        else:
            offsets = [[part.offset for part in parts] for parts in plan.buckets]
            region_bytes = plan.region_bytes
        self._driftrl_stats.update(mode="reload" if plan is None else "direct", reason=reason)
        self._driftrl_stats["begin_s"] = time.perf_counter() - started
        return {
            "mode": self._driftrl_stats["mode"],
            "reason": reason,
            "offsets": offsets,
            "region_bytes": region_bytes,
        }

    def _driftrl_region(self, region: list[Any]) -> torch.Tensor:
        """The shared region ``[path, size, generation]`` as a uint8 tensor (mapped once per generation)."""
        path, size, generation = region
        cached = getattr(self, "_driftrl_mapped", None)
        if cached is None or cached[0] != generation:
            fd = os.open(path, os.O_RDWR)
            try:
                mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            finally:
                os.close(fd)
            # the previous generation's mapping goes when no tensor views it any more
            cached = (generation, torch.frombuffer(mapped, dtype=torch.uint8))
            self._driftrl_mapped = cached
        return cached[1]

    def driftrl_load_shared(self, region: list[Any], bucket_index: int, base: int) -> int:
        """Load bucket ``bucket_index``, which lies at byte ``base`` of the shared region.

        Returns the number of tensors loaded. The region may be rewritten once this returns.
        """
        buffer = self._driftrl_region(region)[base:]
        plan = getattr(self, "_driftrl_plan", None)
        if plan is None:
            return self._driftrl_reload_bucket(buffer, bucket_index)
        parts = plan.buckets[bucket_index]
        for part in parts:
            self._driftrl_apply(plan, buffer, part)
        self._driftrl_stats["tensors"] += len(parts)
        return len(parts)

    def _driftrl_apply(self, plan: DirectLoadPlan, buffer: torch.Tensor, part: _Part) -> None:
        started = time.perf_counter()
        target = part.target
        if target.region_offset is None:
            source = buffer[part.offset : part.offset + tensor_nbytes(part.dtype, part.shape)]
            source = source.view(part.dtype).view(part.shape)
            if target.repack:
                if target.full is None:
                    target.full = self._driftrl_staging(target)
                destination = target.full
            else:
                destination = getattr(target.module, target.attr).data
            if part.shape:
                destination = destination.narrow(0, part.row_start, part.shape[0])
            destination.copy_(source)
        target.parts_left -= 1
        self._driftrl_stats["copy_s"] += time.perf_counter() - started
        if target.parts_left:
            return
        if target.region_offset is not None:
            nbytes = tensor_nbytes(target.dtype, target.shape)
            full = buffer[target.region_offset : target.region_offset + nbytes]
            target.full = full.view(target.dtype).view(target.shape)
        for holder in target.holders:
            plan.targets_left[holder] -= 1
            if plan.targets_left[holder] == 0:
                self._driftrl_process(plan, holder)
        if target.full is not None and target.region_offset is not None:
            # its module still waits for a part in a later bucket, which overwrites the region
            target.full = self._driftrl_staging(target).copy_(target.full)

    def _driftrl_staging(self, target: _Target) -> torch.Tensor:
        """A tensor of the target's shape, kept across syncs: fresh pages cost a page fault each.

        Reusing it is safe even where the GEMM dispatch keeps it as the layer's weight: the next
        sync writes the same layer's new values into it, with the engine paused.
        """
        cache = self.__dict__.setdefault("_driftrl_staging_cache", {})
        staging = cache.get((target.module, target.attr))
        if staging is None or staging.shape != target.shape or staging.dtype != target.dtype:
            staging = cache[(target.module, target.attr)] = torch.empty(target.shape, dtype=target.dtype)
        return staging

    def _driftrl_process(self, plan: DirectLoadPlan, module: torch.nn.Module) -> None:
        """Re-run the module's weight processing once all of its published parameters are in."""
        started = time.perf_counter()
        target = plan.repack.pop(module, None)
        if target is not None:
            module.weight = torch.nn.Parameter(target.full, requires_grad=False)
            target.full = None
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
        region = self._driftrl_mapped[1]
        region_start = region.data_ptr()
        region_end = region_start + region.numel()
        for name, param in module.named_parameters(recurse=False):
            # a GEMM fallback that keeps the weight as given would otherwise read the next bucket
            if param.numel() and region_start <= param.data_ptr() < region_end:
                setattr(module, name, torch.nn.Parameter(param.data.clone(), requires_grad=False))
        self._driftrl_stats["process_s"] += time.perf_counter() - started

    def _driftrl_reload_bucket(self, buffer: torch.Tensor, bucket_index: int) -> int:
        started = time.perf_counter()
        specs, offsets = self._driftrl_reload_layout
        weights = []
        for (name, dtype_name, shape), offset in zip(specs[bucket_index], offsets[bucket_index], strict=True):
            dtype = DTYPES_BY_NAME[dtype_name]
            view = buffer[offset : offset + tensor_nbytes(dtype, tuple(shape))].view(dtype).view(shape)
            # the layer-wise reload may hold a tensor until its layer is complete: copy it out of the region
            weights.append((name, view.clone()))
        # load_weights maps HF names onto vLLM's (possibly fused, possibly sharded) parameters, so
        # the learner publishes plain HF names and never needs vLLM's layout.
        self.model_runner.get_model().load_weights(weights=weights)
        self._driftrl_stats["copy_s"] += time.perf_counter() - started
        self._driftrl_stats["tensors"] += len(weights)
        return len(weights)

    def driftrl_finish_sync(self) -> dict[str, Any]:
        """End the sync (layer-wise: process what is still waiting); returns timings and counts."""
        started = time.perf_counter()
        plan = getattr(self, "_driftrl_plan", None)
        if plan is None:
            self.driftrl_finish_reload()
        else:
            waiting = [type(m).__name__ for m, left in plan.targets_left.items() if left]
            if waiting:
                raise RuntimeError(
                    f"direct weight load ended with {len(waiting)} modules incomplete: {waiting[:5]}"
                )
        self._driftrl_plan = None
        self._driftrl_stats["finish_s"] = time.perf_counter() - started
        return self._driftrl_stats

    def driftrl_export_weights(self) -> bytes:
        """The weights the engine computes with, HF-named, as safetensors bytes (tests, debugging).

        Fused parameters are split back into their HF parts; a CPU linear layer's weight is read
        back from its packed GEMM handle by multiplying the identity matrix (exact: one product per
        output), so a stale handle shows even where the parameter was updated. Small models only:
        the identity is ``in_features`` squared.
        """
        from safetensors.torch import save

        model = self.model_runner.get_model()
        packed = {k: v for k, v in getattr(model, "packed_modules_mapping", {}).items() if len(v) > 1}
        exported: dict[str, torch.Tensor] = {}
        for module_name, module in model.named_modules():
            for attr, param in module.named_parameters(recurse=False):
                value = param.data
                cpu_linear = getattr(module, "cpu_linear", None)
                if attr == "weight" and cpu_linear is not None:
                    in_features = getattr(module, "input_size_per_partition", None) or param.shape[1]
                    identity = torch.eye(in_features, dtype=param.dtype)
                    effective = cpu_linear(identity, param, None).t().contiguous()
                    if param.numel() and not torch.equal(effective, value):
                        raise RuntimeError(f"{module_name}: packed GEMM weight differs from its parameter")
                    value = effective
                parent, _, leaf = module_name.rpartition(".")
                sizes = getattr(module, "output_partition_sizes", None)
                if leaf in packed and sizes is not None and len(sizes) == len(packed[leaf]):
                    for shard, chunk in zip(packed[leaf], value.split(sizes), strict=True):
                        exported[f"{parent}.{shard}.{attr}"] = chunk.contiguous()
                else:
                    exported[f"{module_name}.{attr}"] = value.contiguous()
        return save(exported)

    # -- collective transport and the layer-wise reload it uses ------------------------------------

    def driftrl_begin_reload(self) -> None:
        """Put every layer in layer-wise reload mode (checkpoint-format parameters, deferred processing)."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())

    def driftrl_finish_reload(self) -> None:
        """Process layers still waiting for parts and restore untouched ones; ends reload mode."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model_runner.get_model(), self.model_runner.model_config)

    def _driftrl_peer(self, endpoint: list[Any], rank_offset: int) -> Any:
        """This worker's end of the collective transport (one per store endpoint, kept across syncs)."""
        from transports.collective import CollectivePeer

        peer = getattr(self, "_driftrl_collective", None)
        if peer is None or list(peer.endpoint) != [str(endpoint[0]), int(endpoint[1])]:
            peer = self._driftrl_collective = CollectivePeer(
                (endpoint[0], endpoint[1]), rank_offset + self.rank
            )
        return peer

    def driftrl_collective_join(self, endpoint: list[Any], rank_offset: int, timeout_s: float) -> int:
        """Join learner rank 0's pair group as engine rank ``rank_offset + tp_rank``; returns that rank."""
        peer = self._driftrl_peer(endpoint, rank_offset)
        if not peer.joined:
            peer.join(timeout_s)
        return peer.peer_rank

    def driftrl_collective_receive(
        self, endpoint: list[Any], rank_offset: int, min_version: int, timeout_s: float
    ) -> list[int]:
        """Receive streamed buckets until version ``min_version`` or newer is loaded (layer-wise reload).

        Returns ``[version loaded, tensors loaded]``.
        """
        model = self.model_runner.get_model()
        version, tensors = self._driftrl_peer(endpoint, rank_offset).receive(
            min_version,
            timeout_s,
            load=lambda weights: model.load_weights(weights=weights),
            begin=self.driftrl_begin_reload,
            finish=self.driftrl_finish_reload,
        )
        return [version, tensors]
