"""Methods mixed into every vLLM worker (``worker_extension_cls``) to load published weights.

vLLM adds this class to the bases of its worker (``CPUWorker``, ``GPUWorker``), so ``self`` here is
the worker that owns ``self.model_runner``; the engine calls these methods through
``collective_rpc(method, args=...)`` on every tensor-parallel rank at once, between engine steps
(the rollout worker pauses the scheduler first).

A sync is ``driftrl_begin_reload()``, one call per bucket, then ``driftrl_finish_reload()``. Plain
``model.load_weights`` is not enough: on CPU, ``process_weights_after_loading`` packs every linear
weight into a oneDNN/sgl handle and replaces the parameter by an empty one (no ``weight_loader``),
so a second load fails. vLLM's layer-wise reload (``model_executor/model_loader/reload``) restores
each layer's checkpoint-format parameters, buffers incoming weights, and re-runs the layer's
processing once all of its parts have arrived; a fused layer (q/k/v -> qkv_proj) may therefore be
split across buckets. Between begin and finish the model is partly restored, so the engine must be
paused, and a sync that fails midway leaves it unusable: the rollout worker then refuses to
generate (the driver restarts the actor, which loads the newest weights from scratch).

Bucket entry points, one per transport of :mod:`actors.weight_sync`:

* ``driftrl_load_safetensors(blob)``: one bucket of safetensors bytes. The engine core runs in
  another process and serialises RPC arguments with msgpack, which carries ``bytes`` as they are
  but turns tensors into nested lists, so bytes are the wire format (STACK.md, "escape hatch").
* ``driftrl_init_nccl`` / ``driftrl_receive_nccl_bucket``: a process group of its own
  (``StatelessProcessGroup`` + ``PyNcclCommunicator``) between the learner's rank 0 and every
  engine rank, so it never touches vLLM's own tensor-parallel groups. CUDA only; untested here.

Kept free of driftrl imports beyond the standard library and torch: this module is imported inside
vLLM's worker processes.
"""

from __future__ import annotations

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


class WeightLoaderExtension:
    """Worker mixin: load HF-named tensors into the running model (vLLM fuses q/k/v and gate/up)."""

    model_runner: Any  # provided by the vLLM worker this class is mixed into
    device: Any
    rank: int

    def driftrl_begin_reload(self) -> None:
        """Put every layer in layer-wise reload mode (checkpoint-format parameters, deferred processing)."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())

    def driftrl_load_safetensors(self, blob: bytes) -> int:
        """Load one safetensors bucket; returns the number of tensors loaded."""
        from safetensors.torch import load

        tensors = load(blob)
        # load_weights maps HF names onto vLLM's (possibly fused, possibly sharded) parameters, so
        # the learner publishes plain HF names and never needs vLLM's layout.
        self.model_runner.get_model().load_weights(weights=list(tensors.items()))
        return len(tensors)

    def driftrl_payload_nbytes(self, blob: bytes) -> int:
        """Receive a payload and load nothing: benchmarks/rollout.py times the RPC hop with it."""
        return len(blob)

    def driftrl_finish_reload(self) -> None:
        """Process layers still waiting for parts and restore untouched ones; ends reload mode."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model_runner.get_model(), self.model_runner.model_config)

    def driftrl_init_nccl(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int
    ) -> int:
        """Join the weight-broadcast group as rank ``rank_offset + tp_rank``; learner rank 0 sends."""
        if not torch.cuda.is_available():
            raise RuntimeError("the nccl weight transport needs CUDA GPUs in the vLLM worker; use ray_bytes")
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(
            host=master_address, port=master_port, rank=rank_offset + self.rank, world_size=world_size
        )
        self._driftrl_nccl = PyNcclCommunicator(group, device=self.device)
        return rank_offset + self.rank

    def driftrl_receive_nccl_bucket(self, specs: list[list[Any]], total_bytes: int) -> int:
        """Receive one flat bucket broadcast from rank 0 and load it.

        Args:
            specs: ``[name, dtype_name, shape, byte_offset]`` per tensor, in bucket order.
            total_bytes: size of the flat uint8 buffer the sender broadcasts.
        """
        comm = getattr(self, "_driftrl_nccl", None)
        if comm is None:
            raise RuntimeError("driftrl_init_nccl was not called on this worker before a bucket arrived")
        flat = torch.empty(total_bytes, dtype=torch.uint8, device=self.device)
        comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
        weights = []
        for name, dtype_name, shape, offset in specs:
            dtype = DTYPES_BY_NAME[dtype_name]
            numel = 1
            for dim in shape:
                numel *= dim
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            weights.append((name, flat[offset : offset + nbytes].view(dtype).view(shape)))
        self.model_runner.get_model().load_weights(weights=weights)
        return len(weights)
