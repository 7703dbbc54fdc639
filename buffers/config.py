"""Configuration of the replay buffer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from driftrl.config_base import StrictModel


class BufferConfig(StrictModel):
    """Replay buffer between rollout actors and the learner."""

    capacity_groups: int = Field(256, ge=1, description="Most unacknowledged groups held at once.")
    when_full: Literal["block", "reject"] = Field(
        "block", description="push() on a full buffer: wait for room (up to push_timeout_s) or answer 'full'."
    )
    push_timeout_s: float = Field(60.0, gt=0, description="Longest a blocking push waits for room.")
    order: Literal["fifo", "freshest"] = Field(
        "fifo", description="Sampling order: oldest first, or newest policy version first."
    )
    uri: str | None = Field(
        None,
        description="Where segments and the ack log live (local path or fsspec/pyarrow URI such as "
        "s3://bucket/run/buffer). None = <run_dir>/buffer.",
    )
    segment_rows: int = Field(4096, ge=1, description="Rows per IPC segment before a new one is started.")
