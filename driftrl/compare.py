"""``driftrl compare``: one report over several run directories, seeds grouped by method.

A *method* is a set of runs whose resolved configs are equal once the seeds and the run's own
name and place are left out (:data:`NOT_METHOD`), so ``grpo-s0`` and ``grpo-s1`` are one method;
``LABEL=RUN_DIR`` on the command line (or :func:`write_comparison`'s ``groups``) names the groups
by hand instead. For each method the table gives the mean and the spread (population std, and
``n`` seeds) over its runs of each run's value of every :data:`COLUMNS` entry, a run's value being
the mean over its last ``window`` steps (``last``) or over all its steps (``mean``), non-finite
values left out; a column no run has is left out. Avg@K / Pass@K come from the eval JSON that
``driftrl eval`` writes beside the final model (``<run dir>/final_model.eval-k<K>.json``).

The plots: one PNG per column, the mean over seeds of a trailing ``window``-step mean against the
learner step, the band min..max over seeds; ``eval.png`` when evals exist;
``delta_entropy_scatter.png`` (predicted vs realised probe ΔH per sync, seeds pooled) when any run
has both.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
import yaml

from driftrl.config import ConfigError
from driftrl.report import DELTA_ENTROPY_PAIR
from driftrl.run_dir import RunDir

# The same-batch realised entropy change per step (the learner's re-forward after its update),
# beside ``predicted_entropy_change``; shown when a run has it, left out when none does.
REALISED_ENTROPY_CHANGE = "realised_entropy_change"

# dotted config keys that differ between seeds of one method, not between methods
NOT_METHOD: tuple[str, ...] = (
    "run.name",
    "run.root_dir",
    "run.seed",
    "rollout.seed",
    "metrics.port",
    "metrics.loggers",
    "buffer.uri",
)


@dataclass(frozen=True)
class Column:
    """One compared quantity: a metrics-table column and how a run's value is taken from it."""

    column: str
    label: str
    reduce: Literal["last", "mean"]
    digits: int = 3


COLUMNS: tuple[Column, ...] = (
    Column("entropy_mean", "entropy (last)", "last"),
    Column("probe_entropy", "probe entropy (last)", "last"),
    Column(REALISED_ENTROPY_CHANGE, "same-batch ΔH (mean)", "mean", 5),
    Column("predicted_entropy_change", "predicted ΔH (mean)", "mean", 5),
    Column("cov_adv_weighted_s_centered", "Cov(A, r·Sc) (mean)", "mean", 4),
    Column("reward_mean", "reward (last)", "last"),
    Column("clip_dropped_frac", "mask fraction (mean)", "mean", 4),
    Column("clip_dropped_frac_neg_adv", "mask fraction A<0 (mean)", "mean", 4),
    Column("staleness_mean", "staleness (mean)", "mean", 2),
    Column("train_tokens_per_s", "learner tokens/s (mean)", "mean", 0),
    Column("rollout_tokens_per_s", "rollout tokens/s (mean)", "mean", 0),
)
STEPS_PER_S = "steps_per_s"


@dataclass
class Run:
    """One run directory's metrics rows, config tree and eval results."""

    path: Path
    rows: list[dict[str, float]]
    config: dict[str, Any]
    evals: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_k: int | None = None


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def load_run(path: Path) -> Run:
    """Read a run directory (``metrics.parquet``, ``config.yaml``, eval JSON beside ``final_model``)."""
    run = RunDir(Path(path))
    if not run.metrics.is_file():
        raise ConfigError(f"{run.root} is not a driftrl run directory with metrics (no metrics.parquet)")
    config = yaml.safe_load(run.config.read_text()) if run.config.is_file() else {}
    loaded = Run(run.root, pq.read_table(run.metrics).to_pylist(), config or {})
    evals = sorted(run.root.glob(f"{run.final_model.name}.eval-k*.json"))
    if evals:
        record = json.loads(evals[-1].read_text())
        loaded.eval_k = int(record["k"])
        loaded.evals = {
            name: {"avg_at_k": float(d["avg_at_k"]), "pass_at_k": float(d["pass_at_k"])}
            for name, d in record["datasets"].items()
        }
    return loaded


def group_by_method(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs whose configs agree outside :data:`NOT_METHOD`, labelled by the keys that tell them apart."""
    keyed: dict[tuple[tuple[str, str], ...], list[Run]] = {}
    for run in runs:
        flat = {k: v for k, v in _flat(run.config).items() if k not in NOT_METHOD}
        keyed.setdefault(tuple(sorted((k, json.dumps(v)) for k, v in flat.items())), []).append(run)
    if len(keyed) == 1:
        (members,) = keyed.values()
        return {members[0].path.name if len(members) == 1 else "all runs": members}
    differing = sorted({k for key in keyed for k, v in key if any((k, v) not in other for other in keyed)})
    out: dict[str, list[Run]] = {}
    for key, members in keyed.items():
        values = dict(key)
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={json.loads(values.get(k, 'null'))}" for k in differing)
        out[label] = members
    return out


def _finite(rows: Sequence[Mapping[str, float]], column: str) -> list[float]:
    return [float(r[column]) for r in rows if r.get(column) is not None and math.isfinite(r[column])]


def run_value(rows: Sequence[Mapping[str, float]], column: Column, window: int) -> float | None:
    """A run's value of ``column``: mean over its last ``window`` finite values or over all of them."""
    values = _finite(rows, column.column)
    if column.reduce == "last":
        values = values[-window:]
    return statistics.fmean(values) if values else None


def steps_per_s(rows: Sequence[Mapping[str, float]]) -> float | None:
    """Learner steps per wall second between the first and the last step (start-up left out)."""
    walls = _finite(rows, "wall_seconds")
    if len(walls) < 2 or walls[-1] <= walls[0]:
        return None
    return (len(walls) - 1) / (walls[-1] - walls[0])


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, population std, min, max and count over seeds."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise(groups: Mapping[str, Sequence[Run]], window: int) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {quantity: spread over its runs}}``; a quantity no run of a method has is absent."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method, runs in groups.items():
        per_quantity: dict[str, list[float]] = {}
        for run in runs:
            values = {c.column: run_value(run.rows, c, window) for c in COLUMNS}
            values[STEPS_PER_S] = steps_per_s(run.rows)
            for name, scores in run.evals.items():
                for metric, value in scores.items():
                    values[f"eval/{name}/{metric}"] = value
            for key, value in values.items():
                if value is not None:
                    per_quantity.setdefault(key, []).append(value)
        out[method] = {key: spread(values) for key, values in per_quantity.items()}
    return out


def _table_columns(summary: Mapping[str, Mapping[str, Any]], k: int | None) -> list[tuple[str, str, int]]:
    present = {key for stats in summary.values() for key in stats}
    columns = [(c.column, c.label, c.digits) for c in COLUMNS if c.column in present]
    columns.append((STEPS_PER_S, "steps/s", 3))
    evals = sorted(key for key in present if key.startswith("eval/"))
    datasets = list(dict.fromkeys(key.split("/")[1] for key in evals))
    for name in datasets:
        suffix = f" {name}" if len(datasets) > 1 else ""
        columns.append((f"eval/{name}/avg_at_k", f"Avg@{k}{suffix}", 3))
        columns.append((f"eval/{name}/pass_at_k", f"Pass@{k}{suffix}", 3))
    return [c for c in columns if c[0] in present]


def markdown_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]], k: int | None) -> str:
    """One row per method, ``mean ± std`` per quantity (``± 0`` for one seed) and the seed count."""
    columns = _table_columns(summary, k)
    lines = [
        "| method | runs | " + " | ".join(label for _, label, _ in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for method, stats in summary.items():
        n = max((s["n"] for s in stats.values()), default=0)
        cells = [
            f"{stats[key]['mean']:.{digits}f} ± {stats[key]['std']:.{digits}f}" if key in stats else ""
            for key, _, digits in columns
        ]
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _trailing_mean(rows: Sequence[Mapping[str, float]], column: str, window: int) -> dict[int, float]:
    out, recent = {}, []
    for row in rows:
        value = row.get(column)
        if value is not None and math.isfinite(value):
            recent = [*recent, float(value)][-window:]
            out[int(row["step"])] = statistics.fmean(recent)
    return out


def plot(
    groups: Mapping[str, Sequence[Run]], summary: Mapping[str, Any], out: Path, window: int
) -> list[str]:
    """The PNGs (see the module docstring); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for column in COLUMNS:
        curves = {
            method: [c for c in (_trailing_mean(r.rows, column.column, window) for r in runs) if c]
            for method, runs in groups.items()
        }
        if not any(curves.values()):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (method, per_run) in enumerate(curves.items()):
            if not per_run:
                continue
            steps = sorted(set.intersection(*(set(c) for c in per_run)))
            values = [[c[s] for c in per_run] for s in steps]
            ax.plot(
                steps,
                [statistics.fmean(v) for v in values],
                color=f"C{i}",
                label=f"{method} ({len(per_run)})",
            )
            ax.fill_between(
                steps, [min(v) for v in values], [max(v) for v in values], color=f"C{i}", alpha=0.2
            )
        ax.set_title(
            f"{column.label.rsplit(' (', 1)[0]}: {window}-step trailing mean; band min..max over seeds"
        )
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        name = f"{column.column}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)
    pairs = {
        method: [
            (row[DELTA_ENTROPY_PAIR[0]], row[DELTA_ENTROPY_PAIR[1]])
            for run in runs
            for row in run.rows
            if all(math.isfinite(row.get(c, math.nan)) for c in DELTA_ENTROPY_PAIR)
        ]
        for method, runs in groups.items()
    }
    if any(pairs.values()):
        fig, ax = plt.subplots(figsize=(6, 5))
        for i, (method, points) in enumerate(pairs.items()):
            ax.scatter(
                [x for x, _ in points], [y for _, y in points], s=8, alpha=0.5, color=f"C{i}", label=method
            )
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("predicted ΔH since the previous sync (per unit step size)")
        ax.set_ylabel("realised ΔH on the probe set (nats)")
        ax.set_title("entropy change per sync, seeds pooled")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "delta_entropy_scatter.png", dpi=100)
        plt.close(fig)
        written.append("delta_entropy_scatter.png")
    eval_keys = sorted({k for stats in summary.values() for k in stats if k.startswith("eval/")})
    if eval_keys:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(summary) * len(eval_keys) / 2), 4))
        width = 0.8 / len(eval_keys)
        for j, key in enumerate(eval_keys):
            stats = [summary[m].get(key) for m in summary]
            ax.bar(
                [i + (j - (len(eval_keys) - 1) / 2) * width for i in range(len(summary))],
                [s["mean"] if s else 0.0 for s in stats],
                width=width,
                yerr=[s["std"] if s else 0.0 for s in stats],
                label=key.removeprefix("eval/").replace("_at_k", "@K"),
            )
        ax.set_xticks(range(len(summary)), list(summary))
        ax.set_ylabel("held-out (error bar: std over seeds)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "eval.png", dpi=100)
        plt.close(fig)
        written.append("eval.png")
    return written


@dataclass(frozen=True)
class Comparison:
    """What :func:`write_comparison` wrote: the markdown report, the PNG names, the per-method summary."""

    markdown: Path
    plots: list[str]
    summary: dict[str, dict[str, dict[str, float]]]


def write_comparison(groups: Mapping[str, Sequence[Path | Run]], out: Path, window: int = 10) -> Comparison:
    """Write ``out/compare.md`` (the table and the plots), ``compare.json`` and the PNGs.

    Args:
        groups: method label -> its runs, as run directories or already loaded :class:`Run` records.
        out: report folder (created).
        window: steps averaged for the ``last`` values and the curves' trailing mean.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    loaded = {
        method: [r if isinstance(r, Run) else load_run(Path(r)) for r in runs]
        for method, runs in groups.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(loaded, window)
    ks = {r.eval_k for runs in loaded.values() for r in runs if r.eval_k is not None}
    k = max(ks) if ks else None
    pictures = plot(loaded, summary, out, window)
    text = "\n".join(
        [
            f"# driftrl compare: {sum(len(r) for r in loaded.values())} runs, {len(loaded)} methods",
            "",
            f"mean ± std over each method's runs; (last) = mean of a run's last {window} steps, "
            "(mean) = over all its steps; steps/s between its first and last step.",
            "",
            markdown_table(summary, k),
            *(f"- {m}: " + ", ".join(str(r.path) for r in runs) for m, runs in loaded.items()),
            "",
            *(f"![{name}]({name})" for name in pictures),
            "",
        ]
    )
    md = out / "compare.md"
    md.write_text(text)
    record = {
        "window": window,
        "k": k,
        "runs": {m: [str(r.path) for r in runs] for m, runs in loaded.items()},
        "summary": summary,
        "plots": pictures,
    }
    (out / "compare.json").write_text(json.dumps(record, indent=1) + "\n")
    return Comparison(md, pictures, summary)


def groups_from_args(items: Sequence[str]) -> dict[str, list[Run]]:
    """``RUN_DIR`` (grouped by :func:`group_by_method`) or ``LABEL=RUN_DIR`` (grouped by label)."""
    labelled: dict[str, list[Run]] = {}
    unlabelled: list[Run] = []
    for item in items:
        label, sep, path = item.partition("=")
        if sep and not Path(item).exists():
            labelled.setdefault(label, []).append(load_run(Path(path)))
        else:
            unlabelled.append(load_run(Path(item)))
    return {**(group_by_method(unlabelled) if unlabelled else {}), **labelled}
