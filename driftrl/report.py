"""The end-of-run report: PNG plots from ``metrics.parquet`` and a one-screen summary.

The metrics table has one row per learner step: the :meth:`learner.engine.Learner.train_step` dict
without its ``driftrl_learner_`` prefix (:func:`learner_row`), plus the driver's columns
:data:`DRIVER_COLUMNS`. Plots skip series a run did not produce (a run without probe syncs has no
realised entropy change) rather than drawing empty axes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq

LEARNER_PREFIX = "driftrl_learner_"

# columns the driver adds to the learner's: (name, meaning)
DRIVER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("probe_entropy", "drift gauge: mean token entropy on the fixed probe set, at steps where it was probed"),
    ("realised_delta_entropy", "drift gauge: probe entropy change since the previous sync, at sync steps"),
    (
        "predicted_delta_entropy_since_sync",
        "sum of predicted_entropy_change over the measured steps since the previous sync, at sync steps",
    ),
    ("sync_seconds", "wall time of the weight sync started at this step"),
    ("buffer_rows_available", "replay buffer rows waiting to be trained on"),
    ("buffer_rows_leased", "replay buffer rows leased to the learner"),
    ("rollout_tokens_per_s", "generation throughput summed over the rollout actors"),
    ("rollout_tokens_generated", "response tokens the rollout actors generated so far (trained or not)"),
    ("rollout_generate_seconds", "seconds the rollout engines had work so far, summed over actors"),
    ("rollout_weight_load_seconds", "seconds the rollout actors spent loading weights so far, summed"),
    ("buffer_rows_evicted_stale", "rows the buffer dropped so far as older than learner.max_staleness"),
    ("wall_seconds", "seconds since the run started"),
)


@dataclass(frozen=True)
class Plot:
    """One PNG: ``(column, legend)`` series against the learner step, optionally a second y axis
    for series of another scale (the predicted entropy change is per unit step size)."""

    file_name: str
    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]
    right_ylabel: str = ""
    right_series: tuple[tuple[str, str], ...] = ()


PLOTS: tuple[Plot, ...] = (
    Plot("reward.png", "Reward", "mean reward", (("reward_mean", "trained batch"),)),
    Plot(
        "entropy.png",
        "Policy entropy",
        "nats / token",
        (("entropy_mean", "training batch"), ("probe_entropy", "probe set")),
    ),
    Plot(
        "delta_entropy_same_batch.png",
        "Entropy change of a step on its own tokens: predicted (first order) vs realised",
        "ΔH (nats)",
        (
            ("predicted_entropy_change", "predicted: η_eff · (−mean r·A·Sc over kept tokens)"),
            ("realised_entropy_change", "realised: batch entropy after − before the step"),
        ),
    ),
    Plot(
        "delta_entropy.png",
        "Drift gauge: probe-set entropy change per sync (other prompts: not a test of the law)",
        "probe ΔH (nats)",
        (("realised_delta_entropy", "probe set, since the previous sync"),),
        "predicted ΔH (nats)",
        (("predicted_delta_entropy_since_sync", "same-batch prediction, summed since the previous sync"),),
    ),
    Plot(
        "mask_fractions.png",
        "Tokens dropped by the entropy clip",
        "fraction of valid tokens",
        (
            ("clip_dropped_frac", "all"),
            ("clip_dropped_frac_pos_adv", "A > 0"),
            ("clip_dropped_frac_neg_adv", "A < 0"),
        ),
    ),
    Plot(
        "staleness.png",
        "Staleness of trained rows",
        "policy versions",
        (("staleness_mean", "mean"), ("staleness_max", "max")),
    ),
    Plot("cov.png", "Cov(A, r·Sc)", "covariance", (("cov_adv_weighted_s_centered", "batch covariance"),)),
    Plot(
        "throughput.png",
        "Throughput",
        "tokens / s",
        (("train_tokens_per_s", "learner"), ("rollout_tokens_per_s", "rollout actors")),
    ),
    Plot(
        "buffer.png",
        "Replay buffer",
        "rows",
        (("buffer_rows_available", "available"), ("buffer_rows_leased", "leased")),
    ),
)
# (x column, y column) of the predicted-vs-realised scatters: same batch (one point per measured
# step, the test of the first-order law) and the probe-set drift gauge (one point per sync)
SAME_BATCH_PAIR = ("predicted_entropy_change", "realised_entropy_change")
DELTA_ENTROPY_PAIR = ("predicted_delta_entropy_since_sync", "realised_delta_entropy")

SUMMARY_KEYS: tuple[tuple[str, str], ...] = (
    ("reward_mean", "reward"),
    ("entropy_mean", "entropy"),
    ("probe_entropy", "probe entropy"),
    ("realised_entropy_change", "realised ΔH"),
    ("cov_adv_weighted_s_centered", "Cov(A, r·Sc)"),
    ("clip_dropped_frac", "mask fraction"),
    ("mismatch_kl", "behaviour KL"),
    ("is_masked_frac", "IS masked"),
    ("truncated_frac", "IS truncated"),
    ("staleness_mean", "staleness"),
    ("train_tokens_per_s", "train tokens/s"),
    ("rollout_tokens_per_s", "rollout tokens/s"),
    ("sync_seconds", "sync seconds"),
    ("wall_seconds", "wall seconds"),
)


def learner_row(metrics: Mapping[str, object]) -> dict[str, float]:
    """A ``Learner.train_step`` dict as metrics-table columns: the ``driftrl_learner_`` prefix
    removed (unprefixed keys pass unchanged), numbers as floats (NaN kept), anything else dropped."""
    return {
        key.removeprefix(LEARNER_PREFIX): float(value)  # type: ignore[arg-type]
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


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


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _series(rows: Sequence[Mapping[str, float]], column: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(column)
        if _finite(value):
            xs.append(row.get("step", len(xs)))
            ys.append(value)
    return xs, ys


def _delta_entropy_pairs(
    rows: Sequence[Mapping[str, float]], pair: tuple[str, str] = DELTA_ENTROPY_PAIR
) -> list[tuple[float, float]]:
    x_col, y_col = pair
    return [(row[x_col], row[y_col]) for row in rows if _finite(row.get(x_col)) and _finite(row.get(y_col))]


def delta_entropy_agreement(
    rows: Sequence[Mapping[str, float]], pair: tuple[str, str] = DELTA_ENTROPY_PAIR, count_key: str = "syncs"
) -> dict[str, float | int | None]:
    """How a realised entropy change follows the first-order prediction over the run.

    ``pair`` = :data:`SAME_BATCH_PAIR` compares each measured step's prediction with the realised
    change on the same tokens (the test of the law); the default, :data:`DELTA_ENTROPY_PAIR`, the
    probe-set drift gauge per sync. Returns ``count_key`` (pairs with both values), ``pearson_r``
    (None below 3 pairs or with a constant side) and ``sign_agreement`` (fraction of pairs with
    equal signs; None without pairs). The step scale is approximate for Adam, so sign and
    correlation are the comparable parts.
    """
    pairs = _delta_entropy_pairs(rows, pair)
    n = len(pairs)
    signs = sum(math.copysign(1, x) == math.copysign(1, y) for x, y in pairs)
    out: dict[str, float | int | None] = {
        count_key: n,
        "pearson_r": None,
        "sign_agreement": signs / n if n else None,
    }
    if n >= 3:
        mx, my = sum(x for x, _ in pairs) / n, sum(y for _, y in pairs) / n
        sxy = sum((x - mx) * (y - my) for x, y in pairs)
        sxx, syy = sum((x - mx) ** 2 for x, _ in pairs), sum((y - my) ** 2 for _, y in pairs)
        if sxx > 0 and syy > 0:
            out["pearson_r"] = sxy / math.sqrt(sxx * syy)
    return out


def _draw(plt: ModuleType, plot: Plot, rows: Sequence[Mapping[str, float]], path: Path) -> bool:
    """Save ``plot`` to ``path``; False (nothing written) when the run has none of its columns."""
    sides = [
        (ylabel, [(legend, *_series(rows, col)) for col, legend in series])
        for ylabel, series in ((plot.ylabel, plot.series), (plot.right_ylabel, plot.right_series))
    ]
    sides = [(ylabel, [d for d in drawn if d[1]]) for ylabel, drawn in sides]
    if not any(drawn for _, drawn in sides):
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    handles = []
    for axis, (ylabel, drawn) in zip((ax, ax.twinx() if sides[1][1] else None), sides, strict=True):
        for legend, xs, ys in drawn:
            color = f"C{len(handles)}"  # one colour cycle across both axes
            handles += axis.plot(xs, ys, marker="." if len(xs) < 50 else None, label=legend, color=color)
        if axis is not None:
            axis.set_ylabel(ylabel)
    ax.set_title(plot.title)
    ax.set_xlabel("learner step")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _draw_delta_entropy_scatter(
    plt: ModuleType,
    rows: Sequence[Mapping[str, float]],
    agreement: Mapping[str, object],
    path: Path,
    same_batch: bool = False,
) -> None:
    pairs = _delta_entropy_pairs(rows, SAME_BATCH_PAIR if same_batch else DELTA_ENTROPY_PAIR)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter([x for x, _ in pairs], [y for _, y in pairs], s=16)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    r = agreement["pearson_r"]
    shown_r = "n/a" if r is None else f"{r:.3f}"
    if same_batch:
        ax.set_title(f"ΔH on the step's own tokens: Pearson r = {shown_r} over {len(pairs)} steps")
        ax.set_xlabel("predicted, η_eff · (−mean r·A·Sc) (nats)")
        ax.set_ylabel("realised, entropy after − before (nats)")
    else:
        ax.set_title(f"Drift gauge, probe set: Pearson r = {shown_r} over {len(pairs)} syncs")
        ax.set_xlabel("predicted, summed since previous sync (nats)")
        ax.set_ylabel("realised on the probe set (nats)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, extra: Mapping[str, object] | None = None) -> Path:
    """Write ``report/*.png`` and ``report/summary.{txt,json}``; returns the summary text path.

    One PNG per :data:`PLOTS` entry the run has data for, plus ``delta_entropy_same_batch_scatter.png``
    (predicted vs realised ΔH on the same tokens, one point per measured step) and
    ``delta_entropy_scatter.png`` (the probe-set drift gauge, one point per sync) when they have data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = run_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.parquet"
    rows = pq.read_table(metrics_path).to_pylist() if metrics_path.exists() else []
    for plot in PLOTS:
        _draw(plt, plot, rows, report / plot.file_name)
    same_batch = delta_entropy_agreement(rows, SAME_BATCH_PAIR, count_key="steps")
    if same_batch["steps"]:
        scatter = report / "delta_entropy_same_batch_scatter.png"
        _draw_delta_entropy_scatter(plt, rows, same_batch, scatter, same_batch=True)
    agreement = delta_entropy_agreement(rows)
    if agreement["syncs"]:
        _draw_delta_entropy_scatter(plt, rows, agreement, report / "delta_entropy_scatter.png")

    summary: dict[str, object] = {"steps": len(rows)}
    lines = [f"driftrl run {run_dir.name}: {len(rows)} learner steps"]
    for key, label in SUMMARY_KEYS:
        _, ys = _series(rows, key)
        if ys:
            summary[key] = {"first": ys[0], "last": ys[-1]}
            lines.append(f"  {label:<16} first {ys[0]:>10.4f}   last {ys[-1]:>10.4f}")
    if same_batch["steps"]:
        summary["same_batch_entropy_agreement"] = same_batch
        r, signs = same_batch["pearson_r"], same_batch["sign_agreement"]
        lines.append(
            f"  {'ΔH same batch':<16} r {'n/a' if r is None else f'{r:.3f}'}, same sign {signs:.0%} "
            f"over {same_batch['steps']} measured steps (predicted vs realised on the step's tokens)"
        )
    if agreement["syncs"]:
        summary["delta_entropy_agreement"] = agreement
        r, signs = agreement["pearson_r"], agreement["sign_agreement"]
        lines.append(
            f"  {'ΔH probe drift':<16} r {'n/a' if r is None else f'{r:.3f}'}, same sign {signs:.0%} "
            f"over {agreement['syncs']} syncs (drift gauge: other prompts, not a test of the law)"
        )
    for key, value in (extra or {}).items():
        summary[key] = value
        if isinstance(value, Mapping):
            lines.append(f"  {key}:")
            lines.extend(f"    {name:<56} {seconds:>8.2f}" for name, seconds in value.items())
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<16} {shown}")
    lines.append(f"  report: {report}")
    (report / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text_path = report / "summary.txt"
    text_path.write_text("\n".join(lines) + "\n")
    return text_path
