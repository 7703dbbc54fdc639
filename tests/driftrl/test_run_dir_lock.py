"""One run per run directory (and per local buffer): a second one fails at once naming the holder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from driftrl.config import load_config
from driftrl.run_dir import DirLock, RunDirInUseError, RunLocks, in_use

REPO = Path(__file__).resolve().parents[2]
HOLD = (
    "import sys, time\n"
    "from driftrl.run_dir import RunLocks\n"
    "locks = RunLocks(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def holder():
    """Start a process that holds the locks of (run dir[, buffer]); SIGKILL it at the end."""
    procs: list[subprocess.Popen] = []

    def start(*paths: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, *map(str, paths)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=30)


def test_second_lock_names_the_holder_and_is_free_again_after_release(tmp_path: Path) -> None:
    first = DirLock(tmp_path / "run")
    with pytest.raises(
        RunDirInUseError, match=rf"run directory {tmp_path / 'run'} is in use by pid {os.getpid()} "
    ):
        DirLock(tmp_path / "run")
    assert in_use(tmp_path / "run")
    first.release()
    assert not in_use(tmp_path / "run")
    DirLock(tmp_path / "run").release()


def test_train_refuses_a_run_directory_held_by_another_process(tmp_path: Path, holder) -> None:
    import ray

    from driftrl.pipeline import train

    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [f"run.root_dir={tmp_path}", "run.name=busy"])
    proc = holder(tmp_path / "busy")
    with pytest.raises(RunDirInUseError, match=rf"in use by pid {proc.pid} "):
        train(cfg, progress=False)
    # refused before anything was written or started
    assert not (tmp_path / "busy" / "config.yaml").exists()
    assert not ray.is_initialized()


def test_cli_exits_2_with_one_line_naming_the_holder(tmp_path: Path, holder) -> None:
    proc = holder(tmp_path / "busy")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "driftrl.cli",
            "train",
            f"run.root_dir={tmp_path}",
            "run.name=busy",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"driftrl: run directory {tmp_path / 'busy'} is in use by pid {proc.pid} ")


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path, holder) -> None:
    proc = holder(tmp_path / "run")
    assert in_use(tmp_path / "run")
    proc.kill()
    proc.wait(timeout=30)
    assert not in_use(tmp_path / "run")
    RunLocks(tmp_path / "run").release()


def test_a_shared_local_buffer_is_locked_too(tmp_path: Path, holder) -> None:
    buffer = tmp_path / "shared-buffer"
    proc = holder(tmp_path / "a", buffer)
    with pytest.raises(RunDirInUseError, match=rf"buffer {buffer} is in use by pid {proc.pid} "):
        RunLocks(tmp_path / "b", f"file://{buffer}")
    # the refused run dropped the run-directory lock it had taken first
    assert not in_use(tmp_path / "b")
    # a buffer inside the run directory is covered by the run directory's lock; object stores are not locked
    RunLocks(tmp_path / "c", str(tmp_path / "c" / "buffer")).release()
    RunLocks(tmp_path / "d", "s3://bucket/buffer").release()
