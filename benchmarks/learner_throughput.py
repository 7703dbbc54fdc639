"""Learner throughput, packed vs padded micro-batches: trained (response) tokens per second (issue 17.4).

The real :class:`learner.engine.Learner` (DeepSpeed ZeRO-2 fp32 on CPU, gloo, rank 0 of 1) on the
tiny Qwen2 of :mod:`tasks.tiny_model`, built twice in this one process from the same weights:

* ``padded``: ``micro_batch_size`` rows per micro-batch, each padded to its longest row;
* ``packed``: ``learner.packing=true`` with a ``max_tokens_per_micro_batch`` budget of real tokens;
  the default 2048 is about what a padded micro-batch holds (8 rows × longest row: 2217 positions
  on average over the timed tables), so both paths get the same activation memory per micro-batch.

Both train on the same synthetic rollout tables (the real schema, :mod:`buffers.schema`): groups of
random prompts, response lengths log-normal like math responses, scaled to the CPU (median 64,
capped at 512 tokens by default), behaviour log-probs ``log(1/V)`` (the near-uniform init policy).
Time: wall clock of ``train_step`` (forward, backward, optimizer step), after one warm-up step per
path; each timed table is trained ``--repeats`` times per path, the paths alternating call by call,
and a table's time is the fastest of its repeats (timeit's rule: on a shared machine a neighbour's
load only ever adds time, and a 1 s step moved 2-8x between runs here); tokens/s =
``driftrl_learner_train_tokens`` summed over the timed tables / the sum of their times. The cost of
a step does not depend on the weights, so repeating a table after an update times the same work.

The last printed line is one JSON object: ``value`` = packed tokens/s / padded tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

# the benchmark runs as a script from the repository root or elsewhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from buffers.schema import records_to_table  # noqa: E402
from learner.config import ClipConfig, LearnerConfig  # noqa: E402
from tasks.tiny_model import VOCAB_SIZE, make_tiny_model  # noqa: E402

SPEEDUP_GOAL = 2.0
QUICK = {
    "groups": 2,
    "group_size": 4,
    "median": 16,
    "max_length": 64,
    "token_budget": 256,
    "steps": 1,
    "repeats": 1,
}
# longest prompt + longest response the model must position
MAX_POSITIONS = 1024


def response_lengths(
    rng: np.random.Generator, n: int, median: int, sigma: float, max_length: int
) -> np.ndarray:
    """``[n]`` int64 log-normal lengths: ``exp(N(log median, sigma²))`` rounded, clipped to [1, max_length]."""
    return np.clip(np.rint(rng.lognormal(math.log(median), sigma, size=n)), 1, max_length).astype(np.int64)


def make_table(
    rng: np.random.Generator,
    groups: int,
    group_size: int,
    lengths: np.ndarray,
    step: int,
    vocab_size: int = VOCAB_SIZE,
) -> pa.Table:
    """Whole groups of random prompts (8-32 tokens) and responses of the given lengths, schema-valid."""
    records = []
    for g in range(groups):
        prompt = rng.integers(4, vocab_size, size=int(rng.integers(8, 33))).tolist()
        for i in range(group_size):
            n = int(lengths[g * group_size + i])
            records.append(
                {
                    "traj_id": f"s{step}-{g}-{i}",
                    "prompt_id": f"s{step}-{g}",
                    "group_id": f"s{step}-{g}",
                    "group_size": group_size,
                    "prompt_ids": prompt,
                    "response_ids": rng.integers(4, vocab_size, size=n).tolist(),
                    "behaviour_logprobs": [-math.log(vocab_size)] * n,
                    "temperature": 1.0,
                    "reward": float(rng.random()),
                    "version_start": 0,
                    "version_end": 0,
                    "actor_id": "bench",
                    "finish_reason": "stop",
                }
            )
    return records_to_table(records)


def _single_rank_env() -> None:
    """torch.distributed as rank 0 of a world of 1 over gloo, DeepSpeed on its CPU accelerator."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        os.environ.setdefault(key, value)


def tiny_model_dir(out: Path) -> Path:
    """The tiny Qwen2, with room for the longest sequence (RoPE has no learned positions)."""
    model_dir = make_tiny_model(out, seed=0)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = MAX_POSITIONS
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return model_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8, help="prompt groups per step")
    parser.add_argument("--group-size", type=int, default=8, help="responses per group")
    parser.add_argument("--median", type=int, default=64, help="median response length (tokens)")
    parser.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of response lengths")
    parser.add_argument("--max-length", type=int, default=512, help="longest response (tokens)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="rows per padded micro-batch")
    parser.add_argument("--token-budget", type=int, default=2048, help="real tokens per packed micro-batch")
    parser.add_argument("--steps", type=int, default=3, help="timed tables per path (after one warm-up)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="train steps per timed table; the fastest counts"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run on tiny inputs ({QUICK}); the numbers mean nothing"
    )
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.max_length + 32 > MAX_POSITIONS:
        parser.error(f"--max-length must leave room for a 32-token prompt within {MAX_POSITIONS} positions")

    _single_rank_env()
    from learner.engine import Learner

    rows = args.groups * args.group_size
    base = {
        "lr": 1e-5,
        "zero_stage": 2,
        "groups_per_step": args.groups,
        "micro_batch_size": args.micro_batch_size,
        "clip": ClipConfig(method="none"),
        "realised_entropy_interval": 0,
    }
    configs = {
        "padded": LearnerConfig(**base),
        "packed": LearnerConfig(**base, packing=True, max_tokens_per_micro_batch=args.token_budget),
    }
    rng = np.random.default_rng(args.seed)
    # one warm-up table, then one per timed step, shared by both paths
    tables = [
        make_table(
            rng,
            args.groups,
            args.group_size,
            response_lengths(rng, rows, args.median, args.sigma, args.max_length),
            s,
        )
        for s in range(args.steps + 1)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(Path(tmp) / "model")
        learners = {
            name: Learner(cfg, model_dir, rank=0, world_size=1, seed=args.seed)
            for name, cfg in configs.items()
        }
        seconds = dict.fromkeys(learners, 0.0)
        tokens = dict.fromkeys(learners, 0.0)
        for step, table in enumerate(tables):
            best = dict.fromkeys(learners, math.inf)
            trained = dict.fromkeys(learners, 0.0)
            for _ in range(args.repeats if step > 0 else 1):
                for name, learner in learners.items():
                    start = time.perf_counter()
                    metrics = learner.train_step(table)
                    elapsed = time.perf_counter() - start
                    if not math.isfinite(metrics["driftrl_learner_loss"]):
                        raise RuntimeError(f"{name}: non-finite loss at step {step}")
                    best[name] = min(best[name], elapsed)
                    trained[name] = metrics["driftrl_learner_train_tokens"]
                    print(
                        f"table {step} {name:6s} {elapsed:7.3f} s  "
                        f"{metrics['driftrl_learner_train_tokens']:6.0f} tokens"
                    )
            if step > 0:
                for name in learners:
                    seconds[name] += best[name]
                    tokens[name] += trained[name]

    tokens_per_s = {name: tokens[name] / seconds[name] for name in learners}
    lengths = np.concatenate(
        [np.asarray([len(r) for r in t.column("response_ids").to_pylist()]) for t in tables[1:]]
    )
    speedup = tokens_per_s["packed"] / tokens_per_s["padded"]
    for name, rate in tokens_per_s.items():
        print(f"{name:6s} {rate:9.0f} trained tokens/s over {args.steps} tables ({seconds[name]:.2f} s)")
    print(
        json.dumps(
            {
                "metric": "packed_speedup",
                "value": round(speedup, 3),
                "goal": f">= {SPEEDUP_GOAL:g}",
                "met": speedup >= SPEEDUP_GOAL,
                "packed_tokens_per_s": round(tokens_per_s["packed"], 1),
                "padded_tokens_per_s": round(tokens_per_s["padded"], 1),
                "steps": args.steps,
                "repeats": args.repeats,
                "rows_per_step": rows,
                "response_length_median": float(np.median(lengths)),
                "response_length_mean": round(float(lengths.mean()), 1),
                "response_length_max": int(lengths.max()),
                "micro_batch_size": args.micro_batch_size,
                "token_budget": args.token_budget,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
