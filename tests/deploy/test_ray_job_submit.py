"""deploy/ray-job-submit.sh against a real Ray head started by this test (slow).

The head runs on 127.0.0.1 with its own free ports and its own --temp-dir, so it can share the
machine with other engineers' Ray instances. It is stopped by signalling only the processes of its
own session (``ray start`` runs in a new session; raylet, GCS, dashboard and workers inherit it)
and any process whose command line names its temp dir: never ``ray stop``, which kills every Ray
process on the machine.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "deploy" / "ray-job-submit.sh"

# The job: two learner steps of the tiny default on the test's head (2 CPUs: one for the rollout
# actor, one for the learner), with a model and data made by the test at absolute paths (the
# uploaded checkout excludes runs/). The run root has a space: it checks quoting end to end (a run
# name is one folder name of letters, digits and ._-, so the space goes in the root).
RUN_NAME = "submitted-by-test"
RUNS_DIR = "runs by test"
EXPECTED_IN_LOGS = "run directory:"
JOB_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_range(size: int) -> int:
    """First port of ``size`` consecutive ports that are free now (Ray's worker ports)."""
    for _ in range(200):
        start = random.randrange(20000, 60000 - size)
        try:
            for port in range(start, start + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return start
    raise RuntimeError(f"no {size} consecutive free ports")


def _live_session_of(pid: int) -> int | None:
    """Session id of a running process; None for a zombie (already dead, only awaiting its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after "(comm)": state ppid pgrp session ...
    state, _, _, session = stat.rsplit(")", 1)[1].split()[:4]
    return None if state == "Z" else int(session)


def _own_processes(session: int, temp_dir: str) -> list[int]:
    """PIDs of the head we started: its session, or a command line that names its unique temp dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        live_session = _live_session_of(pid)
        if live_session is not None and (live_session == session or temp_dir in cmdline):
            pids.append(pid)
    return pids


def _stop_head(session: int, temp_dir: str, grace_s: float = 15.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace_s``, every process of our head; returns survivors (none)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in _own_processes(session, temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _own_processes(session, temp_dir):
            time.sleep(0.5)
    return _own_processes(session, temp_dir)


def _head_logs(temp_dir: str, lines: int = 30) -> str:
    """The last lines of ray start's output and of the dashboard's log, for a failure message."""
    paths = [Path(temp_dir) / "ray-start.log", *Path(temp_dir).glob("session_*/logs/dashboard.log")]
    return "\n".join(
        f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) for p in paths
    )


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head on 127.0.0.1 started from this venv; yields (dashboard URL, env for the CLI)."""
    # Short path: Ray's unix sockets live under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="drj", dir="/tmp")
    venv_bin = str(Path(sys.executable).parent)
    # The job's `python` is the first on the head's PATH: this venv's.
    # Token auth with a token of our own: Ray 2.60 turns auth on by itself whenever ~/.ray/auth_token
    # exists (any local ray.init() on the machine writes one), so leaving the mode unset makes the
    # head's behaviour depend on other people's runs. The CLI in the script reads the same variables.
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    dashboard_port = _free_port()
    worker_ports = _free_port_range(64)
    args = [
        f"{venv_bin}/ray", "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--port", str(_free_port()), "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(_free_port()),
        "--min-worker-port", str(worker_ports), "--max-worker-port", str(worker_ports + 63),
        "--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port()),
        "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
        "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
        "--num-cpus", "2", "--temp-dir", temp_dir,
    ]  # fmt: skip
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed in the finally below
    head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        # Minutes, not seconds: on a shared 2-core machine the dashboard's modules start slowly.
        deadline = time.monotonic() + 300
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited {head.returncode}:\n{_head_logs(temp_dir)}")
            try:
                probe = urllib.request.Request(
                    f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
                )
                with urllib.request.urlopen(probe, timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray dashboard did not answer within 300 s:\n{_head_logs(temp_dir)}")
            time.sleep(1)
        yield url, env
    finally:
        survivors = _stop_head(head.pid, temp_dir)
        head.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"processes of the test's Ray head survived: {survivors}"


def _submit(url: str, env: dict[str, str], *driftrl_args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SUBMIT), "--address", url, "--follow", "--", *driftrl_args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def tiny_job_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tasks.synthetic import write_dataset
    from tasks.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("job-inputs")
    make_tiny_model(root / "model", seed=0)
    write_dataset(root / "train.parquet", root / "heldout.parquet", seed=0, n_train=500, n_heldout=32)
    return {"root": root, "model": root / "model"}


@pytest.mark.slow
def test_submitted_job_runs_from_the_uploaded_checkout_and_succeeds(ray_head, tiny_job_inputs) -> None:
    url, env = ray_head
    root = tiny_job_inputs["root"]
    entrypoint = [
        "train", "--config", "configs/tiny-cpu.yaml", "--no-progress",
        f"run.name={RUN_NAME}", f"run.root_dir={root / RUNS_DIR}",
        f"model.path={tiny_job_inputs['model']}", "model.tiny=false",
        f"task.train_path={root / 'train.parquet'}", f"task.eval_path={root / 'heldout.parquet'}",
        "learner.total_steps=2", "learner.checkpoint_interval=2", "metrics.port=0",
    ]  # fmt: skip
    result = _submit(url, env, *entrypoint)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id, _, logs = result.stdout.partition("\n")
    assert job_id.startswith("driftrl-"), result.stdout
    assert EXPECTED_IN_LOGS in logs, result.stdout + result.stderr
    # The override with a space arrived as one word: quoting survives the script and Ray's shell.
    run_dir = root / RUNS_DIR / RUN_NAME
    assert (run_dir / "final_model" / "config.json").is_file(), logs
    assert (run_dir / "checkpoints" / "step_2" / "driver.json").is_file()
    status = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "status", "--address", url, job_id],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr


@pytest.mark.slow
def test_failed_job_makes_the_script_fail(ray_head) -> None:
    url, env = ray_head
    result = _submit(url, env, "check-config", "--config", "configs/qwen2.5-7b-dapo.yaml", "learner.lr=-1")
    assert result.returncode != 0
    job_id = result.stdout.partition("\n")[0]
    assert job_id.startswith("driftrl-")
    # driftrl's config error, raised on the cluster, reaches the caller's logs.
    assert "learner.lr" in result.stdout, result.stdout + result.stderr
