"""The sync/probe/checkpoint lane's order after each trained step, against a driver stand-in that
records what it is asked (no Ray: with ``wait=True`` the lane only calls the driver)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from driftrl.lanes import SyncLane, TrainingLane


class RecordingDriver:
    def __init__(self, total: int, sync_interval: int, checkpoint_interval: int) -> None:
        learner = SimpleNamespace(
            total_steps=total, sync_interval=sync_interval, checkpoint_interval=checkpoint_interval
        )
        self.cfg = SimpleNamespace(learner=learner)
        self.step = 0
        self.version = 0
        self.calls: list[Any] = []

    def _start_sync(self) -> tuple[Any, list[str]]:
        self.version += 1
        self.calls.append(("start_sync", self.version))
        return SimpleNamespace(version=self.version, refs={}), [f"probe-ref-{self.step}"]

    def _finish_sync(self, sync: Any, wait: bool) -> bool:
        self.calls.append(("finish_sync", sync.version))
        return True

    def _take_predicted(self) -> float:
        self.calls.append(("take_predicted", self.step))
        return float(self.step)

    def _learner_get(self, refs: list[str], what: str, started: float | None = None) -> list[float]:
        self.calls.append(("get", what))
        return [0.5]

    def _record_probe(self, probe: float, row: dict[str, float], predicted: float) -> None:
        self.calls.append(("record_probe", int(row["step"]), predicted))

    def _append_row(self, row: dict[str, float], bar: Any) -> None:
        self.calls.append(("row", int(row["step"])))

    def _checkpoint(self) -> None:
        self.calls.append(("checkpoint", self.step))


def test_each_probe_is_recorded_before_the_next_sync_and_before_a_checkpoint() -> None:
    driver = RecordingDriver(total=5, sync_interval=2, checkpoint_interval=4)
    lane = SyncLane(driver, bar=None)  # type: ignore[arg-type]
    for step in range(1, 6):
        driver.step = step
        lane.after_step({"step": float(step)})
    lane.drain()
    assert driver.calls == [
        ("row", 1),
        ("start_sync", 1),
        ("take_predicted", 2),  # the pair's prediction is taken when its probe is queued
        ("row", 3),
        # step 4: the step-2 probe first (realised ΔH between consecutive syncs), then the sync
        ("get", "probe_entropy after step 2"),
        ("record_probe", 2, 2.0),
        ("row", 2),
        ("finish_sync", 1),
        ("start_sync", 2),
        ("take_predicted", 4),
        # a checkpoint step: its probe is recorded before the checkpoint is written
        ("get", "probe_entropy after step 4"),
        ("record_probe", 4, 4.0),
        ("row", 4),
        ("checkpoint", 4),
        # the last step syncs and checkpoints whatever the intervals
        ("finish_sync", 2),
        ("start_sync", 3),
        ("take_predicted", 5),
        ("get", "probe_entropy after step 5"),
        ("record_probe", 5, 5.0),
        ("row", 5),
        ("checkpoint", 5),
        ("finish_sync", 3),  # drain: the run ends with its last sync finished
    ]
    assert not lane.busy and lane.pending_probe is None


def test_the_next_step_samples_for_the_version_it_will_train_under() -> None:
    driver = RecordingDriver(total=4, sync_interval=2, checkpoint_interval=4)
    lane = TrainingLane(driver)  # type: ignore[arg-type]
    assert lane.version_of_next_step() == 0  # nothing training: the current version
    lane.train_refs = ["step-1"]  # step 1 trains; step 2 (a sync step) follows it
    assert lane.version_of_next_step() == 0
    driver.step = 1  # step 2 trains: its end publishes version 1 before step 3 runs
    assert lane.version_of_next_step() == 1
