"""Replay buffer throughput: the Arrow buffer actor vs the common peer design, same rollouts, same run.

* ``arrow``: :func:`buffers.actor.launch_buffer_actor`, durable on local disk in a temp dir
  (every push is an fsync'd IPC file before it returns, acks go to the fsync'd log, compaction runs).
* ``dicts``: a Ray actor holding rows as Python dicts with Python lists of ints/floats, grouped by
  ``group_id`` in a dict (O(1) per group), in memory only: what most peers pass through Ray.

One producer pushes ``--push-groups`` groups per call until all rows are in, then one consumer
samples ``--sample-groups`` groups per call and acks them, until the buffer is empty. Every call
waits for its reply (``ray.get``), like an actor loop and a learner step do. The data (identical
token ids, log-probs and rewards for both) is built before the clock starts; each system gets a
warm-up run on a fresh actor first. Throughput counts the rows' Arrow payload (``Table.nbytes``),
the same logical bytes for both.

The consumer side also turns each sample into padded tensors: ``learner.batch.table_to_batch`` for
Arrow, a per-row ``torch.tensor`` loop for dicts. That time is reported separately.

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the benchmark runs as a script from the repository root or elsewhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from buffers.actor import launch_buffer_actor  # noqa: E402
from buffers.config import BufferConfig  # noqa: E402
from buffers.schema import ROLLOUT_SCHEMA  # noqa: E402
from learner.batch import table_to_batch  # noqa: E402

SPEEDUP_GOAL = 10.0


class DictListBuffer:
    """The peer baseline: rows as dicts of Python lists, whole groups leased and acked."""

    def __init__(self) -> None:
        self.available: dict[str, list[dict[str, Any]]] = {}
        self.leased: dict[str, list[dict[str, Any]]] = {}
        self.group_of: dict[str, str] = {}

    def push(self, rows: list[dict[str, Any]]) -> int:
        for row in rows:
            self.available.setdefault(row["group_id"], []).append(row)
            self.group_of[row["traj_id"]] = row["group_id"]
        return len(rows)

    def sample(self, n_groups: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for group_id in list(self.available)[:n_groups]:
            rows = self.available.pop(group_id)
            self.leased[group_id] = rows
            out += rows
        return out

    def ack(self, traj_ids: list[str]) -> int:
        for traj_id in traj_ids:
            self.leased.pop(self.group_of.pop(traj_id), None)
        return len(traj_ids)

    def ready(self) -> bool:
        return True


def build_pushes(args: argparse.Namespace) -> list[pa.Table]:
    """Random rollouts as Arrow tables, one per push, built from flat numpy arrays (no row loop)."""
    rng = np.random.default_rng(args.seed)
    n_rows = args.rows
    response_len = rng.integers(args.response_tokens // 2, args.response_tokens + 1, n_rows)
    prompt_len = np.full(n_rows, args.prompt_tokens)
    group = np.arange(n_rows) // args.group_size

    def lists(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    columns = {
        "traj_id": pa.array([f"t{i}" for i in range(n_rows)]),
        "prompt_id": pa.array([f"p{g}" for g in group]),
        "group_id": pa.array([f"g{g}" for g in group]),
        "group_size": pa.array(np.full(n_rows, args.group_size, dtype=np.int32)),
        "prompt_ids": lists(prompt_len, rng.integers(0, 150_000, prompt_len.sum(), dtype=np.int32)),
        "response_ids": lists(response_len, rng.integers(0, 150_000, response_len.sum(), dtype=np.int32)),
        "behaviour_logprobs": lists(
            response_len, -rng.exponential(size=response_len.sum()).astype(np.float32)
        ),
        "temperature": pa.array(np.ones(n_rows, dtype=np.float32)),
        "reward": pa.array(rng.random(n_rows, dtype=np.float32)),
        "advantage": pa.nulls(n_rows, pa.float32()),
        "version_start": pa.array(np.zeros(n_rows, dtype=np.int64)),
        "version_end": pa.array(np.zeros(n_rows, dtype=np.int64)),
        "actor_id": pa.array(["actor-0"] * n_rows),
        "finish_reason": pa.array(["stop"] * n_rows),
        "created_at": pa.array(np.full(n_rows, int(time.time() * 1e6)), pa.timestamp("us", tz="UTC")),
    }
    table = pa.Table.from_arrays([columns[f.name] for f in ROLLOUT_SCHEMA], schema=ROLLOUT_SCHEMA)
    rows_per_push = args.group_size * args.push_groups
    return [table.slice(i, rows_per_push).combine_chunks() for i in range(0, n_rows, rows_per_push)]


def dicts_to_batch(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The peer's learner side: pad row by row."""
    width = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.int64)
    behaviour_logprobs = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        p, n = len(r["prompt_ids"]), len(r["response_ids"])
        input_ids[i, : p + n] = torch.tensor(r["prompt_ids"] + r["response_ids"])
        behaviour_logprobs[i, p : p + n] = torch.tensor(r["behaviour_logprobs"])
    return {"input_ids": input_ids, "behaviour_logprobs": behaviour_logprobs}


def run_arrow(pushes: list[pa.Table], args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="driftrl-bench-buffer-") as root:
        n_groups = args.rows // args.group_size
        config = BufferConfig(capacity_groups=n_groups, fsync=not args.no_fsync)
        actor = launch_buffer_actor(config, root, max_concurrency=4, num_cpus=0)
        ray.get(actor.pid.remote())
        timings = drive(
            push=lambda batch: actor.push.remote(batch),
            sample=lambda: actor.sample.remote(args.sample_groups, 0),
            ack=lambda sampled: actor.ack.remote(sampled.column("traj_id")),
            n_rows_of=lambda sampled: sampled.num_rows,
            to_tensors=table_to_batch,
            pushes=pushes,
            n_rows=args.rows,
        )
        stats = ray.get(actor.stats.remote())
        assert stats["acked"] == args.rows and stats["rows_available"] == 0, stats
        timings["bytes_written"] = stats["bytes_written"]
        ray.kill(actor)
    return timings


def run_dicts(pushes: list[list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, float]:
    actor = ray.remote(DictListBuffer).options(num_cpus=0).remote()
    ray.get(actor.ready.remote())
    timings = drive(
        push=lambda batch: actor.push.remote(batch),
        sample=lambda: actor.sample.remote(args.sample_groups),
        ack=lambda sampled: actor.ack.remote([r["traj_id"] for r in sampled]),
        n_rows_of=len,
        to_tensors=dicts_to_batch,
        pushes=pushes,
        n_rows=args.rows,
    )
    ray.kill(actor)
    return timings


def drive(
    push: Callable[[Any], Any],
    sample: Callable[[], Any],
    ack: Callable[[Any], Any],
    n_rows_of: Callable[[Any], int],
    to_tensors: Callable[[Any], Any],
    pushes: list[Any],
    n_rows: int,
) -> dict[str, float]:
    start = time.perf_counter()
    for batch in pushes:
        ray.get(push(batch))
    pushed = time.perf_counter()
    drained = convert_s = 0.0
    sampled_rows = 0
    while sampled_rows < n_rows:
        t0 = time.perf_counter()
        sampled = ray.get(sample())
        ray.get(ack(sampled))
        t1 = time.perf_counter()
        to_tensors(sampled)
        convert_s += time.perf_counter() - t1
        drained += t1 - t0
        sampled_rows += n_rows_of(sampled)
        if not n_rows_of(sampled):
            raise RuntimeError("buffer ran dry before every row was sampled")
    return {
        "push_s": pushed - start,
        "sample_ack_s": drained,
        "total_s": pushed - start + drained,
        "convert_s": convert_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4096, help="responses pushed and drained")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument(
        "--response-tokens", type=int, default=1024, help="longest response (lengths U[n/2, n])"
    )
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--push-groups", type=int, default=16, help="groups per push call (a rollout batch)")
    parser.add_argument(
        "--sample-groups", type=int, default=64, help="groups per sample call (groups_per_step)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per system (median reported)")
    parser.add_argument("--no-fsync", action="store_true", help="skip fsync (crash-safe, not power-safe)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.rows % (args.group_size * args.push_groups):
        parser.error("--rows must be a multiple of --group-size * --push-groups")

    tables = build_pushes(args)
    dict_pushes = [t.to_pylist() for t in tables]
    payload_mb = sum(t.nbytes for t in tables) / 1e6
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results: dict[str, list[dict[str, float]]] = {"arrow": [], "dicts": []}
        for repeat in range(args.repeats + 1):  # run 0 warms up workers, imports and the page cache
            arrow = run_arrow(tables, args)
            dicts = run_dicts(dict_pushes, args)
            if repeat:
                results["arrow"].append(arrow)
                results["dicts"].append(dicts)
    finally:
        ray.shutdown()

    def median(system: str, key: str) -> float:
        return statistics.median(r[key] for r in results[system])

    print(
        f"{args.rows} rows, groups of {args.group_size}, responses <= {args.response_tokens} tokens, "
        f"{payload_mb:.1f} MB Arrow payload; {args.push_groups} groups/push, "
        f"{args.sample_groups} groups/sample; median of {args.repeats}; "
        f"arrow fsync={'off' if args.no_fsync else 'on'}"
    )
    for system in ("arrow", "dicts"):
        push_s, drain_s = median(system, "push_s"), median(system, "sample_ack_s")
        total_s, convert_s = median(system, "total_s"), median(system, "convert_s")
        print(
            f"  {system:6s} push {push_s:7.3f} s   sample+ack {drain_s:7.3f} s   total {total_s:7.3f} s"
            f"   {payload_mb / total_s:8.1f} MB/s   to-tensors {convert_s:6.3f} s"
        )
    speedup = median("dicts", "total_s") / median("arrow", "total_s")
    print(
        f"  speedup (dicts time / arrow time): {speedup:.1f}x, "
        f"push {median('dicts', 'push_s') / median('arrow', 'push_s'):.1f}x, "
        f"sample+ack {median('dicts', 'sample_ack_s') / median('arrow', 'sample_ack_s'):.1f}x, "
        f"to-tensors {median('dicts', 'convert_s') / median('arrow', 'convert_s'):.1f}x"
    )
    print(
        json.dumps(
            {
                "metric": "buffer_speedup",
                "value": round(speedup, 2),
                "goal": f">= {SPEEDUP_GOAL:g}",
                "met": speedup >= SPEEDUP_GOAL,
                "arrow_mb_per_s": round(payload_mb / median("arrow", "total_s"), 1),
                "dicts_mb_per_s": round(payload_mb / median("dicts", "total_s"), 1),
                "push_speedup": round(median("dicts", "push_s") / median("arrow", "push_s"), 2),
                "sample_ack_speedup": round(
                    median("dicts", "sample_ack_s") / median("arrow", "sample_ack_s"), 2
                ),
                "to_tensors_speedup": round(median("dicts", "convert_s") / median("arrow", "convert_s"), 2),
                "rows": args.rows,
                "payload_mb": round(payload_mb, 1),
                "fsync": not args.no_fsync,
            }
        )
    )


if __name__ == "__main__":
    main()
