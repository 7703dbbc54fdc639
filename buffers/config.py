"""Configuration of the replay buffer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from driftrl.config_base import StrictModel


class BufferConfig(StrictModel):
    """Replay buffer between rollout actors and the learner."""

    capacity_groups: int = Field(
        256, ge=1, le=10_000_000, description="Most unacknowledged groups held at once (available + leased)."
    )
    when_full: Literal["block", "reject"] = Field(
        "block", description="push() on a full buffer: wait for room (up to push_timeout_s) or answer 'full'."
    )
    push_timeout_s: float = Field(
        60.0, gt=0, le=86_400, description="Longest a blocking push waits for room."
    )
    order: Literal["fifo", "freshest"] = Field(
        "fifo", description="Sampling order: oldest first, or newest policy version first."
    )
    uri: str | None = Field(
        None,
        description="Where segments and the ack log live (local path or fsspec/pyarrow URI such as "
        "s3://bucket/run/buffer). None = <run_dir>/buffer.",
    )
    segment_rows: int = Field(
        4096, ge=1, le=10_000_000,
        description="Most rows in one segment written by compaction (a group is never split).",
    )
    compact_min_files: int = Field(
        16, ge=2, le=100_000,
        description="Merge the per-push files into segments once this many of them hold live rows.",
    )
    retire_log_compact_files: int = Field(
        64, ge=2, le=100_000,
        description="Rewrite the ack/eviction log as one file once it has this many files.",
    )
    fsync: bool = Field(
        True,
        description="Local directories: fsync each file and its directory, so writes survive power loss "
        "(a killed process loses nothing either way).",
    )
    lease_timeout_s: float | None = Field(
        None, gt=0, le=7 * 86_400,
        description="Return leased groups to the buffer after this long without an ack; None = only when "
        "the driver calls requeue_leased() (a learner restart). Must exceed the learner's checkpoint "
        "interval, or rows are trained twice.",
    )
