"""The DeepSpeed learner on CPU (real DeepSpeed, gloo, the tiny Qwen2): one step, masks, NaN
skipping, gradient accumulation, ZeRO-3 gathering, resume identity, and data parallelism over Ray.

Every in-process learner is rank 0 of a world of 1 (one gloo process group per pytest process);
the data-parallel test runs its ranks as Ray actors. DeepSpeed's first use JIT-builds a shared
memory op (~1–2 min) into ``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR``); later
processes load it from there in a second, so do not point that variable at a temporary folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from buffers.schema import records_to_table
from learner.config import ClipConfig, LearnerConfig, LossConfig

GROUP_SIZE = 4


def make_table(
    model_dir: Path,
    n_groups: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
    version_start: int = 0,
    group_size: int = GROUP_SIZE,
) -> pa.Table:
    """Random prompts/responses of whole groups; behaviour log-probs from the model itself at
    ``temperature`` (so importance ratios are 1 up to rounding); rewards varied within groups."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    records = []
    for g in range(n_groups):
        prompt = rng.integers(4, 64, size=int(rng.integers(3, 7))).tolist()
        for i in range(group_size):
            response = rng.integers(4, 64, size=int(rng.integers(2, 9))).tolist()
            ids = torch.tensor([prompt + response])
            with torch.no_grad():
                logits = model(ids).logits[0].float() / temperature
            logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(1, ids[0, len(prompt) :, None])
            records.append(
                {
                    "traj_id": f"t{seed}-{g}-{i}",
                    "prompt_id": f"p{seed}-{g}",
                    "group_id": f"g{seed}-{g}",
                    "group_size": group_size,
                    "prompt_ids": prompt,
                    "response_ids": response,
                    "behaviour_logprobs": logp[:, 0].tolist(),
                    "temperature": temperature,
                    "reward": float(rng.random()),
                    "version_start": version_start,
                    "version_end": version_start,
                    "actor_id": "test",
                    "finish_reason": "length",
                }
            )
    return records_to_table(records)


def learner_config(**overrides) -> LearnerConfig:
    base = {
        "lr": 1e-3,
        "grad_clip": 1.0,
        "zero_stage": 2,
        "micro_batch_size": 4,
        "groups_per_step": 4,
        "clip": ClipConfig(method="none"),
        "loss": LossConfig(),
    }
    return LearnerConfig(**{**base, **overrides})


def build(model_dir: Path, **overrides):
    from learner.engine import Learner

    return Learner(learner_config(**overrides), model_dir, rank=0, world_size=1, seed=0)


def params(learner) -> dict[str, torch.Tensor]:
    return learner.state_dict_for_sync()


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_one_step_trains_and_reports(distributed_env, model_dir):
    learner = build(model_dir)
    table = make_table(model_dir, seed=1)
    before = params(learner)
    probe = torch.tensor(table.column("prompt_ids").to_pylist()[0])[None]
    entropy_before = learner.probe_entropy(probe)
    metrics = learner.train_step(table)
    after = params(learner)

    assert math.isfinite(metrics["driftrl_learner_loss"])
    assert metrics["driftrl_learner_step_skipped"] == 0.0
    assert max_abs_diff(before, after) > 1e-4
    # on-policy: behaviour log-probs were computed from these very weights at T = 1
    assert metrics["driftrl_learner_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["driftrl_learner_ratio_max"] == pytest.approx(1.0, abs=1e-5)
    lengths = [len(r) for r in table.column("response_ids").to_pylist()]
    assert metrics["driftrl_learner_train_tokens"] == sum(lengths)
    assert metrics["driftrl_learner_response_length_mean"] == pytest.approx(np.mean(lengths))
    assert metrics["driftrl_learner_reward_mean"] == pytest.approx(
        np.mean(table.column("reward").to_pylist())
    )
    assert metrics["driftrl_learner_staleness_count_0"] == table.num_rows
    assert metrics["driftrl_learner_lr"] == pytest.approx(1e-3)
    assert metrics["driftrl_learner_grad_norm"] > 0
    for name in (
        "driftrl_learner_entropy_mean",
        "driftrl_learner_predicted_entropy_change_per_unit_step",
        "driftrl_learner_predicted_entropy_change",
        "driftrl_learner_realised_entropy_change",
        "driftrl_learner_cov_adv_weighted_s_centered",
        "driftrl_learner_s_star_mean",
        "driftrl_learner_s_expect_std",
        "driftrl_learner_clip_dropped_frac",
        "driftrl_learner_truncated_frac",
        "driftrl_learner_staleness_mean",
        "driftrl_learner_staleness_max",
        "driftrl_learner_train_tokens_per_s",
        "driftrl_learner_skipped_steps_total",
    ):
        assert math.isfinite(metrics[name]), name
    assert learner.probe_entropy(probe) != entropy_before


def mean_entropy_float64(model_dir: Path, weights: dict[str, torch.Tensor], table: pa.Table) -> float:
    """Token mean over every response token of the table of H(softmax(z / T)), all in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    model.load_state_dict({k: v.double() for k, v in weights.items()})
    total, count = 0.0, 0
    for row in table.to_pylist():
        prompt, response = row["prompt_ids"], row["response_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
        log_p = torch.log_softmax(logits / row["temperature"], -1)
        total += float(-(log_p.exp() * log_p).sum(-1).sum())
        count += len(response)
    return total / count


def test_same_batch_realised_entropy_change_equals_a_float64_recomputation(distributed_env, model_dir):
    learner = build(model_dir, realised_entropy_interval=2, clip=ClipConfig(method="clip_v", mu=1.0))
    table = make_table(model_dir, seed=6, temperature=0.7)
    before = params(learner)
    m = learner.train_step(table)
    after = params(learner)

    h_before = mean_entropy_float64(model_dir, before, table)
    h_after = mean_entropy_float64(model_dir, after, table)
    # float32 forward vs float64: ~1e-7 relative per token
    assert m["driftrl_learner_entropy_mean"] == pytest.approx(h_before, rel=1e-5)
    assert m["driftrl_learner_entropy_mean_after_step"] == pytest.approx(h_after, rel=1e-5)
    assert abs(h_after - h_before) > 1e-3  # lr 1e-3 moves it: the comparison below can fail
    assert m["driftrl_learner_realised_entropy_change"] == pytest.approx(
        h_after - h_before, rel=1e-3, abs=1e-6
    )
    # η_eff = ‖Δθ‖ / ‖g‖ with ‖Δθ‖ over every parameter in float64
    update = math.sqrt(sum(float((after[k].double() - before[k].double()).square().sum()) for k in after))
    assert m["driftrl_learner_update_norm"] == pytest.approx(update, rel=1e-6)
    scale = update / m["driftrl_learner_grad_norm"]
    assert m["driftrl_learner_entropy_step_scale"] == pytest.approx(scale, rel=1e-6)
    assert m["driftrl_learner_predicted_entropy_change"] == pytest.approx(
        scale * m["driftrl_learner_predicted_entropy_change_per_unit_step"], rel=1e-6
    )
    # step 1 is not a multiple of realised_entropy_interval = 2: nothing measured, NaN throughout
    second = learner.train_step(make_table(model_dir, seed=7))
    for name in ("realised_entropy_change", "entropy_mean_after_step", "predicted_entropy_change"):
        assert math.isnan(second[f"driftrl_learner_{name}"]), name
    assert math.isfinite(second["driftrl_learner_predicted_entropy_change_per_unit_step"])


def test_staleness_counts(distributed_env, model_dir):
    learner = build(model_dir, max_staleness=2)
    learner.state.policy_version = 3
    old = make_table(model_dir, n_groups=2, seed=2, version_start=1)
    new = make_table(model_dir, n_groups=2, seed=3, version_start=3)
    metrics = learner.train_step(pa.concat_tables([old, new]))
    # 8 rows of staleness 3 - 1 = 2 and 8 of staleness 0: mean 1, max 2
    assert metrics["driftrl_learner_staleness_count_0"] == 8
    assert metrics["driftrl_learner_staleness_count_2"] == 8
    assert metrics["driftrl_learner_staleness_mean"] == 1.0
    assert metrics["driftrl_learner_staleness_max"] == 2.0


def test_clip_v_mask_changes_the_loss(distributed_env, model_dir):
    table = make_table(model_dir, seed=4, temperature=0.7)
    plain = build(model_dir).train_step(table)
    # μ = 0.5 population stds drops a good share of a symmetric ClipV batch
    clipped = build(model_dir, clip=ClipConfig(method="clip_v", form="symmetric", mu=0.5)).train_step(table)
    assert plain["driftrl_learner_clip_dropped_frac"] == 0.0
    assert clipped["driftrl_learner_clip_dropped_frac"] > 0.1
    assert clipped["driftrl_learner_loss_tokens"] < plain["driftrl_learner_loss_tokens"]
    assert clipped["driftrl_learner_loss"] != pytest.approx(plain["driftrl_learner_loss"], abs=1e-6)


def test_nan_gradient_is_skipped_and_counted(distributed_env, model_dir):
    learner = build(model_dir)
    table = make_table(model_dir, seed=5)
    weight = learner.hf_model.model.layers[0].mlp.down_proj.weight
    before = params(learner)
    hook = weight.register_hook(lambda grad: torch.full_like(grad, math.nan))
    metrics = learner.train_step(table)
    hook.remove()
    assert metrics["driftrl_learner_step_skipped"] == 1.0
    assert metrics["driftrl_learner_skipped_steps_total"] == 1.0
    assert max_abs_diff(before, params(learner)) == 0.0

    metrics = learner.train_step(table)
    assert metrics["driftrl_learner_step_skipped"] == 0.0
    assert metrics["driftrl_learner_skipped_steps_total"] == 1.0
    assert max_abs_diff(before, params(learner)) > 1e-4


def test_nan_forward_is_skipped_then_too_many_stop_the_run(distributed_env, model_dir):
    from learner.engine import NonFiniteStepError

    learner = build(model_dir, max_nan_steps=2)
    table = make_table(model_dir, seed=6)
    layer = learner.hf_model.model.layers[1]
    hook = layer.register_forward_hook(lambda module, args, out: out * math.nan)
    before = params(learner)
    metrics = learner.train_step(table)
    assert metrics["driftrl_learner_step_skipped"] == 1.0
    assert metrics["driftrl_learner_nonfinite_tokens"] == metrics["driftrl_learner_train_tokens"]
    assert math.isnan(metrics["driftrl_learner_loss"])
    assert max_abs_diff(before, params(learner)) == 0.0
    with pytest.raises(NonFiniteStepError, match="2 consecutive"):
        learner.train_step(table)
    hook.remove()


def capture_gradients(learner) -> dict[str, torch.Tensor]:
    """Sum of every backward's gradient per parameter (tensor hooks run before ZeRO's reduction)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(grad):
            sums[name] = sums[name] + grad if name in sums else grad.clone()

        return add

    for name, param in learner.hf_model.named_parameters():
        param.register_hook(hook(name))
    return sums


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_micro_batches_equal_one_batch(distributed_env, model_dir, zero_stage):
    table = make_table(model_dir, seed=7)
    # eps = 1e-4: Adam's first update is lr·g/(|g| + eps), which with the default 1e-8 turns fp32
    # summation-order noise (~1e-10) in near-zero gradient entries into ~1e-2·lr parameter noise
    whole = build(model_dir, zero_stage=zero_stage, micro_batch_size=table.num_rows, adam_eps=1e-4)
    split = build(model_dir, zero_stage=zero_stage, micro_batch_size=table.num_rows // 4, adam_eps=1e-4)
    g_whole, g_split = capture_gradients(whole), capture_gradients(split)
    m_whole = whole.train_step(table)
    m_split = split.train_step(table)
    assert m_split["driftrl_learner_loss"] == pytest.approx(m_whole["driftrl_learner_loss"], abs=1e-6)
    assert m_split["driftrl_learner_grad_norm"] == pytest.approx(
        m_whole["driftrl_learner_grad_norm"], rel=1e-5
    )
    torch.testing.assert_close(g_split, g_whole)
    torch.testing.assert_close(params(split), params(whole))


def test_zero3_gathers_full_parameters_and_matches_zero2(distributed_env, model_dir):
    from transformers import AutoModelForCausalLM

    table = make_table(model_dir, seed=8)
    zero2 = build(model_dir, zero_stage=2, adam_eps=1e-4)
    from learner.engine import Learner

    zero3 = Learner(
        learner_config(zero_stage=3, adam_eps=1e-4),
        model_dir,
        deepspeed_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).state_dict()
    gathered = params(zero3)
    assert {k: v.shape for k, v in gathered.items()} == {k: v.shape for k, v in reference.items()}
    assert max_abs_diff(gathered, reference) == 0.0
    m2, m3 = zero2.train_step(table), zero3.train_step(table)
    assert m3["driftrl_learner_loss"] == pytest.approx(m2["driftrl_learner_loss"], abs=1e-6)
    assert m3["driftrl_learner_grad_norm"] == pytest.approx(m2["driftrl_learner_grad_norm"], rel=1e-5)
    torch.testing.assert_close(params(zero3), params(zero2))


def test_publish_hands_hf_named_weights_to_the_publisher(distributed_env, model_dir):
    from safetensors.torch import load

    from transports.ray_bytes import BytesWeightPublisher

    learner = build(model_dir)
    learner.train_step(make_table(model_dir, seed=9))
    manifest = learner.publish_weights(BytesWeightPublisher(bucket_bytes=1 << 20, use_object_store=False))
    assert manifest.version == learner.policy_version == 1
    published = {}
    for bucket in manifest.buckets:
        published.update(load(bucket.payload))
    assert max_abs_diff(published, params(learner)) == 0.0


def test_resume_gives_the_identical_next_step(distributed_env, model_dir, tmp_path):
    cfg = {"warmup_steps": 3, "clip": ClipConfig(method="clip_v", mu=1.0)}
    tables = [make_table(model_dir, seed=10 + i) for i in range(3)]
    first = build(model_dir, **cfg)
    for table in tables[:2]:
        first.train_step(table)
    first.state.policy_version = 2
    saved = first.save_checkpoint(tmp_path / "checkpoints" / "step_2")
    assert {"deepspeed", "state.json"} <= {p.name for p in saved.iterdir()}
    assert not (tmp_path / "checkpoints" / "step_2.tmp").exists()
    m3 = first.train_step(tables[2])

    resumed = build(model_dir, **cfg)
    state = resumed.load_checkpoint(saved)
    assert (state.step, state.policy_version) == (2, 2)
    r3 = resumed.train_step(tables[2])
    assert r3["driftrl_learner_loss"] == m3["driftrl_learner_loss"]
    assert r3["driftrl_learner_lr"] == m3["driftrl_learner_lr"]
    # same weights, optimizer moments and LR schedule: the update is bit-identical on one CPU
    assert max_abs_diff(params(first), params(resumed)) == 0.0


def _draws() -> tuple:
    import random

    return random.random(), random.gauss(0.0, 1.0), np.random.randn(3).tolist(), torch.rand(3).tolist()


def test_resume_restores_every_rng_from_plain_json(distributed_env, model_dir, tmp_path):
    import json
    import random

    learner = build(model_dir)
    random.gauss(0.0, 1.0), np.random.randn()  # a cached Gaussian in both states
    saved = learner.save_checkpoint(tmp_path / "step_0")
    expected = _draws()
    state = json.loads((saved / "state.json").read_text())
    # numbers and one base64 string, nothing that needs unpickling
    assert isinstance(state["rng"][0]["python"]["state"], list)
    assert isinstance(state["rng"][0]["numpy"]["keys"], list)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    learner.load_checkpoint(saved)
    assert _draws() == expected


def test_a_tampered_state_json_cannot_run_code(distributed_env, model_dir, tmp_path):
    import base64
    import json
    import os
    import pickle

    learner = build(model_dir)
    saved = learner.save_checkpoint(tmp_path / "step_0")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state_file = saved / "state.json"
    state = json.loads(state_file.read_text())
    # what older checkpoints stored, with a payload that runs a shell command when unpickled
    state["rng"][0]["python"] = base64.b64encode(pickle.dumps(Payload())).decode()
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"state.json rng\[0\]: the RNG state is not the JSON form"):
        learner.load_checkpoint(saved)
    assert not marker.exists()


def _budget_with_an_empty_micro_batch(table: pa.Table) -> int:
    """The smallest packed token budget whose 2-rank plan gives one rank an empty micro-batch."""
    from learner.batch import table_to_batch
    from learner.micro_batches import plan_micro_batches

    batch = table_to_batch(table)
    lengths = (batch.prompt_lengths + batch.response_lengths).numpy()
    for budget in range(int(lengths.max()), int(lengths.sum()) + 1):
        plan = plan_micro_batches(batch.group_index.numpy(), lengths, 2, 3, budget, packed=True)
        if any(rows.size == 0 for rank in plan for rows in rank):
            return budget
    raise AssertionError("no budget leaves a rank with an empty micro-batch")


@pytest.mark.slow
@pytest.mark.parametrize(("zero_stage", "layout"), [(2, "by_count"), (3, "by_count"), (2, "packed_budget")])
def test_two_ranks_equal_one_rank(distributed_env, model_dir, zero_stage, layout):
    import ray
    from safetensors.torch import load

    from learner.actor import call_all, launch_learners
    from transports.ray_bytes import BytesWeightPublisher

    # 3 groups of 4 over 2 ranks: rank 0 gets 8 rows (3 micro-batches of ≤ 3), rank 1 gets 4 rows
    # (2 micro-batches) plus an empty one, so the ranks still join the same ZeRO collectives; the
    # packed case picks a token budget under which one rank's plan has an empty micro-batch too
    table = make_table(model_dir, n_groups=3, seed=20)
    cfg = {
        "clip": ClipConfig(method="clip_b", form="symmetric", mu=1.0),
        "micro_batch_size": 3,
        "adam_eps": 1e-4,
    }
    if layout == "packed_budget":
        cfg |= {"packing": True, "max_tokens_per_micro_batch": _budget_with_an_empty_micro_batch(table)}
    single = build(model_dir, **cfg)
    m_single = single.train_step(table)

    if zero_stage == 2:
        # local Ray on loopback: the ranks meet through learner/actor.py's loopback process group
        from driftrl.pipeline import start_local_ray

        start_local_ray(2, log_to_driver=False)
    else:  # Ray on the machine's address: DeepSpeed's env:// rendezvous
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert (ray.util.get_node_ip_address() == "127.0.0.1") == (zero_stage == 2)
        group = launch_learners(
            learner_config(data_parallel_size=2, num_cpus=1, zero_stage=zero_stage, **cfg),
            str(model_dir),
            deepspeed_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        )
        metrics = call_all(group, "train_step", table, timeout_s=300)
        weights = call_all(group, "state_dict_for_sync", timeout_s=120)
        publisher = BytesWeightPublisher(bucket_bytes=1 << 20, use_object_store=False)
        manifests = call_all(group, "publish_weights", publisher, timeout_s=120)
        group.shutdown()
    finally:
        ray.shutdown()
    for name in ("driftrl_learner_clip_center", "driftrl_learner_clip_bound"):
        assert metrics[0][name] == metrics[1][name]
        assert metrics[0][name] == pytest.approx(m_single[name], rel=1e-6)
    assert metrics[0]["driftrl_learner_loss"] == pytest.approx(m_single["driftrl_learner_loss"], abs=1e-6)
    # the reported norm is the pre-clip norm of the averaged gradient: a wrong DP scale shows here
    assert metrics[0]["driftrl_learner_grad_norm"] == pytest.approx(
        m_single["driftrl_learner_grad_norm"], rel=1e-5
    )
    # same dropped tokens; one rank's float32 masked mean vs the float64 token-weighted merge of two
    assert metrics[0]["driftrl_learner_clip_dropped_frac"] == pytest.approx(
        m_single["driftrl_learner_clip_dropped_frac"], rel=1e-6
    )
    assert max_abs_diff(weights[0], weights[1]) == 0.0
    assert max_abs_diff(weights[0], params(single)) < 1e-5
    assert manifests[1] is None and manifests[0].version == 1
    published = {}
    for bucket in manifests[0].buckets:
        published.update(load(bucket.payload))
    assert max_abs_diff(published, weights[0]) == 0.0


@pytest.mark.parametrize(
    ("clip", "layout"),
    [
        (ClipConfig(method="clip_b", form="symmetric", mu=1.0), {"packing": True}),
        (
            ClipConfig(method="clip_v", form="symmetric", mu=1.0),
            {"packing": True, "max_tokens_per_micro_batch": 40},
        ),
        (ClipConfig(method="clip_v", form="symmetric", mu=1.0), {"max_tokens_per_micro_batch": 40}),
    ],
)
def test_packed_and_token_budget_steps_equal_the_padded_step(distributed_env, model_dir, clip, layout):
    table = make_table(model_dir, seed=11)
    padded = build(model_dir, clip=clip, micro_batch_size=5, adam_eps=1e-4)
    other = build(model_dir, clip=clip, micro_batch_size=5, adam_eps=1e-4, **layout)
    g_padded, g_other = capture_gradients(padded), capture_gradients(other)
    m_padded = padded.train_step(table)
    m_other = other.train_step(table)
    # mu = 1 drops tokens in both tails, so equal masks are checked, not vacuous
    assert m_padded["driftrl_learner_clip_dropped_frac"] > 0
    skip = (
        "driftrl_learner_step_seconds",
        "driftrl_learner_train_tokens_per_s",
        "driftrl_learner_entropy_change_seconds",
    )
    for name, value in m_padded.items():
        if name not in skip:
            assert m_other[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    torch.testing.assert_close(g_other, g_padded)
    torch.testing.assert_close(params(other), params(padded))


def test_gradient_checkpointing_gives_the_same_gradients(distributed_env, model_dir):
    table = make_table(model_dir, seed=12)
    plain = build(model_dir, adam_eps=1e-4, packing=True)
    checkpointed = build(model_dir, adam_eps=1e-4, packing=True, gradient_checkpointing=True)
    assert checkpointed.hf_model.model.gradient_checkpointing and checkpointed.hf_model.training
    g_plain, g_checkpointed = capture_gradients(plain), capture_gradients(checkpointed)
    plain.train_step(table)
    checkpointed.train_step(table)
    torch.testing.assert_close(g_checkpointed, g_plain)


@pytest.mark.parametrize("clip_method", ["none", "clip_v"])
def test_reusing_the_statistics_forward_changes_no_number(distributed_env, model_dir, clip_method):
    """One micro-batch: the loss pass backpropagates through the statistics forward (one forward
    a step) and lands on the same parameters and metrics as two forwards."""
    table = make_table(model_dir, seed=7)
    clip = ClipConfig(method=clip_method, mu=1.0)
    once = build(model_dir, micro_batch_size=64, clip=clip, reuse_statistics_forward=True)
    twice = build(model_dir, micro_batch_size=64, clip=clip, reuse_statistics_forward=False)
    calls = {"once": 0, "twice": 0}
    for name, learner in (("once", once), ("twice", twice)):
        forward = learner._forward

        def counted(mb, _forward=forward, _name=name):
            calls[_name] += 1
            return _forward(mb)

        learner._forward = counted
    a, b = once.train_step(table), twice.train_step(table)
    assert calls["once"] == calls["twice"] - 1  # the saved forward (both also measure ΔH after the step)
    assert max_abs_diff(params(once), params(twice)) <= 1e-6
    for key in ("driftrl_learner_loss", "driftrl_learner_entropy_mean", "driftrl_learner_clip_dropped_frac"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    if clip_method != "none":
        assert a["driftrl_learner_clip_dropped_frac"] > 0  # the mask is exercised, not vacuous
