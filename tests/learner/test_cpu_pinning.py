"""learner/cpu_pinning.py: which cores the learner ranks get, and pinning every thread of a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from driftrl.config import load_config
from learner.cpu_pinning import cores_per_rank, pin_process, process_cores, rank_cores, split_cores

REPO = Path(__file__).resolve().parents[2]
CORES = sorted(os.sched_getaffinity(0))


def test_split_gives_the_learner_the_last_cores_and_the_rest_the_others() -> None:
    assert split_cores([0, 1], 1) == ([0], [1])
    assert split_cores([3, 0, 2, 1, 2], 2) == ([0, 1], [2, 3])
    assert split_cores(range(16), 4) == (list(range(12)), [12, 13, 14, 15])
    with pytest.raises(ValueError, match="more cores than the learner's 2"):
        split_cores([0, 1], 2)
    with pytest.raises(ValueError, match=">= 1"):
        split_cores([0, 1], 0)


def test_each_rank_gets_its_own_slice() -> None:
    assert [cores_per_rank(n) for n in (0.5, 1, 1.0, 1.5, 4)] == [1, 1, 1, 2, 4]
    cores = [4, 5, 6, 7]
    assert [rank_cores(cores, r, 2) for r in range(2)] == [[4, 5], [6, 7]]
    assert [rank_cores(cores, r, 1) for r in range(4)] == [[4], [5], [6], [7]]
    with pytest.raises(ValueError, match="rank 2 needs 2"):
        rank_cores(cores, 2, 2)


CHILD = """
import threading, time
def spin():
    while True:
        time.sleep(0.01)
for _ in range(3):
    threading.Thread(target=spin, daemon=True).start()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores to tell a pinned thread from a free one")
def test_pin_process_pins_every_thread_of_another_process_and_new_threads_inherit() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        before = process_cores(child.pid)
        assert len(before) >= 4 and all(c == CORES for c in before.values())
        assert pin_process([CORES[-1]], child.pid) == len(before)
        after = process_cores(child.pid)
        assert set(after) == set(before)
        assert all(c == [CORES[-1]] for c in after.values())
        assert sorted(os.sched_getaffinity(0)) == CORES  # the caller is untouched
    finally:
        child.kill()
        child.wait()
    # this process: pinned, a thread started afterwards inherits the cores; then put back
    import threading

    try:
        pin_process([CORES[0]])
        seen: list[list[int]] = []
        thread = threading.Thread(
            target=lambda: (seen.append(sorted(os.sched_getaffinity(0))), time.sleep(0))
        )
        thread.start()
        thread.join()
        assert seen == [[CORES[0]]]
        assert all(c == [CORES[0]] for c in process_cores().values())
    finally:
        pin_process(CORES)
    assert all(c == CORES for c in process_cores().values())


def test_the_tiny_configs_pin_and_the_default_does_not() -> None:
    assert load_config(None, []).run.pin_learner_cpus is False
    for name in ("tiny-cpu.yaml", "tiny-longtail-cpu.yaml"):
        cfg = load_config(REPO / "configs" / name, [])
        assert cfg.run.pin_learner_cpus is True
        assert cfg.learner.data_parallel_size * cores_per_rank(cfg.learner.num_cpus) == 1
    assert (
        load_config(REPO / "configs" / "tiny-cpu.yaml", ["run.pin_learner_cpus=false"]).run.pin_learner_cpus
        is False
    )
