"""The checkpoint commit protocol: when a checkpoint counts, and where a resume starts.

A checkpoint at step ``n`` is written in this order, each part atomically (a temporary name, then a
rename), and counts only once its commit marker exists::

    1. checkpoints/step_<n>/            learner state (DeepSpeed + state.json), by the learner ranks
    2. trained/step_<n>.json            the row ids trained since the previous checkpoint, per step
                                        (the ack position: exactly the rows this checkpoint acks)
    3. checkpoints/step_<n>/driver.json driver state (step, version, counters, probe)
    4. the buffer acks the rows of 2    they never come back
    5. checkpoints/step_<n>/commit.json the commit marker, last

A crash before 3 leaves a checkpoint without driver state: it is skipped, and the resume starts from
the previous committed checkpoint, whose unacked rows the buffer hands out again (they were never
acked). A crash between 3 and 5 leaves learner and driver state whole but maybe acked rows: skipping
it would lose those rows, so the resume completes it instead (the ack is replayed, idempotent, then
the marker is written). Either way every row's effect is in the resumed model exactly once, and
``trained/`` past the resume step is removed, so ``trained/`` is the run's history of trained rows.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driftrl.run_dir import RunDir, write_atomic

DRIVER_STATE_FILE = "driver.json"
COMMIT_FILE = "commit.json"
TRAINED_DIR = "trained"
# the protocol's points, in order; a hook is called after each (crash tests raise there)
POINTS = ("learner_saved", "trained_written", "driver_state_written", "acked", "committed")
_STEP_NAME = re.compile(r"^step_(\d+)(\.json)?$")


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run starts.

    Attributes:
        step: the checkpoint's step.
        path: its folder.
        driver_state: its ``driver.json``.
        completed: the crash came after its driver state: the resume replayed its ack and committed it.
        skipped: newer checkpoint folders without driver state (incomplete), removed.
    """

    step: int
    path: Path
    driver_state: dict[str, Any]
    completed: bool = False
    skipped: list[int] = field(default_factory=list)

    def describe(self) -> str:
        how = " (left uncommitted by the crash; its ack replayed and committed now)" if self.completed else ""
        skipped = (
            f"; skipped incomplete checkpoint(s) at step {', '.join(map(str, self.skipped))}"
            if self.skipped
            else ""
        )
        return f"resuming from checkpoint step {self.step} at {self.path}{how}{skipped}"


def trained_dir(run: RunDir) -> Path:
    return run.root / TRAINED_DIR


def _steps_in(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STEP_NAME.match(p.name)))


def committed_steps(run: RunDir) -> list[int]:
    """Steps of the committed checkpoints, oldest first."""
    return [s for s in _steps_in(run.checkpoints) if (run.checkpoint(s) / COMMIT_FILE).is_file()]


def trained_history(run: RunDir) -> dict[int, list[str]]:
    """``{step: row ids trained at that step}`` over every checkpoint interval kept in ``trained/``."""
    history: dict[int, list[str]] = {}
    for step in _steps_in(trained_dir(run)):
        record = json.loads((trained_dir(run) / f"step_{step}.json").read_text())
        history.update({int(k): list(v) for k, v in record["rows_by_step"].items()})
    return history


class CheckpointWriter:
    """Writes checkpoints in the protocol's order (module docstring) and prunes old ones.

    Args:
        run: the run directory.
        save_learner: writes the learner state to the given folder (all ranks, atomically).
        ack: acknowledges row ids in the buffer (idempotent).
        keep: committed checkpoints kept; older ones are deleted after each commit.
        hook: called with ``(point, step)`` after each point of :data:`POINTS` (crash tests).
    """

    def __init__(
        self,
        run: RunDir,
        save_learner: Callable[[Path], object],
        ack: Callable[[list[str]], object],
        keep: int = 2,
        hook: Callable[[str, int], None] | None = None,
    ) -> None:
        self.run = run
        self.save_learner = save_learner
        self.ack = ack
        self.keep = keep
        self.hook = hook

    def _point(self, point: str, step: int) -> None:
        if self.hook is not None:
            self.hook(point, step)

    def write(self, step: int, driver_state: dict[str, Any], rows_by_step: dict[int, Sequence[str]]) -> int:
        """Checkpoint step ``step``; ``rows_by_step`` = the rows trained since the previous checkpoint.

        Returns the rows acknowledged (the length of ``rows_by_step`` flattened).
        """
        path = self.run.checkpoint(step)
        self.save_learner(path)
        self._point("learner_saved", step)
        trained_dir(self.run).mkdir(parents=True, exist_ok=True)
        record = {"step": step, "rows_by_step": {str(k): list(v) for k, v in sorted(rows_by_step.items())}}
        write_atomic(trained_dir(self.run) / f"step_{step}.json", json.dumps(record) + "\n")
        self._point("trained_written", step)
        write_atomic(path / DRIVER_STATE_FILE, json.dumps(driver_state, indent=1) + "\n")
        self._point("driver_state_written", step)
        rows = self._ack_and_commit(step)
        self.prune()
        return rows

    def _ack_and_commit(self, step: int) -> int:
        record = json.loads((trained_dir(self.run) / f"step_{step}.json").read_text())
        ids = [i for rows in record["rows_by_step"].values() for i in rows]
        if ids:
            self.ack(ids)
        self._point("acked", step)
        write_atomic(
            self.run.checkpoint(step) / COMMIT_FILE, json.dumps({"step": step, "rows_acked": len(ids)}) + "\n"
        )
        self._point("committed", step)
        return len(ids)

    def prune(self) -> None:
        """Delete committed checkpoints past the newest ``keep`` (never ``trained/``: it is the history)."""
        for step in committed_steps(self.run)[: -self.keep]:
            shutil.rmtree(self.run.checkpoint(step), ignore_errors=True)

    def resume_point(self) -> ResumePoint | None:
        """The newest complete checkpoint, completing one a crash left between driver state and commit.

        Newer checkpoint folders without driver state and ``trained/`` records past the chosen step
        are removed, so the resumed run writes those steps afresh. None: nothing to resume from.
        """
        skipped: list[int] = []
        for step in reversed(_steps_in(self.run.checkpoints)):
            path = self.run.checkpoint(step)
            state_file = path / DRIVER_STATE_FILE
            if not state_file.is_file() or not (trained_dir(self.run) / f"step_{step}.json").is_file():
                skipped.append(step)
                continue
            completed = not (path / COMMIT_FILE).is_file()
            if completed:
                self._ack_and_commit(step)
            for stale in skipped:
                shutil.rmtree(self.run.checkpoint(stale), ignore_errors=True)
            for later in _steps_in(trained_dir(self.run)):
                if later > step:
                    (trained_dir(self.run) / f"step_{later}.json").unlink()
            return ResumePoint(step, path, json.loads(state_file.read_text()), completed, sorted(skipped))
        return None
