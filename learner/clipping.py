"""Entropy-dynamics token masks: ClipB, ClipV and the directional mode (ALGORITHM.md §3).

Statistics are global over the optimisation batch ``T_B`` (every valid token of the mini-batch,
across micro-batches and data-parallel ranks). The learner therefore splits the work:

1. no-grad pass, per micro-batch: ``x = clip_statistic(...)``, ``ClipMoments.from_values(x, valid)``;
   moments of micro-batches are merged with ``+``, across ranks with :meth:`ClipMoments.all_reduce`;
2. ``thresholds = thresholds_from_moments(method, form, mu, moments)``;
3. with a ``max_frac`` cap: ``thresholds = cap_thresholds(thresholds, x_rank, advantages_rank,
   valid_rank, max_frac, group)`` on the rank's whole mini-batch (micro-batches concatenated,
   ``[N_rank]``): it finds the global cut-off among all ranks' candidates, so the cap counts
   ``⌊max_frac·|T_B|⌋`` over ``T_B``, not per micro-batch;
4. loss pass, per micro-batch: ``keep = clip_mask_with_thresholds(thresholds, x, advantages, valid)``.

Every rank ends with bit-identical thresholds, so the masks equal those of one big batch.
:func:`clip_mask` runs the four steps on one tensor set (single process, tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from learner.bad_values import raise_on_bad_values

ClipMethod = Literal["clip_b", "clip_v", "directional"]
ClipForm = Literal["symmetric", "negative_lower"]

# below this population std the batch has no outliers (ALGORITHM.md §3)
MIN_STD = 1e-12


def clip_statistic(
    method: ClipMethod,
    s_star: Tensor,
    s_expect: Tensor,
    advantages: Tensor,
    ratio: Tensor | None = None,
) -> Tensor:
    """The per-token statistic ``x_t`` the method thresholds.

    * ``clip_b``: ``x = S*``;
    * ``clip_v``: ``x = S* - E_p[S]`` on-policy, ``x = r (S* - E_p[S])`` with ``ratio`` given;
    * ``directional``: ``x = δH = -r A (S* - E_p[S])`` (``r = 1`` without ``ratio``), the
      predicted per-token entropy change of ALGORITHM.md §2.

    Args:
        method: which statistic.
        s_star, s_expect, advantages: ``[N]`` float.
        ratio: ``[N]`` importance ratio current/behaviour, used detached; ``None`` = on-policy.

    Returns:
        ``[N]`` float32, no gradient.
    """
    if method == "clip_b":
        x = s_star
    elif method in ("clip_v", "directional"):
        x = s_star - s_expect
        if ratio is not None:
            x = ratio.detach() * x
        if method == "directional":
            x = -advantages * x
    else:
        raise ValueError(f"method: expected clip_b|clip_v|directional, got {method!r}")
    return x.detach().float()


@dataclass(frozen=True)
class ClipMoments:
    """Count, mean and sum of squared deviations of ``x`` over valid tokens (float64 0-d tensors).

    Kept as ``(count, mean, M2)`` rather than ``(count, Σx, Σx²)``: ``Σx²/n - mean²`` cancels to
    ~1e-8·|mean| for a constant ``x`` and would defeat the σ < 1e-12 rule (ClipV symmetric would
    then drop every token of a constant batch). Merging uses Chan et al. (1979):
    ``M2 = M2_a + M2_b + δ² n_a n_b / n`` with ``δ = mean_b - mean_a``.
    """

    count: Tensor
    mean: Tensor
    m2: Tensor

    @classmethod
    def from_values(cls, x: Tensor, valid: Tensor) -> ClipMoments:
        """Moments of ``x[valid]``; ``x`` ``[N]`` float, ``valid`` ``[N]`` bool (padding False)."""
        x64 = torch.where(valid, x.detach().double(), 0.0)
        count = valid.sum().double()
        mean = x64.sum() / count.clamp_min(1)
        m2 = torch.where(valid, (x64 - mean) ** 2, 0.0).sum()
        return cls(count=count, mean=mean, m2=m2)

    def __add__(self, other: ClipMoments) -> ClipMoments:
        count = self.count + other.count
        delta = other.mean - self.mean
        share = other.count / count.clamp_min(1)
        mean = self.mean + delta * share
        m2 = self.m2 + other.m2 + delta * delta * self.count * share
        return ClipMoments(count=count, mean=mean, m2=m2)

    @property
    def std(self) -> Tensor:
        """Population standard deviation, float64 0-d (0 for an empty batch)."""
        return (self.m2 / self.count.clamp_min(1)).clamp_min(0).sqrt()

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> ClipMoments:
        """Merge the moments of every rank of ``group``; every rank gets the same bits.

        One ``all_gather_single`` of ``3·world`` float64, then the same fold in rank order on every
        rank (a plain SUM all-reduce would need ``(Σx, Σx²)``, see the class docstring). Returns
        ``self`` when ``torch.distributed`` is not initialised.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        local = torch.stack([self.count, self.mean, self.m2])
        gathered = local.new_empty(dist.get_world_size(group) * 3)
        dist.all_gather_single(gathered, local, group=group)
        rows = [ClipMoments(count=r[0], mean=r[1], m2=r[2]) for r in gathered.view(-1, 3).unbind(0)]
        total = rows[0]
        for row in rows[1:]:
            total = total + row
        return total


@dataclass(frozen=True)
class ClipThresholds:
    """Global thresholds of one optimisation batch; apply with :func:`clip_mask_with_thresholds`.

    Attributes:
        method, form: as in :func:`clip_mask`.
        center: float64 0-d, subtracted from ``x`` to get ``d`` (the batch mean for ClipB and the
            directional mode, 0 for ClipV, which is already centred over the vocabulary).
        bound: float64 0-d, ``μ σ(x)``; ``inf`` when ``σ < 1e-12`` or the batch is empty.
        count: float64 0-d, ``|T_B|``.
        cutoff: float64 0-d or ``None``: with the ``max_frac`` cap, a candidate is dropped only if
            its severity (``-d`` for lower-tail rules, ``|d|`` for symmetric) is ``>= cutoff``.
    """

    method: ClipMethod
    form: ClipForm
    center: Tensor
    bound: Tensor
    count: Tensor
    cutoff: Tensor | None = None


def thresholds_from_moments(
    method: ClipMethod, form: ClipForm, mu: float, moments: ClipMoments
) -> ClipThresholds:
    """Thresholds ``center`` and ``bound = μ σ`` from the global moments (ALGORITHM.md §3).

    Args:
        method: ``clip_b`` | ``clip_v`` | ``directional``.
        form: ``symmetric`` | ``negative_lower``.
        mu: threshold in population standard deviations, ``> 0``.
        moments: moments of :func:`clip_statistic` over every valid token of the batch.
    """
    if form not in ("symmetric", "negative_lower"):
        raise ValueError(f"form: expected symmetric|negative_lower, got {form!r}")
    if method not in ("clip_b", "clip_v", "directional"):
        raise ValueError(f"method: expected clip_b|clip_v|directional, got {method!r}")
    if not mu > 0:
        raise ValueError(f"mu: expected > 0, got {mu}")
    std = moments.std
    bound = torch.where(std < MIN_STD, math.inf, mu * std)
    center = moments.mean if method != "clip_v" else torch.zeros_like(moments.mean)
    return ClipThresholds(method=method, form=form, center=center, bound=bound, count=moments.count)


def _candidates(thresholds: ClipThresholds, x: Tensor, advantages: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """``(candidate [N] bool, severity [N] float64)`` before the cap.

    ``symmetric`` drops ``|d| > μσ`` (both tails), except for ``directional``, whose rule is
    one-sided by construction (only entropy-decreasing outliers ``d < -μσ``, for any sign of A).
    ``negative_lower`` drops ``d < -μσ`` among ``A < 0`` tokens only (released code).
    """
    d = x.detach().double() - thresholds.center
    if thresholds.form == "symmetric" and thresholds.method != "directional":
        severity = d.abs()
    else:
        severity = -d
    candidate = valid & (severity > thresholds.bound)
    if thresholds.form == "negative_lower":
        candidate &= advantages < 0
    return candidate, severity


def cap_thresholds(
    thresholds: ClipThresholds,
    x: Tensor,
    advantages: Tensor,
    valid: Tensor,
    max_frac: float,
    group: dist.ProcessGroup | None = None,
    all_ranks: bool = True,
) -> ClipThresholds:
    """Add the ``max_frac`` cap: drop at most ``k = max(⌊max_frac·|T_B|⌋, 1)`` tokens, most severe first.

    Pass the rank's **whole** mini-batch (micro-batches concatenated, ``[N_rank]``): each rank
    offers its ``k`` most severe candidates, one ``all_gather`` collects them, and the ``k``-th
    most severe overall becomes the cut-off, identical on every rank. Ties exactly at the cut-off
    are all dropped (they have probability zero for continuous statistics).

    Args:
        thresholds: from :func:`thresholds_from_moments` (``count`` is ``|T_B|``).
        x, advantages: ``[N_rank]`` float; valid: ``[N_rank]`` bool.
        max_frac: in ``(0, 1]``.
        group: data-parallel group; ignored without ``torch.distributed``.
        all_ranks: False keeps the cap local to these tokens (no collective), as :func:`clip_mask`.
    """
    if not 0 < max_frac <= 1:
        raise ValueError(f"max_frac: expected in (0, 1], got {max_frac}")
    # k is a host integer: the learner needs |T_B| on the host anyway to size its loop
    k = max(math.floor(max_frac * float(thresholds.count)), 1)
    candidate, severity = _candidates(thresholds, x, advantages, valid)
    offered = torch.where(candidate, severity, -math.inf)
    offered = torch.cat([offered, offered.new_full((k,), -math.inf)]).topk(k).values
    if all_ranks and dist.is_available() and dist.is_initialized():
        gathered = offered.new_empty(dist.get_world_size(group) * k)
        dist.all_gather_single(gathered, offered, group=group)
        offered = gathered.topk(k).values
    # fewer than k candidates: the k-th is -inf and the cap drops nothing extra
    return replace(thresholds, cutoff=offered[-1])


def clip_mask_with_thresholds(
    thresholds: ClipThresholds, x: Tensor, advantages: Tensor, valid: Tensor
) -> Tensor:
    """Apply global thresholds to one micro-batch.

    Args:
        thresholds: from :func:`thresholds_from_moments` (optionally :func:`cap_thresholds`).
        x: ``[N]`` :func:`clip_statistic` of these tokens.
        advantages: ``[N]`` float.
        valid: ``[N]`` bool, padding False.

    Returns:
        ``[N]`` bool, True = the token stays in the loss; invalid tokens are always False.
    """
    candidate, severity = _candidates(thresholds, x, advantages, valid)
    if thresholds.cutoff is not None:
        candidate &= severity >= thresholds.cutoff
    return valid & ~candidate


def _check_clip_inputs(tensors: dict[str, Tensor | None], valid: Tensor) -> None:
    if valid.dtype != torch.bool or valid.dim() != 1:
        raise ValueError(f"valid: expected a bool [N] tensor, got {valid.dtype} {list(valid.shape)}")
    checks = {}
    for name, t in tensors.items():
        if t is None:
            continue
        if t.shape != valid.shape:
            raise ValueError(f"{name}: expected shape {list(valid.shape)} like valid, got {list(t.shape)}")
        # padding may hold anything; only valid tokens must be finite
        checks[f"{name} (non-finite at a valid token)"] = valid & ~torch.isfinite(t.detach())
    raise_on_bad_values(checks)


def clip_mask(
    method: ClipMethod,
    form: ClipForm,
    mu: float,
    s_star: Tensor,
    s_expect: Tensor,
    advantages: Tensor,
    valid: Tensor,
    ratio: Tensor | None = None,
    max_frac: float | None = None,
) -> Tensor:
    """Entropy-dynamics keep-mask of one batch, statistics over exactly these tokens.

    ALGORITHM.md §3 (Wang et al. 2026, arXiv 2602.03392): ClipB thresholds ``S* - mean(S*)``,
    ClipV thresholds ``Sc`` (``r·Sc`` with ``ratio``) against ``μ σ``. For a batch split into
    micro-batches or ranks use the staged functions of this module instead (module docstring).

    Args:
        method: ``clip_b`` | ``clip_v`` | ``directional``.
        form: ``symmetric`` | ``negative_lower``.
        mu: threshold in population standard deviations, ``> 0``.
        s_star, s_expect, advantages: ``[N]`` float (from :class:`learner.entropy.TokenStats`).
        valid: ``[N]`` bool, padding False.
        ratio: ``[N]`` importance ratio, used detached by ClipV and directional; ``None`` = on-policy.
        max_frac: cap on the dropped fraction (most severe first), ``None`` = no cap.

    Returns:
        ``[N]`` bool, True = the token stays in the loss.

    Raises:
        ValueError: shape mismatch or a non-finite value at a valid token.
    """
    _check_clip_inputs({"s_star": s_star, "s_expect": s_expect, "advantages": advantages, "ratio": ratio}, valid)
    x = clip_statistic(method, s_star, s_expect, advantages, ratio)
    thresholds = thresholds_from_moments(method, form, mu, ClipMoments.from_values(x, valid))
    if max_frac is not None:
        thresholds = cap_thresholds(thresholds, x, advantages, valid, max_frac, all_ranks=False)
    return clip_mask_with_thresholds(thresholds, x, advantages, valid)
