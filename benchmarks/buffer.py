"""Replay buffer throughput: the Arrow buffer actor vs the common peer design, same rollouts, same run.

Three Ray actors (``num_cpus=0``, one local Ray with 2 CPUs) get the same rows and the same calls:

* ``arrow``: :func:`buffers.actor.launch_buffer_actor` with the default :class:`BufferConfig` (only
  ``capacity_groups`` raised so that every group fits) on a temp dir. ``push`` validates every row
  (vectorised), writes the accepted groups as an Arrow IPC file (write + rename; with ``--fsync``
  also fsync of the file and its directory) before it returns, so an accepted row survives a
  SIGKILL of the actor (push files under ``compact_below_bytes`` would be merged into segments;
  the default 128-row pushes here are above it). ``sample`` leases whole groups and returns one
  compact table. ``ack`` writes the ack-log file before it returns, then drops the rows and
  deletes the files whose rows are all acknowledged.
* ``dicts``: the common peer design: rows as Python dicts with Python lists of ints / floats,
  grouped by ``group_id`` in a dict (O(1) per group), in memory only (no validation, no files, lost
  with the process). ``push`` stores the dicts, ``sample`` moves whole groups to a leased dict and
  returns their dicts, ``ack`` drops the acknowledged rows' groups.
* ``arrow-mem``: not a usable buffer but a floor: a list of the pushed Arrow tables, no validation,
  no files. ``sample`` slices whole groups off the front and copies them into one compact table
  (the copy ``arrow`` makes too), ``ack`` drops ids from a leased set. Its time is what Ray's calls
  alone cost any Arrow buffer for this call pattern, so ``dicts / arrow-mem`` is the ceiling of the
  speedup and ``arrow - arrow-mem`` is the durable buffer's own work.

Calls, the same for all three: one producer pushes ``--push-groups`` groups per call until all rows
are in; then one consumer samples ``--sample-groups`` groups per call (one learner step) and acks
every id leased since its last ack after every ``--ack-every`` samples and once at the end: the
learner acks after each checkpoint (``LearnerConfig.checkpoint_interval`` steps, the default here;
``driftrl/pipeline.py`` acks one Arrow array of ids, as ``arrow`` does here; ``dicts`` acks a
Python list). Every call waits for its reply (``ray.get``), like a rollout actor's loop and a learner
step do. Each push is its own compact table, as a rollout actor builds it; the ``dicts`` pushes are
the same rows as Python objects. All data is built before the clock starts, and every actor answers
one call (process start, imports) before it. Round 0 warms up and is not reported; then
``--repeats`` rounds run the three systems back to back, and the speedup of a round is its
``dicts`` total over its ``arrow`` total (paired: the two runs are seconds apart, so a slow drift
in the load from other users of the machine cancels; a spike does not, hence several rounds); the
headline is the median round. Throughput counts the rows' Arrow
payload (``Table.nbytes``), the same logical bytes for all.

Each side starts from rows already in its own format: a producer that builds its rows as Python
lists and converts them (``buffers.schema.records_to_table``, as ``actors/rollout.py`` does today)
pays ~5 ms per 128-row push on the 2-core machine for that conversion, outside this clock.

The consumer side also turns each sample into padded tensors: ``learner.batch.table_to_batch`` for
Arrow, a per-row ``torch.tensor`` loop for dicts. That time is reported separately, outside the
speedup.

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import deque
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
from learner.config import LearnerConfig  # noqa: E402

SPEEDUP_GOAL = 10.0
SYSTEMS = ("arrow", "dicts", "arrow-mem")
# --quick: every call path once on a few small rows
QUICK = {
    "rows": 256,
    "push_groups": 4,
    "sample_groups": 8,
    "response_tokens": 64,
    "prompt_tokens": 16,
    "ack_every": 2,
    "repeats": 1,
}


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


class ArrowTableList:
    """The floor: pushed tables in a list; fixed-size groups of consecutive rows (this benchmark's data)."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size
        self.tables: deque[pa.Table] = deque()
        self.leased: set[str] = set()
        # pyarrow's lazy pandas import (0.3-0.6 s), which Ray's Arrow serializer triggers on the first
        # returned table: paid at start, as ReplayBuffer does, so the clock sees only per-call costs
        pa.array([0]).to_numpy()

    def push(self, table: pa.Table) -> int:
        self.tables.append(table)
        return table.num_rows

    def sample(self, n_groups: int) -> pa.Table:
        wanted = n_groups * self.group_size
        parts: list[pa.Table] = []
        while wanted and self.tables:
            head = self.tables.popleft()
            parts.append(head.slice(0, wanted))
            if head.num_rows > wanted:
                self.tables.appendleft(head.slice(wanted))
            wanted -= parts[-1].num_rows
        if not parts:
            return ROLLOUT_SCHEMA.empty_table()
        columns = [
            pa.concat_arrays([chunk for part in parts for chunk in part.column(i).chunks])
            for i in range(len(ROLLOUT_SCHEMA))
        ]
        table = pa.Table.from_arrays(columns, schema=ROLLOUT_SCHEMA)
        self.leased.update(table.column("traj_id").to_pylist())
        return table

    def ack(self, traj_ids: pa.Array) -> int:
        ids = traj_ids.to_pylist()
        self.leased.difference_update(ids)
        return len(ids)

    def ready(self) -> bool:
        return True


def build_pushes(args: argparse.Namespace) -> list[pa.Table]:
    """Random rollouts, one compact Arrow table per push, built from flat numpy arrays (no row loop)."""
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

    def own_buffers(part: pa.Table) -> pa.Table:
        # a slice would share (and Ray would have to cut down) the buffers of all 4096 rows
        columns = [pa.concat_arrays(c.chunks) for c in part.columns]
        return pa.Table.from_arrays(columns, schema=ROLLOUT_SCHEMA)

    return [own_buffers(table.slice(i, rows_per_push)) for i in range(0, n_rows, rows_per_push)]


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
        overrides: dict[str, Any] = {"capacity_groups": n_groups}
        if args.fsync is not None:
            overrides["fsync"] = args.fsync == "on"
        config = BufferConfig(**overrides)
        actor = launch_buffer_actor(config, root, max_concurrency=4, num_cpus=0)
        ray.get(actor.pid.remote())
        timings = drive(actor, (args.sample_groups, 0), table_to_batch, pushes, args)
        stats = ray.get(actor.stats.remote())
        assert stats["acked"] == args.rows and stats["rows_available"] == stats["rows_leased"] == 0, stats
        timings["fsync"] = config.fsync
        ray.kill(actor)
    return timings


def run_in_memory(
    actor_class: type,
    init_args: tuple[Any, ...],
    to_tensors: Callable[[Any], Any] | None,
    pushes: list[Any],
    args: argparse.Namespace,
) -> dict[str, float]:
    actor = ray.remote(actor_class).options(num_cpus=0).remote(*init_args)
    ray.get(actor.ready.remote())
    timings = drive(actor, (args.sample_groups,), to_tensors, pushes, args)
    ray.kill(actor)
    return timings


def drive(
    actor: Any,
    sample_args: tuple[Any, ...],
    to_tensors: Callable[[Any], Any] | None,
    pushes: list[Any],
    args: argparse.Namespace,
) -> dict[str, float]:
    """Push everything, then sample, acking every ``args.ack_every`` samples; Arrow or dict rows."""
    arrow = isinstance(pushes[0], pa.Table)
    start = time.perf_counter()
    for batch in pushes:
        ray.get(actor.push.remote(batch))
    pushed = time.perf_counter()
    drained = convert_s = 0.0
    sampled_rows = steps = 0
    unacked: list[Any] = []
    while sampled_rows < args.rows:
        t0 = time.perf_counter()
        sampled = ray.get(actor.sample.remote(*sample_args))
        n_rows = sampled.num_rows if arrow else len(sampled)
        if not n_rows:
            raise RuntimeError("buffer ran dry before every row was sampled")
        steps += 1
        sampled_rows += n_rows
        unacked.append(sampled.column("traj_id") if arrow else [r["traj_id"] for r in sampled])
        if steps % args.ack_every == 0 or sampled_rows >= args.rows:
            if arrow:  # as driftrl/pipeline.py acks: one Arrow array of every id since the checkpoint
                ids = pa.concat_arrays([chunk for column in unacked for chunk in column.chunks])
            else:
                ids = [traj_id for part in unacked for traj_id in part]
            ray.get(actor.ack.remote(ids))
            unacked = []
        t1 = time.perf_counter()
        if to_tensors is not None:
            to_tensors(sampled)
        convert_s += time.perf_counter() - t1
        drained += t1 - t0
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
    parser.add_argument(
        "--ack-every",
        type=int,
        default=LearnerConfig().checkpoint_interval,
        help="samples between acks (the learner acks after each checkpoint; default its checkpoint_interval)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument(
        "--fsync",
        choices=("on", "off"),
        default=None,
        help="arrow: fsync each file and its directory (power-loss safety); default: BufferConfig's",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run on {QUICK} (the numbers mean nothing)"
    )
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    if args.rows % (args.group_size * args.push_groups):
        parser.error("--rows must be a multiple of --group-size * --push-groups")
    if args.rows % (args.group_size * args.sample_groups):
        parser.error("--rows must be a multiple of --group-size * --sample-groups")

    tables = build_pushes(args)
    dict_pushes = [t.to_pylist() for t in tables]
    payload_mb = sum(t.nbytes for t in tables) / 1e6
    runners: dict[str, Callable[[], dict[str, float]]] = {
        "arrow": lambda: run_arrow(tables, args),
        "dicts": lambda: run_in_memory(DictListBuffer, (), dicts_to_batch, dict_pushes, args),
        "arrow-mem": lambda: run_in_memory(ArrowTableList, (args.group_size,), None, tables, args),
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results: dict[str, list[dict[str, float]]] = {system: [] for system in SYSTEMS}
        for repeat in range(args.repeats + 1):  # round 0 warms up workers, imports and the page cache
            for system in SYSTEMS:
                timings = runners[system]()
                if repeat:
                    results[system].append(timings)
    finally:
        ray.shutdown()

    def median(system: str, key: str) -> float:
        return statistics.median(r[key] for r in results[system])

    def ratios(numerator: str, denominator: str, key: str) -> list[float]:
        return [n[key] / d[key] for n, d in zip(results[numerator], results[denominator], strict=True)]

    fsync = bool(results["arrow"][0]["fsync"])
    print(
        f"{args.rows} rows, groups of {args.group_size}, responses <= {args.response_tokens} tokens, "
        f"{payload_mb:.1f} MB Arrow payload; {args.push_groups} groups/push, {args.sample_groups} "
        f"groups/sample, ack every {args.ack_every} samples; median of {args.repeats} rounds; "
        f"arrow fsync={'on' if fsync else 'off'}"
    )
    for system in SYSTEMS:
        convert = f"   to-tensors {median(system, 'convert_s'):6.3f} s" if system != "arrow-mem" else ""
        print(
            f"  {system:9s} push {median(system, 'push_s'):7.3f} s   sample+ack "
            f"{median(system, 'sample_ack_s'):7.3f} s   total {median(system, 'total_s'):7.3f} s"
            f"   {payload_mb / median(system, 'total_s'):8.1f} MB/s{convert}"
        )
    speedups = ratios("dicts", "arrow", "total_s")
    speedup = statistics.median(speedups)
    ceiling = statistics.median(ratios("dicts", "arrow-mem", "total_s"))
    push_speedup = statistics.median(ratios("dicts", "arrow", "push_s"))
    drain_speedup = statistics.median(ratios("dicts", "arrow", "sample_ack_s"))
    convert_speedup = statistics.median(ratios("dicts", "arrow", "convert_s"))
    print(
        f"  speedup (dicts time / arrow time): {speedup:.1f}x (rounds: "
        f"{', '.join(f'{s:.1f}' for s in speedups)}), push {push_speedup:.1f}x, "
        f"sample+ack {drain_speedup:.1f}x, to-tensors {convert_speedup:.1f}x"
    )
    print(f"  ceiling (dicts time / arrow-mem time, Ray calls only): {ceiling:.1f}x")
    print(
        json.dumps(
            {
                "metric": "buffer_speedup",
                "value": round(speedup, 2),
                "goal": f">= {SPEEDUP_GOAL:g}",
                "met": speedup >= SPEEDUP_GOAL,
                "rounds": [round(s, 2) for s in speedups],
                "ceiling_arrow_mem": round(ceiling, 2),
                "arrow_mb_per_s": round(payload_mb / median("arrow", "total_s"), 1),
                "dicts_mb_per_s": round(payload_mb / median("dicts", "total_s"), 1),
                "arrow_mem_mb_per_s": round(payload_mb / median("arrow-mem", "total_s"), 1),
                "push_speedup": round(push_speedup, 2),
                "sample_ack_speedup": round(drain_speedup, 2),
                "to_tensors_speedup": round(convert_speedup, 2),
                "rows": args.rows,
                "payload_mb": round(payload_mb, 1),
                "push_groups": args.push_groups,
                "sample_groups": args.sample_groups,
                "ack_every": args.ack_every,
                "fsync": fsync,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
