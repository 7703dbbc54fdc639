"""The paper's claims at tiny scale: entropy dynamics of GRPO, ClipB, ClipV and ClipV with r-weighting.

    python -m experiments.entropy_dynamics.run --out runs/entropy_dynamics --seeds 2 --steps 40

(The same comparison through the real Ray pipeline, with real off-policy data: pipeline_runs.py.)

Builds the synthetic reversal data, the tiny policy and its warm start (cached in ``--out``), then

1. one real policy-gradient step on the warm policy: realised vs predicted entropy change per token;
2. for every seed and method, the same number of off-policy GRPO steps (behaviour policy
   ``--staleness`` versions behind) from the same warm start: entropy, reward, Cov(A, r·Sc) and
   mask fractions per step;
3. Avg@K and Pass@K on the held-out split (temperature 0.7) for the warm start and each run.

Writes ``results.json`` (all numbers), ``summary.md`` and PNG plots to ``--out``. See loop.py for
why the loop runs in-process instead of through the Ray pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from experiments.entropy_dynamics.loop import (
    METHODS,
    LoopSettings,
    entropy_change_check,
    run_rl,
    sample_batch,
    sample_k_correct,
)
from tasks.evaluation import avg_at_k, mean_pass_at_k

METHOD_LABELS = {"grpo": "GRPO", "clip_b": "ClipB", "clip_v": "ClipV", "clip_v_r": "ClipV (r-weighted)"}
EVAL_TEMPERATURE = 0.7


def prepare(out: Path, threads: int, n_heldout: int) -> tuple[Path, dict[str, Any], Path, Path]:
    """Data, tiny model and warm start under ``out`` (reused when already there)."""
    from tasks.synthetic import write_dataset
    from tasks.tiny_model import make_tiny_model
    from tasks.warm_start import WarmStartSettings, warm_start

    train, heldout = out / "data" / "train.parquet", out / "data" / "heldout.parquet"
    if not (train.is_file() and heldout.is_file()):
        write_dataset(train, heldout, seed=0, n_train=20_000, n_heldout=n_heldout)
    init = out / "model_init"
    if not (init / "config.json").is_file():
        make_tiny_model(init, seed=0)
    record = warm_start(
        init,
        out / "model_warm",
        train,
        heldout,
        WarmStartSettings(num_threads=threads, eval_rows=n_heldout),
        progress=False,
    )
    return out / "model_warm", record, train, heldout


def load_model(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def evaluate(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], k: int, max_new_tokens: int
) -> dict[str, float]:
    """Avg@K and Pass@K (tasks.evaluation) of K samples per held-out question at T = 0.7."""
    correct = sample_k_correct(model, tokenizer, rows, k, EVAL_TEMPERATURE, max_new_tokens, seed=12345)
    return {
        "avg_at_k": avg_at_k(correct),
        "pass_at_k": mean_pass_at_k(correct, k),
        "pass_at_1": mean_pass_at_k(correct, 1),
    }


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def summarise(runs: dict[str, dict[int, dict[str, Any]]], tail: int) -> dict[str, Any]:
    """Per method, over seeds: final entropy and reward (mean of the last ``tail`` steps), entropy
    change from the first step, Cov(A, r·Sc) mean and sign, mask fractions, Avg@K, Pass@K."""
    out: dict[str, Any] = {}
    for method, by_seed in runs.items():
        per_seed: dict[str, list[float]] = {}
        for run in by_seed.values():
            h = run["history"]
            last = h[-tail:]
            values = {
                "entropy_first": h[0]["entropy_mean"],
                "entropy_final": statistics.fmean(m["entropy_mean"] for m in last),
                "reward_final": statistics.fmean(m["reward_mean"] for m in last),
                "cov_mean": statistics.fmean(m["cov_adv_weighted_s_centered"] for m in h),
                "cov_negative_frac": statistics.fmean(m["cov_adv_weighted_s_centered"] < 0 for m in h),
                "dropped_frac_mean": statistics.fmean(m["clip_dropped_frac"] for m in h),
                "ratio_max": max(m["ratio_max"] for m in h),
                "avg_at_k": run["eval"]["avg_at_k"],
                "pass_at_k": run["eval"]["pass_at_k"],
            }
            values["entropy_change"] = values["entropy_final"] - values["entropy_first"]
            for key, v in values.items():
                per_seed.setdefault(key, []).append(float(v))
        out[method] = {key: mean_std(v) for key, v in per_seed.items()}
    return out


def plot(
    out: Path, check: dict[str, Any], runs: dict[str, dict[int, dict[str, Any]]], baseline: dict, k: int
) -> list[str]:
    """scatter.png, curves.png, eval.png; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in (
        (axes[0], "first_order", "first-order ∇H·Δθ"),
        (axes[1], "paper", "−A·Sc (per-token formula)"),
    ):
        ax.scatter(check[key], check["realised"], s=6, alpha=0.5)
        corr = check[f"corr_realised_vs_{key}"]
        ax.set_xlabel(f"predicted: {label}")
        ax.set_ylabel("realised ΔH per token")
        ax.set_title(f"Pearson r = {corr:.3f}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
    fig.suptitle(f"One SGD policy-gradient step (lr {check['lr']:g}), {check['tokens']} tokens")
    fig.tight_layout()
    fig.savefig(out / "scatter.png", dpi=120)
    plt.close(fig)

    panels = [
        ("entropy_mean", "token entropy (batch)"),
        ("reward_mean", "reward (batch)"),
        ("cov_adv_weighted_s_centered", "Cov(A, r·Sc)"),
        ("clip_dropped_frac", "fraction of tokens masked"),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)), sharex=True)
    for ax, (key, label) in zip(axes, panels, strict=True):
        for method, by_seed in runs.items():
            series = torch.tensor([[m[key] for m in run["history"]] for run in by_seed.values()])
            steps = range(series.shape[1])
            mean = series.mean(0)
            line = ax.plot(steps, mean, label=METHOD_LABELS[method])[0]
            ax.fill_between(
                steps, series.min(0).values, series.max(0).values, alpha=0.15, color=line.get_color()
            )
        ax.set_ylabel(label)
        if key == "cov_adv_weighted_s_centered":
            ax.axhline(0, color="grey", lw=0.5)
    axes[0].legend()
    axes[-1].set_xlabel("learner step")
    fig.suptitle("mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(runs)
    for offset, metric in ((-0.2, "avg_at_k"), (0.2, "pass_at_k")):
        vals = [[run["eval"][metric] for run in runs[m].values()] for m in names]
        ax.bar(
            [i + offset for i in range(len(names))],
            [statistics.fmean(v) for v in vals],
            width=0.4,
            yerr=[statistics.pstdev(v) if len(v) > 1 else 0 for v in vals],
            label=f"{'Avg' if metric == 'avg_at_k' else 'Pass'}@{k}",
        )
        ax.axhline(baseline[metric], ls="--", lw=0.8, color="C0" if metric == "avg_at_k" else "C1")
    ax.set_xticks(range(len(names)), [METHOD_LABELS[m] for m in names])
    ax.set_ylabel("held-out")
    ax.set_title(f"Avg@{k} / Pass@{k} at T={EVAL_TEMPERATURE} (dashed: warm start)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=120)
    plt.close(fig)
    return ["scatter.png", "curves.png", "eval.png"]


def summary_markdown(results: dict[str, Any]) -> str:
    k = results["settings"]["k"]
    lines = [
        "# Entropy dynamics at tiny scale",
        "",
        f"Seeds {results['settings']['seeds']}, {results['settings']['steps']} steps, staleness "
        f"{results['settings']['staleness']}, wall time {results['seconds']:.0f} s.",
        "",
        "| method | entropy first → final | reward final | Cov(A,r·Sc) mean (neg. frac) | masked | "
        f"Avg@{k} | Pass@{k} |",
        "|---|---|---|---|---|---|---|",
    ]
    b = results["baseline_eval"]
    lines.append(f"| warm start | | | | | {b['avg_at_k']:.3f} | {b['pass_at_k']:.3f} |")
    for method, s in results["summary"].items():
        lines.append(
            f"| {METHOD_LABELS[method]} | {s['entropy_first']['mean']:.3f} → {s['entropy_final']['mean']:.3f}"
            f" ± {s['entropy_final']['std']:.3f} | {s['reward_final']['mean']:.3f} | "
            f"{s['cov_mean']['mean']:.2e} ({s['cov_negative_frac']['mean']:.2f}) | "
            f"{s['dropped_frac_mean']['mean']:.3f} | {s['avg_at_k']['mean']:.3f} ± {s['avg_at_k']['std']:.3f} | "
            f"{s['pass_at_k']['mean']:.3f} ± {s['pass_at_k']['std']:.3f} |"
        )
    c = results["entropy_check"]
    lines += [
        "",
        f"Per-token entropy change of one SGD step (lr {c['lr']:g}, {c['tokens']} tokens): "
        f"corr(realised, first-order) = {c['corr_realised_vs_first_order']:.4f}, "
        f"corr(realised, −A·Sc) = {c['corr_realised_vs_paper']:.3f}; batch mean realised "
        f"{c['mean_realised']:.2e}, first-order {c['mean_first_order']:.2e}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="Output directory (data, models, report).")
    p.add_argument("--seeds", type=int, default=2, help="Seeds per method (0..seeds-1).")
    p.add_argument("--steps", type=int, default=40, help="Learner steps per run.")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument(
        "--staleness", type=int, default=2, help="Behaviour policy lag in versions (>0: off-policy)."
    )
    p.add_argument("--mu", type=float, default=2.5, help="Mask threshold (symmetric form) for ClipB/ClipV.")
    p.add_argument("--k", type=int, default=8, help="Samples per held-out question for Avg@K/Pass@K.")
    p.add_argument("--heldout", type=int, default=128, help="Held-out questions scored.")
    p.add_argument(
        "--check-lrs", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1], help="SGD lrs of the entropy check."
    )
    p.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))))
    args = p.parse_args(argv)

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warm_dir, warm_record, train_path, heldout_path = prepare(
        out, args.threads, n_heldout=max(256, args.heldout)
    )
    from tasks.synthetic import load_rows

    train_rows = load_rows(train_path)
    heldout_rows = load_rows(heldout_path)[: args.heldout]
    max_new_tokens = max(len(r["answer"]) for r in train_rows + heldout_rows) + 1

    model, tokenizer = load_model(warm_dir)
    baseline = evaluate(model, tokenizer, heldout_rows, args.k, max_new_tokens)
    # Short strings, where the warm policy is right some of the time: groups with reward variance,
    # hence nonzero advantages (long strings are mostly all-wrong groups that carry no gradient).
    check_rows = [r for r in train_rows if r["difficulty"] <= 5][:16]
    check_batch = sample_batch(
        model, tokenizer, check_rows, args.group_size, 1.0, max_new_tokens, generator_seed=7
    )
    checks = [entropy_change_check(model, check_batch, lr=lr) for lr in args.check_lrs]
    for c in checks:
        print(
            f"entropy check lr {c['lr']:g}: corr(realised, first-order) {c['corr_realised_vs_first_order']:.4f}, "
            f"corr(realised, -A*Sc) {c['corr_realised_vs_paper']:.3f}, mean realised {c['mean_realised']:.2e}",
            flush=True,
        )
    # the scatter shows the middle step size: large enough to move entropy, small enough to be linear
    check = checks[len(checks) // 2]

    runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in args.methods}
    for seed in range(args.seeds):
        for method in args.methods:
            t0 = time.perf_counter()
            model, tokenizer = load_model(warm_dir)
            settings = LoopSettings(
                method=method,
                steps=args.steps,
                prompts_per_step=args.prompts_per_step,
                group_size=args.group_size,
                lr=args.lr,
                staleness=args.staleness,
                mu=args.mu,
                max_new_tokens=max_new_tokens,
                seed=seed,
            )
            history = run_rl(model, tokenizer, train_rows, settings)
            result = evaluate(model, tokenizer, heldout_rows, args.k, max_new_tokens)
            runs[method][seed] = {"history": history, "eval": result, "seconds": time.perf_counter() - t0}
            print(
                f"seed {seed} {method:9s} entropy {history[0]['entropy_mean']:.3f} -> {history[-1]['entropy_mean']:.3f} "
                f"reward {history[-1]['reward_mean']:.3f} Avg@{args.k} {result['avg_at_k']:.3f} "
                f"Pass@{args.k} {result['pass_at_k']:.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )

    results = {
        "settings": {**vars(args), "eval_temperature": EVAL_TEMPERATURE, "max_new_tokens": max_new_tokens},
        "warm_start": warm_record,
        "baseline_eval": baseline,
        "entropy_check": {k: v for k, v in check.items() if not isinstance(v, list)},
        "entropy_checks_by_lr": [{k: v for k, v in c.items() if not isinstance(v, list)} for c in checks],
        "summary": summarise(runs, tail=max(1, args.steps // 8)),
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }
    results["plots"] = plot(out, check, runs, baseline, args.k)
    (out / "entropy_check_tokens.json").write_text(
        json.dumps({k: check[k] for k in ("realised", "first_order", "paper")}) + "\n"
    )
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(results))
    print(summary_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
