"""The buffer actor is SIGKILLed twice mid-stream: nothing accepted is lost, nothing is acked twice.

A producer thread pushes groups and a consumer thread samples and acknowledges them (every second
step, like a learner acking after a checkpoint) through a real Ray actor with ``max_restarts``;
the test kills the actor's process (only that PID) while both run.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray

from buffers.actor import launch_buffer_actor
from buffers.config import BufferConfig
from buffers.replay import ReplayBuffer

pytestmark = pytest.mark.slow

N_GROUPS = 150
KILL_AFTER_GROUPS = (40, 95)
DEADLINE_S = 75.0


@pytest.fixture(scope="module")
def ray_session():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _run_and_record(errors: list[BaseException], target) -> threading.Thread:
    def guarded() -> None:
        try:
            target()
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    return thread


def test_sigkill_mid_stream_loses_nothing_and_acks_nothing_twice(ray_session, tmp_path, make_groups):
    uri = str(tmp_path / "buffer")
    config = BufferConfig(capacity_groups=24, compact_min_files=4, segment_rows=32, push_timeout_s=30.0)
    actor = launch_buffer_actor(
        config, uri, max_restarts=-1, max_task_retries=-1, max_concurrency=4, num_cpus=0
    )
    pids = [ray.get(actor.pid.remote(), timeout=60)]
    deadline = time.monotonic() + DEADLINE_S
    errors: list[BaseException] = []
    stored: set[str] = set()
    acked: set[str] = set()
    newly_acked_total = 0
    pushed_groups = 0
    producer_done = threading.Event()

    def produce() -> None:
        nonlocal pushed_groups
        for k in range(N_GROUPS):
            table = make_groups([f"g{k}"], seed=k)
            while True:
                result = ray.get(actor.push.remote(table), timeout=60)
                if not result.full:
                    break
                time.sleep(0.02)
            # a push retried after the crash finds its rows stored: duplicate == stored
            assert {reason for _, reason in result.rejected} <= {"duplicate_traj_id"}, result
            stored.update(table.column("traj_id").to_pylist())
            pushed_groups = k + 1
            time.sleep(0.005)
        producer_done.set()

    def consume() -> None:
        nonlocal newly_acked_total
        since_checkpoint: list[str] = []
        steps = 0
        while time.monotonic() < deadline:
            table = ray.get(actor.sample.remote(3, 0, None, 0.2), timeout=60)
            ids = table.column("traj_id").to_pylist()
            assert acked.isdisjoint(ids), "an acknowledged row was sampled again"
            since_checkpoint += ids
            steps += 1
            if steps % 2 == 0 or not ids:
                result = ray.get(actor.ack.remote(since_checkpoint), timeout=60)
                assert result.unknown == 0
                newly_acked_total += result.acked
                acked.update(since_checkpoint)
                since_checkpoint = []
            if not ids and producer_done.is_set():
                stats = ray.get(actor.stats.remote(), timeout=60)
                if stats["rows_available"] + stats["rows_leased"] == 0:
                    return
        raise TimeoutError("consumer did not drain the buffer in time")

    threads = [_run_and_record(errors, produce), _run_and_record(errors, consume)]
    for kill_after in KILL_AFTER_GROUPS:
        while pushed_groups < kill_after and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pids[-1], signal.SIGKILL)
        pids.append(ray.get(actor.pid.remote(), timeout=60))  # waits for the restart
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "producer or consumer hung"

    assert len(set(pids)) == 3, f"the actor was not restarted twice: pids {pids}"
    assert len(stored) == 4 * N_GROUPS
    assert acked == stored, f"lost rows: {len(stored - acked)}"
    stats = ray.get(actor.stats.remote())
    # counters rebuilt from the files after the last restart, then counted on
    assert stats["acked"] == stats["accepted"] == len(stored)
    assert stats["evicted"] == {} and stats["rows_available"] == stats["rows_leased"] == 0
    # acks from before a crash whose reply was lost come back "already_retired": never counted twice
    assert newly_acked_total <= len(stored)

    ray.kill(actor, no_restart=True)
    recovered = ReplayBuffer(config, uri).stats()
    assert (recovered["acked"], recovered["accepted"], recovered["rows_available"]) == (
        len(stored),
        len(stored),
        0,
    )
