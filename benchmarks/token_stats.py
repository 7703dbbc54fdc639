"""Naive full-logit token statistics vs the streamed ``token_stats_from_hidden``: time and peak memory.

Both paths run forward + backward of ``logp`` to ``hidden`` and the LM-head weight:

* ``naive``: ``logits = hidden @ Wᵀ`` in float32 (``[N, V]``), then :func:`learner.entropy.token_stats`;
* ``streamed``: :func:`learner.entropy.token_stats_from_hidden` with ``--chunk-size`` vocabulary rows.

Each path runs in a fresh subprocess so that neither inherits the other's allocations.

Peak memory, CPU: the child records its resident set size (``/proc/self/statm``) after building the
inputs, runs one forward + backward, and reads the kernel's high-water mark ``ru_maxrss``; the extra
peak is the difference. It counts every byte the pass touched (autograd saved tensors, temporaries,
gradients), which allocator counters on CPU would not. The timed repeats come after that first pass.
Peak memory, CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
allocation before the pass.

The last printed line is one JSON object with the ratios (streamed / naive) and the goals.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# the benchmark runs as a script from the repository root or elsewhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from learner.entropy import token_stats, token_stats_from_hidden  # noqa: E402

MEMORY_GOAL = 1 / 8
TIME_GOAL = 1.5
# what a child process measures; --quick replaces the sizes
CHILD_ARGS = ("device", "n", "d", "vocab", "chunk_size", "dtype", "repeats")
QUICK_SHAPE = {"n": 256, "d": 32, "vocab": 2048, "chunk_size": 512, "repeats": 1}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _run_pass(
    path: str, hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, chunk: int
) -> None:
    hidden.grad = None
    weight.grad = None
    if path == "naive":
        stats = token_stats(hidden @ weight.T, tokens)
    else:
        stats = token_stats_from_hidden(hidden, weight, tokens, chunk_size=chunk)
    stats.logp.sum().backward()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def child(args: argparse.Namespace) -> dict[str, float]:
    """Measure one path in this process: extra peak bytes of the first pass, median time of the rest."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = args.device
    hidden = torch.randn(args.n, args.d, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.d, device=device) / args.d**0.5).to(dtype).requires_grad_()
    tokens = torch.randint(0, args.vocab, (args.n,), device=device)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
        # a high-water mark above the current RSS (import-time transient) would hide the pass's peak
        high_water_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    _run_pass(args.path, hidden, weight, tokens, args.chunk_size)
    _sync(device)
    first_s = time.perf_counter() - start
    if device == "cuda":
        peak_extra = torch.cuda.max_memory_allocated() - before
    else:
        peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        if high_water_before > before + peak_extra:
            raise RuntimeError("ru_maxrss was already above the pass's peak; measurement invalid")
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        _run_pass(args.path, hidden, weight, tokens, args.chunk_size)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"peak_extra_bytes": float(peak_extra), "first_s": first_s, "time_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--n", type=int, default=4096, help="tokens")
    parser.add_argument("--d", type=int, default=256, help="hidden size")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--chunk-size", type=int, default=1024, help="streamed vocabulary chunk")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the measured first one")
    parser.add_argument("--path", choices=["naive", "streamed"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--gpu-suite",
        action="store_true",
        help="run benchmarks/token_stats_gpu.py instead (torch, chunked, fused kernel, Liger, Cut CE on CUDA)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run of every path on small shapes ({QUICK_SHAPE}); the numbers mean nothing",
    )
    args = parser.parse_args()
    if args.gpu_suite:
        from benchmarks.token_stats_gpu import main as gpu_main

        gpu_main(["--quick"] if args.quick else [])
        return
    if args.quick:
        for key, value in QUICK_SHAPE.items():
            setattr(args, key, value)
    if args.path is not None:
        print(json.dumps(child(args)))
        return

    results = {}
    for path in ("naive", "streamed"):
        # the child gets the measurement's own arguments only (a store_true flag takes no value)
        cmd = [sys.executable, __file__, "--path", path] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in CHILD_ARGS
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[path] = json.loads(out.strip().splitlines()[-1])
        r = results[path]
        print(
            f"{path:9s} peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB   "
            f"fwd+bwd median {r['time_s']:.3f} s (first {r['first_s']:.3f} s)"
        )
    memory_ratio = results["streamed"]["peak_extra_bytes"] / results["naive"]["peak_extra_bytes"]
    time_ratio = results["streamed"]["time_s"] / results["naive"]["time_s"]
    print(
        json.dumps(
            {
                "metric": "token_stats_memory_ratio",
                "value": round(memory_ratio, 4),
                "goal": f"<= {MEMORY_GOAL}",
                "time_ratio": round(time_ratio, 3),
                "time_goal": f"<= {TIME_GOAL}",
                "memory_ok": memory_ratio <= MEMORY_GOAL,
                "time_ok": time_ratio <= TIME_GOAL,
                "device": args.device,
                "n": args.n,
                "d": args.d,
                "vocab": args.vocab,
                "chunk_size": args.chunk_size,
                "dtype": args.dtype,
                "quick": args.quick,
                "naive_peak_mib": round(results["naive"]["peak_extra_bytes"] / 2**20, 1),
                "streamed_peak_mib": round(results["streamed"]["peak_extra_bytes"] / 2**20, 1),
                "naive_time_s": round(results["naive"]["time_s"], 4),
                "streamed_time_s": round(results["streamed"]["time_s"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
