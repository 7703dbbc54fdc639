"""Per-step metric loggers for TensorBoard and Weights & Biases (``metrics.loggers``).

They log the same row the driver appends to ``metrics.parquet`` (:class:`driftrl.report.MetricsLog`),
the learner's metrics without their ``driftrl_learner_`` prefix plus the driver's columns, so the
three views of a run never disagree. Non-finite values are left out (TensorBoard and W&B both draw
them as gaps anyway, and W&B's summary rejects NaN in some versions).

Both backends are optional extras (``pip install 'driftrl[tensorboard]'`` / ``'driftrl[wandb]'``);
asking for one that is not installed fails before the run starts, naming the extra. W&B honours
its own environment (``WANDB_MODE=offline`` writes the run under ``<run dir>/wandb`` without a
network; ``wandb sync`` uploads it later).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from driftrl.config import ConfigError

LoggerName = Literal["tensorboard", "wandb"]
# logger -> (module that must import, the pyproject extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}
TENSORBOARD_DIR = "tensorboard"


def _finite_items(row: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "step" and math.isfinite(float(v))}


class StepLogger:
    """One backend: :meth:`log` once per learner step, :meth:`close` at the end of the run."""

    def log(self, row: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TensorBoardLogger(StepLogger):
    """Scalars under ``<run dir>/tensorboard/``, one tag per metrics-table column."""

    def __init__(self, log_dir: Path) -> None:
        from tensorboard.summary import Writer

        self.log_dir = log_dir
        self._writer = Writer(str(log_dir))

    def log(self, row: Mapping[str, float], step: int) -> None:
        for key, value in _finite_items(row).items():
            self._writer.add_scalar(key, value, step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger(StepLogger):
    """A W&B run named after the run directory, its config the resolved driftrl config."""

    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any], project: str) -> None:
        import wandb

        self._run = wandb.init(project=project, name=name, dir=str(run_dir), config=dict(config), reinit=True)

    def log(self, row: Mapping[str, float], step: int) -> None:
        self._run.log(_finite_items(row), step=step)

    def close(self) -> None:
        import wandb

        self._run.finish()
        # finish() can return before wandb-core has written the run's records (seen offline: a
        # 7-byte file that fills a moment later); teardown waits for the service to flush and exit
        wandb.teardown()


def check_installed(names: Sequence[str]) -> None:
    """Raise :class:`ConfigError` naming the extra for each asked-for logger that cannot import."""
    missing = [name for name in names if importlib.util.find_spec(EXTRAS[name][0]) is None]
    if missing:
        extras = ",".join(EXTRAS[name][1] for name in missing)
        raise ConfigError(
            f"metrics.loggers asks for {', '.join(missing)}, which is not installed: "
            f"pip install 'driftrl[{extras}]' (or drop it from metrics.loggers)"
        )


def open_loggers(
    names: Sequence[str], run_dir: Path, run_name: str, config: Mapping[str, Any], wandb_project: str
) -> list[StepLogger]:
    """The loggers ``names`` asks for, writing under ``run_dir``."""
    check_installed(names)
    loggers: list[StepLogger] = []
    for name in names:
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir / TENSORBOARD_DIR))
        else:
            loggers.append(WandbLogger(run_dir, run_name, config, wandb_project))
    return loggers
