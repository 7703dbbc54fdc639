"""The learner step against a bare torch step of the same batch, with where the difference goes (issue 14.1).

    python benchmarks/learner_step.py            # the tiny default's batch: 8 groups × 8, 12 + 12 tokens
    python benchmarks/learner_step.py --quick    # smoke run

Both in this one process, one torch thread (the learner's share of the 2-core default), from the
same tiny Qwen2 weights (:mod:`tasks.tiny_model`):

* ``learner``: :class:`learner.engine.Learner` (DeepSpeed ZeRO-2 fp32 on CPU, gloo, rank 0 of 1)
  with the learner section of ``configs/tiny-cpu.yaml`` (ClipV, the same-batch entropy change
  every step, one micro-batch) and ``train_step`` on a rollout table of the real schema;
* ``bare``: the Hugging Face model and ``torch.optim.AdamW``: one forward of the same padded
  ``[64, 24]`` batch, the response tokens' log-probs, a PPO-clipped token-mean loss with
  group-normalised advantages, backward, gradient-norm clip, optimizer step.

The two alternate step by step (a neighbour's load falls on both alike); each figure is the
median over ``--steps`` timed steps after ``--warmup``. The learner's step is cut into its phases
by timing its own methods (statistics pass, clip agreement, loss pass with backward, optimizer
step, same-batch entropy change, metric reductions), so the breakdown names where it spends
more than the bare step.

Last line: ``{"metric": "learner_step_vs_bare_torch", "value": learner / bare, "goal": "<= 1.3"}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

GOAL = 1.3
QUICK = {"steps": 2, "warmup": 1}
# the Learner methods whose time the breakdown reports (each called inside train_step)
PHASES = (
    "_statistics_pass",
    "_agree",
    "_loss_pass",
    "_optimizer_step",
    "_trainable_copy",
    "_entropy_change_metrics",
    "_step_metrics",
    "_reduce_metrics",
)


def tiny_table(groups: int, group_size: int, step: int, vocab: int, seed: int) -> Any:
    """Rows shaped like the tiny task's: 12-token prompts, 1-12-token responses, rewards 0/1."""
    import numpy as np

    from buffers.schema import records_to_table

    rng = np.random.default_rng(seed + step)
    records = []
    for g in range(groups):
        prompt = rng.integers(4, vocab, size=12).tolist()
        for i in range(group_size):
            n = int(rng.integers(1, 13))
            records.append(
                {
                    "traj_id": f"s{step}-{g}-{i}",
                    "prompt_id": f"s{step}-{g}",
                    "group_id": f"s{step}-{g}",
                    "group_size": group_size,
                    "prompt_ids": prompt,
                    "response_ids": rng.integers(4, vocab, size=n).tolist(),
                    "behaviour_logprobs": [-math.log(vocab)] * n,
                    "temperature": 1.0,
                    "reward": float(rng.random() < 0.4),
                    "version_start": 0,
                    "version_end": 0,
                    "actor_id": "bench",
                    "finish_reason": "stop",
                }
            )
    return records_to_table(records)


class BareStep:
    """Forward + backward + AdamW of a padded batch with plain torch: the floor a learner step is held to."""

    def __init__(self, model_dir: Path, lr: float, grad_clip: float, eps_clip: float = 0.2) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.grad_clip = grad_clip
        self.eps_clip = eps_clip

    def step(self, table: Any, pad_id: int) -> float:
        import torch

        prompts = table.column("prompt_ids").to_pylist()
        responses = table.column("response_ids").to_pylist()
        behaviour = table.column("behaviour_logprobs").to_pylist()
        rewards = torch.tensor(table.column("reward").to_pylist())
        groups = table.column("group_id").to_pylist()
        width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        mask = torch.zeros(len(prompts), width - 1)
        old = torch.zeros(len(prompts), width - 1)
        for i, (p, r, b) in enumerate(zip(prompts, responses, behaviour, strict=True)):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            attention[i, : len(p) + len(r)] = 1
            mask[i, len(p) - 1 : len(p) + len(r) - 1] = 1
            old[i, len(p) - 1 : len(p) + len(r) - 1] = torch.tensor(b)
        index = {g: k for k, g in enumerate(dict.fromkeys(groups))}
        gi = torch.tensor([index[g] for g in groups])
        mean = torch.zeros(len(index)).index_reduce_(0, gi, rewards, "mean", include_self=False)
        sq = torch.zeros(len(index)).index_reduce_(
            0, gi, (rewards - mean[gi]) ** 2, "mean", include_self=False
        )
        adv = ((rewards - mean[gi]) / (sq[gi].sqrt() + 1e-6))[:, None]

        start = time.perf_counter()
        logits = self.model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        ratio = (logp - old).exp()
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - self.eps_clip, 1 + self.eps_clip) * adv)
        loss = -(surrogate * mask).sum() / mask.sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return time.perf_counter() - start


def time_phases(learner: Any, totals: dict[str, float]) -> None:
    """Wrap the learner's phase methods so each call adds its seconds to ``totals``."""
    for name in PHASES:
        method = getattr(learner, name, None)
        if method is None:
            continue

        @functools.wraps(method)
        def timed(*args: Any, __method: Any = method, __name: str = name, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return __method(*args, **kwargs)
            finally:
                totals[__name] += time.perf_counter() - started

        setattr(learner, name, timed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="Timed steps of each (after the warm-up).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps of each first.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the learner's one core).")
    parser.add_argument("--quick", action="store_true", help=f"smoke run {QUICK}; the numbers mean nothing")
    parser.add_argument("override", nargs="*", help="Dotted overrides of configs/tiny-cpu.yaml (learner.*).")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = QUICK["steps"], QUICK["warmup"]
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    import torch

    from benchmarks.learner_throughput import _single_rank_env
    from driftrl.config import load_config
    from learner.engine import Learner
    from tasks.tiny_model import VOCAB_SIZE, make_tiny_model

    torch.set_num_threads(args.threads)
    _single_rank_env()
    cfg = load_config(REPO_ROOT / "configs" / "tiny-cpu.yaml", args.override)
    lcfg = cfg.learner
    groups, group_size = lcfg.groups_per_step, cfg.rollout.group_size
    tables = [
        tiny_table(groups, group_size, s, VOCAB_SIZE, cfg.run.seed) for s in range(args.warmup + args.steps)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", seed=0)
        learner = Learner(lcfg, model_dir, rank=0, world_size=1, seed=cfg.run.seed)
        bare = BareStep(model_dir, lcfg.lr, lcfg.grad_clip)
        phases: dict[str, float] = defaultdict(float)
        seconds: dict[str, list[float]] = {"learner": [], "bare": []}
        for k, table in enumerate(tables):
            timed = k >= args.warmup
            if timed and not phases:
                time_phases(learner, phases)
            started = time.perf_counter()
            learner.train_step(table)
            elapsed = time.perf_counter() - started
            bare_elapsed = bare.step(table, learner.pad_id)
            if timed:
                seconds["learner"].append(elapsed)
                seconds["bare"].append(bare_elapsed)

    median = {name: statistics.median(v) for name, v in seconds.items()}
    ratio = median["learner"] / median["bare"]
    per_step = {name: total / args.steps for name, total in phases.items()}
    accounted = sum(per_step.values())
    print(
        f"{groups} groups × {group_size} responses, {args.threads} torch thread(s), {args.steps} timed steps"
    )
    print(f"  bare torch step     {median['bare'] * 1e3:8.1f} ms (median)")
    print(f"  learner train_step  {median['learner'] * 1e3:8.1f} ms (median) = {ratio:.2f}x")
    for name, value in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"    {name:<24} {value * 1e3:8.1f} ms")
    mean_learner = sum(seconds["learner"]) / args.steps
    print(f"    {'(rest of train_step)':<24} {(mean_learner - accounted) * 1e3:8.1f} ms")
    print(
        json.dumps(
            {
                "metric": "learner_step_vs_bare_torch",
                "value": round(ratio, 3),
                "goal": f"<= {GOAL:g}",
                "learner_ms": round(median["learner"] * 1e3, 1),
                "bare_ms": round(median["bare"] * 1e3, 1),
                "phases_ms": {k: round(v * 1e3, 1) for k, v in per_step.items()},
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
