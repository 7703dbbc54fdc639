"""The run directory: where a run's config, checkpoints, buffer, metrics and report live.

Layout (DESIGN.md "Run directory")::

    runs/<name>/config.yaml            resolved config (written once; a resume checks it)
    runs/<name>/checkpoints/step_<n>/  learner checkpoint + state.json
    runs/<name>/buffer/                Arrow IPC segments + ack log
    runs/<name>/metrics.parquet        one row per learner step
    runs/<name>/report/                PNG plots, summary
    runs/<name>/logs/

Every file the driver writes here is written to a temporary name and renamed, so a crash never
leaves a half-written config or state file behind.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driftrl.config import ConfigError, DriftConfig, config_from_dict, dump_config

_STEP_DIR = re.compile(r"^step_(\d+)$")


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
        """The newest complete checkpoint (one whose state.json exists), or None."""
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
