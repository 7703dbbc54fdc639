"""The Ray shell: a rollout actor killed with SIGKILL is restarted by Ray, catches up to the newest
published weights and resumes its prompt cursor."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.config import RewardConfig, RolloutConfig
from actors.prompts import PromptSpec
from actors.rollout import launch_rollout_actors
from tasks.tiny_model import make_tiny_model
from transports.base import launch_weight_board
from transports.ray_bytes import BytesWeightPublisher

pytestmark = pytest.mark.slow

GROUP_SIZE = 2


class TableCollector:
    """Buffer stand-in run as a Ray actor: keeps pushed tables (the real buffer has its own tests)."""

    def __init__(self) -> None:
        self.tables: list[pa.Table] = []

    def push(self, table: pa.Table) -> int:
        self.tables.append(table)
        return table.num_rows

    def rows_since(self, index: int) -> tuple[int, pa.Table | None]:
        fresh = self.tables[index:]
        return len(self.tables), pa.concat_tables(fresh) if fresh else None


def kill_and_wait_for_restart(ray: Any, actor: Any, pid: int, timeout_s: float = 300) -> dict[str, Any]:
    """SIGKILL the actor's process (``pid``, created by this test); the restarted process's stats."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stats = ray.get(actor.stats.remote(), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(1)
            continue
        if stats["pid"] != pid:
            return stats
        time.sleep(1)  # the old process still answers: its death is not seen yet
    raise AssertionError(f"the actor did not come back within {timeout_s:.0f} s of SIGKILL")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_killed_actor_restarts_with_latest_weights_and_cursor(ray_session, tmp_path: Path) -> None:
    ray = ray_session
    model_dir = make_tiny_model(tmp_path / "model", seed=0)
    rows = [
        {"prompt_id": f"p{i}", "prompt": f"{w}=", "answer": w[::-1]}
        for i, w in enumerate(["abc", "de", "fgh", "ij", "klm", "no"] * 5)
    ]
    data = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    cfg = RolloutConfig(
        group_size=GROUP_SIZE,
        prompts_per_request=2,
        max_tokens=6,
        max_model_len=64,
        max_restarts=2,
        reward=RewardConfig(type="partial_match"),
    )
    collector = ray.remote(num_cpus=0)(TableCollector).remote()
    board = launch_weight_board()
    run_dir = tmp_path / "run"
    (actor,) = launch_rollout_actors(
        cfg, str(model_dir), PromptSpec(path=str(data)), collector, run_dir=str(run_dir), weight_board=board
    )
    assert ray.get(actor.run.remote(max_groups=3), timeout=300) >= 3

    # Publish version 1 through the object store and the board, as the learner would.
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.01)
    publisher = BytesWeightPublisher(cfg.weight_sync.bucket_bytes)
    manifest = publisher.publish(1, model.named_parameters())
    ray.get(board.post.remote(manifest))
    assert ray.get(actor.update_weights.remote(manifest), timeout=120) > 0
    assert ray.get(actor.run.remote(max_groups=2), timeout=300) >= 2

    cursor_file = run_dir / "rollout" / "prompt_cursor_0.json"
    committed = json.loads(cursor_file.read_text())["position"]
    assert committed >= 5
    seen_tables, _ = ray.get(collector.rows_since.remote(0))

    old_pid = ray.get(actor.pid.remote())
    stats = kill_and_wait_for_restart(ray, actor, old_pid)
    new_pid = stats["pid"]
    assert stats["weight_version"] == 1  # caught up from the board before generating
    assert stats["prompt_cursor"]["position"] == committed  # resumed, not restarted from 0
    assert ray.get(actor.run.remote(max_groups=2), timeout=300) >= 2
    _, fresh = ray.get(collector.rows_since.remote(seen_tables))
    assert fresh is not None and fresh.num_rows >= 2 * GROUP_SIZE
    assert set(fresh["version_start"].to_pylist()) == {1}

    # a restart whose catch-up fails (the board's newest version cannot be loaded here): the actor
    # stays up and reports itself broken, for the driver to restart counted, instead of a failed
    # constructor that Ray would never restart
    from dataclasses import replace

    from transports.base import WeightSyncError

    ray.get(
        board.post.remote(replace(manifest, version=2, transport="collective", endpoint=("127.0.0.1", 1)))
    )
    stats = kill_and_wait_for_restart(ray, actor, new_pid)
    assert stats["broken"] is not None and "catch-up from the weight board failed" in stats["broken"]
    assert "'collective'" in stats["broken"] and stats["weight_version"] == 0
    with pytest.raises(WeightSyncError, match=r"rollout-0 cannot generate: catch-up from the weight board"):
        ray.get(actor.generate_step.remote(), timeout=60)
    ray.kill(actor)  # the actor this test created
