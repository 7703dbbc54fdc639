"""The failure matrix of DESIGN.md exercised through the real pipeline (slow: each run starts vLLM)."""

from __future__ import annotations

import os
import signal
import time

import pyarrow.parquet as pq
import pytest
import ray

from driftrl.pipeline import PipelineError, train
from tests.pipeline.conftest import tiny_config

pytestmark = pytest.mark.slow


def small_run(tiny_inputs, tmp_path, name, *overrides):
    """A few steps of 4 groups x 4 responses under ``tmp_path/runs/<name>``."""
    return tiny_config(
        tiny_inputs,
        tmp_path / "runs",
        f"run.name={name}",
        "learner.groups_per_step=4",
        "rollout.group_size=4",
        *overrides,
    )


def test_rollout_actor_sigkill_restarts_resyncs_and_run_finishes(tiny_inputs, tmp_path):
    cfg = small_run(
        tiny_inputs, tmp_path, "kill-rollout", "learner.total_steps=8", "learner.checkpoint_interval=4"
    )
    seen: dict[str, int] = {}

    def on_step(driver, row):
        if int(row["step"]) == 3 and "pid" not in seen:
            pid = ray.get(driver.actors[0].pid.remote())
            os.kill(pid, signal.SIGKILL)
            seen.update(pid=pid, version=driver.version)
        if int(row["step"]) == 7:
            # the only actor produced steps 4..7, so it is back: a new process on the new weights
            seen.update(
                pid_after=ray.get(driver.actors[0].pid.remote()),
                version_after=ray.get(driver.actors[0].stats.remote())["weight_version"],
            )

    result = train(cfg, progress=False, on_step=on_step)
    assert result.steps == 8
    assert result.rollout_restarts >= 1
    assert seen["pid_after"] != seen["pid"]
    assert seen["version_after"] > seen["version"]  # re-synced from the board and kept syncing
    rows = pq.read_table(result.run_dir / "metrics.parquet").to_pylist()
    assert all(r["staleness_count_over"] == 0 for r in rows)
    stats = result.buffer_stats
    assert stats["rows_leased"] == 0 and stats["ack_already_retired"] == 0


def test_learner_killed_then_resume_finishes_and_acks_every_row_once(tiny_inputs, tmp_path):
    cfg = small_run(
        tiny_inputs, tmp_path, "kill-learner", "learner.total_steps=6", "learner.checkpoint_interval=3"
    )

    def on_step(driver, row):
        if int(row["step"]) == 4:
            pid = ray.get(driver.learners.actors[0].pid.remote())
            os.kill(pid, signal.SIGKILL)

    with pytest.raises(PipelineError, match="--resume"):
        train(cfg, progress=False, on_step=on_step)
    run_dir = tmp_path / "runs" / "kill-learner"
    assert (run_dir / "checkpoints" / "step_3" / "commit.json").is_file()

    result = train(cfg, resume=run_dir, progress=False)
    assert result.steps == 6
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == list(range(1, 7))
    trained_kept = sum(int(r["responses"]) for r in rows)
    stats = result.buffer_stats
    # steps 1-3 were acked before the crash; step 4's rows went back to the buffer and were trained
    # again after the resume: every row of the kept steps is acked exactly once, none stays leased
    assert result.rows_acked_by_driver == trained_kept == stats["acked"]
    assert stats["rows_leased"] == 0 and stats["ack_already_retired"] == 0


def test_weight_sync_that_cannot_finish_is_a_clear_error_not_a_hang(tiny_inputs, tmp_path):
    cfg = small_run(
        tiny_inputs,
        tmp_path,
        "sync-timeout",
        "learner.total_steps=4",
        "learner.groups_per_step=2",
        "rollout.max_restarts=1",
        # no receiver can load a bucket this fast: every sync times out inside the actor
        "rollout.weight_sync.timeout_s=0.000001",
    )
    started = time.monotonic()
    with pytest.raises(PipelineError, match="weight|restart") as info:
        train(cfg, progress=False)
    assert time.monotonic() - started < 600
    assert "rollout actor 0" in str(info.value)
