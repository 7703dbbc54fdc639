"""The checkpoint commit protocol (driftrl/checkpoints.py): a crash at any point of it, then a resume,
trains every row exactly once, audited by row id against a real ReplayBuffer on disk.

The learner here is a stand-in whose whole state is the list of row ids whose effect it holds (what a
model holds, made countable); it saves and loads that state atomically the way the engine does. The
buffer is the real one, rebuilt from its files at every resume as after a driver crash.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from buffers.config import BufferConfig
from buffers.replay import ReplayBuffer
from buffers.schema import records_to_table
from driftrl.checkpoints import POINTS, CheckpointWriter, committed_steps, trained_history
from driftrl.run_dir import RunDir
from tests.buffers.conftest import group_records

GROUPS_PER_STEP = 2
GROUP_SIZE = 3
TOTAL_STEPS = 6
INTERVAL = 2


class Crash(Exception):
    """Stands for the process dying at a point of the protocol."""


class CountingLearner:
    """A learner whose state is the ids of the rows it trained on, in order."""

    def __init__(self, trained: list[str] | None = None) -> None:
        self.trained = list(trained or [])

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "state.json").write_text(json.dumps(self.trained))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)

    @classmethod
    def load(cls, path: Path) -> CountingLearner:
        return cls(json.loads((path / "state.json").read_text()))


def fill_buffer(uri: Path) -> list[str]:
    """Exactly the rows of TOTAL_STEPS steps; returns their ids."""
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(BufferConfig(capacity_groups=64), str(uri))
    records = [
        r for g in range(TOTAL_STEPS * GROUPS_PER_STEP) for r in group_records(f"g{g}", GROUP_SIZE, 0, rng)
    ]
    assert buffer.push(records_to_table(records)).accepted == len(records)
    return [r["traj_id"] for r in records]


def train_until_done_or_crash(run: RunDir, uri: Path, crash_at: set[tuple[str, int]], resume: bool):
    """One driver process: (resume and) train to TOTAL_STEPS, checkpointing every INTERVAL steps.

    Returns ``(learner, resume point)``; raises :class:`Crash` at the first ``(point, step)`` in
    ``crash_at`` (which it removes, so the next process gets past it).
    """
    buffer = ReplayBuffer(BufferConfig(capacity_groups=64), str(uri))

    def hook(point: str, step: int) -> None:
        if (point, step) in crash_at:
            crash_at.discard((point, step))
            raise Crash(point, step)

    learner = CountingLearner()
    writer = CheckpointWriter(run, save_learner=lambda p: learner.save(p), ack=buffer.ack, hook=hook)
    step, point = 0, None
    if resume:
        point = writer.resume_point()
        assert point is not None
        learner = CountingLearner.load(point.path)
        step = point.driver_state["step"]
    unacked: dict[int, list[str]] = {}
    while step < TOTAL_STEPS:
        table = buffer.sample(GROUPS_PER_STEP, learner_version=0)
        assert table.num_rows == GROUPS_PER_STEP * GROUP_SIZE
        step += 1
        unacked[step] = table.column("traj_id").to_pylist()
        learner.trained += unacked[step]
        if step % INTERVAL == 0:
            writer.write(step, {"step": step}, unacked)
            unacked = {}
    return learner, point, buffer


def run_with_crashes(tmp_path: Path, crash_at: set[tuple[str, int]]):
    run, uri = RunDir(tmp_path / "run"), tmp_path / "buffer"
    run.checkpoints.mkdir(parents=True)
    pushed = fill_buffer(uri)
    points, resume = [], False
    while True:
        try:
            learner, point, buffer = train_until_done_or_crash(run, uri, crash_at, resume)
            points.append(point)
            break
        except Crash:
            resume = True
    return run, pushed, learner, buffer


def audit(run: RunDir, pushed: list[str], learner: CountingLearner, buffer: ReplayBuffer) -> None:
    # the final model holds every pushed row exactly once: none lost, none twice
    assert sorted(learner.trained) == sorted(pushed)
    assert len(set(learner.trained)) == len(learner.trained)
    # the run's history of trained rows says the same, step by step
    history = trained_history(run)
    assert sorted(history) == list(range(1, TOTAL_STEPS + 1))
    assert sorted(i for ids in history.values() for i in ids) == sorted(pushed)
    stats = buffer.stats()
    assert stats["acked"] == len(pushed) and stats["rows_leased"] == 0 and stats["rows_available"] == 0


@pytest.mark.parametrize("point", POINTS)
def test_a_crash_at_each_point_of_the_protocol_then_resume_trains_every_row_once(tmp_path, point):
    crash_step = 4  # the second checkpoint: there is a committed one (step 2) to fall back to
    run, pushed, learner, buffer = run_with_crashes(tmp_path, {(point, crash_step)})
    audit(run, pushed, learner, buffer)
    assert committed_steps(run) == [4, 6]


def test_resume_says_which_checkpoint_and_completes_one_left_between_driver_state_and_commit(tmp_path):
    run, uri = RunDir(tmp_path / "run"), tmp_path / "buffer"
    run.checkpoints.mkdir(parents=True)
    fill_buffer(uri)
    with pytest.raises(Crash):
        train_until_done_or_crash(run, uri, {("acked", 4)}, resume=False)
    # the old order's failure: the newest learner checkpoint lacks what a resume needs
    assert not (run.checkpoint(4) / "commit.json").exists()
    buffer = ReplayBuffer(BufferConfig(capacity_groups=64), str(uri))
    point = CheckpointWriter(run, save_learner=lambda p: None, ack=buffer.ack).resume_point()
    assert (point.step, point.completed) == (4, True)
    assert "checkpoint step 4" in point.describe() and "replayed" in point.describe()
    # the replayed ack found its rows retired already: idempotent, nothing acked twice
    assert buffer.stats()["ack_already_retired"] == INTERVAL * GROUPS_PER_STEP * GROUP_SIZE

    with pytest.raises(Crash):
        train_until_done_or_crash(run, uri, {("learner_saved", 6)}, resume=True)
    point = CheckpointWriter(run, save_learner=lambda p: None, ack=buffer.ack).resume_point()
    assert (point.step, point.completed, point.skipped) == (4, False, [6])
    assert not run.checkpoint(6).exists()  # the incomplete one is gone; the resumed run rewrites it


def test_seeded_crashes_at_random_points_of_every_checkpoint(tmp_path):
    rng = np.random.default_rng(7)
    crash_at = {(str(rng.choice(POINTS)), step) for step in range(INTERVAL, TOTAL_STEPS + 1, INTERVAL)}
    run, pushed, learner, buffer = run_with_crashes(tmp_path, set(crash_at))
    audit(run, pushed, learner, buffer)
