"""Generalised advantage estimation over response tokens, for PPO with a value model (ALGORITHM.md §4).

Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
(arXiv 1506.02438), eq. 16, on the token MDP of RL fine-tuning: the state before token ``t`` is the
prompt and the response so far, the action is token ``t``, the verifiable reward ``R`` arrives at the
last response token and every other token's reward is 0. With ``V_t`` the critic's value of the
state before token ``t`` and ``V_{T}`` = 0 after the last token (the response ended, or was cut at the
length limit, which is treated as terminal like the reward is)::

    δ_t = r_t + γ V_{t+1} - V_t,        A_t = δ_t + γ λ A_{t+1},        G_t = A_t + V_t

``G_t`` is the value target (λ-return). γ = λ = 1 gives ``A_t = R - V_t`` at every token.

Pure functions on tensors: the learner computes the values with :mod:`learner.critic` before the
step's updates, calls :func:`gae_advantages_flat` per micro-batch, then whitens with the global
moments (:func:`advantage_moments` summed over micro-batches and ranks, :func:`whiten`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE advantages and λ-returns of a padded batch of responses.

    Each row is one response; its tokens are the True entries of ``mask`` in column order (anything
    before, after or between them, prompt or padding, is skipped). The reward sits at the row's
    last True column; the value after it is 0.

    Args:
        rewards: ``[B]`` float, one verifiable reward per response.
        values: ``[B, T]`` float, ``V`` of the state before the token at each column; entries
            outside ``mask`` are ignored (may be anything, NaN included).
        mask: ``[B, T]`` bool, True at response tokens.
        gamma: discount γ in ``[0, 1]``.
        lam: GAE λ in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, each ``[B, T]`` in ``values``' dtype, 0 outside ``mask``.
    """
    if values.dim() != 2 or mask.shape != values.shape or rewards.shape != values.shape[:1]:
        raise ValueError(
            f"rewards [B], values [B, T] and mask [B, T] disagree: "
            f"{list(rewards.shape)}, {list(values.shape)}, {list(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected bool, got {mask.dtype}")
    values = torch.where(mask, values, 0.0)
    rewards = rewards.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])
    next_advantage = values.new_zeros(values.shape[0])
    seen = torch.zeros_like(mask[:, 0])
    # reverse scan over columns; a masked column leaves the carried V_{t+1} and A_{t+1} untouched,
    # so the recursion runs over each row's own tokens whatever its offset and length
    for t in range(values.shape[1] - 1, -1, -1):
        m = mask[:, t]
        reward = torch.where(m & ~seen, rewards, 0.0)
        delta = reward + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(m, advantage, 0.0)
        next_value = torch.where(m, values[:, t], next_value)
        next_advantage = torch.where(m, advantage, next_advantage)
        seen = seen | m
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def gae_advantages_flat(
    rewards: Tensor, values: Tensor, seq_index: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """:func:`gae_advantages` on the learner's flat token layout.

    Args:
        rewards: ``[N]`` float, each token's response reward (the response's reward broadcast).
        values: ``[N]`` float, ``V`` of the state before each token.
        seq_index: ``[N]`` integer, the response of each token; a response's tokens are contiguous
            and in order (row-major flattening of a padded batch, or a packed sequence).
        gamma, lam: γ and λ.

    Returns:
        ``(advantages, returns)``, each ``[N]`` in ``values``' dtype.
    """
    n = values.shape[0]
    if rewards.shape != (n,) or seq_index.shape != (n,):
        raise ValueError(
            f"rewards, values and seq_index must all be [N]: {list(rewards.shape)}, {list(values.shape)}, "
            f"{list(seq_index.shape)}"
        )
    if n == 0:
        return values.clone(), values.clone()
    # a new response starts wherever seq_index changes; rows of the padded view are those runs
    starts = torch.ones(n, dtype=torch.bool, device=values.device)
    starts[1:] = seq_index[1:] != seq_index[:-1]
    row = starts.long().cumsum(0) - 1
    first = torch.nonzero(starts).squeeze(1)
    column = torch.arange(n, device=values.device) - first[row]
    n_rows, width = int(row[-1]) + 1, int(column.max()) + 1
    padded_values = values.new_zeros(n_rows, width)
    padded_values[row, column] = values
    mask = torch.zeros(n_rows, width, dtype=torch.bool, device=values.device)
    mask[row, column] = True
    advantages, returns = gae_advantages(rewards[first], padded_values, mask, gamma, lam)
    return advantages[row, column], returns[row, column]


@dataclass(frozen=True)
class AdvantageSummary:
    """Global moments of one step's GAE outputs (every rank holds the same values), 0-d float64.

    Attributes:
        mean, std: advantage mean and population std over the valid tokens, before whitening.
        explained_variance: ``1 - Var(G - V) / Var(G)`` of the values the advantages were computed
            with (1 = perfect critic, 0 = as good as a constant, negative = worse); 0 when
            ``Var(G) = 0``.
    """

    mean: Tensor
    std: Tensor
    explained_variance: Tensor


def advantage_moments(advantages: Tensor, returns: Tensor, values: Tensor) -> Tensor:
    """Sums to all-reduce for :func:`summarise_moments`, ``[7]`` float64.

    ``[n, ΣA, ΣA², ΣG, ΣG², Σ(G-V), Σ(G-V)²]`` over ``[N]`` tokens (all valid). Summed over
    micro-batches and ranks they give the moments of the whole batch.
    """
    a, g, v = advantages.double(), returns.double(), values.double()
    residual = g - v
    return torch.stack(
        [
            a.new_tensor(float(a.numel())),
            a.sum(),
            (a * a).sum(),
            g.sum(),
            (g * g).sum(),
            residual.sum(),
            (residual * residual).sum(),
        ]
    )


def summarise_moments(totals: Tensor) -> AdvantageSummary:
    """Mean, std and explained variance from the summed :func:`advantage_moments`."""
    n = totals[0].clamp_min(1)

    def variance(s: Tensor, s2: Tensor) -> Tensor:
        mean = s / n
        return (s2 / n - mean * mean).clamp_min(0)

    var_a = variance(totals[1], totals[2])
    var_g = variance(totals[3], totals[4])
    var_residual = variance(totals[5], totals[6])
    explained = torch.where(var_g > 0, 1 - var_residual / var_g.clamp_min(1e-300), 0.0)
    return AdvantageSummary(mean=totals[1] / n, std=var_a.sqrt(), explained_variance=explained)


def whiten(advantages: Tensor, summary: AdvantageSummary, min_std: float = 1e-6) -> Tensor:
    """``(A - mean) / max(std, min_std)`` with the batch's global moments, in ``advantages``' dtype.

    ``min_std`` keeps a batch of identical advantages (all rewards and values alike) at 0 instead
    of dividing by zero.
    """
    scale = summary.std.clamp_min(min_std)
    return ((advantages.double() - summary.mean) / scale).to(advantages.dtype)
