"""Loss behaviour (STYLE rule 14), GRPO advantages, baselines and step metrics (ALGORITHM.md §4-§5)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from learner.config import LossConfig
from learner.entropy import TokenStats, token_stats
from learner.losses import (
    METRIC_REDUCTIONS,
    LossInputs,
    entropy_metrics,
    grpo_advantages,
    loss_denominator,
    masked_mean,
    metrics_to_floats,
    policy_loss,
)

PPO = LossConfig(clip_eps_low=0.2, clip_eps_high=0.28)


def leaf(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


def test_grpo_advantages_by_hand():
    # group 7: R = [1,0,1,0], mean 0.5, sample std = sqrt(4·0.25/3) = 0.57735 -> A = ±0.5/0.57735 = ±0.86603
    # group 3: R = [1,1] zero variance -> 0; group 9: a single response -> 0.  Zero-variance: 2 of 3.
    rewards = t(1, 0, 1, 0, 1, 1, 0.5)
    groups = torch.tensor([7, 7, 7, 7, 3, 3, 9])
    adv, zero_frac = grpo_advantages(rewards, groups, eps=0.0)
    a = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(adv, t(a, -a, a, -a, 0, 0, 0))
    torch.testing.assert_close(zero_frac, torch.tensor(2 / 3))
    adv, _ = grpo_advantages(rewards, groups, std_norm=False)
    torch.testing.assert_close(adv, t(0.5, -0.5, 0.5, -0.5, 0, 0, 0))


def test_grpo_rejects_bad_input():
    with pytest.raises(ValueError, match=r"rewards.*\(1,\)"):
        grpo_advantages(t(0, float("nan")), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="disagree"):
        grpo_advantages(t(0, 1), torch.tensor([0]))


def batch(n: int = 8, seed: int = 0, spread: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    behaviour = -torch.rand(n, generator=gen) * 3
    return {
        "logprobs": (behaviour + torch.randn(n, generator=gen) * spread).requires_grad_(),
        "behaviour_logprobs": behaviour,
        "advantages": torch.randn(n, generator=gen),
        "loss_mask": torch.ones(n, dtype=torch.bool),
    }


def test_inside_clip_range_ppo_equals_plain_policy_gradient():
    b = batch(spread=0.05)  # |log r| <= ~0.15 -> r in (0.86, 1.16) ⊂ (0.8, 1.28)
    ratio = torch.exp(b["logprobs"] - b["behaviour_logprobs"])
    assert bool(((ratio > 0.8) & (ratio < 1.28)).all())
    loss, metrics = policy_loss(LossInputs(**b), PPO)
    plain = -(b["advantages"] * ratio).mean()
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(grad_of(loss, b["logprobs"]), grad_of(plain, b["logprobs"]))
    assert float(metrics["driftrl_learner_clipped_frac"]) == 0.0


def test_clipped_tokens_get_zero_gradient():
    # r = e^{0.5} = 1.65 with A > 0 (above 1 + 0.28) and r = e^{-0.5} = 0.61 with A < 0 (below 0.8):
    # both clipped; r = 0.61 with A > 0 and r = 1.65 with A < 0 are not (min keeps the unclipped term)
    logprobs = leaf(0.5, -0.5, -0.5, 0.5)
    b = {"logprobs": logprobs, "behaviour_logprobs": torch.zeros(4), "advantages": t(1, -1, 1, -1),
         "loss_mask": torch.ones(4, dtype=torch.bool)}
    loss, metrics = policy_loss(LossInputs(**b), PPO)
    g = grad_of(loss, logprobs)
    assert g[0] == 0 and g[1] == 0
    # d/dlp of -A e^{lp} / 4 at lp = ∓0.5: token 2: -e^{-0.5}/4 = -0.15163, token 3: +e^{0.5}/4 = 0.41218
    torch.testing.assert_close(g[2:], t(-math.exp(-0.5) / 4, math.exp(0.5) / 4))
    torch.testing.assert_close(metrics["driftrl_learner_clipped_frac"], torch.tensor(0.5))
    # dual clip c = 1.5 caps token 3 (A < 0, r = 1.65 > 1.5): its loss is the constant c·|A|
    loss, metrics = policy_loss(LossInputs(**b), PPO.model_copy(update={"dual_clip_c": 1.5}))
    assert grad_of(loss, logprobs)[3] == 0
    torch.testing.assert_close(metrics["driftrl_learner_dual_clipped_frac"], torch.tensor(0.25))


def test_masked_tokens_leave_numerator_and_denominator():
    b = batch(6, seed=1)
    keep = torch.tensor([True, False, True, True, False, True])
    loss, _ = policy_loss(LossInputs(**b, keep_mask=keep), PPO)
    g = grad_of(loss, b["logprobs"])
    assert g[1] == 0 and g[4] == 0
    kept = {k: v[keep] if k != "logprobs" else v[keep] for k, v in b.items()}
    ref, _ = policy_loss(LossInputs(**kept), PPO)
    torch.testing.assert_close(loss, ref)  # mean over the 4 kept tokens, not over 6


def test_padding_changes_nothing():
    b = batch(5, seed=2)
    loss, _ = policy_loss(LossInputs(**b), PPO)
    g = grad_of(loss, b["logprobs"])
    nan = float("nan")
    padded_lp = torch.cat([b["logprobs"].detach(), t(nan, 0.3, -nan)]).requires_grad_()
    padded = LossInputs(
        logprobs=padded_lp,
        behaviour_logprobs=torch.cat([b["behaviour_logprobs"], t(-math.inf, nan, 7.0)]),
        advantages=torch.cat([b["advantages"], t(nan, 100.0, -3.0)]),
        loss_mask=torch.cat([b["loss_mask"], torch.zeros(3, dtype=torch.bool)]),
    )
    padded_loss, metrics = policy_loss(padded, PPO)
    padded_g = grad_of(padded_loss, padded_lp)
    torch.testing.assert_close(padded_loss, loss)
    torch.testing.assert_close(padded_g[:5], g)
    assert padded_g[5:].tolist() == [0.0, 0.0, 0.0]
    assert all(math.isfinite(v) for v in metrics_to_floats(metrics).values())


def test_behaviour_equal_to_current_gives_ratio_one():
    b = batch(7, seed=3)
    b["behaviour_logprobs"] = b["logprobs"].detach().clone()
    loss, metrics = policy_loss(LossInputs(**b), PPO)
    torch.testing.assert_close(metrics["driftrl_learner_ratio_mean"], torch.tensor(1.0))
    torch.testing.assert_close(metrics["driftrl_learner_ratio_max"], torch.tensor(1.0))
    torch.testing.assert_close(loss, -b["advantages"].mean())
    # at r = 1 the gradient is the REINFORCE one, -A/n per token
    torch.testing.assert_close(grad_of(loss, b["logprobs"]), -b["advantages"] / 7)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_micro_batch_split_changes_nothing(aggregation):
    config = PPO.model_copy(update={"aggregation": aggregation, "entropy_coef": 0.1})
    b = batch(12, seed=4, spread=0.4)  # some tokens clipped
    b["seq_index"] = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])
    b["keep_mask"] = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)  # seq 3 fully dropped
    b["entropy"] = torch.rand(12, generator=torch.Generator().manual_seed(0))
    whole, _ = policy_loss(LossInputs(**b), config)
    g_whole = grad_of(whole, b["logprobs"])

    lp = b["logprobs"].detach().clone().requires_grad_()
    parts = [slice(0, 5), slice(5, 9), slice(9, 12)]  # on response boundaries
    # each micro-batch numbers its responses from 0, as a learner would
    offsets = [0, 2, 3]
    micro = [
        LossInputs(
            logprobs=lp[s], behaviour_logprobs=b["behaviour_logprobs"][s], advantages=b["advantages"][s],
            loss_mask=b["loss_mask"][s], keep_mask=b["keep_mask"][s], seq_index=b["seq_index"][s] - off,
            entropy=b["entropy"][s],
        )
        for s, off in zip(parts, offsets, strict=True)
    ]
    total = sum(loss_denominator(m, aggregation) for m in micro)
    # token_mean: 12 tokens - 3 dropped = 9; seq_mean_token_mean: 5 responses - 1 fully dropped = 4
    assert float(total) == (9.0 if aggregation == "token_mean" else 4.0)
    split = sum(policy_loss(m, config, denominator=total)[0] for m in micro)
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(grad_of(split, lp), g_whole)


def test_seq_mean_token_mean_by_hand():
    # two responses at r = 1: seq 0 A = [1, 1, 1] (token mean -1), seq 1 A = [-3] (token mean 3):
    # seq-mean-token-mean = (-1 + 3)/2 = 1; token-mean = (-3 + 3)/4 = 0
    lp = leaf(0, 0, 0, 0)
    inputs = LossInputs(logprobs=lp, behaviour_logprobs=torch.zeros(4), advantages=t(1, 1, 1, -3),
                        loss_mask=torch.ones(4, dtype=torch.bool), seq_index=torch.tensor([0, 0, 0, 1]))
    seq_loss, _ = policy_loss(inputs, PPO.model_copy(update={"aggregation": "seq_mean_token_mean"}))
    tok_loss, _ = policy_loss(inputs, PPO)
    assert float(seq_loss.detach()) == 1.0 and float(tok_loss.detach()) == 0.0


def test_all_masked_batch_gives_zero_loss_and_runs_backward():
    b = batch(4, seed=5)
    b["loss_mask"] = torch.zeros(4, dtype=torch.bool)
    b["behaviour_logprobs"] = torch.full((4,), float("nan"))
    loss, metrics = policy_loss(LossInputs(**b), PPO)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert b["logprobs"].grad.tolist() == [0.0] * 4
    assert float(metrics["driftrl_learner_empty_batch"]) == 1.0
    empty_lp = torch.zeros(0, requires_grad=True)
    empty = LossInputs(logprobs=empty_lp, behaviour_logprobs=torch.zeros(0), advantages=torch.zeros(0),
                       loss_mask=torch.zeros(0, dtype=torch.bool))
    loss, metrics = policy_loss(empty, PPO)
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(math.isfinite(v) for v in metrics_to_floats(metrics).values())


def test_bad_inputs_raise():
    b = batch(4, seed=6)
    b["advantages"] = t(0, 0, float("inf"), 0)
    with pytest.raises(ValueError, match=r"advantages.*\(2,\)"):
        policy_loss(LossInputs(**b), PPO)
    b = batch(4, seed=6)
    b["behaviour_logprobs"] = t(0, -200, 0, 0)  # log r = ~200: exp overflows float32
    with pytest.raises(ValueError, match=r"ratio.*\(1,\)"):
        policy_loss(LossInputs(**b), PPO)
    b = batch(4, seed=6)
    b["advantages"] = torch.zeros(3)
    with pytest.raises(ValueError, match="advantages: expected shape"):
        policy_loss(LossInputs(**b), PPO)
    with pytest.raises(ValueError, match="entropy: required"):
        policy_loss(LossInputs(**batch(4)), PPO.model_copy(update={"entropy_coef": 0.1}))


def test_truncated_importance_weight_with_proximal_policy():
    # proximal - behaviour = log 3 -> w = 3, truncated to C = 2; logprobs = proximal -> r = 1:
    # loss = -mean(w A r) = -2·mean(A) = -2·(1 + 3)/2 = -4; truncated fraction 1
    lp = leaf(-1.0, -2.0)
    inputs = LossInputs(logprobs=lp, behaviour_logprobs=t(-1 - math.log(3), -2 - math.log(3)),
                        advantages=t(1, 3), loss_mask=torch.ones(2, dtype=torch.bool),
                        proximal_logprobs=t(-1.0, -2.0))
    loss, metrics = policy_loss(inputs, PPO.model_copy(update={"truncate_is_c": 2.0}))
    torch.testing.assert_close(loss, torch.tensor(-4.0))
    torch.testing.assert_close(metrics["driftrl_learner_truncated_frac"], torch.tensor(1.0))


def test_truncated_ratio_without_proximal_policy():
    # r = e^{1} = 2.718 > C = 2 with A < 0: the unclipped term is -A·min(r, C) = 2 (constant), the
    # clipped term -A·1.28: loss = max(2, 1.28) = 2 with zero gradient; counted as truncated
    lp = leaf(1.0)
    inputs = LossInputs(logprobs=lp, behaviour_logprobs=t(0.0), advantages=t(-1),
                        loss_mask=torch.ones(1, dtype=torch.bool))
    loss, metrics = policy_loss(inputs, PPO.model_copy(update={"truncate_is_c": 2.0}))
    torch.testing.assert_close(loss, torch.tensor(2.0))
    assert grad_of(loss, lp).tolist() == [0.0]
    torch.testing.assert_close(metrics["driftrl_learner_truncated_frac"], torch.tensor(1.0))


def cov_batch() -> dict[str, torch.Tensor]:
    # A = [2, 2, -2, -2, 0], logp = [0, -4, 0, -4, -2] at r = 1 (behaviour = logprobs):
    # mean A = 0, mean logp = -2 -> cov = A·(logp + 2) = [4, -4, -4, 4, 0]
    lp = leaf(0, -4, 0, -4, -2)
    return {"logprobs": lp, "behaviour_logprobs": lp.detach().clone(), "advantages": t(2, 2, -2, -2, 0),
            "loss_mask": torch.ones(5, dtype=torch.bool)}


def test_clip_cov_detaches_tokens_in_the_covariance_band():
    b = cov_batch()
    # band (1, 5) holds tokens 0 and 3 (cov 4); frac 0.4 -> max(⌊0.4·5⌋, 1) = 2 selected: both
    config = PPO.model_copy(update={"type": "clip_cov", "cov_clip_frac": 0.4})
    loss, metrics = policy_loss(LossInputs(**b), config, generator=torch.Generator().manual_seed(0))
    g = grad_of(loss, b["logprobs"])
    # r = 1 inside the clip range: plain gradient -A/5 except the detached tokens
    torch.testing.assert_close(g, t(0, -0.4, 0.4, 0, 0))
    torch.testing.assert_close(loss, -b["advantages"].mean())  # values are kept
    torch.testing.assert_close(metrics["driftrl_learner_cov_selected_frac"], torch.tensor(0.4))
    # frac 0.2 -> 1 token, chosen at random among the two in the band
    config = config.model_copy(update={"cov_clip_frac": 0.2})
    loss, _ = policy_loss(LossInputs(**b), config, generator=torch.Generator().manual_seed(1))
    zero = (grad_of(loss, b["logprobs"]) == 0).nonzero().flatten().tolist()
    assert zero in ([0, 4], [3, 4])  # token 4 has A = 0 and no gradient anyway


def test_kl_cov_penalises_the_top_covariance_tokens():
    b = cov_batch()
    # A = [3, 2, -2, -2, -1]: mean 0, cov = A·(logp + 2) = [6, -4, -4, 4, 0]; k = max(⌊0.2·5⌋, 1) = 1
    # -> token 0 (unique largest). Move it off-policy by +0.1 so the penalty |logp - behaviour| = 0.1
    b["advantages"] = t(3, 2, -2, -2, -1)
    b["behaviour_logprobs"] = b["behaviour_logprobs"] - t(0.1, 0, 0, 0, 0)
    config = PPO.model_copy(update={"type": "kl_cov", "kl_cov_frac": 0.2, "kl_cov_coef": 2.0})
    loss, metrics = policy_loss(LossInputs(**b), config)
    r0 = math.exp(0.1)
    # loss = [-3 r0 + 2·0.1 - 2 + 2 + 2 + 1]/5 = (-3·1.10517 + 3.2)/5 = -0.023102
    torch.testing.assert_close(loss, torch.tensor((-3 * r0 + 3.2) / 5))
    g = grad_of(loss, b["logprobs"])
    # token 0: (-3 r0 + 2·sign(0.1))/5; others -A/5 (no ratio clipping in KL-Cov)
    torch.testing.assert_close(g, t((-3 * r0 + 2) / 5, -0.4, 0.4, 0.4, 0.2))
    torch.testing.assert_close(metrics["driftrl_learner_kl_cov_penalty"], torch.tensor(0.2))
    torch.testing.assert_close(metrics["driftrl_learner_cov_selected_frac"], torch.tensor(0.2))


def test_entropy_bonus_gradient_is_the_entropy_gradient_in_expectation():
    """One position, every token of the vocabulary once, behaviour uniform (μ = 1/V): the ratio
    r_k = V p_k turns the token mean into E_{k~p}, so the estimator's gradient is exactly ∇H."""
    vocab = 6
    z = (torch.randn(vocab, generator=torch.Generator().manual_seed(8)) * 2).requires_grad_()
    stats = token_stats(z.expand(vocab, vocab), torch.arange(vocab))
    inputs = LossInputs(logprobs=stats.logp, behaviour_logprobs=torch.full((vocab,), -math.log(vocab)),
                        advantages=torch.zeros(vocab), loss_mask=torch.ones(vocab, dtype=torch.bool),
                        entropy=stats.entropy)
    # wide clip range: the PG part is zero anyway (A = 0), the bonus is not clipped
    loss, metrics = policy_loss(inputs, PPO.model_copy(update={"entropy_coef": 1.0}))
    z64 = z.detach().double().requires_grad_()
    log_p = torch.log_softmax(z64, -1)
    (grad_h,) = torch.autograd.grad(-(log_p.exp() * log_p).sum(), z64)
    torch.testing.assert_close(grad_of(loss, z).double(), -grad_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["driftrl_learner_entropy_bonus"], stats.entropy.mean())


def test_entropy_metrics_by_hand():
    # Sc = S* - E[S] = [1, -1, 2, 0 (padding)], A = [1, 1, -1, 9], r = [1, 2, 1, 1]:
    # r·Sc = [1, -2, 2]; predicted over the kept tokens {1, 2}: -(1·2·(-1) + 1·(-1)·2)/2 = 2.0
    # Cov(A, r·Sc): mean A = 1/3, mean rSc = 1/3: Σ (A - 1/3)(rSc - 1/3)/3
    #   = [(2/3)(2/3) + (2/3)(-7/3) + (-4/3)(5/3)]/3 = (4/9 - 14/9 - 20/9)/3 = -30/27 = -1.1111
    stats = TokenStats(logp=torch.zeros(4), entropy=t(1, 2, 3, 100), s_star=t(1.5, -0.5, 2.5, 7),
                       s_expect=t(0.5, 0.5, 0.5, 0.5))
    valid = torch.tensor([True, True, True, False])
    keep = torch.tensor([False, True, True, False])
    m = entropy_metrics(stats, t(1, 1, -1, 9), valid, ratio=t(1, 2, 1, 1), keep_mask=keep)
    floats = metrics_to_floats(m)
    assert set(floats) <= set(METRIC_REDUCTIONS)
    assert floats["driftrl_learner_predicted_entropy_change_per_unit_step"] == pytest.approx(2.0)
    unmasked = metrics_to_floats(entropy_metrics(stats, t(1, 1, -1, 9), valid, ratio=t(1, 2, 1, 1)))
    assert unmasked["driftrl_learner_predicted_entropy_change_per_unit_step"] == pytest.approx(1.0)  # -(1-2-2)/3
    assert floats["driftrl_learner_cov_adv_weighted_s_centered"] == pytest.approx(-30 / 27)
    # mean term mean(A)·mean(r·Sc) = (1/3)(1/3); Cov + mean term = mean(A·r·Sc) = -1 = -(unmasked prediction)
    assert floats["driftrl_learner_adv_weighted_s_centered_mean_term"] == pytest.approx(1 / 9)
    assert -30 / 27 + 1 / 9 == pytest.approx(-1.0)
    assert floats["driftrl_learner_entropy_mean"] == pytest.approx(2.0)  # padding's 100 ignored
    # dropped: token 0 of 3 valid; of A>0 tokens {0, 1}: 1/2; of A<0 tokens {2}: 0
    assert floats["driftrl_learner_clip_dropped_frac"] == pytest.approx(1 / 3)
    assert floats["driftrl_learner_clip_dropped_frac_pos_adv"] == pytest.approx(0.5)
    assert floats["driftrl_learner_clip_dropped_frac_neg_adv"] == 0.0
    # Sc = [1, -1, 2]: mean 2/3, population var = (1/9 + 25/9 + 16/9)/3 = 42/27 -> std 1.2472
    assert floats["driftrl_learner_s_centered_std"] == pytest.approx(math.sqrt(42 / 27))


def test_masked_mean_of_nothing_is_zero():
    assert float(masked_mean(t(float("nan"), 1.0), torch.tensor([False, False]))) == 0.0


def _score_batch(n: int, seed: int) -> tuple[TokenStats, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random token statistics; the second half is shifted so the ranks' means differ (a per-rank
    average of stds then misses the spread between them)."""
    gen = torch.Generator().manual_seed(seed)
    shift = torch.where(torch.arange(n) >= n // 2, 3.0, 0.0)
    stats = TokenStats(
        logp=torch.zeros(n),
        entropy=torch.rand(n, generator=gen) + shift,
        s_star=torch.randn(n, generator=gen) ** 3 + shift,
        s_expect=torch.rand(n, generator=gen) * 0.3,
    )
    advantages = torch.randn(n, generator=gen) + shift
    valid = torch.rand(n, generator=gen) > 0.2
    ratio = torch.exp(torch.randn(n, generator=gen) * 0.2)
    keep = torch.rand(n, generator=gen) > 0.1
    return stats, advantages, valid, ratio, keep


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _metrics_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        stats, advantages, valid, ratio, keep = _score_batch(600, seed=3)
        shard = slice(0, 250) if rank == 0 else slice(250, 600)
        part = TokenStats(*(getattr(stats, f)[shard] for f in ("logp", "entropy", "s_star", "s_expect")))
        metrics = entropy_metrics(
            part, advantages[shard], valid[shard], ratio[shard], keep[shard], sum_all_reduce=_sum_over_ranks
        )
        torch.save({k: v.double() for k, v in metrics.items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_data_parallel_ranks_give_the_global_std_and_covariance(tmp_path):
    """Two gloo ranks holding 250 and 350 tokens report what one rank holding all 600 reports,
    and both equal a float64 reference written from the definitions."""
    out = str(tmp_path / "metrics")
    mp.spawn(_metrics_rank_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    stats, advantages, valid, ratio, keep = _score_batch(600, seed=3)
    one_rank = entropy_metrics(stats, advantages, valid, ratio, keep)
    for name, value in one_rank.items():
        for rank in ranks:
            torch.testing.assert_close(rank[name], value.double(), msg=name)
    # float64 reference over the valid tokens of the whole batch
    a = advantages[valid].double()
    w = (ratio * (stats.s_star - stats.s_expect))[valid].double()
    kept = keep[valid]
    reference = {
        "s_star_std": stats.s_star[valid].double().std(correction=0),
        "weighted_s_centered_std": w.std(correction=0),
        "cov_adv_weighted_s_centered": ((a - a.mean()) * (w - w.mean())).mean(),
        "adv_weighted_s_centered_mean_term": a.mean() * w.mean(),
        "predicted_entropy_change_per_unit_step": -(a * w)[kept].mean(),
        "clip_dropped_frac_pos_adv": (~kept)[a > 0].double().mean(),
    }
    for name, value in reference.items():
        torch.testing.assert_close(ranks[0][f"driftrl_learner_{name}"], value, msg=name)
    # what the learner reported before: per-rank values averaged with token weights
    counts = [int(valid[:250].sum()), int(valid[250:].sum())]
    local = [
        entropy_metrics(
            TokenStats(*(getattr(stats, f)[s] for f in ("logp", "entropy", "s_star", "s_expect"))),
            advantages[s], valid[s], ratio[s], keep[s],
        )
        for s in (slice(0, 250), slice(250, 600))
    ]
    for name in ("s_star_std", "cov_adv_weighted_s_centered"):
        averaged = sum(c * float(m[f"driftrl_learner_{name}"]) for c, m in zip(counts, local, strict=True)) / sum(counts)
        assert abs(averaged - float(reference[name])) > 0.05, name


def _off_policy_batch(n: int = 64, seed: int = 5) -> dict[str, torch.Tensor]:
    # spread 0.4: many ratios leave (0.8, 1.28), so clipping and dual-clipping both act
    b = batch(n, seed=seed, spread=0.4)
    return b


@pytest.mark.parametrize("loss_type", ["ppo", "kl_cov"])
def test_decoupled_loss_with_proximal_equal_to_behaviour_is_the_plain_ppo_loss(loss_type):
    b = _off_policy_batch()
    config = PPO.model_copy(update={"type": loss_type, "dual_clip_c": 3.0})
    plain, m_plain = policy_loss(LossInputs(**b), config)
    decoupled, m_dec = policy_loss(LossInputs(**b, proximal_logprobs=b["behaviour_logprobs"]), config)
    assert m_plain["driftrl_learner_clipped_frac"] > 0 or loss_type == "kl_cov"
    torch.testing.assert_close(decoupled, plain)
    torch.testing.assert_close(grad_of(decoupled, b["logprobs"]), grad_of(plain, b["logprobs"]))
    for name, value in m_plain.items():
        torch.testing.assert_close(m_dec[name], value)


def test_decoupled_loss_against_a_float64_reference():
    gen = torch.Generator().manual_seed(3)
    b = _off_policy_batch()
    proximal = b["behaviour_logprobs"] + torch.randn(64, generator=gen) * 0.5
    config = PPO.model_copy(update={"truncate_is_c": 1.5})
    loss, metrics = policy_loss(LossInputs(**b, proximal_logprobs=proximal), config)
    lp, mu, prox, a = (x.detach().double() for x in (b["logprobs"], b["behaviour_logprobs"], proximal, b["advantages"]))
    r = torch.exp(lp - prox)
    w = torch.exp(prox - mu)
    expected = (w.clamp(max=1.5) * torch.maximum(-a * r, -a * r.clamp(0.8, 1.28))).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-7)
    assert 0 < float(metrics["driftrl_learner_truncated_frac"]) < 1
    torch.testing.assert_close(metrics["driftrl_learner_truncated_frac"].double(), (w > 1.5).double().mean())


def test_unit_advantage_sign_weights_are_grpo_exactly():
    b = _off_policy_batch()
    plain, _ = policy_loss(LossInputs(**b), PPO)
    unit, _ = policy_loss(LossInputs(**b), PPO.model_copy(update={"pos_adv_weight": 1.0, "neg_adv_weight": 1.0}))
    passed, _ = policy_loss(LossInputs(**b), PPO, sign_weights=(1.0, 1.0))
    assert float(unit.detach()) == float(plain.detach()) == float(passed.detach())
    assert torch.equal(grad_of(unit, b["logprobs"]), grad_of(plain, b["logprobs"]))


@pytest.mark.parametrize("loss_type", ["ppo", "clip_cov", "kl_cov"])
def test_advantage_sign_weights_against_a_float64_reference(loss_type):
    b = _off_policy_batch()
    b["advantages"][:4] = 0.0  # A = 0 tokens keep weight 1 (they add nothing either way)
    config = PPO.model_copy(
        update={"type": loss_type, "pos_adv_weight": 2.0, "neg_adv_weight": 0.25, "kl_cov_coef": 0.0}
    )
    loss, _ = policy_loss(LossInputs(**b), config, generator=torch.Generator().manual_seed(0))
    lp, mu, a = (x.detach().double() for x in (b["logprobs"], b["behaviour_logprobs"], b["advantages"]))
    r = torch.exp(lp - mu)
    surrogate = -a * r if loss_type == "kl_cov" else torch.maximum(-a * r, -a * r.clamp(0.8, 1.28))
    weight = torch.where(a > 0, 2.0, torch.where(a < 0, 0.25, 1.0)).double()
    # Clip-Cov detaches a few tokens: their value is unchanged, so the loss value still matches
    torch.testing.assert_close(loss.double(), (weight * surrogate).mean(), rtol=1e-6, atol=1e-7)
    # zero weight for A < 0: those tokens get no gradient
    only_pos, _ = policy_loss(LossInputs(**b), config, sign_weights=(2.0, 0.0))
    g = grad_of(only_pos, b["logprobs"])
    assert bool((g[b["advantages"] < 0] == 0).all()) and bool((g[b["advantages"] > 0] != 0).any())


def test_importance_keep_mask_by_hand():
    from learner.losses import importance_keep_mask

    # log r per token; responses 0 = tokens 0-2, 1 = tokens 3-4, 2 = token 5 (padding, not valid)
    log_r = t(0.0, math.log(3.0), -0.1, math.log(0.4), math.log(1.5), 9.0)
    valid = torch.tensor([True, True, True, True, True, False])
    seq = torch.tensor([0, 0, 0, 1, 1, 2])
    token = importance_keep_mask(log_r, valid, seq, "token", 0.5, 2.0)
    # r = 1, 3, 0.905, 0.4, 1.5: 3 > 2 and 0.4 < 0.5 drop; padding is never kept
    assert token.tolist() == [True, False, True, False, True, False]
    # geometric means: response 0 exp((0 + 1.0986 - 0.1)/3) = 1.395 kept; response 1
    # exp((-0.9163 + 0.4055)/2) = 0.775 kept at low 0.5, dropped at low 0.8
    assert importance_keep_mask(log_r, valid, seq, "sequence", 0.5, 2.0).tolist() == [True] * 5 + [False]
    assert importance_keep_mask(log_r, valid, seq, "sequence", 0.8, 2.0).tolist() == [True] * 3 + [False] * 3
    # a non-finite log ratio drops its token, or its whole response
    bad = log_r.clone()
    bad[1] = float("nan")
    assert importance_keep_mask(bad, valid, seq, "token", 0.5, 4.0).tolist()[:3] == [True, False, True]
    assert importance_keep_mask(bad, valid, seq, "sequence", 0.5, 4.0).tolist()[:3] == [False] * 3


def test_mismatch_kl_is_the_k3_estimate_and_converges_to_the_true_kl():
    from learner.losses import mismatch_kl

    # by hand: log r = log 2 -> r - 1 - log r = 1 - 0.693147 = 0.306853; log r = 0 -> 0; mean 0.153426
    value = mismatch_kl(t(math.log(2.0), -1.0, 5.0), t(0.0, -1.0, 0.0), torch.tensor([True, True, False]))
    torch.testing.assert_close(value, torch.tensor((1 - math.log(2.0)) / 2))
    # tokens sampled from mu: the estimate approaches KL(mu || pi) of the two distributions
    gen = torch.Generator().manual_seed(0)
    mu = torch.softmax(torch.randn(6, generator=gen, dtype=torch.float64), -1)
    pi = torch.softmax(torch.randn(6, generator=gen, dtype=torch.float64), -1)
    tokens = torch.multinomial(mu, 200_000, replacement=True, generator=gen)
    estimate = mismatch_kl(pi.log()[tokens].float(), mu.log()[tokens].float(), torch.ones_like(tokens, dtype=torch.bool))
    exact = float((mu * (mu.log() - pi.log())).sum())
    assert float(estimate) == pytest.approx(exact, rel=0.02)


def test_entropy_prediction_sums_over_the_trained_tokens_and_fractions_stay_the_clip_masks():
    stats, advantages, valid, ratio, keep = _score_batch(64, seed=9)
    trained = keep & (torch.rand(64, generator=torch.Generator().manual_seed(1)) > 0.3)
    clip_only = entropy_metrics(stats, advantages, valid, ratio, keep)
    as_trained = entropy_metrics(stats, advantages, valid, ratio, trained)
    both = entropy_metrics(stats, advantages, valid, ratio, keep, trained_mask=trained)
    name = "driftrl_learner_predicted_entropy_change_per_unit_step"
    # float64 reference: -sum over trained valid tokens of r·A·Sc / their count
    sc = (stats.s_star - stats.s_expect).double()
    t_mask = valid & trained
    expected = -(ratio.double() * advantages.double() * sc)[t_mask].sum() / t_mask.sum()
    torch.testing.assert_close(both[name].double(), expected)
    torch.testing.assert_close(both[name], as_trained[name])
    assert both[name] != clip_only[name]
    assert both["driftrl_learner_clip_dropped_frac"] == clip_only["driftrl_learner_clip_dropped_frac"]
