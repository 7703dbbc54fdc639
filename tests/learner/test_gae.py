"""GAE over response tokens against a float64 per-response reference, and its layout adapters."""

from __future__ import annotations

import pytest
import torch

from learner.gae import (
    advantage_moments,
    gae_advantages,
    gae_advantages_flat,
    summarise_moments,
    whiten,
)


def reference_gae(
    reward: float, values: list[float], gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """Schulman et al. eq. 16 on one response, written out as sums: A_t = Σ_l (γλ)^l δ_{t+l}."""
    n = len(values)
    rewards = [0.0] * (n - 1) + [reward]
    nxt = values[1:] + [0.0]
    deltas = [rewards[t] + gamma * nxt[t] - values[t] for t in range(n)]
    adv = [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]
    return adv, [a + v for a, v in zip(adv, values, strict=True)]


def random_batch(
    seed: int, rows: int = 6, width: int = 13
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards, values with NaN off the mask, and masks with a prompt offset, lengths 1..width-3."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(rows, generator=g, dtype=torch.float64) * 2 - 0.5
    values = torch.randn(rows, width, generator=g, dtype=torch.float64)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    lengths = [1, width - 3, *torch.randint(1, width - 3, (rows - 2,), generator=g).tolist()]
    for i, length in enumerate(lengths):
        offset = int(torch.randint(0, width - length + 1, (1,), generator=g))
        mask[i, offset : offset + length] = True
    return rewards, torch.where(mask, values, torch.nan), mask


@pytest.mark.parametrize(
    ("gamma", "lam", "seed"), [(1.0, 0.95, 0), (0.99, 0.9, 1), (0.7, 0.0, 2), (1.0, 1.0, 3)]
)
def test_gae_equals_the_float64_reference(gamma, lam, seed):
    rewards, values, mask = random_batch(seed)
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    expected_adv = torch.zeros_like(advantages)
    expected_ret = torch.zeros_like(returns)
    for i in range(rewards.shape[0]):
        cols = mask[i].nonzero().squeeze(1)
        adv, ret = reference_gae(float(rewards[i]), values[i, cols].tolist(), gamma, lam)
        expected_adv[i, cols] = torch.tensor(adv, dtype=torch.float64)
        expected_ret[i, cols] = torch.tensor(ret, dtype=torch.float64)
    torch.testing.assert_close(advantages, expected_adv)
    torch.testing.assert_close(returns, expected_ret)
    # padding and prompt positions are exactly zero (NaN values there never leak)
    assert torch.all(advantages[~mask] == 0) and torch.all(returns[~mask] == 0)


def test_gamma_lambda_one_with_a_constant_value_gives_reward_minus_value_everywhere():
    rewards, _, mask = random_batch(4)
    values = torch.full(mask.shape, 0.3, dtype=torch.float64)
    advantages, returns = gae_advantages(rewards, values, mask, 1.0, 1.0)
    expected = (rewards[:, None] - 0.3).expand_as(mask)
    torch.testing.assert_close(advantages[mask], expected[mask])
    # the λ-return of every token is the final reward itself
    torch.testing.assert_close(returns[mask], rewards[:, None].expand_as(mask)[mask])


def test_flat_layout_equals_the_padded_one():
    rewards, values, mask = random_batch(5)
    values = torch.where(mask, values, 0.0).float()
    advantages, returns = gae_advantages(rewards.float(), values, mask, 0.99, 0.95)
    row = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]
    # non-consecutive response ids, as a micro-batch's rows might carry
    seq_index = row * 3 + 7
    flat_adv, flat_ret = gae_advantages_flat(rewards.float()[row], values[mask], seq_index, 0.99, 0.95)
    torch.testing.assert_close(flat_adv, advantages[mask])
    torch.testing.assert_close(flat_ret, returns[mask])
    empty = torch.zeros(0)
    assert gae_advantages_flat(empty, empty, empty.long(), 0.99, 0.95)[0].shape == (0,)


def test_moments_split_over_parts_equal_the_whole_and_whiten():
    g = torch.Generator().manual_seed(6)
    adv, ret, val = (torch.randn(40, generator=g, dtype=torch.float64) for _ in range(3))
    whole = summarise_moments(advantage_moments(adv, ret, val))
    parts = summarise_moments(
        advantage_moments(adv[:15], ret[:15], val[:15]) + advantage_moments(adv[15:], ret[15:], val[15:])
    )
    torch.testing.assert_close(parts.mean, adv.mean())
    torch.testing.assert_close(parts.std, adv.std(correction=0))
    explained = 1 - (ret - val).var(correction=0) / ret.var(correction=0)
    torch.testing.assert_close(whole.explained_variance, explained)
    torch.testing.assert_close(parts.explained_variance, explained)
    white = whiten(adv.float(), parts)
    assert white.dtype == torch.float32
    # the whitened values are float32: their mean is 0 up to float32 rounding of O(1) numbers
    torch.testing.assert_close(
        white.double().mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(white.double().std(correction=0), torch.tensor(1.0, dtype=torch.float64))
    # a batch of identical advantages whitens to zeros, not NaN
    same = torch.full((5,), 0.4)
    assert torch.all(whiten(same, summarise_moments(advantage_moments(same, same, same))) == 0)
