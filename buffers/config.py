"""Configuration of the replay buffer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from settings.base import StrictModel


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
        description="Merge the small per-push files (compact_below_bytes) into segments once this many "
        "of them hold live rows.",
    )
    compact_below_bytes: int = Field(
        256 * 1024, ge=0, le=1 << 40,
        description="Only per-push files holding fewer bytes of rows than this are merged into segments; "
        "a larger push is already a file worth its open/list cost, and merging it would write its bytes "
        "twice. 0 = never compact.",
    )
    retire_log_compact_files: int = Field(
        64, ge=2, le=100_000,
        description="Rewrite the ack/eviction log as one file once it has this many files.",
    )
    # Default off: DESIGN.md's failure matrix asks that a dead buffer *process* lose nothing, and a
    # completed write + rename already survives that (the kernel holds the bytes). fsync adds
    # survival of a power loss or kernel crash of the machine, for two flushes per push and per ack
    # (file + directory) and a slower delete of each flushed file. Plain class, 128 rows of 1k
    # tokens per push, 2-core ext4 VM, quiet disk: push 1.8 -> 2.9 ms, an ack deleting 32 files
    # 7 -> 19 ms; one flush took 1-126 ms while other jobs wrote to the same disk. driftrl does not
    # flush DeepSpeed's checkpoint files either, so the buffer alone cannot make a run survive a
    # power loss.
    fsync: bool = Field(
        False,
        description="Local directories: fsync each file and its directory before push/ack return, so "
        "accepted pushes and acks also survive a power loss or kernel crash. Off, they survive a "
        "killed or crashed process (what the failure matrix asks), not a machine failure.",
    )
    lease_timeout_s: float | None = Field(
        None, gt=0, le=7 * 86_400,
        description="Return leased groups to the buffer after this long without an ack; None = only when "
        "the driver calls requeue_leased() (a learner restart). Must exceed the learner's checkpoint "
        "interval, or rows are trained twice.",
    )
