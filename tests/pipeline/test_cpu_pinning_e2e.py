"""run.pin_learner_cpus (learner/cpu_pinning.py) in a real local run: the learner rank's threads own
the last core, every other process of the run (driver, Ray, buffer, rollout actor, vLLM's engine) is
on the others, and the driver's threads get all their cores back when the run ends."""

from __future__ import annotations

import os

import psutil
import pytest
import ray

from driftrl.pipeline import train
from learner.cpu_pinning import process_cores
from tests.pipeline.conftest import THREE_SMALL_STEPS, tiny_config

pytestmark = pytest.mark.slow

CORES = sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(CORES) < 2, reason="pinning needs a core for the learner and one for the rest")
def test_the_learner_owns_its_core_and_the_rest_of_the_run_shares_the_others(tiny_inputs, tmp_path):
    cfg = tiny_config(tiny_inputs, tmp_path / "runs", *THREE_SMALL_STEPS)
    assert cfg.run.pin_learner_cpus  # the tiny default pins
    seen: dict[str, dict[int, list[int]]] = {}

    def on_step(driver, row) -> None:
        if int(row["step"]) != 2:  # every process up: Ray, buffer, learner, vLLM engine
            return
        learner_pid = ray.get(driver.learners.actors[0].pid.remote())
        seen["learner (asked)"] = {
            0: sorted(set().union(*ray.get(driver.learners.actors[0].cores.remote()).values()))
        }
        seen["learner"] = process_cores(learner_pid)
        for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            if proc.pid == learner_pid:
                continue
            try:
                seen[f"{proc.pid} {proc.name()} {' '.join(proc.cmdline()[:2])}"] = process_cores(proc.pid)
            except (psutil.Error, FileNotFoundError):
                pass  # ended meanwhile

    train(cfg, progress=False, on_step=on_step)
    learner_core, rest = CORES[-1:], CORES[:-1]
    assert seen["learner (asked)"] == {0: learner_core}
    assert seen["learner"] and all(c == learner_core for c in seen["learner"].values()), seen["learner"]
    others = {name: cores for name, cores in seen.items() if not name.startswith("learner")}
    names = " ".join(others)
    # the census saw the parts it is about (it can fail): Ray's GCS and raylet, vLLM's engine core
    assert "gcs_server" in names and "raylet" in names and "RolloutActor" in names, names
    off_rest = {
        name: sorted({c for cs in cores.values() for c in cs} - set(rest))
        for name, cores in others.items()
        # vLLM binds its engine's OpenMP threads itself; on this machine type it picks the first core
        if any(set(cs) - set(rest) for cs in cores.values())
    }
    assert off_rest == {}
    assert all(c == CORES for c in process_cores().values())  # the driver's cores are back
