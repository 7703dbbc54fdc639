"""The end-of-run report: PNG plots from ``metrics.parquet`` and a one-screen summary.

The metrics table has one row per learner step (the numbers the learner returned plus the driver's
own: probe entropy, sync seconds, buffer size). Plots skip series a run did not produce (a GRPO run
has no mask fractions) rather than drawing empty axes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# (file name, title, y label, [(column, legend)])
PLOTS: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    ("reward.png", "Reward", "mean reward", (("reward_mean", "trained batch"),)),
    ("entropy.png", "Policy entropy", "nats / token", (("entropy_mean", "training batch"), ("probe_entropy", "probe set"))),
    (
        "delta_entropy.png",
        "Entropy change: predicted (first order) vs realised",
        "ΔH (nats)",
        (("predicted_delta_entropy", "predicted per step"), ("realised_delta_entropy", "realised per sync (probe)")),
    ),
    (
        "mask_fractions.png",
        "Tokens dropped by the entropy clip",
        "fraction of valid tokens",
        (("mask_drop_frac", "all"), ("mask_drop_frac_pos", "A > 0"), ("mask_drop_frac_neg", "A < 0")),
    ),
    ("staleness.png", "Staleness of trained rows", "policy versions", (("staleness_mean", "mean"), ("staleness_max", "max"))),
    ("cov.png", "Cov(A, r·Sc)", "covariance", (("cov_adv_r_sc", "batch covariance"),)),
)

SUMMARY_KEYS: tuple[tuple[str, str], ...] = (
    ("reward_mean", "reward"),
    ("entropy_mean", "entropy"),
    ("cov_adv_r_sc", "Cov(A, r·Sc)"),
    ("mask_drop_frac", "mask fraction"),
    ("staleness_mean", "staleness"),
    ("tokens_per_s", "train tokens/s"),
)


class MetricsLog:
    """Appends per-step metric dicts and writes them as one parquet file (atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, float]] = []
        if path.exists():
            self.rows = pq.read_table(path).to_pylist()

    def append(self, row: Mapping[str, float]) -> None:
        self.rows.append({k: float(v) for k, v in row.items() if isinstance(v, int | float)})

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step``: a resumed run re-does those steps from its checkpoint."""
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]

    def flush(self) -> None:
        if not self.rows:
            return
        names = sorted({k for row in self.rows for k in row})
        table = pa.table({n: pa.array([row.get(n) for row in self.rows], pa.float64()) for n in names})
        tmp = self.path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        tmp.replace(self.path)


def _series(rows: Sequence[Mapping[str, float]], column: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(column)
        if value is not None and math.isfinite(value):
            xs.append(row.get("step", len(xs)))
            ys.append(value)
    return xs, ys


def write_report(run_dir: Path, extra: Mapping[str, object] | None = None) -> Path:
    """Write ``report/*.png`` and ``report/summary.{txt,json}``; returns the summary text path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = run_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.parquet"
    rows = pq.read_table(metrics_path).to_pylist() if metrics_path.exists() else []
    for file_name, title, ylabel, series in PLOTS:
        drawn = [(legend, *_series(rows, col)) for col, legend in series]
        drawn = [d for d in drawn if d[1]]
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for legend, xs, ys in drawn:
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=legend)
        ax.set_title(title)
        ax.set_xlabel("learner step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(report / file_name, dpi=100)
        plt.close(fig)

    summary: dict[str, object] = {"steps": len(rows)}
    lines = [f"driftrl run {run_dir.name}: {len(rows)} learner steps"]
    for key, label in SUMMARY_KEYS:
        _, ys = _series(rows, key)
        if ys:
            summary[key] = {"first": ys[0], "last": ys[-1]}
            lines.append(f"  {label:<16} first {ys[0]:>10.4f}   last {ys[-1]:>10.4f}")
    for key, value in (extra or {}).items():
        summary[key] = value
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<16} {shown}")
    lines.append(f"  report: {report}")
    (report / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text_path = report / "summary.txt"
    text_path.write_text("\n".join(lines) + "\n")
    return text_path
