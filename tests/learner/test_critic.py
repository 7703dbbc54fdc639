"""PPO's critic: the clipped value loss by hand, the value model, and the learner with
``loss.advantage=gae`` on CPU (real DeepSpeed, the tiny Qwen2): GAE reaching the policy loss, the
critic training, micro-batch invariance, ZeRO-3, and checkpoint -> resume of policy + critic."""

from __future__ import annotations

import math

import deepspeed
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from learner.config import CriticConfig, LearnerConfig, LossConfig
from learner.critic import value_loss
from tests.learner.test_engine import build, learner_config, make_table, max_abs_diff, params

GAE = {"loss": LossConfig(advantage="gae")}


def critic_params(learner) -> dict[str, torch.Tensor]:
    named = list(learner.critic.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=learner.cfg.zero_stage == 3):
        return {n: p.detach().clone() for n, p in named}


def test_value_loss_by_hand_and_clipped_tokens_get_no_gradient():
    values = torch.tensor([1.0, 0.5, -0.2, 3.0], requires_grad=True)
    old = torch.tensor([0.5, 0.5, 0.0, 0.0])
    returns = torch.tensor([2.0, 1.0, -1.0, 9.0])
    mask = torch.tensor([True, True, True, False])
    loss, metrics = value_loss(values, old, returns, mask, value_clip=0.2)
    # token 0: V - V_old = 0.5 clips to 0.2, V_clip = 0.7: max((1-2)², (0.7-2)²) = 1.69 (clipped)
    # token 1: V = V_old: (0.5-1)² = 0.25 either way;  token 2: V_clip = -0.2 = V: 0.8² = 0.64
    # token 3 is masked; ½ · (1.69 + 0.25 + 0.64) / 3 = 0.43
    assert float(loss.detach()) == pytest.approx(0.43)
    assert float(metrics["driftrl_learner_value_clipped_frac"]) == pytest.approx(1 / 3)
    loss.backward()
    # the clipped token's loss does not depend on V; token 1: ½ · 2 (0.5 - 1) / 3; token 2: ½ · 2 · 0.8 / 3
    torch.testing.assert_close(values.grad, torch.tensor([0.0, -0.5 / 3, 0.8 / 3, 0.0]))
    unclipped, _ = value_loss(values.detach(), old, returns, mask, value_clip=None)
    # ½ · (1 + 0.25 + 0.64) / 3
    assert float(unclipped) == pytest.approx(0.315)


def test_config_requires_the_critic_for_gae_and_refuses_it_otherwise():
    with pytest.raises(ValidationError, match="needs learner.critic"):
        LearnerConfig(loss=LossConfig(advantage="gae"))
    with pytest.raises(ValidationError, match="only gae uses a value model"):
        LearnerConfig(critic=CriticConfig())
    with pytest.raises(ValidationError):
        CriticConfig(lam=1.5)
    assert LearnerConfig(loss=LossConfig(advantage="gae"), critic=CriticConfig()).critic.gamma == 1.0


def test_gae_advantages_reach_the_policy_loss_and_the_critic_trains(distributed_env, model_dir):
    # γ = λ = 1 and a zero head: V = 0, so every token's advantage is its response's reward
    critic = CriticConfig(gamma=1.0, lam=1.0, whiten_advantages=False, head_init_std=0.0, lr=1e-3)
    learner = build(model_dir, critic=critic, **GAE)
    table = make_table(model_dir, seed=1)
    policy_before, critic_before = params(learner), critic_params(learner)
    metrics = learner.train_step(table)

    lengths = np.array([len(r) for r in table.column("response_ids").to_pylist()])
    rewards = np.array(table.column("reward").to_pylist())
    token_reward_mean = float((rewards * lengths).sum() / lengths.sum())
    assert metrics["driftrl_learner_advantage_mean"] == pytest.approx(token_reward_mean, rel=1e-6)
    assert metrics["driftrl_learner_advantage_std"] > 0
    # on-policy (ratio 1, nothing clipped): the token-mean surrogate is -mean(A)
    assert metrics["driftrl_learner_pg_loss"] == pytest.approx(-token_reward_mean, rel=1e-4)
    assert metrics["driftrl_learner_value_mean"] == 0.0
    # the targets are the rewards: ½ mean_t R², and V = 0 explains nothing: EV = 1 - Var(G)/Var(G)
    assert metrics["driftrl_learner_value_loss"] == pytest.approx(
        0.5 * float((rewards**2 * lengths).sum() / lengths.sum()), rel=1e-5
    )
    assert metrics["driftrl_learner_explained_variance"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["driftrl_learner_value_clipped_frac"] == 0.0
    assert metrics["driftrl_learner_value_grad_norm"] > 0
    assert max_abs_diff(policy_before, params(learner)) > 1e-4
    assert max_abs_diff(critic_before, critic_params(learner)) > 1e-4
    # the critic moved towards the rewards: the next batch's values are no longer all zero
    again = learner.train_step(table)
    assert again["driftrl_learner_value_mean"] > 0.01
    assert again["driftrl_learner_value_loss"] < metrics["driftrl_learner_value_loss"]


def test_micro_batches_equal_one_batch_with_a_critic(distributed_env, model_dir):
    table = make_table(model_dir, seed=3)
    critic = CriticConfig(head_init_std=0.05, lr=1e-3)
    whole = build(model_dir, critic=critic, micro_batch_size=table.num_rows, adam_eps=1e-4, **GAE)
    split = build(model_dir, critic=critic, micro_batch_size=table.num_rows // 4, adam_eps=1e-4, **GAE)
    mw, ms = whole.train_step(table), split.train_step(table)
    for name in ("loss", "value_loss", "advantage_std", "explained_variance", "value_clipped_frac"):
        assert ms[f"driftrl_learner_{name}"] == pytest.approx(
            mw[f"driftrl_learner_{name}"], rel=1e-5, abs=1e-7
        )
    torch.testing.assert_close(critic_params(split), critic_params(whole))


def test_zero3_critic_builds_steps_and_matches_zero2(distributed_env, model_dir):
    table = make_table(model_dir, seed=4)
    critic = CriticConfig(head_init_std=0.05, lr=1e-3)
    from learner.engine import Learner

    zero2 = build(model_dir, critic=critic, adam_eps=1e-4, **GAE)
    zero3 = Learner(
        learner_config(zero_stage=3, critic=critic, adam_eps=1e-4, **GAE),
        model_dir,
        deepspeed_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )
    torch.testing.assert_close(critic_params(zero3), critic_params(zero2))
    m2, m3 = zero2.train_step(table), zero3.train_step(table)
    assert m3["driftrl_learner_value_loss"] == pytest.approx(m2["driftrl_learner_value_loss"], rel=1e-5)
    assert m3["driftrl_learner_value_grad_norm"] == pytest.approx(
        m2["driftrl_learner_value_grad_norm"], rel=1e-4
    )
    assert math.isfinite(m3["driftrl_learner_loss"])
    torch.testing.assert_close(critic_params(zero3), critic_params(zero2))


def test_resume_of_policy_and_critic_gives_the_identical_next_step(distributed_env, model_dir, tmp_path):
    cfg = {"warmup_steps": 3, "critic": CriticConfig(head_init_std=0.05, lr=1e-3), **GAE}
    tables = [make_table(model_dir, seed=20 + i) for i in range(3)]
    first = build(model_dir, **cfg)
    for table in tables[:2]:
        first.train_step(table)
    saved = first.save_checkpoint(tmp_path / "step_2")
    assert {"deepspeed", "critic", "state.json"} <= {p.name for p in saved.iterdir()}
    m3 = first.train_step(tables[2])

    resumed = build(model_dir, **cfg)
    resumed.load_checkpoint(saved)
    r3 = resumed.train_step(tables[2])
    for name in ("loss", "value_loss", "explained_variance", "advantage_mean", "value_grad_norm"):
        assert r3[f"driftrl_learner_{name}"] == m3[f"driftrl_learner_{name}"], name
    # same weights and optimizer moments of both engines: the updates are bit-identical on one CPU
    assert max_abs_diff(params(first), params(resumed)) == 0.0
    assert max_abs_diff(critic_params(first), critic_params(resumed)) == 0.0
    with pytest.raises(ValueError, match="has critic"):
        build(model_dir, warmup_steps=3).load_checkpoint(saved)
