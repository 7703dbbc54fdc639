"""Every benchmark runs in its quick mode in the default suite, so a broken benchmark fails CI.

The convention (also in README.md, "Benchmarks"), which every file in ``benchmarks/`` follows:

* Every ``benchmarks/*.py`` script (run as ``python benchmarks/NAME.py``) and every
  ``benchmarks/*.sh`` script (run as ``bash benchmarks/NAME.sh``) is a benchmark and accepts
  ``--quick``. A module there that is only imported by benchmarks starts with ``_``.
* ``--quick`` runs the same code paths as the full benchmark on the smallest inputs that still
  reach them (a shell script: its dry run, which checks its tools and arguments and runs the
  smallest case), on this CPU-only machine, in seconds to about a minute. Its numbers mean nothing.
  A benchmark that needs a GPU runs what it can without one and says why in its JSON
  (``"skipped": "no CUDA device"``, ``"value": null``).
* The last line on stdout, quick or not, is one JSON object with ``metric`` (str), ``value`` (a
  number, or null with ``skipped`` saying why) and ``goal`` (str, e.g. ``">= 10"``); a quick run
  adds ``"quick": true``. Exit status 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted(
    p
    for p in (*(REPO / "benchmarks").glob("*.py"), *(REPO / "benchmarks").glob("*.sh"))
    if not p.name.startswith("_")
)
# a guard against a hang, not a speed goal: the slowest quick mode (two tiny pipeline runs) takes ~1-2 min
QUICK_DEADLINE_S = 600


def test_benchmarks_are_found() -> None:
    names = {p.name for p in BENCHMARKS}
    assert {"async_vs_sync.py", "buffer.py", "rollout.py", "token_stats.py", "token_stats_gpu.py"} <= names


def goal_line(stdout: str) -> dict:
    """The JSON object on the last non-empty line of ``stdout`` (a clear failure otherwise)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        pytest.fail("the benchmark printed nothing")
    try:
        goal = json.loads(lines[-1])
    except json.JSONDecodeError:
        pytest.fail(f"the last line is not JSON: {lines[-1][:300]!r}")
    if not isinstance(goal, dict):
        pytest.fail(f"the last line is JSON but not an object: {lines[-1][:300]!r}")
    return goal


def test_goal_line_rejects_what_the_convention_forbids() -> None:
    assert goal_line('table\n{"metric": "m", "value": 1.5, "goal": ">= 1"}\n') == {
        "metric": "m",
        "value": 1.5,
        "goal": ">= 1",
    }
    for stdout in ("", "done\n", '{"metric": "m"}\ntrailing words\n', "[1, 2]\n"):
        with pytest.raises(pytest.fail.Exception):
            goal_line(stdout)


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_quick_mode_runs_and_ends_with_the_goal_object(path: Path) -> None:
    runner = [sys.executable] if path.suffix == ".py" else ["bash"]
    # this checkout's code, not that of another install of driftrl in the environment
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    proc = subprocess.run(
        [*runner, str(path), "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=QUICK_DEADLINE_S,
    )
    assert proc.returncode == 0, (
        f"{path.name} --quick exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
        f"--- stderr\n{proc.stderr[-3000:]}"
    )
    goal = goal_line(proc.stdout)
    assert isinstance(goal.get("metric"), str) and goal["metric"], goal
    assert isinstance(goal.get("goal"), str) and goal["goal"], goal
    assert goal.get("quick") is True, f'{path.name}: a --quick run says "quick": true in its JSON'
    value = goal.get("value", "absent")
    if value is None:
        assert goal.get("skipped"), f"{path.name}: value null without 'skipped' saying why"
    else:
        assert isinstance(value, int | float) and not isinstance(value, bool), goal
