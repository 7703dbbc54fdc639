"""Several updates per sampled batch (``learner.mini_batches``, ``learner.epochs``) on the CPU learner.

One update per batch must be today's step: checked against an independent plain-torch GRPO step
(HF forward, the PPO surrogate written out, torch's AdamW). Several updates must be the same
updates as separate learner steps on the mini-batches' own tables, each with its own thresholds.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from learner.config import ClipConfig
from tests.learner.test_engine import build, make_table, max_abs_diff, params

# eps = 1e-4 as in test_engine: Adam's first update lr·g/(|g| + eps) would turn fp32 summation-order
# noise in near-zero gradient entries into visible parameter noise with the default 1e-8
ADAM_EPS = 1e-4


def reference_grpo_step(model_dir, table: pa.Table, lr: float, grad_clip: float) -> tuple[float, dict]:
    """One GRPO/PPO step written out in plain torch: loss and the parameters after AdamW."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    rows = table.to_pylist()
    rewards = np.array([r["reward"] for r in rows])
    groups = [r["group_id"] for r in rows]
    advantages = []
    for row, g in zip(rows, groups, strict=True):
        group = rewards[[h == g for h in groups]]
        advantages.append((row["reward"] - group.mean()) / (group.std(ddof=1) + 1e-6))
    terms = []
    for row, adv in zip(rows, advantages, strict=True):
        prompt, response = row["prompt_ids"], row["response_ids"]
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1] / row["temperature"]
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None])[:, 0]
        ratio = torch.exp(logp - torch.tensor(row["behaviour_logprobs"]))
        a = float(adv)
        terms.append(torch.maximum(-a * ratio, -a * ratio.clamp(1 - 0.2, 1 + 0.28)))
    loss = torch.cat(terms).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=ADAM_EPS, weight_decay=0.0)
    opt.step()
    return float(loss.detach()), {k: v.detach() for k, v in model.state_dict().items()}


def test_one_mini_batch_one_epoch_is_the_plain_grpo_step(distributed_env, model_dir):
    table = make_table(model_dir, seed=30)
    learner = build(model_dir, adam_eps=ADAM_EPS)
    updates = learner.train_updates(table)
    assert len(updates) == 1
    m = updates[0]
    loss, weights = reference_grpo_step(model_dir, table, lr=1e-3, grad_clip=1.0)
    assert m["driftrl_learner_loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    after = params(learner)
    torch.testing.assert_close(after, {k: weights[k] for k in after})
    assert (m["driftrl_learner_step"], m["driftrl_learner_optimizer_step"]) == (1.0, 1.0)
    assert (learner.state.step, learner.state.optimizer_step) == (1, 1)


def test_mini_batches_and_epochs_are_the_updates_of_separate_steps_on_the_halves(distributed_env, model_dir):
    # 2 groups of 4 rows, grouped rows in table order: mini-batch 0 = rows 0-3, 1 = rows 4-7; GRPO
    # advantages are per group, so a half's own table has the same advantages
    table = make_table(model_dir, n_groups=2, seed=31)
    halves = [table.slice(0, 4), table.slice(4, 4)]
    clip = ClipConfig(method="clip_b", form="symmetric", mu=1.0)
    several = build(model_dir, clip=clip, adam_eps=ADAM_EPS, mini_batches=2, epochs=2)
    separate = build(model_dir, clip=clip, adam_eps=ADAM_EPS)
    updates = several.train_updates(table)
    expected = [separate.train_step(h) for h in (*halves, *halves)]
    assert len(updates) == 4
    assert [(u["driftrl_learner_epoch"], u["driftrl_learner_mini_batch"]) for u in updates] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert [u["driftrl_learner_optimizer_step"] for u in updates] == [1, 2, 3, 4]
    assert {u["driftrl_learner_step"] for u in updates} == {1.0}
    for got, want in zip(updates, expected, strict=True):
        for name in (
            "driftrl_learner_clip_center",
            "driftrl_learner_clip_bound",
            "driftrl_learner_loss",
            "driftrl_learner_grad_norm",
            "driftrl_learner_clip_dropped_frac",
            "driftrl_learner_train_tokens",
        ):
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name
    # each update's thresholds are its own mini-batch's, not the table's
    assert updates[0]["driftrl_learner_clip_center"] != updates[1]["driftrl_learner_clip_center"]
    assert updates[0]["driftrl_learner_loss"] != updates[2]["driftrl_learner_loss"]
    torch.testing.assert_close(params(several), params(separate))
    # the table's staleness is counted once against one policy version: the same for every update
    assert {u["driftrl_learner_staleness_mean"] for u in updates} == {0.0}


def test_mini_batches_must_divide_the_groups():
    from learner.config import LearnerConfig

    with pytest.raises(ValueError, match="must divide"):
        LearnerConfig(groups_per_step=6, mini_batches=4)
    assert LearnerConfig(groups_per_step=8, mini_batches=4, epochs=2).mini_batches == 4


@pytest.mark.slow
def test_two_ranks_four_mini_batches_use_each_mini_batch_global_thresholds(distributed_env, model_dir):
    import ray

    from driftrl.pipeline import start_local_ray
    from learner.actor import call_all, launch_learners
    from tests.learner.test_engine import learner_config

    # 8 groups, 4 mini-batches of 2 groups: each rank holds one group of every mini-batch, so a
    # rank-local threshold would differ from the global one; the 1-rank reference runs each
    # mini-batch's 8 rows as a learner step of its own
    table = make_table(model_dir, n_groups=8, seed=32)
    cfg = {
        "clip": ClipConfig(method="clip_v", form="symmetric", mu=1.0),
        "micro_batch_size": 2,
        "adam_eps": 1e-4,
        "groups_per_step": 8,
    }
    single = build(model_dir, **cfg)
    expected = [single.train_step(table.slice(8 * k, 8)) for k in range(4)]
    start_local_ray(2, log_to_driver=False)
    try:
        group = launch_learners(
            learner_config(data_parallel_size=2, num_cpus=1, mini_batches=4, **cfg), str(model_dir)
        )
        per_rank = call_all(group, "train_updates", table, timeout_s=300)
        weights = call_all(group, "state_dict_for_sync", timeout_s=120)
        group.shutdown()
    finally:
        ray.shutdown()
    assert [len(u) for u in per_rank] == [4, 4]
    for k, want in enumerate(expected):
        for name in ("driftrl_learner_clip_center", "driftrl_learner_clip_bound"):
            assert per_rank[0][k][name] == per_rank[1][k][name]
            assert per_rank[0][k][name] == pytest.approx(want[name], rel=1e-5), (k, name)
        assert per_rank[0][k]["driftrl_learner_loss"] == pytest.approx(want["driftrl_learner_loss"], abs=1e-6)
        assert math.isfinite(per_rank[0][k]["driftrl_learner_grad_norm"])
    assert max_abs_diff(weights[0], weights[1]) == 0.0
    assert max_abs_diff(weights[0], params(single)) < 1e-5


def test_decoupled_ppo_on_fresh_rows_is_todays_step(distributed_env, model_dir):
    from learner.config import LossConfig

    table = make_table(model_dir, seed=33)
    plain = build(model_dir, adam_eps=ADAM_EPS)
    decoupled = build(model_dir, adam_eps=ADAM_EPS, loss=LossConfig(proximal="learner"))
    m_plain, m_dec = plain.train_step(table), decoupled.train_step(table)
    # fresh rows: behaviour and recomputed log-probs agree to fp32 rounding
    assert 0 <= m_plain["driftrl_learner_mismatch_kl"] < 1e-8
    assert m_dec["driftrl_learner_loss"] == pytest.approx(m_plain["driftrl_learner_loss"], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(params(decoupled), params(plain))


def test_decoupled_proximal_is_the_start_of_the_batch_for_every_update(distributed_env, model_dir):
    from learner.config import LossConfig

    # fresh rows: the start-of-batch learner is the behaviour policy, so a proximal taken there
    # clips every update exactly as plain PPO against behaviour does. A tight clip range makes the
    # later updates clip (the weights moved): a proximal recomputed per update would clip nothing
    table = make_table(model_dir, n_groups=2, seed=34)
    tight = {"clip_eps_low": 1e-3, "clip_eps_high": 1e-3}
    cfg = {"adam_eps": ADAM_EPS, "mini_batches": 2, "epochs": 2}
    plain = build(model_dir, loss=LossConfig(**tight), **cfg)
    decoupled = build(model_dir, loss=LossConfig(proximal="learner", **tight), **cfg)
    u_plain, u_dec = plain.train_updates(table), decoupled.train_updates(table)
    assert u_plain[-1]["driftrl_learner_clipped_frac"] > 0.1
    for got, want in zip(u_dec, u_plain, strict=True):
        for name in ("driftrl_learner_loss", "driftrl_learner_clipped_frac", "driftrl_learner_grad_norm"):
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name
    torch.testing.assert_close(params(decoupled), params(plain))


def test_masked_importance_sampling_drops_the_out_of_range_tokens(distributed_env, model_dir):
    from learner.config import LossConfig

    # behaviour log-probs off by N(0, 0.3²) per token, as a mismatched rollout engine would give:
    # ratios exp(±0.3) straddle [0.8, 1.25]
    table = make_table(model_dir, n_groups=2, seed=35)
    rng = np.random.default_rng(0)
    noisy = [
        [v + 0.3 * rng.standard_normal() for v in row]
        for row in table.column("behaviour_logprobs").to_pylist()
    ]
    index = table.schema.get_field_index("behaviour_logprobs")
    table = table.set_column(
        index, table.schema.field(index), pa.array(noisy, type=table.schema.field(index).type)
    )
    plain = build(model_dir).train_step(table)
    token = build(model_dir, loss=LossConfig(is_mask="token", is_mask_low=0.8, is_mask_high=1.25)).train_step(
        table
    )
    seq = build(
        model_dir, loss=LossConfig(is_mask="sequence", is_mask_low=0.8, is_mask_high=1.25)
    ).train_step(table)
    assert plain["driftrl_learner_is_masked_frac"] == 0.0
    assert plain["driftrl_learner_mismatch_kl"] > 1e-3
    for m in (token, seq):
        assert 0 < m["driftrl_learner_is_masked_frac"] < 1
        assert m["driftrl_learner_mismatch_kl"] == pytest.approx(
            plain["driftrl_learner_mismatch_kl"], rel=1e-6
        )
        # masked tokens leave the loss: the loss-token count is what is left
        assert m["driftrl_learner_loss_tokens"] == pytest.approx(
            plain["driftrl_learner_train_tokens"] * (1 - m["driftrl_learner_is_masked_frac"]), abs=1e-3
        )
    # a token-level mask bounds every trained ratio; a sequence-level one only each response's mean
    assert token["driftrl_learner_ratio_max"] <= 1.25 + 1e-5
    assert seq["driftrl_learner_ratio_max"] > 1.25


def test_entropy_controller_state_is_checkpointed_and_resumed(distributed_env, model_dir, tmp_path):
    from learner.config import EntropyControlConfig, LossConfig

    loss = LossConfig(
        entropy_control=EntropyControlConfig(target_entropy=1.0, kp=0.5, ki=0.2, weight_max=3.0)
    )
    tables = [make_table(model_dir, n_groups=2, seed=40 + i) for i in range(3)]
    first = build(model_dir, loss=loss)
    metrics = [first.train_step(t) for t in tables[:2]]
    entropy = [m["driftrl_learner_entropy_mean"] for m in metrics]
    # e = 1 - H per step, I = e1 + e2; u = 0.5 e2 + 0.2 I; w+ = clip(1 - u), w- = clip(1 + u) in [0, 3]
    e = [1.0 - h for h in entropy]
    u = 0.5 * e[1] + 0.2 * (e[0] + e[1])
    assert metrics[1]["driftrl_learner_entropy_control_error"] == pytest.approx(e[1], rel=1e-6)
    assert metrics[1]["driftrl_learner_pos_adv_weight"] == pytest.approx(min(3, max(0, 1 - u)), rel=1e-6)
    assert metrics[1]["driftrl_learner_neg_adv_weight"] == pytest.approx(min(3, max(0, 1 + u)), rel=1e-6)
    saved = first.save_checkpoint(tmp_path / "step_2")
    m3 = first.train_step(tables[2])

    resumed = build(model_dir, loss=loss)
    resumed.load_checkpoint(saved)
    assert resumed.controller.state_dict() == {
        "error": pytest.approx(e[1]),
        "integral": pytest.approx(e[0] + e[1]),
        "observations": 2,
    }
    r3 = resumed.train_step(tables[2])
    assert r3["driftrl_learner_pos_adv_weight"] == m3["driftrl_learner_pos_adv_weight"]
    assert r3["driftrl_learner_loss"] == m3["driftrl_learner_loss"]
    assert max_abs_diff(params(first), params(resumed)) == 0.0


def sampled_table(model, seed: int, n_groups: int = 4, group_size: int = 4, length: int = 6) -> pa.Table:
    """Fresh rows from ``model`` (the learner's current weights) at T = 1; reward = the fraction of
    response tokens below 32, so groups have reward variance."""
    from buffers.schema import records_to_table

    gen = torch.Generator().manual_seed(seed)
    records = []
    for g in range(n_groups):
        prompt = torch.randint(4, 64, (5,), generator=gen)
        ids = prompt.repeat(group_size, 1)
        logps = []
        with torch.no_grad():
            for _ in range(length):
                logp = torch.log_softmax(model(ids).logits[:, -1].float(), -1)
                token = torch.multinomial(logp.exp(), 1, generator=gen)
                logps.append(logp.gather(1, token))
                ids = torch.cat([ids, token], 1)
        logps = torch.cat(logps, 1)
        for i in range(group_size):
            response = ids[i, len(prompt) :].tolist()
            records.append(
                {
                    "traj_id": f"s{seed}-{g}-{i}",
                    "prompt_id": f"s{seed}-{g}",
                    "group_id": f"s{seed}-{g}",
                    "group_size": group_size,
                    "prompt_ids": prompt.tolist(),
                    "response_ids": response,
                    "behaviour_logprobs": logps[i].tolist(),
                    "temperature": 1.0,
                    "reward": float(np.mean([t < 32 for t in response])),
                    "version_start": 0,
                    "version_end": 0,
                    "actor_id": "test",
                    "finish_reason": "length",
                }
            )
    return records_to_table(records)


def entropy_run(model_dir, steps: int, loss) -> list[float]:
    """A tiny on-policy run: each step samples from the learner's current weights, then trains."""
    from transformers import AutoModelForCausalLM

    learner = build(model_dir, lr=3e-3, realised_entropy_interval=0, loss=loss)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    entropy = []
    for step in range(steps):
        model.load_state_dict(params(learner))
        entropy.append(
            learner.train_step(sampled_table(model, seed=100 + step))["driftrl_learner_entropy_mean"]
        )
    return entropy


@pytest.mark.slow
def test_entropy_controller_ends_closer_to_its_target(distributed_env, model_dir):
    from learner.config import EntropyControlConfig, LossConfig

    # lr 3e-3 collapses the plain run's entropy within a dozen steps (4.1 -> under 1 nat); the
    # controller, asked to hold 0.5 nat under the start, shifts weight to the negative samples
    steps = 12
    plain = entropy_run(model_dir, steps, LossConfig())
    target = plain[0] - 0.5
    control = EntropyControlConfig(target_entropy=target, kp=4.0, ki=0.1)
    controlled = entropy_run(model_dir, steps, LossConfig(entropy_control=control))
    print("plain", [round(h, 3) for h in plain], "controlled", [round(h, 3) for h in controlled])
    # the first batch comes from the same initial weights in both runs
    assert controlled[0] == pytest.approx(plain[0], rel=1e-6)
    end_plain, end_controlled = np.mean(plain[-3:]), np.mean(controlled[-3:])
    print(f"target {target:.3f}: plain {plain[0]:.3f} -> {end_plain:.3f}, controlled -> {end_controlled:.3f}")
    assert abs(end_controlled - target) < abs(end_plain - target)
