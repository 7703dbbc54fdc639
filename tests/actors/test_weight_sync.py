"""Wire format and deadlines of the weight transports (the engine path is in test_rollout.py)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from safetensors.torch import load

from actors.config import WeightSyncConfig
from actors.weight_sync import (
    BytesWeightPublisher,
    BytesWeightReceiver,
    NcclWeightPublisher,
    WeightBoard,
    WeightSyncTimeoutError,
    make_receiver,
    plan_buckets,
)


def named(sizes_bytes: list[int]) -> list[tuple[str, torch.Tensor]]:
    return [(f"w{i}", torch.arange(n // 4, dtype=torch.float32)) for i, n in enumerate(sizes_bytes)]


def test_buckets_keep_order_and_limit() -> None:
    # 400 + 400 fit in 1000; the next 400 would make 1200 -> new bucket; 2000 alone exceeds the
    # limit and gets its own bucket; the last 400 starts another.
    buckets = plan_buckets(named([400, 400, 400, 2000, 400]), bucket_bytes=1000)
    assert [[name for name, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3"], ["w4"]]
    with pytest.raises(ValueError, match="twice"):
        plan_buckets([("a", torch.zeros(1)), ("a", torch.zeros(1))], 1000)
    with pytest.raises(ValueError, match="nothing"):
        plan_buckets([], 1000)


def test_bytes_manifest_round_trips_tensors() -> None:
    tensors = [("a.weight", torch.randn(3, 5)), ("b.bias", torch.randn(7).to(torch.bfloat16))]
    manifest = BytesWeightPublisher(bucket_bytes=64, use_object_store=False).publish(4, tensors)
    assert manifest.version == 4 and manifest.transport == "ray_bytes" and manifest.num_tensors == 2
    assert manifest.total_bytes == 3 * 5 * 4 + 7 * 2 and len(manifest.buckets) == 2
    assert manifest.buckets[1].dtypes == ("bfloat16",) and manifest.buckets[0].shapes == ((3, 5),)
    decoded = {}
    for bucket in manifest.buckets:
        decoded.update(load(bucket.payload))
    for name, tensor in tensors:
        assert torch.equal(decoded[name], tensor)


def test_receiver_deadline_is_a_clear_error() -> None:
    manifest = BytesWeightPublisher(bucket_bytes=1 << 20, use_object_store=False).publish(
        3, [("w", torch.zeros(4))]
    )

    async def stalled_engine(method: str, args: tuple, timeout_s: float) -> list[int]:
        if method == "driftrl_load_safetensors":
            await asyncio.sleep(60)  # an engine that never answers
        return [1]

    receiver = BytesWeightReceiver("rollout-7")
    with pytest.raises(
        WeightSyncTimeoutError, match=r"rollout-7: weight sync to version 3 .* within 0.2 s .*bucket 1/1"
    ):
        asyncio.run(receiver.receive(stalled_engine, manifest, timeout_s=0.2))


def test_nccl_fails_clearly_without_gpus() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CPU error path does not apply")
    with pytest.raises(RuntimeError, match="needs CUDA GPUs on the learner.*ray_bytes"):
        NcclWeightPublisher(1 << 20, "127.0.0.1", 29555, engine_ranks=1, timeout_s=10)
    with pytest.raises(RuntimeError, match="needs CUDA GPUs on the rollout actor"):
        make_receiver(WeightSyncConfig(transport="nccl"), "rollout-0", rank_offset=1)


def test_board_keeps_newest() -> None:
    board = WeightBoard()
    assert board.latest() is None
    publisher = BytesWeightPublisher(1 << 20, use_object_store=False)
    m2 = publisher.publish(2, [("w", torch.zeros(1))])
    m1 = publisher.publish(1, [("w", torch.zeros(1))])
    board.post(m2)
    board.post(m1)
    assert board.latest() is m2
