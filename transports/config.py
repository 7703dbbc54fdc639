"""Configuration of the weight transport (a sub-config of ``rollout``: both ends are built from it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from settings.base import StrictModel


class WeightSyncConfig(StrictModel):
    """How weights travel from the learner to the rollout engines."""

    transport: Literal["ray_bytes", "collective"] = Field(
        "ray_bytes",
        description="ray_bytes: buckets through the Ray object store (any node, any device). collective: a "
        "torch.distributed process group between learner rank 0 and every vLLM worker, NCCL on CUDA and "
        "gloo on CPU (transports/collective.py).",
    )
    bucket_bytes: int = Field(64 << 20, ge=1 << 10, le=1 << 34, description="Tensor bytes of one bucket.")
    timeout_s: float = Field(
        120.0,
        gt=0,
        le=86_400,
        description="Deadline of one sync (every collective runs under it); expiry is a clear error.",
    )
    in_flight: Literal["finish_old", "abort_resubmit"] = Field(
        "finish_old",
        description="Requests running at a sync: finish on the old weights (tagged by version spans) "
        "or abort and resubmit on the new ones.",
    )

    @field_validator("transport", mode="before")
    @classmethod
    def _renamed_nccl(cls, value: Any) -> Any:
        if value == "nccl":
            # NCCL is what `collective` uses on CUDA; a silent alias would also run gloo on CPU
            raise ValueError(
                "'nccl' is now 'collective' (NCCL between CUDA devices, gloo on CPU, same code): "
                "set rollout.weight_sync.transport=collective"
            )
        return value
