"""The GPU figures of issue 17.5, one JSON line each; ``benchmarks/gpu_check.sh`` runs it.

* ``fused_stats_ms``: :func:`learner.fused_stats.fused_token_stats` fwd+bwd (all statistics: logp
  with gradient, H, S*, E[S]) vs torch (bf16 logits + :func:`learner.entropy.token_stats`) at
  ``N = 8192, d = 3584, V = 152064`` bf16; median of ``triton.testing.do_bench``; goal <= 42 ms;
* ``learner_tokens_per_s``: :meth:`learner.engine.Learner.train_step` on a random-init Qwen2 of the
  Qwen2.5-1.5B shape, 2048-token sequences, ZeRO-2 bf16, one rank; goal >= 30k tokens/s
  (sequence tokens, prompt + response, after one warm-up step);
* ``weight_sync_gb_per_s``: ``torch.distributed.broadcast`` of the 1.5B model's bf16 bytes from
  rank 0 to rank 1 (two processes; NCCL when each has its own GPU, otherwise gloo through host
  memory, named in the JSON).

``--dry-run`` (what ``--quick`` is, and what the default test suite runs, on CPU): the full shapes
are still built where that costs nothing (the 1.5B model on the meta device: its parameter count
and bytes are checked), and each figure's code runs at a reduced size on CPU (torch token
statistics instead of the Triton kernel, a 2-layer Qwen2 in fp32, a gloo broadcast of 4 MiB);
every line then says ``"dry_run": true`` and ``"value": null``, since CPU numbers are not the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks.learner_throughput import make_table  # noqa: E402
from learner import entropy  # noqa: E402
from learner.config import ClipConfig, LearnerConfig  # noqa: E402

FUSED_SHAPE = {"n": 8192, "d": 3584, "vocab": 152064}
FUSED_DRY = {"n": 256, "d": 64, "vocab": 1024}
QWEN_1_5B = {
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
}
QWEN_DRY = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}
# Qwen2.5-1.5B: 1.54 B parameters with its untied LM head counted once (tied in the release)
PARAMS_1_5B = (1.4e9, 1.9e9)
SEQUENCE_TOKENS, SEQUENCE_TOKENS_DRY = 2048, 64
# the longest prompt of benchmarks.learner_throughput.make_table
PROMPT_TOKENS = 32


def _line(metric: str, value: float | None, goal: str, dry_run: bool, **extra: object) -> None:
    record = {"metric": metric, "value": value, "goal": goal, **extra, "dry_run": dry_run}
    if dry_run:
        record |= {"value": None, "skipped": "dry run on CPU: reduced shapes, the numbers are not the figure"}
    print(json.dumps(record), flush=True)


def fused_stats(dry_run: bool) -> None:
    shape = FUSED_DRY if dry_run else FUSED_SHAPE
    device, dtype = ("cpu", torch.float32) if dry_run else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    hidden = torch.randn(shape["n"], shape["d"], device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(shape["vocab"], shape["d"], device=device) / shape["d"] ** 0.5).to(dtype)
    weight.requires_grad_()
    tokens = torch.randint(0, shape["vocab"], (shape["n"],), device=device)
    advantages = torch.randn(shape["n"], device=device)

    def torch_pass() -> None:
        stats = entropy.token_stats(hidden @ weight.T, tokens)
        (advantages * stats.logp).sum().backward()

    if dry_run:
        torch_pass()
        if hidden.grad is None or hidden.grad.shape != hidden.shape or weight.grad.shape != weight.shape:
            raise RuntimeError("token statistics: gradients do not match the inputs' shapes")
        _line("fused_stats_ms", None, "<= 42", True, torch_ms=None, **shape)
        return
    import triton

    from learner.fused_stats import fused_token_stats

    def fused_pass() -> None:
        logp, *_ = fused_token_stats(hidden, weight, tokens)
        (advantages * logp).sum().backward()

    times = {
        name: triton.testing.do_bench(run, rep=500, grad_to_none=[hidden, weight], return_mode="median")
        for name, run in (("fused", fused_pass), ("torch", torch_pass))
    }
    _line(
        "fused_stats_ms", round(times["fused"], 2), "<= 42", False, torch_ms=round(times["torch"], 2), **shape
    )


def _qwen_config(arch: dict[str, int]):  # -> transformers.Qwen2Config
    from transformers import Qwen2Config

    return Qwen2Config(**arch, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def meta_parameter_count(arch: dict[str, int]) -> int:
    """Parameters of the Qwen2 of ``arch``, built on the meta device (no memory, no init)."""
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(_qwen_config(arch))
    return sum(p.numel() for p in model.parameters())


def _single_rank_env(cpu: bool) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key, value in env.items():
        os.environ.setdefault(key, value)


def learner_step(dry_run: bool, steps: int = 3) -> None:
    from transformers import Qwen2ForCausalLM

    from learner.engine import Learner

    n_params = meta_parameter_count(QWEN_1_5B)
    if not PARAMS_1_5B[0] <= n_params <= PARAMS_1_5B[1]:
        raise RuntimeError(f"the 1.5B shape has {n_params} parameters, outside {PARAMS_1_5B}")
    arch, seq = (QWEN_DRY, SEQUENCE_TOKENS_DRY) if dry_run else (QWEN_1_5B, SEQUENCE_TOKENS)
    cfg = LearnerConfig(
        lr=1e-6,
        zero_stage=2,
        precision="fp32" if dry_run else "bf16",
        num_gpus=0 if dry_run else 1,
        groups_per_step=2 if dry_run else 4,
        micro_batch_size=2,
        clip=ClipConfig(method="none"),
        realised_entropy_interval=0,
    )
    _single_rank_env(cpu=dry_run)
    rng = np.random.default_rng(0)
    group_size = 4
    rows = cfg.groups_per_step * group_size
    response = np.full(rows, seq - PROMPT_TOKENS)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(_qwen_config(arch)).to(torch.float32 if dry_run else torch.bfloat16)
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        learner = Learner(cfg, tmp, rank=0, world_size=1, seed=0)
        seconds, tokens = 0.0, 0
        for step in range(steps + 1):
            table = make_table(
                rng, cfg.groups_per_step, group_size, response, step, vocab_size=arch["vocab_size"]
            )
            lengths = [
                len(p) + len(r)
                for p, r in zip(
                    table.column("prompt_ids").to_pylist(),
                    table.column("response_ids").to_pylist(),
                    strict=True,
                )
            ]
            if dry_run and max(lengths) > seq:
                raise RuntimeError(f"sequences of {max(lengths)} tokens, more than {seq}")
            if not dry_run:
                torch.cuda.synchronize()
            start = time.perf_counter()
            metrics = learner.train_step(table)
            if not dry_run:
                torch.cuda.synchronize()
            if step > 0:
                seconds += time.perf_counter() - start
                tokens += sum(lengths)
        if not np.isfinite(metrics["driftrl_learner_loss"]):
            raise RuntimeError("non-finite loss")
    _line(
        "learner_tokens_per_s",
        round(tokens / seconds, 1),
        ">= 30000",
        dry_run,
        parameters=n_params,
        sequence_tokens=seq,
        rows_per_step=rows,
        steps=steps,
        zero_stage=2,
        precision=cfg.precision,
    )


def _sync_worker(rank: int, port: int, numel: int, backend: str, out: mp.SimpleQueue) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group(backend, rank=rank, world_size=2)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    weights = torch.full((numel,), float(rank + 1), dtype=torch.bfloat16, device=device)
    dist.broadcast(weights, src=0)  # warm-up: connection set-up is not the transfer
    seconds = []
    for _ in range(3):
        if backend == "nccl":
            torch.cuda.synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        dist.broadcast(weights, src=0)
        if backend == "nccl":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    if rank == 1:
        if not bool((weights == 1.0).all()):
            raise RuntimeError("rank 1 did not receive rank 0's weights")
        out.put(float(np.median(seconds)))
    dist.destroy_process_group()


def weight_sync(dry_run: bool) -> None:
    numel = 2 * 2**20 if dry_run else meta_parameter_count(QWEN_1_5B)
    backend = "nccl" if not dry_run and torch.cuda.device_count() >= 2 else "gloo"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    procs = [ctx.Process(target=_sync_worker, args=(r, port, numel, backend, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.exitcode != 0:
            raise RuntimeError(f"weight-sync process exited {p.exitcode}")
    seconds = out.get()
    nbytes = 2 * numel
    _line(
        "weight_sync_gb_per_s",
        round(nbytes / seconds / 1e9, 2),
        "reported (no goal in the issue)",
        dry_run,
        bytes=nbytes,
        seconds=round(seconds, 4),
        backend=backend,
    )


FIGURES = {"fused_stats": fused_stats, "learner_step": learner_step, "weight_sync": weight_sync}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", choices=[*FIGURES, "all"], default="all")
    parser.add_argument(
        "--dry-run", action="store_true", help="reduced shapes on CPU (see the module docstring)"
    )
    parser.add_argument("--quick", action="store_true", help="the same as --dry-run")
    args = parser.parse_args(argv)
    dry_run = args.dry_run or args.quick
    if not dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run on CPU")
    for name in FIGURES if args.figure == "all" else [args.figure]:
        FIGURES[name](dry_run)
    if args.figure == "all":
        print(
            json.dumps(
                {
                    "metric": "gpu_check_figures",
                    "value": len(FIGURES),
                    "goal": f"== {len(FIGURES)}",
                    "dry_run": dry_run,
                    "quick": args.quick,
                }
            )
        )


if __name__ == "__main__":
    main()
