"""The run directory: where a run's config, checkpoints, buffer, metrics and report live.

Layout (DESIGN.md "Run directory")::

    runs/<name>/config.yaml            resolved config (written once; a resume checks it)
    runs/<name>/checkpoints/step_<n>/  learner checkpoint + state.json, driver.json, commit.json
    runs/<name>/trained/step_<n>.json  row ids trained since the previous checkpoint (the history)
    runs/<name>/buffer/                Arrow IPC segments + ack log
    runs/<name>/metrics.parquet        one row per learner step
    runs/<name>/report/                PNG plots, summary
    runs/<name>/logs/

Every file the driver writes here is written to a temporary name and renamed, so a crash never
leaves a half-written config or state file behind.

One run at a time: the driver holds an exclusive lock on the run directory (and on a local buffer
URI outside it) for the whole run, ``flock`` on ``<dir>/.driftrl.lock``, which names its holder. The
kernel drops the lock when the holding process ends, however it ends, so a crashed run leaves no
stale lock; a second run on the same directory fails at once with the holder's pid. Object-store
URIs cannot be locked this way (they have no locks); a run on one relies on its unique run name.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from driftrl.config import ConfigError, DriftConfig, config_from_dict, dump_config

_STEP_DIR = re.compile(r"^step_(\d+)$")
LOCK_FILE = ".driftrl.lock"


class RunDirInUseError(ConfigError):
    """Another process holds the lock of a run directory or buffer; the message names its pid."""


class DirLock:
    """An exclusive ``flock`` on ``<directory>/.driftrl.lock``, held until :meth:`release` or process exit.

    Args:
        directory: the folder to lock (created if missing).
        what: how the folder is named in the error (``run directory``, ``buffer``).

    Raises:
        RunDirInUseError: another open lock holds it (another process, or this one).
    """

    def __init__(self, directory: str | Path, what: str = "run directory") -> None:
        self._fd: int | None = None
        self.path = Path(directory) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise RunDirInUseError(
                f"{what} {self.path.parent} is in use by {holder}: one run at a time per {what}. Wait for "
                f"that run to end (or stop it), or use another run.name (lock file {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.write(fd, (json.dumps(holder) + "\n").encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent); the file stays, empty of meaning until the next holder writes it."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {int(holder['pid'])} on {holder['host']} (since {holder['since']})"
    except (ValueError, KeyError, TypeError, OSError):
        return "another process (it has not written its pid yet)"


def local_path(uri: str) -> Path | None:
    """The local folder of a path or ``file://`` URI; None for object stores (``s3://`` ...)."""
    parsed = urlparse(uri)
    if parsed.scheme == "":
        return Path(uri)
    return Path(parsed.path) if parsed.scheme == "file" else None


class RunLocks:
    """The locks of one run: its run directory, and its buffer when that is a local folder elsewhere.

    Taken before anything is written there (the resolved config included) and released when the
    run ends; see the module docstring.
    """

    def __init__(self, root: str | Path, buffer_uri: str | None = None) -> None:
        self.locks = [DirLock(root, "run directory")]
        buffer = local_path(buffer_uri) if buffer_uri else None
        if buffer is not None and not buffer.resolve().is_relative_to(Path(root).resolve()):
            try:
                self.locks.append(DirLock(buffer, "buffer"))
            except RunDirInUseError:
                self.release()
                raise

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()

    def __enter__(self) -> RunLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def in_use(directory: str | Path) -> bool:
    """Whether a live process holds ``directory``'s lock (a probe: takes and drops it at once)."""
    if not (Path(directory) / LOCK_FILE).is_file():
        return False
    try:
        DirLock(directory).release()
    except RunDirInUseError:
        return True
    return False


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


@dataclass(frozen=True)
class RunDir:
    """Paths of one run."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def buffer(self) -> Path:
        return self.root / "buffer"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.parquet"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def final_model(self) -> Path:
        return self.root / "final_model"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}"

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        """The newest checkpoint holding learner state (state.json), or None: whether a run is here.

        A resume starts from the newest *committed* one instead (driftrl/checkpoints.py).
        """
        if not self.checkpoints.is_dir():
            return None
        found = []
        for child in self.checkpoints.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / "state.json").is_file():
                found.append((int(match.group(1)), child))
        return max(found) if found else None

    def read_state(self, checkpoint: Path) -> dict[str, Any]:
        return json.loads((checkpoint / "state.json").read_text())


def create_run_dir(cfg: DriftConfig) -> RunDir:
    """Make a new run directory for ``cfg``; refuses to overwrite one that holds checkpoints."""
    run = RunDir(Path(cfg.run.root_dir) / cfg.run.name)
    if run.latest_checkpoint() is not None:
        raise ConfigError(
            f"run directory {run.root} already holds checkpoints: resume it with "
            f"`driftrl train --resume {run.root}` or pick another run.name=<name>"
        )
    for path in (run.root, run.checkpoints, run.logs, run.report):
        path.mkdir(parents=True, exist_ok=True)
    write_atomic(run.config, dump_config(cfg))
    return run


def open_run_dir(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunDir, DriftConfig]:
    """Open an existing run directory for resuming; its stored config is the base of ``overrides``."""
    import yaml

    from driftrl.config import parse_override, set_dotted

    run = RunDir(Path(path))
    if not run.config.is_file():
        raise ConfigError(f"{run.root} is not a driftrl run directory (no config.yaml)")
    tree = yaml.safe_load(run.config.read_text()) or {}
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    cfg = config_from_dict(tree, source=f"{run.config} + overrides" if overrides else str(run.config))
    return run, cfg
