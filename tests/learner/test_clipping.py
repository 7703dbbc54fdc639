"""S*-clipping masks against hand-worked cases (ALGORITHM.md §3), and their global consistency."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from learner.clipping import (
    ClipMoments,
    cap_thresholds,
    clip_mask,
    clip_mask_with_thresholds,
    clip_statistic,
    thresholds_from_moments,
)

T, F = True, False


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def all_valid(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool)


def test_clip_b_symmetric_drops_both_tails():
    # x = S* = [0,0,0,0,10]: mean 2, d = [-2,-2,-2,-2,8], σ² = (4·4 + 64)/5 = 16, σ = 4.
    # μ = 1.5: bound 6, |8| > 6 -> drop token 4.  μ = 2.5: bound 10 -> keep all.
    s_star, zeros, adv = t(0, 0, 0, 0, 10), torch.zeros(5), t(-1, -1, 1, 1, -1)
    assert clip_mask("clip_b", "symmetric", 1.5, s_star, zeros, adv, all_valid(5)).tolist() == [T, T, T, T, F]
    assert clip_mask("clip_b", "symmetric", 2.5, s_star, zeros, adv, all_valid(5)).tolist() == [T] * 5


def test_clip_b_negative_lower_drops_only_low_tail_with_negative_advantage():
    # x = [10,10,10,10,0]: mean 8, d = [2,2,2,2,-8], σ = 4; μ = 1.5: bound 6, d_4 = -8 < -6.
    s_star, zeros = t(10, 10, 10, 10, 0), torch.zeros(5)
    neg = t(1, 1, 1, 1, -1)
    pos = t(-1, -1, -1, -1, 1)
    assert clip_mask("clip_b", "negative_lower", 1.5, s_star, zeros, neg, all_valid(5)).tolist() == [T, T, T, T, F]
    # same token with A > 0 stays; the symmetric form would drop it regardless of A
    assert clip_mask("clip_b", "negative_lower", 1.5, s_star, zeros, pos, all_valid(5)).tolist() == [T] * 5
    assert clip_mask("clip_b", "symmetric", 1.5, s_star, zeros, pos, all_valid(5)).tolist() == [T, T, T, T, F]
    # a high outlier (x = [0,0,0,0,10], d_4 = +8) is never dropped by the lower rule
    assert clip_mask("clip_b", "negative_lower", 1.5, t(0, 0, 0, 0, 10), zeros, neg, all_valid(5)).tolist() == [T] * 5


def test_clip_v_symmetric_is_not_centred():
    # Sc = S* - E[S] = [4,-2,2,0]: mean 1, deviations [3,-3,1,-1], σ² = 20/4 = 5, σ = 2.2361;
    # μ = 1.2: bound 2.6833 against |Sc| itself (ClipV is centred over the vocabulary, not the
    # batch): |4| > 2.68 drops token 0, |-2| stays (batch-centring would have dropped it: |-3|).
    s_expect = torch.full((4,), 0.5)
    s_star = t(4, -2, 2, 0) + s_expect
    adv = t(-1, -1, -1, 1)
    assert clip_mask("clip_v", "symmetric", 1.2, s_star, s_expect, adv, all_valid(4)).tolist() == [F, T, T, T]


def test_clip_v_uses_the_importance_weighted_score_when_ratio_given():
    # r = [1,2,1,1]: x = r·Sc = [4,-4,2,0], mean 0.5, deviations [3.5,-4.5,1.5,-0.5],
    # σ² = (12.25 + 20.25 + 2.25 + 0.25)/4 = 8.75, σ = 2.9580; μ = 1.2: bound 3.5496 -> drop 0 and 1.
    s_expect = torch.full((4,), 0.5)
    s_star = t(4, -2, 2, 0) + s_expect
    adv, ratio = t(-1, -1, -1, 1), t(1, 2, 1, 1)
    keep = clip_mask("clip_v", "symmetric", 1.2, s_star, s_expect, adv, all_valid(4), ratio=ratio)
    assert keep.tolist() == [F, F, T, T]


def test_clip_v_negative_lower():
    # Sc = [4,-2,2,0], σ = 2.2361; μ = 0.8: bound 1.7889. Lower rule: A<0 and Sc < -1.79 -> token 1.
    # Symmetric at the same μ drops |Sc| > 1.79: tokens 0, 1, 2.
    s_expect = torch.zeros(4)
    s_star, adv = t(4, -2, 2, 0), t(-1, -1, -1, 1)
    assert clip_mask("clip_v", "negative_lower", 0.8, s_star, s_expect, adv, all_valid(4)).tolist() == [T, F, T, T]
    assert clip_mask("clip_v", "symmetric", 0.8, s_star, s_expect, adv, all_valid(4)).tolist() == [F, F, F, T]


def test_directional_drops_entropy_decreasing_outliers():
    # Sc = [3,.5,.5,-.5,0], A = [1,1,-1,1,1], r = 1: δH = -A·Sc = [-3,-.5,.5,.5,0], mean -0.5,
    # d = [-2.5,0,1,1,.5], σ² = (6.25 + 0 + 1 + 1 + .25)/5 = 1.7, σ = 1.3038; μ = 1.5: bound 1.9558.
    # d_0 = -2.5 < -1.96: reinforcing a high-S* token (A > 0) is the outlier entropy drop -> dropped.
    s_star, s_expect = t(3, 0.5, 0.5, -0.5, 0), torch.zeros(5)
    adv = t(1, 1, -1, 1, 1)
    keep = clip_mask("directional", "symmetric", 1.5, s_star, s_expect, adv, all_valid(5))
    assert keep.tolist() == [F, T, T, T, T]
    # restricted to A < 0 tokens, token 0 (A > 0) is spared
    keep = clip_mask("directional", "negative_lower", 1.5, s_star, s_expect, adv, all_valid(5))
    assert keep.tolist() == [T] * 5
    # flip the signs of A and Sc of token 0 (δH unchanged): now A < 0 and the lower rule drops it
    keep = clip_mask("directional", "negative_lower", 1.5, t(-3, 0.5, 0.5, -0.5, 0), s_expect, t(-1, 1, -1, 1, 1), all_valid(5))
    assert keep.tolist() == [F, T, T, T, T]


CAP_X = t(-5, -4, -3, 1, 1, 1, 1, 1, 1, 6)


@pytest.mark.parametrize(
    "max_frac, expected_dropped",
    [
        # x = Sc = [-5,-4,-3,1×6,6]: mean 0, σ² = (25+16+9+6+36)/10 = 9.2, σ = 3.0332; μ = 0.9:
        # bound 2.7298, candidates (A<0, x < -2.73): tokens 0, 1, 2.
        (0.2, [0, 1]),  # k = ⌊0.2·10⌋ = 2 most negative
        (0.05, [0]),  # k = max(⌊0.5⌋, 1) = 1
        (0.5, [0, 1, 2]),  # k = 5 >= 3 candidates: no extra restriction
        (None, [0, 1, 2]),
    ],
)
def test_max_frac_cap_keeps_only_the_most_negative(max_frac, expected_dropped):
    adv = -torch.ones(10)
    keep = clip_mask("clip_v", "negative_lower", 0.9, CAP_X, torch.zeros(10), adv, all_valid(10), max_frac=max_frac)
    assert (~keep).nonzero().flatten().tolist() == expected_dropped


def test_symmetric_cap_ranks_by_magnitude():
    # same x, symmetric μ = 0.9: |x| > 2.73 -> tokens 0 (5), 1 (4), 2 (3), 9 (6); k = 2 -> 9 and 0.
    adv = -torch.ones(10)
    keep = clip_mask("clip_v", "symmetric", 0.9, CAP_X, torch.zeros(10), adv, all_valid(10), max_frac=0.2)
    assert (~keep).nonzero().flatten().tolist() == [0, 9]


@pytest.mark.parametrize("method", ["clip_b", "clip_v", "directional"])
@pytest.mark.parametrize("form", ["symmetric", "negative_lower"])
def test_zero_std_drops_nothing(method, form):
    # constant x: σ = 0 (< 1e-12) -> nothing is an outlier, even for ClipV where |x| = 0.7 > μ·0
    s_star = torch.full((6,), 0.7)
    keep = clip_mask(method, form, 0.5, s_star, torch.zeros(6), -torch.ones(6), all_valid(6))
    assert keep.tolist() == [T] * 6


@pytest.mark.parametrize("method", ["clip_b", "clip_v", "directional"])
@pytest.mark.parametrize("form", ["symmetric", "negative_lower"])
def test_all_invalid_and_padding(method, form):
    nan = torch.full((4,), float("nan"))
    none = torch.zeros(4, dtype=torch.bool)
    assert clip_mask(method, form, 1.0, nan, nan, nan, none, max_frac=0.5).tolist() == [F] * 4
    # NaN padding appended to a hand case changes nothing on the valid tokens and is never kept
    s_star = torch.cat([t(0, 0, 0, 0, 10), nan])
    adv = torch.cat([t(-1, -1, 1, 1, -1), nan])
    valid = torch.cat([all_valid(5), none])
    keep = clip_mask("clip_b", "symmetric", 1.5, s_star, torch.zeros(9), adv, valid)
    assert keep.tolist() == [T, T, T, T, F, F, F, F, F]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"s_star.*\(1,\)"):
        clip_mask("clip_b", "symmetric", 1.0, t(0, float("inf"), 0), torch.zeros(3), torch.zeros(3), all_valid(3))
    with pytest.raises(ValueError, match=r"ratio.*\(2,\)"):
        clip_mask("clip_v", "symmetric", 1.0, torch.zeros(3), torch.zeros(3), torch.zeros(3), all_valid(3),
                  ratio=t(1, 1, float("nan")))
    with pytest.raises(ValueError, match="advantages: expected shape"):
        clip_mask("clip_b", "symmetric", 1.0, torch.zeros(3), torch.zeros(3), torch.zeros(2), all_valid(3))
    with pytest.raises(ValueError, match="method"):
        clip_mask("clip_x", "symmetric", 1.0, torch.zeros(3), torch.zeros(3), torch.zeros(3), all_valid(3))
    with pytest.raises(ValueError, match="form"):
        clip_mask("clip_b", "both", 1.0, torch.zeros(3), torch.zeros(3), torch.zeros(3), all_valid(3))


def random_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # heavy-tailed S* so that every rule has outliers to drop
    s_star = torch.randn(n, generator=gen) ** 3
    return {
        "s_star": s_star,
        "s_expect": torch.rand(n, generator=gen) * 0.3,
        "advantages": torch.randn(n, generator=gen),
        "valid": torch.rand(n, generator=gen) > 0.2,
        "ratio": torch.exp(torch.randn(n, generator=gen) * 0.2),
    }


def staged_masks(batch, method, form, mu, max_frac, splits):
    """The learner's path: moments per micro-batch merged with +, one cap over the whole, apply per part."""
    parts = [{k: v[s] for k, v in batch.items()} for s in splits]
    xs = [clip_statistic(method, p["s_star"], p["s_expect"], p["advantages"], p["ratio"]) for p in parts]
    moments = ClipMoments.from_values(xs[0], parts[0]["valid"])
    for x, p in zip(xs[1:], parts[1:], strict=True):
        moments = moments + ClipMoments.from_values(x, p["valid"])
    thresholds = thresholds_from_moments(method, form, mu, moments)
    if max_frac is not None:
        thresholds = cap_thresholds(
            thresholds, torch.cat(xs), batch["advantages"], batch["valid"], max_frac, all_ranks=False
        )
    return torch.cat(
        [clip_mask_with_thresholds(thresholds, x, p["advantages"], p["valid"]) for x, p in zip(xs, parts, strict=True)]
    )


@pytest.mark.parametrize(
    "method, form, max_frac",
    list(itertools.product(["clip_b", "clip_v", "directional"], ["symmetric", "negative_lower"], [None, 0.01])),
)
def test_micro_batch_split_gives_the_identical_mask(method, form, max_frac):
    batch = random_batch(1000, seed=7)
    whole = clip_mask(method, form, 1.5, **batch, max_frac=max_frac)
    assert 0 < int((batch["valid"] & ~whole).sum()) < 100  # the case drops something, not everything
    splits = [slice(0, 137), slice(137, 600), slice(600, 1000)]
    assert torch.equal(staged_masks(batch, method, form, 1.5, max_frac, splits), whole)


def test_moments_merge_matches_direct():
    x = torch.randn(100, dtype=torch.float64) * 3 + 10
    valid = torch.rand(100) > 0.3
    merged = ClipMoments.from_values(x[:30], valid[:30]) + ClipMoments.from_values(x[30:], valid[30:])
    ref = x[valid]
    torch.testing.assert_close(merged.count, torch.tensor(float(valid.sum()), dtype=torch.float64))
    torch.testing.assert_close(merged.mean, ref.mean())
    torch.testing.assert_close(merged.std, ref.std(correction=0))
    empty = ClipMoments.from_values(x[:0], valid[:0])
    torch.testing.assert_close((empty + merged).std, merged.std)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch = random_batch(1000, seed=7)
        shard = slice(0, 450) if rank == 0 else slice(450, 1000)
        part = {k: v[shard] for k, v in batch.items()}
        x = clip_statistic("clip_v", part["s_star"], part["s_expect"], part["advantages"], part["ratio"])
        moments = ClipMoments.from_values(x, part["valid"]).all_reduce()
        thresholds = thresholds_from_moments("clip_v", "negative_lower", 1.5, moments)
        thresholds = cap_thresholds(thresholds, x, part["advantages"], part["valid"], 0.01)
        torch.save(clip_mask_with_thresholds(thresholds, x, part["advantages"], part["valid"]), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_reproduce_the_single_batch_mask(tmp_path):
    """Two gloo ranks, each with part of the batch: moments all-reduced, cap gathered globally."""
    out = str(tmp_path / "mask")
    mp.spawn(_rank_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    batch = random_batch(1000, seed=7)
    whole = clip_mask("clip_v", "negative_lower", 1.5, **batch, max_frac=0.01)
    parts = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    assert torch.equal(torch.cat(parts), whole)
