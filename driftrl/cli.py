"""The `driftrl` command line: one subcommand per user-facing action.

Subcommands import their implementation lazily so `driftrl --help` and config errors answer in
well under a second, before torch, vLLM or Ray are imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from driftrl.config import ConfigError, load_config
from tasks.data_files import DataFileError

Handler = Callable[[argparse.Namespace], int]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="configs/tiny-cpu.yaml", help="YAML config file.")
    p.add_argument("overrides", nargs="*", help="Dotted overrides, e.g. learner.lr=1e-5 rollout.group_size=4.")


def _make_tiny_model(args: argparse.Namespace) -> int:
    from tasks.tiny_model import make_tiny_model

    out = make_tiny_model(args.out, seed=args.seed)
    print(f"tiny model written to {out}")
    return 0


def _make_data(args: argparse.Namespace) -> int:
    from tasks.synthetic import ReversalSpec, TaskSpecError, make_dataset

    # Unset knobs fall back to the task's own defaults, kept in one place (tasks/synthetic.py), which
    # also owns their ranges: a bad knob is refused there, before a file is written.
    knobs = {k: getattr(args, k) for k in ("min_len", "max_len", "alphabet_size") if getattr(args, k) is not None}
    sizes = {k: getattr(args, k) for k in ("n_train", "n_heldout") if getattr(args, k) is not None}
    try:
        train, heldout = make_dataset(args.out, seed=args.seed, train_spec=ReversalSpec(**knobs), **sizes)
    except TaskSpecError as err:
        print(f"driftrl make-data: error: {err}", file=sys.stderr)
        return 2
    print(f"reversal task written: {train}, {heldout}")
    return 0


def _warm_start(args: argparse.Namespace) -> int:
    from driftrl.pipeline import ensure_tiny_default

    cfg = load_config(args.config, args.overrides)
    record = ensure_tiny_default(cfg)
    if record is None:
        print(f"{cfg.model.path}: not a warm-started tiny model; nothing to do")
        return 0
    print(
        f"warm start in {cfg.model.path}: held-out greedy accuracy {record['heldout_accuracy_before']:.3f} -> "
        f"{record['heldout_accuracy_after']:.3f} after {record['steps']} steps ({record['train_seconds']:.0f} s)"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from driftrl.pipeline import train_main

    return train_main(args)


def _run(args: argparse.Namespace) -> int:
    from driftrl.pipeline import run_main

    return run_main(args)


def _eval(args: argparse.Namespace) -> int:
    return eval_main(args)


def _filter_pass_rate(args: argparse.Namespace) -> int:
    return filter_pass_rate_main(args)


def _compare(args: argparse.Namespace) -> int:
    from driftrl.compare import groups_from_args, write_comparison

    md = write_comparison(groups_from_args(args.run_dirs), Path(args.out), window=args.window).markdown
    print("".join(line for line in md.read_text().splitlines(keepends=True) if line.startswith("|")), end="")
    print(f"report written to {md}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from driftrl.plan import plan_main

    try:
        return plan_main(args)
    except ValueError as err:
        print(f"driftrl plan: error: {err}", file=sys.stderr)
        return 2


def _check_config(args: argparse.Namespace) -> int:
    from driftrl.config import dump_config

    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    return 0


def make_verifier(task_type: str, reward_timeout_s: float = 5.0) -> Any:
    """Verdicts for a batch: exact match (synthetic) or the ``math`` reward scoring 1 (math data).

    The math reward runs in :class:`actors.rewards.RewardScorer`, the same scorer and per-call
    deadline as training: eval and training must agree on what "correct" means, and a response that
    makes math-verify/sympy hang scores 0 instead of stalling the evaluation.
    """
    if task_type == "synthetic":
        from tasks.synthetic import is_correct

        def exact(responses: Sequence[str], answers: Sequence[str]) -> list[bool]:
            return [is_correct(r, a) for r, a in zip(responses, answers, strict=True)]

        return exact
    if task_type == "math":
        from actors.config import RewardConfig
        from actors.rewards import RewardScorer

        scorer = RewardScorer(RewardConfig(type="math", timeout_s=reward_timeout_s))

        def math_correct(responses: Sequence[str], answers: Sequence[str]) -> list[bool]:
            return [reward >= 1.0 for reward in scorer.score(list(responses), list(answers))]

        return math_correct
    raise ValueError(f"no verifier for task type {task_type!r}")






def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


def default_eval_json(checkpoint: str, k: int) -> Path:
    """``<checkpoint>.eval-k<K>.json`` beside a local checkpoint; under ``runs/eval/`` for a hub name."""
    p = Path(checkpoint)
    if p.exists():
        p = p.resolve()
        return p.parent / f"{p.name}.eval-k{k}.json"
    return Path("runs") / "eval" / f"{checkpoint.replace('/', '--')}.eval-k{k}.json"


def _dataset_specs(args: argparse.Namespace, default_spec: str) -> dict[str, str]:
    specs: dict[str, str] = {}
    for item in getattr(args, "dataset", None) or []:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--dataset {item!r} is not NAME=SPEC")
        specs[name] = spec
    return specs or {"heldout": default_spec}


def eval_main(args: argparse.Namespace) -> int:
    """``driftrl eval``: Avg@K and Pass@K per dataset, printed as a table and written as JSON."""
    from tasks.evaluation import (
        KSampler,
        SamplingSetup,
        evaluate_prompt_set,
        format_table,
        load_prompt_set,
        resolve_model_dir,
    )

    cfg = load_config(args.config, args.overrides)
    checkpoint = args.checkpoint or cfg.model.path
    k = args.k
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    setup = SamplingSetup(
        temperature=args.temperature,
        top_p=1.0,
        max_tokens=args.max_tokens or cfg.rollout.max_tokens,
        seed=args.seed if args.seed is not None else cfg.run.seed,
    )
    model_dir = resolve_model_dir(checkpoint)
    specs = _dataset_specs(args, cfg.task.eval_path)
    sampler = KSampler.from_model(
        model_dir,
        dtype=cfg.rollout.dtype,
        max_model_len=cfg.rollout.max_model_len,
        kv_cache_memory_bytes=cfg.rollout.kv_cache_memory_bytes,
        seed=setup.seed,
    )
    verifier = make_verifier(cfg.task.type, cfg.rollout.reward.timeout_s)
    scores = []
    for name, spec in specs.items():
        prompt_set = load_prompt_set(
            name,
            spec,
            cfg.task.type,
            sampler.tokenizer,
            cfg.task.prompt_key,
            cfg.task.answer_key,
            limit=args.limit,
        )
        scores.append(evaluate_prompt_set(sampler, prompt_set, k, setup, verifier))
    print(format_table(scores))
    out = Path(args.out) if args.out else default_eval_json(str(checkpoint), k)
    _write_json(
        out,
        {
            "checkpoint": str(checkpoint),
            "model_dir": model_dir,
            "task_type": cfg.task.type,
            "k": k,
            "sampling": asdict(setup),
            "datasets": {s.name: {**asdict(s), "spec": specs[s.name]} for s in scores},
        },
    )
    print(f"written to {out}")
    return 0


def filter_pass_rate_main(args: argparse.Namespace) -> int:
    """``driftrl filter-pass-rate``: keep train prompts with pass rate in (low, high) under the starting model."""
    from tasks.evaluation import (
        KSampler,
        SamplingSetup,
        filter_by_pass_rate,
        load_prompt_set,
        resolve_model_dir,
        write_filtered,
    )

    cfg = load_config(args.config, args.overrides)
    k = args.k
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    # Pass rates are a property of the behaviour the RL run starts from: rollout temperature.
    setup = SamplingSetup(
        temperature=args.temperature if args.temperature is not None else cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        max_tokens=cfg.rollout.max_tokens,
        seed=cfg.run.seed,
    )
    source = args.source or cfg.task.train_path
    model_dir = resolve_model_dir(args.model or cfg.model.path)
    sampler = KSampler.from_model(
        model_dir,
        dtype=cfg.rollout.dtype,
        max_model_len=cfg.rollout.max_model_len,
        kv_cache_memory_bytes=cfg.rollout.kv_cache_memory_bytes,
        seed=setup.seed,
    )
    prompt_set = load_prompt_set(
        "train",
        source,
        cfg.task.type,
        sampler.tokenizer,
        cfg.task.prompt_key,
        cfg.task.answer_key,
        limit=args.limit,
    )
    kept, counts, summary = filter_by_pass_rate(
        sampler,
        prompt_set,
        k,
        setup,
        make_verifier(cfg.task.type, cfg.rollout.reward.timeout_s),
        args.low,
        args.high,
        source=source,
    )
    out = write_filtered(args.out, prompt_set, kept, [c / k for c in counts])
    summary_path = out.with_name(out.stem + ".summary.json")
    _write_json(summary_path, {**asdict(summary), "model_dir": model_dir, "sampling": asdict(setup)})
    print(
        f"kept {summary.kept}/{summary.prompts} prompts with pass rate in ({args.low:.4g}, {args.high:.4g}) "
        f"at K={k}; dropped {summary.dropped_too_hard} too hard, {summary.dropped_too_easy} too easy"
    )
    print(f"written to {out} and {summary_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="driftrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="Write a tiny Qwen2 model + tokenizer for tests and the default run.")
    p.add_argument("out", help="Output directory.")
    p.add_argument("--seed", type=int, default=0, help="Initialisation seed (same seed, same files).")
    p.set_defaults(handler=_make_tiny_model)

    p = sub.add_parser("make-data", help="Write the synthetic reversal task (train + held-out parquet).")
    p.add_argument("out", help="Output directory (train.parquet, heldout.parquet).")
    p.add_argument("--seed", type=int, default=0, help="Data seed (same seed, same rows).")
    p.add_argument("--n-train", type=int, default=None, help="Train rows (default 20000).")
    p.add_argument("--n-heldout", type=int, default=None, help="Held-out rows, disjoint from train (default 512).")
    p.add_argument("--min-len", type=int, default=None, help="Shortest string, a difficulty knob (default 3).")
    p.add_argument("--max-len", type=int, default=None, help="Longest string, a difficulty knob (default 10).")
    p.add_argument("--alphabet-size", type=int, default=None, help="Letters a..z used (default 26).")
    p.set_defaults(handler=_make_data)

    p = sub.add_parser(
        "warm-start", help="Build the tiny default's data, model and supervised warm start if missing (cached)."
    )
    _add_config_args(p)
    p.set_defaults(handler=_warm_start)

    p = sub.add_parser("check-config", help="Validate a config with overrides and print it resolved.")
    _add_config_args(p)
    p.set_defaults(handler=_check_config)

    p = sub.add_parser("train", help="Train: rollout actors, replay buffer and learner on Ray.")
    _add_config_args(p)
    p.add_argument("--resume", default=None, help="Run directory to resume from its last checkpoint.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar (logs and CI).")
    p.set_defaults(handler=_train)

    p = sub.add_parser("run", help="The one-command tiny run: build data, model and warm start if needed, then train.")
    _add_config_args(p)
    p.add_argument("--resume", default=None, help="Run directory to resume from its last checkpoint.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar (logs and CI).")
    p.set_defaults(handler=_run)

    p = sub.add_parser("compare", help="One report (PNG plots + markdown table) over runs, seeds grouped by method.")
    p.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="Run directories; LABEL=RUN_DIR names a method by hand."
    )
    p.add_argument("--out", default="runs/compare", help="Report folder (compare.md, compare.json, PNGs).")
    p.add_argument("--window", type=int, default=10, help="Steps averaged for 'last' values and the curves.")
    p.set_defaults(handler=_compare)

    p = sub.add_parser(
        "plan", help="Simulate the pipeline on N GPUs from a run's measured rates (or given ones); best split."
    )
    p.add_argument("run_dir", nargs="?", default=None, metavar="RUN_DIR", help="Run directory to take rates from.")
    p.add_argument("--gpus", type=int, required=True, help="GPUs to split between rollout actors and learner ranks.")
    p.add_argument("--steps", type=int, default=100, help="Learner steps simulated per split.")
    p.add_argument("--seed", type=int, default=0, help="Response-length sampling seed.")
    p.add_argument("--json", action="store_true", help="One JSON object instead of the table.")
    rates = p.add_argument_group("rates (override the run's, or give them all without RUN_DIR)")
    rates.add_argument("--generation-tokens-per-s", type=float, default=None, help="Per rollout GPU, while busy.")
    rates.add_argument("--learner-tokens-per-s", type=float, default=None, help="Trained tokens/s per learner rank.")
    rates.add_argument("--learner-post-step-s", type=float, default=None, help="Learner s per step outside train_step.")
    rates.add_argument("--weight-load-s", type=float, default=None, help="Rollout pause per weight sync.")
    rates.add_argument("--response-length", type=int, default=None, help="Fixed response length (tokens).")
    rates.add_argument(
        "--rollout-group-overhead-s", type=float, default=None, help="Rollout s per group outside the engine."
    )
    shape = p.add_argument_group("pipeline (override the run's config)")
    shape.add_argument("--mode", choices=["sync", "async"], default=None, help="run.mode")
    shape.add_argument("--max-staleness", type=int, default=None, help="learner.max_staleness")
    shape.add_argument("--sync-interval", type=int, default=None, help="learner.sync_interval")
    shape.add_argument("--groups-per-step", type=int, default=None, help="learner.groups_per_step")
    shape.add_argument("--group-size", type=int, default=None, help="rollout.group_size")
    shape.add_argument("--prompts-per-request", type=int, default=None, help="rollout.prompts_per_request")
    shape.add_argument(
        "--admission-lag-s",
        type=float,
        default=None,
        help="Age of the buffer count behind the driver's admission figure (default: its stats period; 0: exact).",
    )
    p.set_defaults(handler=_plan)

    p = sub.add_parser("eval", help="Avg@K and Pass@K of a checkpoint on held-out data.")
    _add_config_args(p)
    p.add_argument("--checkpoint", default=None, help="Model directory or run checkpoint to evaluate.")
    p.add_argument("--k", type=int, default=8, help="Samples per question.")
    p.add_argument("--temperature", type=float, default=0.7, help="Eval sampling temperature (paper: 0.7).")
    p.add_argument("--max-tokens", type=int, default=None, help="Most response tokens (default rollout.max_tokens).")
    p.add_argument("--seed", type=int, default=None, help="Sampling seed (default run.seed).")
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        metavar="NAME=SPEC",
        help="Dataset to score, repeatable: file, hub name or dapo500/aime24/aime25 (default task.eval_path).",
    )
    p.add_argument("--limit", type=int, default=None, help="Score only the first N questions of each dataset.")
    p.add_argument("--out", default=None, help="JSON output (default <checkpoint>.eval-k<K>.json beside it).")
    p.set_defaults(handler=_eval)

    p = sub.add_parser(
        "filter-pass-rate", help="Keep train prompts whose pass rate under the starting model is in (low, high)."
    )
    _add_config_args(p)
    p.add_argument("--k", type=int, default=16, help="Samples per prompt.")
    p.add_argument("--out", required=True, help="Filtered prompts (parquet); a .summary.json is written beside it.")
    p.add_argument("--source", default=None, help="Prompt set spec (default task.train_path), e.g. dapo-math-17k.")
    p.add_argument("--model", default=None, help="Starting model (default model.path).")
    p.add_argument("--temperature", type=float, default=None, help="Sampling temperature (default rollout's).")
    p.add_argument("--low", type=float, default=1 / 16, help="Exclusive lower pass-rate bound.")
    p.add_argument("--high", type=float, default=15 / 16, help="Exclusive upper pass-rate bound.")
    p.add_argument("--limit", type=int, default=None, help="Score only the first N prompts.")
    p.set_defaults(handler=_filter_pass_rate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (ConfigError, DataFileError) as err:
        print(f"driftrl: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
