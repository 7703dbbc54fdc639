"""Chaos: one tiny run whose buffer, rollout actor and learner are each SIGKILLed at seeded random points.

The run is audited by row id afterwards, from its run directory alone (slow: every segment starts
vLLM and DeepSpeed, every rollout restart starts vLLM again).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import ray
from ray.exceptions import RayActorError

from driftrl.checkpoints import committed_steps, trained_history
from driftrl.pipeline import PipelineError, start_local_ray, train
from driftrl.run_dir import RunDir
from tests.pipeline.conftest import tiny_config

pytestmark = pytest.mark.slow

SEED = 15
TOTAL_STEPS = 10
CHECKPOINT_INTERVAL = 2
GROUPS_PER_STEP = 2
GROUP_SIZE = 4
LEARNER_KILLS = 2  # each ends a segment; the run is resumed after each
KILL_DELAY_S = (0.0, 0.6)  # after the step's metrics row: lands mid-step, mid-sync or mid-checkpoint
REDELIVERED = "buffer_redelivered_rows_total"  # the driver's count of rows a restarted buffer sent again


class Killer:
    """SIGKILLs processes after a delay from a timer thread and records the kills that landed."""

    def __init__(self) -> None:
        self.landed: list[tuple[str, int]] = []
        self.timers: list[threading.Timer] = []

    def later(self, kind: str, pid: int, delay_s: float) -> None:
        def kill() -> None:
            try:
                os.kill(pid, signal.SIGKILL)
                self.landed.append((kind, pid))
            except ProcessLookupError:  # gone already (its segment ended first): not counted
                pass

        timer = threading.Timer(delay_s, kill)
        timer.start()
        self.timers.append(timer)

    def in_flight(self) -> bool:
        return any(t.is_alive() for t in self.timers)

    def join(self) -> None:
        for timer in self.timers:
            timer.join()

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.landed if k == kind)


def segment_plan(rng: random.Random, first: int, learner_kill: int | None) -> list[tuple[int, str]]:
    """``[(step, kind)]``: kill ``kind`` after the metrics row of ``step`` (or the first step after it
    at which its process answers) in a segment that trains from step ``first``.

    A segment that ends with a learner kill also kills the buffer and the rollout actor once each at
    earlier steps; the last segment kills the buffer once more (cheap: no vLLM restart).
    """
    if learner_kill is None:
        return [(rng.randint(first, max(first, TOTAL_STEPS - 1)), "buffer")]
    before = list(range(first, learner_kill))
    steps = rng.sample(before, 2) if len(before) > 1 else [first, first]
    return [(steps[0], "buffer"), (steps[1], "rollout"), (learner_kill, "learner")]


def wait_until_back(actor, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.pid.remote(), timeout=30)
            return
        except RayActorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def read_ids(folder: Path, column: str = "traj_id") -> list[tuple[str, ...]]:
    rows = []
    for path in sorted(folder.glob("*.arrow")):
        table = ipc.open_file(str(path)).read_all()
        names = [column] + (["kind"] if "kind" in table.column_names else [])
        rows += list(zip(*(table.column(n).to_pylist() for n in names), strict=True))
    return rows


def audit(run_dir: Path) -> dict[str, int]:
    """Classify every row the buffer ever admitted, by id, from the run directory.

    Admitted: accepted by the buffer, i.e. in its ack/eviction log (``buffer/retired/``) or in a
    live segment file (``buffer/segments/``). Trained: listed under a step of the final history
    ``trained/step_N.json`` (steps 1..total; a resume removed the records past its checkpoint).
    Evicted: retired by the buffer's own rules (``stale``, ``partial_group``), counted there.
    Pending: still in a segment and not retired (available to a next run). Then:

    * ``lost``: admitted rows that are none of trained, evicted, pending; plus rows acked but not in
      the history (acked rows never come back, so their effect would be missing from the model);
    * ``twice``: extra occurrences of a row id in the history (trained at two steps);
    * ``trained_unretired``: trained rows the buffer would hand out again (must be 0 too).
    """
    buffer = run_dir / "buffer"
    retired: dict[str, str] = {}
    for traj_id, kind in read_ids(buffer / "retired"):
        retired.setdefault(traj_id, kind)
    live = {i for (i,) in read_ids(buffer / "segments")} - set(retired)
    history = trained_history(RunDir(run_dir))
    counts = Counter(i for step in sorted(history) for i in history[step])
    trained = set(counts)
    acked = {i for i, kind in retired.items() if kind == "acked"}
    evicted = {i for i, kind in retired.items() if kind != "acked"} - trained
    admitted = set(retired) | live
    return {
        "steps": len(history),
        "admitted": len(admitted),
        "trained": len(trained),
        "evicted": len(evicted),
        "pending": len(live),
        "lost": len(admitted - trained - evicted - live) + len(acked - trained),
        "twice": sum(c - 1 for c in counts.values()),
        "trained_unretired": len(trained - set(retired)),
        "trained_not_admitted": len(trained - admitted),
        "short_steps": sum(1 for ids in history.values() if len(ids) != GROUPS_PER_STEP * GROUP_SIZE),
    }


def test_chaos_buffer_rollout_and_learner_sigkilled_twice_each_no_row_lost_or_trained_twice(
    tiny_inputs, tmp_path
):
    """Seeded kills: the buffer (3x) and the rollout actor (2x) are restarted by Ray inside a segment;
    each learner kill (2x) ends the segment and ``train(resume=...)`` goes on from the newest
    complete checkpoint. One Ray session serves every segment. Afterwards, by row id (:func:`audit`):
    0 lost, 0 trained twice, every step of 1..total trained on a full batch."""
    started = time.monotonic()
    rng = random.Random(SEED)
    cfg = tiny_config(
        tiny_inputs,
        tmp_path / "runs",
        "run.name=chaos",
        f"run.seed={SEED}",
        f"learner.total_steps={TOTAL_STEPS}",
        f"learner.checkpoint_interval={CHECKPOINT_INTERVAL}",
        f"learner.groups_per_step={GROUPS_PER_STEP}",
        f"rollout.group_size={GROUP_SIZE}",
        "rollout.max_restarts=4",
        # rows trained since the last checkpoint stay fresh enough to be handed out again after a
        # buffer restart instead of being evicted as stale: the hazard the driver must catch
        "learner.max_staleness=4",
    )
    run_dir = tmp_path / "runs" / "chaos"
    killer = Killer()
    buffer_pids: set[int] = set()
    restarts_seen: list[int] = []
    redelivered_seen: list[int] = []  # rows a restarted buffer handed out again, dropped by the driver
    segments: list[dict] = []
    start_local_ray(cfg.run.ray_num_cpus, log_to_driver=False)
    try:
        first, resume = 1, None
        for segment in range(LEARNER_KILLS + 1):
            learner_kill = None
            if segment < LEARNER_KILLS:
                learner_kill = min(first + rng.randint(2, 3), TOTAL_STEPS - 2)
            plan = segment_plan(rng, first, learner_kill)
            pending = sorted(plan)
            drivers: list = []  # the segment's driver, read after it ends

            def on_step(driver, row, pending=pending, drivers=drivers):
                step = int(row["step"])
                drivers[:] = [driver]
                buffer_pids.add(ray.get(driver.buffer.pid.remote(), timeout=300))
                handles = {
                    "buffer": driver.buffer,
                    "rollout": driver.actors[0],
                    "learner": driver.learners.actors[0],
                }
                for when, kind in [p for p in pending if p[0] <= step]:
                    if kind == "learner":
                        if len(pending) > 1 or killer.in_flight():
                            continue  # it ends the segment: the segment's other kills land first
                        # a restarting rollout actor catches up from weights the learner process owns:
                        # killing the learner meanwhile kills that restart too (two faults at once)
                        wait_until_back(handles["rollout"])
                        # this hook runs inside the driver's loop, which cannot poll the actor's stats
                        # while it blocks here: hand the driver the poll it would make next, so a
                        # restart no failed call revealed is counted (from the new process id)
                        stats = ray.get(handles["rollout"].stats.remote(), timeout=300)
                        driver._check_incarnation(0, stats.get("pid"))
                    try:
                        pid = ray.get(handles[kind].pid.remote(), timeout=300)
                    except RayActorError:  # restarting after an earlier kill: at the next step
                        continue
                    pending.remove((when, kind))
                    killer.later(kind, pid, rng.uniform(*KILL_DELAY_S))

            segment_started = time.monotonic()
            if learner_kill is None:
                result = train(cfg, resume=resume, progress=False, on_step=on_step)
            else:
                with pytest.raises(PipelineError, match="learner rank .*--resume") as info:
                    train(cfg, resume=resume, progress=False, on_step=on_step)
                assert "a learner rank died" in str(info.value), info.value  # not a buffer/rollout kill
            killer.join()
            restarts_seen.append(drivers[0].rollout_restarts)
            redelivered_seen.append(int(drivers[0].telemetry.counters.get(REDELIVERED, 0)))
            segments.append(
                {"first": first, "plan": plan, "seconds": round(time.monotonic() - segment_started, 1)}
            )
            resume = run_dir
            first = committed_steps(RunDir(run_dir))[-1] + 1
    finally:
        killer.join()
        ray.shutdown()

    figures = audit(run_dir)
    figures.update(
        kills={k: killer.count(k) for k in ("buffer", "rollout", "learner")},
        redelivered_rows_dropped=sum(redelivered_seen),
        rollout_restarts_counted=sum(restarts_seen),
        wall_seconds=round(time.monotonic() - started, 1),
        segments=segments,
    )
    print("chaos:", json.dumps(figures))
    assert result.steps == TOTAL_STEPS
    assert killer.count("learner") == LEARNER_KILLS
    assert killer.count("buffer") >= 2 and killer.count("rollout") >= 2, killer.landed
    assert len(buffer_pids) >= 2 + LEARNER_KILLS  # restarted in-run, besides one per segment
    assert sum(restarts_seen) >= 2, restarts_seen  # the driver saw and counted each rollout death
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert [int(r["step"]) for r in rows] == list(range(1, TOTAL_STEPS + 1))
    assert figures["steps"] == TOTAL_STEPS and figures["short_steps"] == 0
    assert figures["lost"] == 0 and figures["twice"] == 0, figures
    assert figures["trained_unretired"] == 0 and figures["trained_not_admitted"] == 0, figures
    assert figures["trained"] == TOTAL_STEPS * GROUPS_PER_STEP * GROUP_SIZE
