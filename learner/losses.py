"""Advantages and policy-gradient surrogates with their baselines (ALGORITHM.md §4).

Pure functions over flat token tensors ``[N]`` (a padded ``[B, L]`` batch flattened, padding marked
in ``loss_mask``). The learner computes ``logprobs`` with :mod:`learner.entropy`, the keep-mask with
:mod:`learner.clipping`, calls :func:`policy_loss` per micro-batch and runs backward.

Baselines share the code path: plain GRPO/PPO (``type="ppo"``, ``clip_eps_high == clip_eps_low``),
clip-higher (``clip_eps_high > clip_eps_low``, DAPO), entropy bonus (``entropy_coef > 0``), and
Clip-Cov / KL-Cov of Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
Reasoning Language Models" (arXiv 2505.22617, §4.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from learner.bad_values import raise_on_bad_values
from learner.config import LossConfig
from learner.entropy import SumAllReduce, TokenStats, global_moments

Reduction = Literal["mean", "max", "sum"]

# how each metric of this package combines across data-parallel ranks (STYLE rule 7); every value
# is already reduced over the tokens of one call, and the learner makes one call per rank per step
METRIC_REDUCTIONS: dict[str, Reduction] = {
    "driftrl_learner_loss": "sum",
    "driftrl_learner_pg_loss": "sum",
    "driftrl_learner_loss_tokens": "sum",
    "driftrl_learner_empty_batch": "max",
    "driftrl_learner_ratio_mean": "mean",
    "driftrl_learner_ratio_max": "max",
    "driftrl_learner_clipped_frac": "mean",
    "driftrl_learner_dual_clipped_frac": "mean",
    "driftrl_learner_truncated_frac": "mean",
    "driftrl_learner_entropy_bonus": "mean",
    "driftrl_learner_cov_selected_frac": "mean",
    "driftrl_learner_kl_cov_penalty": "mean",
    "driftrl_learner_grpo_zero_variance_frac": "mean",
    "driftrl_learner_mismatch_kl": "mean",
    "driftrl_learner_is_masked_frac": "mean",
    # entropy_metrics reduces over the ranks itself (global moments): every rank holds the same value
    "driftrl_learner_entropy_mean": "max",
    "driftrl_learner_clip_dropped_frac": "max",
    "driftrl_learner_clip_dropped_frac_pos_adv": "max",
    "driftrl_learner_clip_dropped_frac_neg_adv": "max",
    "driftrl_learner_s_star_mean": "max",
    "driftrl_learner_s_star_std": "max",
    "driftrl_learner_s_expect_mean": "max",
    "driftrl_learner_s_expect_std": "max",
    "driftrl_learner_s_centered_mean": "max",
    "driftrl_learner_s_centered_std": "max",
    "driftrl_learner_weighted_s_centered_mean": "max",
    "driftrl_learner_weighted_s_centered_std": "max",
    "driftrl_learner_cov_adv_weighted_s_centered": "max",
    "driftrl_learner_adv_weighted_s_centered_mean_term": "max",
    "driftrl_learner_predicted_entropy_change_per_unit_step": "max",
}


def masked_mean(x: Tensor, mask: Tensor, denominator: Tensor | float | None = None) -> Tensor:
    """The one masked mean of the package (STYLE rule 6).

    Args:
        x: ``[N]`` float; masked entries may hold anything finite or not (``where`` drops them).
        mask: ``[N]`` bool.
        denominator: overrides ``mask.sum()`` (e.g. the token count of the whole mini-batch).

    Returns:
        0-d tensor; ``0`` for an all-masked ``x`` with the default denominator.
    """
    den = mask.sum().clamp_min(1) if denominator is None else denominator
    return torch.where(mask, x, 0.0).sum() / den


def grpo_advantages(
    rewards: Tensor, group_index: Tensor, std_norm: bool = True, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """GRPO group-relative advantages ``A_i = (R_i - mean_g R) / (std_g R + eps)`` (ALGORITHM.md §4).

    ``std_g`` is the sample standard deviation (Bessel-corrected, like ``torch.std`` in the GRPO
    reference implementations). A group whose rewards are all equal (including a group of one)
    gets exactly zero advantage and is counted as zero-variance.

    Args:
        rewards: ``[B]`` float, one per response.
        group_index: ``[B]`` integer, equal for responses of the same prompt (any values).
        std_norm: divide by ``std_g + eps`` (False: Dr. GRPO-style mean-centring only).
        eps: added to the std.

    Returns:
        ``(advantages [B] float32, zero_variance_frac 0-d float32)``, the fraction over groups.
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards [B] and group_index [B] disagree: {list(rewards.shape)} vs {list(group_index.shape)}"
        )
    raise_on_bad_values({"rewards (non-finite)": ~torch.isfinite(rewards)})
    _, group = torch.unique(group_index, return_inverse=True)
    n_groups = int(group.max()) + 1 if group.numel() else 0
    r = rewards.double()
    counts = r.new_zeros(n_groups).index_add_(0, group, torch.ones_like(r))
    mean = r.new_zeros(n_groups).index_add_(0, group, r) / counts
    centred = r - mean[group]
    m2 = r.new_zeros(n_groups).index_add_(0, group, centred * centred)
    std = (m2 / (counts - 1).clamp_min(1)).sqrt()
    r_max = r.new_full((n_groups,), -math.inf).scatter_reduce_(0, group, r, "amax")
    r_min = r.new_full((n_groups,), math.inf).scatter_reduce_(0, group, r, "amin")
    # max == min, not std == 0: rounding can leave std ~1e-17 and blow a tied group up to ±1/eps
    zero_variance = r_max == r_min
    advantages = centred / (std[group] + eps) if std_norm else centred
    advantages = torch.where(zero_variance[group], 0.0, advantages)
    zero_frac = zero_variance.double().mean() if n_groups else r.new_zeros(())
    return advantages.float(), zero_frac.float()


@dataclass(frozen=True)
class LossInputs:
    """Per-token inputs of one micro-batch, all ``[N]``.

    Attributes:
        logprobs: current learner ``log p_k`` at the sampling temperature, float32 with gradient.
        behaviour_logprobs: vLLM's ``log μ(k)`` recorded at sampling time.
        advantages: per-token advantage (the response's GRPO advantage broadcast to its tokens).
        loss_mask: bool, True for valid response tokens (padding and prompt False).
        keep_mask: bool entropy-clipping mask from :mod:`learner.clipping`, ``None`` = keep all.
            A dropped token leaves numerator and denominator, exactly like padding.
        seq_index: integer, the response each token belongs to, ``0 <= seq_index < N``; needed by
            ``seq_mean_token_mean`` only.
        proximal_logprobs: decoupled PPO (Hilton et al. 2022): the ratio is taken against this
            proximal policy and ``exp(proximal - behaviour)`` becomes a detached importance weight.
        entropy: detached per-token entropy ``H`` (from :class:`learner.entropy.TokenStats`),
            needed by the entropy bonus only.
    """

    logprobs: Tensor
    behaviour_logprobs: Tensor
    advantages: Tensor
    loss_mask: Tensor
    keep_mask: Tensor | None = None
    seq_index: Tensor | None = None
    proximal_logprobs: Tensor | None = None
    entropy: Tensor | None = None

    @property
    def mask(self) -> Tensor:
        """``[N]`` bool: tokens in the loss (valid and kept by the entropy mask)."""
        return self.loss_mask if self.keep_mask is None else self.loss_mask & self.keep_mask


def loss_denominator(inputs: LossInputs, aggregation: str) -> Tensor:
    """This micro-batch's share of the mini-batch loss denominator, 0-d float32.

    Sum it over micro-batches and all-reduce (SUM) over ranks, then pass the total to every
    :func:`policy_loss` call: the summed micro-batch losses then equal the loss of one big batch.
    ``token_mean`` counts tokens in ``inputs.mask``; ``seq_mean_token_mean`` counts responses with
    at least one such token.
    """
    mask = inputs.mask
    if aggregation == "token_mean":
        return mask.sum().float()
    if inputs.seq_index is None:
        raise ValueError("seq_index: required by seq_mean_token_mean")
    seq_tokens = mask.new_zeros(mask.shape[0], dtype=torch.float32).index_add_(
        0, inputs.seq_index.long(), mask.float()
    )
    return (seq_tokens > 0).sum().float()


def _aggregate(
    per_token: Tensor, inputs: LossInputs, aggregation: str, denominator: Tensor | float | None
) -> Tensor:
    """token-mean, or seq-mean-token-mean (mean over responses of each response's token mean)."""
    mask = inputs.mask
    if aggregation == "token_mean":
        return masked_mean(per_token, mask, denominator)
    if aggregation != "seq_mean_token_mean":
        raise ValueError(f"aggregation: expected token_mean|seq_mean_token_mean, got {aggregation!r}")
    if inputs.seq_index is None:
        raise ValueError("seq_index: required by seq_mean_token_mean")
    # sequence ids are < N, so [N] buffers hold every response without a host sync for the count
    seq = inputs.seq_index.long()
    seq_sum = per_token.new_zeros(per_token.shape[0]).index_add(0, seq, torch.where(mask, per_token, 0.0))
    seq_tokens = per_token.new_zeros(per_token.shape[0]).index_add(0, seq, mask.float())
    has_tokens = seq_tokens > 0
    return masked_mean(seq_sum / seq_tokens.clamp_min(1), has_tokens, denominator)


def importance_keep_mask(
    log_ratio: Tensor, valid: Tensor, seq_index: Tensor, level: str, low: float, high: float
) -> Tensor:
    """Masked importance sampling: which tokens keep their place in the loss.

    Beside truncation (which caps the weight), masking drops tokens whose behaviour-vs-learner
    ratio ``r = exp(log_ratio)`` is outside ``[low, high]``: ``token`` tests each token's ``r``,
    ``sequence`` the geometric mean ratio ``exp(mean_t log r_t)`` of each response and drops the
    whole response (the rejection of Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL training", and verl's rollout correction). A dropped token leaves numerator
    and denominator, like padding. A non-finite ``log_ratio`` is dropped.

    Args:
        log_ratio: ``[N]`` float, ``log π - log μ`` (detached).
        valid: ``[N]`` bool; seq_index: ``[N]`` int, the response of each token, ``< N``.
        level: ``token`` or ``sequence``.
        low, high: the accepted ratio interval, ``0 < low <= 1 <= high``.

    Returns:
        ``[N]`` bool, True = kept (always False where ``valid`` is False).
    """
    log_ratio = torch.where(valid, log_ratio.detach().double(), 0.0)
    lo, hi = math.log(low), math.log(high)
    if level == "token":
        inside = (log_ratio >= lo) & (log_ratio <= hi)
    elif level == "sequence":
        seq = seq_index.long()
        finite = torch.isfinite(log_ratio)
        n = log_ratio.new_zeros(log_ratio.shape[0]).index_add(0, seq, valid.double())
        total = log_ratio.new_zeros(log_ratio.shape[0]).index_add(0, seq, torch.where(finite, log_ratio, 0.0))
        bad = log_ratio.new_zeros(log_ratio.shape[0]).index_add(0, seq, (valid & ~finite).double())
        mean = total / n.clamp_min(1)
        inside = ((mean >= lo) & (mean <= hi) & (bad == 0))[seq]
    else:
        raise ValueError(f"level: expected token|sequence, got {level!r}")
    return valid & inside


def mismatch_kl(logprobs: Tensor, behaviour_logprobs: Tensor, valid: Tensor) -> Tensor:
    """k3 estimate of ``KL(μ ‖ π)`` from tokens sampled by the behaviour policy μ (Schulman 2020,
    "Approximating KL divergence"): mean over ``valid`` of ``r - 1 - log r``, ``r = π/μ``.

    Unbiased, non-negative per token; 0-d float32 (0 for no valid token). The rollout engine's
    and the learner's log-probs of the same weights differ by kernels and precision, so this
    measures that mismatch on fresh rows and policy lag on stale ones.
    """
    log_r = torch.where(valid, logprobs.detach() - behaviour_logprobs.detach(), 0.0).double()
    return masked_mean(log_r.exp() - 1 - log_r, valid).float()


def _covariance(advantages: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """Cui et al. 2025 token covariance ``(A_t - mean A)(logp_t - mean logp)`` over ``mask``, detached."""
    lp = logprobs.detach()
    return (advantages - masked_mean(advantages, mask)) * (lp - masked_mean(lp, mask))


def policy_loss(
    inputs: LossInputs,
    config: LossConfig,
    denominator: Tensor | float | None = None,
    generator: torch.Generator | None = None,
    sign_weights: tuple[float, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy-gradient loss of one micro-batch and its metrics.

    Per token, with ``r = exp(logprobs - reference)`` (reference = proximal if given, else
    behaviour) and ``w`` the detached importance weight ``exp(proximal - behaviour)`` (1 without a
    proximal policy):

    * ``ppo`` / ``clip_cov``: ``ℓ = w · max(-A r, -A clip(r, 1-ε_low, 1+ε_high))``; dual-clip
      (Ye et al. 2020) caps ``ℓ`` at ``-c A`` for ``A < 0``.
    * ``clip_cov`` (Cui et al. 2025, Alg. "Clip-Cov"): among tokens whose centred covariance
      ``(A - mean A)(logp - mean logp)`` lies in ``(cov_clip_low, cov_clip_high)``, a random
      ``max(⌊cov_clip_frac · n⌋, 1)`` get ``logprobs`` detached: no gradient, value and
      denominator unchanged (the paper detaches them; they are not removed like padding).
    * ``kl_cov`` (Cui et al. 2025, "KL-Cov"): ``ℓ = -w A r`` (no ratio clipping, as in the paper),
      plus ``kl_cov_coef · |logprobs - reference|`` on the ``max(⌊kl_cov_frac · n⌋, 1)`` tokens of
      largest covariance.
    * Truncated importance weight ``truncate_is_c = C``: with a proximal policy ``w -> min(w, C)``;
      without one the ratio itself is the importance weight, so the unclipped term uses
      ``min(r, C)`` (tokens with ``r > C`` then get no gradient from that term).
    * Advantage-sign weights ``(w₊, w₋)``: the surrogate ``ℓ`` of a token is multiplied by ``w₊``
      where ``A > 0`` and ``w₋`` where ``A < 0`` (after clipping, so the clip decisions are
      unchanged; before the importance weight and the KL-Cov penalty, which they leave alone).
      ``w₊ = w₋ = 1`` is exactly the unweighted loss. Positive samples sharpen the policy and
      negative ones flatten it, so their balance steers entropy (EntroPIC, Yang et al. 2025,
      arXiv 2511.15248).
    * Entropy bonus: ``-entropy_coef · H``. The streamed statistics carry no entropy gradient, so
      the bonus uses the score-function estimator ``∇H = E_{k~p}[-(log p_k + H) ∇ log p_k]``,
      importance-weighted by the detached ratio for off-policy samples; its value is ``H``.

    The Clip-Cov/KL-Cov covariance and token selection use the tokens of this call (the paper's
    reference computes them per update batch as well).

    Args:
        inputs: the micro-batch.
        config: loss settings.
        denominator: total of :func:`loss_denominator` over the mini-batch (all micro-batches and
            ranks); ``None`` = this call's own count (one micro-batch = the whole batch).
        generator: random source of Clip-Cov's token selection.
        sign_weights: ``(w₊, w₋)``; ``None`` = ``config.pos_adv_weight, config.neg_adv_weight``
            (the learner passes the entropy controller's weights here).

    Returns:
        ``(loss 0-d, metrics)``: ``loss`` has gradient to ``inputs.logprobs``; metrics are 0-d
        detached tensors named as in :data:`METRIC_REDUCTIONS`.

    Raises:
        ValueError: shape mismatch, non-finite values at valid tokens, non-finite ratio.
    """
    valid = inputs.loss_mask
    if valid.dtype != torch.bool or valid.dim() != 1:
        raise ValueError(f"loss_mask: expected a bool [N] tensor, got {valid.dtype} {list(valid.shape)}")
    named = {
        "logprobs": inputs.logprobs,
        "behaviour_logprobs": inputs.behaviour_logprobs,
        "advantages": inputs.advantages,
        "keep_mask": inputs.keep_mask,
        "seq_index": inputs.seq_index,
        "proximal_logprobs": inputs.proximal_logprobs,
        "entropy": inputs.entropy,
    }
    for name, t in named.items():
        if t is not None and t.shape != valid.shape:
            raise ValueError(f"{name}: expected shape {list(valid.shape)} like loss_mask, got {list(t.shape)}")
    if config.entropy_coef > 0 and inputs.entropy is None:
        raise ValueError("entropy: required when entropy_coef > 0")
    mask = inputs.mask
    # padding may hold NaN/-inf (unset behaviour log-probs): zero it before any arithmetic, because
    # where() after exp() would still send NaN gradients back through the masked entries
    logprobs = torch.where(valid, inputs.logprobs, 0.0)
    behaviour = torch.where(valid, inputs.behaviour_logprobs.detach(), 0.0)
    reference = behaviour if inputs.proximal_logprobs is None else torch.where(valid, inputs.proximal_logprobs, 0.0)
    reference = reference.detach()
    advantages = torch.where(valid, inputs.advantages.detach(), 0.0)
    ratio = torch.exp(logprobs - reference)
    weight = torch.exp(reference - behaviour)
    checks = {
        f"{name} (non-finite at a valid token)": valid & ~torch.isfinite(t.detach())
        for name, t in named.items()
        if t is not None and t.dtype.is_floating_point
    }
    checks["ratio exp(logprobs - reference) (non-finite)"] = valid & ~torch.isfinite(ratio.detach())
    checks["importance weight exp(proximal - behaviour) (non-finite)"] = valid & ~torch.isfinite(weight)
    if inputs.seq_index is not None:
        checks["seq_index (outside [0, N))"] = (inputs.seq_index < 0) | (inputs.seq_index >= valid.shape[0])
    raise_on_bad_values(checks)

    truncate_c = config.truncate_is_c
    if truncate_c is not None and inputs.proximal_logprobs is not None:
        truncated = weight > truncate_c
        weight = weight.clamp_max(truncate_c)
    elif truncate_c is not None:
        truncated = ratio.detach() > truncate_c
    else:
        truncated = torch.zeros_like(valid)

    metrics: dict[str, Tensor] = {}
    n_valid = valid.sum().clamp_min(1)
    if config.type in ("clip_cov", "kl_cov"):
        cov = _covariance(advantages, logprobs, mask)
        frac = config.cov_clip_frac if config.type == "clip_cov" else config.kl_cov_frac
        n_select = max(math.floor(frac * int(valid.sum())), 1)
        if config.type == "clip_cov":
            in_band = mask & (cov > config.cov_clip_low) & (cov < config.cov_clip_high)
            # random keys, -inf outside the band: top-k of them is a uniform random subset of the band
            keys = torch.rand(cov.shape, generator=generator, device=cov.device)
            score = torch.where(in_band, keys, -math.inf)
        else:
            score = torch.where(mask, cov, -math.inf)
        top = score.topk(min(n_select, score.shape[0])).indices
        selected = torch.zeros_like(mask).index_fill_(0, top, True) & torch.isfinite(score)
        if config.type == "clip_cov":
            selected &= in_band
            logprobs = torch.where(selected, logprobs.detach(), logprobs)
            ratio = torch.exp(logprobs - reference)
        metrics["driftrl_learner_cov_selected_frac"] = (selected.sum() / n_valid).detach()

    unclipped_ratio = ratio if truncate_c is None or inputs.proximal_logprobs is not None else ratio.clamp_max(truncate_c)
    w_pos, w_neg = (config.pos_adv_weight, config.neg_adv_weight) if sign_weights is None else sign_weights
    sign_weight = torch.where(advantages > 0, w_pos, torch.where(advantages < 0, w_neg, 1.0))
    if config.type == "kl_cov":
        per_token = sign_weight * (-advantages * unclipped_ratio)
        penalty = config.kl_cov_coef * (logprobs - reference).abs()
        per_token = per_token + torch.where(selected, penalty, 0.0)
        metrics["driftrl_learner_kl_cov_penalty"] = masked_mean(penalty, selected).detach()
        clipped = dual_clipped = torch.zeros_like(valid)
    else:
        unclipped = -advantages * unclipped_ratio
        clipped_loss = -advantages * ratio.clamp(1 - config.clip_eps_low, 1 + config.clip_eps_high)
        per_token = torch.maximum(unclipped, clipped_loss)
        clipped = (clipped_loss > unclipped).detach()
        if config.dual_clip_c is not None:
            cap = -config.dual_clip_c * advantages
            dual_clipped = (advantages < 0) & (per_token > cap).detach()
            per_token = torch.where(advantages < 0, torch.minimum(per_token, cap), per_token)
        else:
            dual_clipped = torch.zeros_like(valid)
        per_token = sign_weight * per_token
    per_token = weight * per_token

    # an all-masked micro-batch gives 0 / 1 = 0 whose graph still reaches logprobs, i.e. the
    # `logprobs.sum() * 0.0` of STYLE rule 8: backward runs and every data-parallel rank joins the
    # gradient all-reduce instead of hanging the others
    pg_loss = _aggregate(per_token, inputs, config.aggregation, denominator)
    loss = pg_loss
    if config.entropy_coef > 0:
        entropy = torch.where(valid, inputs.entropy.detach(), 0.0)
        lp_detached = logprobs.detach()
        score_weight = ratio.detach() * weight * -(lp_detached + entropy)
        bonus = entropy + score_weight * (logprobs - lp_detached)
        bonus_mean = _aggregate(bonus, inputs, config.aggregation, denominator)
        loss = loss - config.entropy_coef * bonus_mean
        metrics["driftrl_learner_entropy_bonus"] = bonus_mean.detach()

    ratio_d = ratio.detach()
    metrics.update(
        {
            "driftrl_learner_loss": loss.detach(),
            "driftrl_learner_pg_loss": pg_loss.detach(),
            "driftrl_learner_loss_tokens": mask.sum().float(),
            "driftrl_learner_empty_batch": (~mask.any()).float(),
            "driftrl_learner_ratio_mean": masked_mean(ratio_d, mask),
            # the appended 0 keeps amax defined on an empty micro-batch
            "driftrl_learner_ratio_max": torch.cat([torch.where(mask, ratio_d, 0.0), ratio_d.new_zeros(1)]).amax(),
            "driftrl_learner_clipped_frac": masked_mean(clipped.float(), mask),
            "driftrl_learner_dual_clipped_frac": masked_mean(dual_clipped.float(), mask),
            "driftrl_learner_truncated_frac": masked_mean(truncated.float(), mask),
        }
    )
    return loss, metrics


def entropy_metrics(
    stats: TokenStats,
    advantages: Tensor,
    valid: Tensor,
    ratio: Tensor | None = None,
    keep_mask: Tensor | None = None,
    sum_all_reduce: SumAllReduce | None = None,
    trained_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Entropy-dynamics metrics of one step (ALGORITHM.md §3 and §5), 0-d detached float64 tensors.

    Every value is global over the optimisation batch ``T_B``: with ``sum_all_reduce`` the ranks'
    sums are combined by :func:`learner.entropy.global_moments` (two SUM all-reduces), so means,
    population stds, the covariance and the fractions equal those of one rank holding all tokens,
    and every rank returns the same numbers.

    * ``predicted_entropy_change_per_unit_step`` = ``-Σ_t r_t A_t Sc_t / |T|`` over the tokens the
      clip mask keeps (those the loss trains on): the first-order entropy change of one
      policy-gradient step per unit step size (ALGORITHM.md §2); the learner scales it by the step
      taken (:func:`learner.entropy.entropy_step_scale`).
    * ``cov_adv_weighted_s_centered`` = ``Cov_t(A_t, r_t Sc_t)`` and ``adv_weighted_s_centered_mean_term``
      = ``mean(A)·mean(r·Sc)`` over all valid tokens (the pressure before masking); their sum is
      ``mean(A·r·Sc)``. By §2's formula a positive covariance means entropy falling (ALGORITHM.md's
      prose calls the GRPO collapse sign negative; the implementation follows the formula).

    Args:
        stats: token statistics of this rank's tokens (``[N]`` each).
        advantages: ``[N]``; valid: ``[N]`` bool.
        ratio: ``[N]`` importance ratio (detached), ``None`` = 1.
        keep_mask: ``[N]`` bool entropy-clipping mask, ``None`` = nothing dropped.
        sum_all_reduce: sums a vector over the data-parallel ranks; ``None`` = one rank.
        trained_mask: ``[N]`` bool, the tokens the loss trains on when more than the clip mask
            drops tokens (masked importance sampling); ``None`` = ``keep_mask``. The prediction
            sums over these; the dropped fractions stay the clip mask's.
    """
    advantages = torch.where(valid, advantages.detach().float(), 0.0)
    r = torch.ones_like(advantages) if ratio is None else torch.where(valid, ratio.detach().float(), 0.0)
    s_centered = torch.where(valid, stats.s_centered.detach(), 0.0)
    weighted = r * s_centered
    dropped = valid & ~keep_mask if keep_mask is not None else torch.zeros_like(valid)
    kept = valid & ~dropped if trained_mask is None else valid & trained_mask
    pos, neg = advantages > 0, advantages < 0
    # fractions over a subset are ratios of two global means, so each is exact over T_B
    columns = {
        "entropy": stats.entropy,
        "s_star": stats.s_star,
        "s_expect": stats.s_expect,
        "s_centered": s_centered,
        "weighted_s_centered": weighted,
        "advantage": advantages,
        "dropped": dropped.float(),
        "pos": pos.float(),
        "neg": neg.float(),
        "dropped_pos": (dropped & pos).float(),
        "dropped_neg": (dropped & neg).float(),
        "kept": kept.float(),
        # the step's own tokens: a dropped token leaves the loss, so it moves no logit
        "kept_entropy_drive": torch.where(kept, r * advantages * s_centered, 0.0),
    }
    scores = ("s_star", "s_expect", "s_centered", "weighted_s_centered")
    pair = ("advantage", "weighted_s_centered")
    m = global_moments(columns, valid, stds=scores, covariances=(pair,), sum_all_reduce=sum_all_reduce)

    def share(part: str, whole: str) -> Tensor:
        return torch.where(m.mean[whole] > 0, m.mean[part] / m.mean[whole], 0.0)

    return {
        "driftrl_learner_entropy_mean": m.mean["entropy"],
        "driftrl_learner_clip_dropped_frac": m.mean["dropped"],
        "driftrl_learner_clip_dropped_frac_pos_adv": share("dropped_pos", "pos"),
        "driftrl_learner_clip_dropped_frac_neg_adv": share("dropped_neg", "neg"),
        **{f"driftrl_learner_{n}_mean": m.mean[n] for n in scores},
        **{f"driftrl_learner_{n}_std": m.std[n] for n in scores},
        "driftrl_learner_cov_adv_weighted_s_centered": m.cov[pair],
        "driftrl_learner_adv_weighted_s_centered_mean_term": m.mean["advantage"] * m.mean["weighted_s_centered"],
        "driftrl_learner_predicted_entropy_change_per_unit_step": -share("kept_entropy_drive", "kept"),
    }


def metrics_to_floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    """One host sync for a whole metrics dict: stack, ``tolist()``, zip back to names."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics.keys(), values, strict=True))
