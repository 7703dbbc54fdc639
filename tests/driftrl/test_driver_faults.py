"""The driver's answers to faults, against stand-in Ray actors (no vLLM, no DeepSpeed): a rollout step
that raises is a counted restart, a hung learner rank or buffer ends the run within its deadline."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import ray
from ray.exceptions import RayActorError

from driftrl.config import load_config
from driftrl.pipeline import Driver, PipelineError, start_local_ray
from driftrl.run_dir import RunDir
from learner.actor import LearnerGroup

REPO_ROOT = Path(__file__).resolve().parents[2]


class EngineDeadError(RuntimeError):
    """Named after vLLM's: the engine process behind a rollout actor is gone, the actor is not."""


class DeadEngineActor:
    def generate_step(self) -> int:
        raise EngineDeadError("EngineCore encountered an issue")

    def pid(self) -> int:
        return os.getpid()


class SleepyProcess:
    """A learner rank (``call``) or buffer (``stats``) that answers after ``sleep_s``."""

    def __init__(self, sleep_s: float) -> None:
        self.sleep_s = sleep_s

    def call(self, method: str, *args: object) -> str:
        time.sleep(self.sleep_s)
        return method

    def stats(self) -> dict[str, int]:
        time.sleep(self.sleep_s)
        return {}

    def pid(self) -> int:
        return os.getpid()


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray(2)
    yield
    ray.shutdown()


def make_driver(tmp_path: Path, *overrides: str) -> Driver:
    cfg = load_config(REPO_ROOT / "configs" / "tiny-cpu.yaml", [f"run.root_dir={tmp_path}", *overrides])
    return Driver(cfg, RunDir(tmp_path / "run"), progress=False)


def pid_after_restart(actor, old_pid: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid = ray.get(actor.pid.remote(), timeout=10)
            if pid != old_pid:
                return pid
        except RayActorError:  # still restarting
            pass
        time.sleep(0.2)
    raise AssertionError("the actor did not come back")


def test_any_exception_from_a_rollout_step_restarts_the_actor_counted_and_logged(local_ray, tmp_path, caplog):
    driver = make_driver(tmp_path, "rollout.max_restarts=1")
    actor = ray.remote(DeadEngineActor).options(max_restarts=1, num_cpus=0).remote()
    driver.actors = [actor]
    pid = ray.get(actor.pid.remote())
    with caplog.at_level(logging.ERROR, logger="driftrl.pipeline"):
        driver._generate_done(0, actor.generate_step.remote())
    # the run goes on: one restart, counted, its cause in the log, a new process
    assert driver.rollout_restarts == 1 and driver.restarts_by_actor == {0: 1}
    assert driver.telemetry.counters["rollout_step_errors_total"] == 1
    assert (
        "rollout actor 0: generate_step raised EngineDeadError: EngineCore encountered an issue"
        in caplog.text
    )
    assert pid_after_restart(actor, pid) != pid
    # bounded by rollout.max_restarts: the next one ends the run with the cause
    with pytest.raises(
        PipelineError, match=r"rollout actor 0: generate_step raised EngineDeadError.*max_restarts=1"
    ):
        driver._generate_done(0, actor.generate_step.remote())
    ray.kill(actor, no_restart=True)


def test_a_hung_learner_rank_ends_the_run_naming_rank_and_step_within_the_deadline(local_ray, tmp_path):
    driver = make_driver(tmp_path, "learner.step_timeout_s=2")
    ranks = [ray.remote(SleepyProcess).options(num_cpus=0).remote(s) for s in (0.0, 60.0)]
    # both processes up before the clock starts: on a loaded machine a worker's start alone can pass 2 s,
    # and then rank 0 would be named as hung too (the stop-24 CI failure)
    ray.get([rank.pid.remote() for rank in ranks], timeout=60)
    driver.learners = LearnerGroup(actors=ranks, placement_group=None)
    driver.step = 4
    started = time.monotonic()
    with pytest.raises(
        PipelineError, match=r"learner rank 1 did not finish save_checkpoint after step 4 .*--resume"
    ):
        driver._learner_call("save_checkpoint", "somewhere")
    assert 2.0 <= time.monotonic() - started < 5.0
    # a step in flight since before the deadline: named at once, by the step it trains
    refs = [r.call.remote("train_step") for r in ranks]
    ray.get(refs[0], timeout=10)  # rank 0 answered; rank 1 is still asleep
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"learner rank 1 did not finish train_step of step 5 within"):
        driver._learner_get(refs, "train_step of step 5", started=started - 3.0)
    assert time.monotonic() - started < 1.0
    for rank in ranks:
        ray.kill(rank, no_restart=True)


class BrokenSyncActor:
    """A rollout actor whose weight sync failed because the learner process owning the weights died."""

    def generate_step(self) -> int:
        raise RuntimeError("weight sync to version 8 failed at bucket 1/1: OwnerDiedError")

    def pid(self) -> int:
        return os.getpid()


def test_a_rollout_failure_while_a_learner_rank_is_dead_names_the_learner_and_resume(local_ray, tmp_path):
    driver = make_driver(tmp_path, "rollout.max_restarts=2")
    # rank 1 is busy with a step longer than the driver's ping wait: alive, not answering
    ranks = [ray.remote(SleepyProcess).options(num_cpus=0, max_restarts=0).remote(s) for s in (0.0, 30.0)]
    ranks[1].call.remote("train_step")
    driver.learners = LearnerGroup(actors=ranks, placement_group=None)
    actor = ray.remote(BrokenSyncActor).options(max_restarts=2, num_cpus=0).remote()
    driver.actors = [actor]
    driver.step = 7
    pid = ray.get(actor.pid.remote())
    # every rank alive: the failure is the actor's own, a counted restart
    driver._generate_done(0, actor.generate_step.remote())
    assert driver.rollout_restarts == 1
    # rank 0 dies: the next rollout failure is its consequence, named as such with the resume instruction
    ray.kill(ranks[0], no_restart=True)
    pid_after_restart(actor, pid)
    with pytest.raises(PipelineError, match=r"learner rank 0 died after step 7 .*driftrl train --resume"):
        driver._generate_done(0, actor.generate_step.remote())
    assert driver.rollout_restarts == 1  # not counted against the actor
    for handle in (actor, ranks[1]):
        ray.kill(handle, no_restart=True)


def test_a_hung_buffer_call_ends_the_run_within_the_rpc_deadline(local_ray, tmp_path):
    driver = make_driver(tmp_path, "run.rpc_timeout_s=1")
    buffer = ray.remote(SleepyProcess).options(num_cpus=0).remote(60.0)
    started = time.monotonic()
    with pytest.raises(
        PipelineError, match=r"the buffer's stats did not answer within run.rpc_timeout_s=1 s"
    ):
        driver._get(buffer.stats.remote(), "the buffer's stats")
    assert time.monotonic() - started < 4.0
    ray.kill(buffer, no_restart=True)


def test_predicted_entropy_change_is_paired_with_the_probe_of_its_own_sync(tmp_path):
    # no Ray: the driver's bookkeeping when step 2 is handled before step 1's probe answers
    driver = make_driver(tmp_path)
    driver.last_probe = 1.0
    row1 = driver._after_step({"predicted_entropy_change": 0.25})
    predicted = driver._take_predicted()  # step 1 syncs: its probe is queued
    driver._after_step({"predicted_entropy_change": -0.5})  # step 2 ends first
    driver._record_probe(0.75, row1, predicted)  # step 1's probe answers
    # 0.75 - 1.0 realised against step 1's 0.25 only; step 2's -0.5 waits for the next sync
    assert (row1["realised_delta_entropy"], row1["predicted_delta_entropy_since_sync"]) == (-0.25, 0.25)
    assert driver.predicted_since_sync == -0.5


def test_rows_a_restarted_buffer_hands_out_again_are_dropped_from_the_batch_not_trained_twice(
    local_ray, tmp_path
):
    import signal

    from buffers.actor import launch_buffer_actor
    from buffers.config import BufferConfig
    from buffers.schema import records_to_table
    from tests.buffers.conftest import group_records

    buffer = launch_buffer_actor(BufferConfig(), str(tmp_path / "buffer"), num_cpus=0)
    records = [r for key in ("a", "b", "c", "d") for r in group_records(key)]
    assert ray.get(buffer.push.remote(records_to_table(records))).accepted == 16
    trained = ray.get(buffer.sample.remote(2, 0)).column("traj_id").to_pylist()  # leased, not yet acked
    pid = ray.get(buffer.pid.remote())
    os.kill(pid, signal.SIGKILL)
    pid_after_restart(buffer, pid)
    # the hazard: the restarted buffer forgot the lease and hands the trained groups out again
    again = ray.get(buffer.sample.remote(4, 0))
    assert set(trained) <= set(again.column("traj_id").to_pylist())

    driver = make_driver(tmp_path)
    kept = driver._without_redelivered(again, trained)
    assert kept.num_rows == 8 and not set(kept.column("traj_id").to_pylist()) & set(trained)
    assert driver.telemetry.counters["buffer_redelivered_rows_total"] == 8
    assert driver._without_redelivered(kept, trained) is kept  # nothing held: the batch as it is
    # the dropped rows stay leased by that sample (no third delivery) until the checkpoint acks them
    assert ray.get(buffer.sample.remote(1, 0)).num_rows == 0
    assert ray.get(buffer.ack.remote(trained)).acked == 8
    stats = ray.get(buffer.stats.remote())
    assert (stats["acked"], stats["rows_leased"], stats["rows_available"]) == (8, 8, 0)
    ray.kill(buffer, no_restart=True)
