"""The entropy-law experiment's measurements on the random-init tiny model (float64 references)."""

from __future__ import annotations

import random

import pytest
import torch

from experiments.entropy_dynamics.loop import sample_batch, token_advantages
from experiments.entropy_law.law import (
    LawProbe,
    LawSettings,
    centred_scores64,
    float64_copy,
    linearity_summary,
    response_logprobs64,
    run_law,
)
from learner.entropy import token_stats
from tests.experiments.conftest import ROWS


@pytest.fixture(scope="module")
def batch(tiny):
    model, tokenizer = tiny
    b = sample_batch(
        model, tokenizer, ROWS, group_size=4, temperature=1.0, max_new_tokens=5, generator_seed=3
    )
    # the random policy never answers correctly: alternate rewards give every group variance
    b.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0] * 4)
    return b


def test_centred_scores_match_the_learner_statistics_on_random_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 37, generator=gen, dtype=torch.float64) * 3
    tokens = torch.randint(0, 37, (50,), generator=gen)
    ours = centred_scores64(torch.log_softmax(logits, -1), tokens)
    learner = token_stats(logits, tokens).s_centered.double()
    assert ours.abs().max() > 1e-3  # not a degenerate all-zero case
    torch.testing.assert_close(ours, learner, atol=2e-6, rtol=1e-5)


def test_float64_copy_runs_rms_norm_in_float64(tiny, batch) -> None:
    model, _ = tiny
    m64 = float64_copy(model)
    # the patched norm keeps float64 where transformers' casts to float32
    norm = m64.model.norm
    x = torch.randn(3, norm.weight.numel(), dtype=torch.float64)
    ref = norm.weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.variance_epsilon)
    torch.testing.assert_close(norm(x), ref, atol=1e-14, rtol=1e-13)
    assert response_logprobs64(m64, batch, 1.0).dtype == torch.float64


def test_first_order_is_the_derivative_of_the_realised_change(tiny, batch) -> None:
    model, _ = tiny
    probe = LawProbe(float64_copy(model).train(), temperature=1.0)
    grads = probe.gradients(batch)
    before = [p.detach().clone() for p in probe.params]
    points = {lr: probe.sgd_point(batch, lr, grads) for lr in (1e-7, 1e-6, 1e-5, 1e-3)}
    small, big = points[1e-7], points[1e-3]
    # the parameters are restored bit for bit after each measurement
    assert all(torch.equal(p, b) for p, b in zip(probe.params, before, strict=True))
    # first order is exactly linear in lr; the realised change converges to it as lr -> 0, and the
    # gap is second order: ten times the lr, ten times the relative gap (measured 3.3e-5 at 1e-7)
    assert big["first_order"] == pytest.approx(1e4 * small["first_order"], rel=1e-9)
    assert small["realised"] == pytest.approx(small["first_order"], rel=2e-4)
    gap = {lr: p["realised"] / p["first_order"] - 1 for lr, p in points.items()}
    assert gap[1e-5] / gap[1e-6] == pytest.approx(10.0, rel=0.05)
    assert gap[1e-6] / gap[1e-7] == pytest.approx(10.0, rel=0.05)
    # the proxy is −η·mean(A·Sc), recomputed here from the model's own float64 log-probs
    log_probs = response_logprobs64(probe.model, batch, 1.0).detach()
    targets = batch.input_ids[:, 1:][batch.response_mask[:, 1:]]
    adv = token_advantages(batch)[0].double()
    assert adv.ne(0).all()
    expected = -1e-3 * float((adv * centred_scores64(log_probs, targets)).mean())
    assert big["proxy"] == pytest.approx(expected, rel=1e-10)
    # the realised change is H̄ after minus H̄ before, on the same tokens
    assert grads["entropy"] == pytest.approx(float(-(log_probs.exp() * log_probs).sum(-1).mean()), rel=1e-12)


def test_linearity_summary_is_one_for_a_linear_law_and_two_for_a_quadratic() -> None:
    rng = random.Random(0)
    linear, quadratic = [], []
    for b in range(4):
        c = rng.uniform(0.5, 2.0) * (1 if b % 2 else -1)
        for s in (0.25, 0.5, 1.0, 2.0, 4.0):
            lr = 1e-4 * s
            linear.append({"batch": b, "scale": s, "lr": lr, "realised": c * lr})
            quadratic.append({"batch": b, "scale": s, "lr": lr, "realised": c * lr * lr})
    lin, quad = linearity_summary(linear), linearity_summary(quadratic)
    assert lin["loglog_slope"] == pytest.approx(1.0, abs=1e-9)
    assert all(v == pytest.approx(1.0) for v in lin["ratio_to_linear_by_scale"].values())
    assert quad["loglog_slope"] == pytest.approx(2.0, abs=1e-9)
    assert quad["ratio_to_linear_by_scale"]["4.0"] == pytest.approx(4.0)


def test_run_law_fails_loudly_when_no_batch_can_step(tiny) -> None:
    model, tokenizer = tiny
    rows = [{"prompt": p + "=", "answer": p[::-1]} for p in ("ab", "cd", "efg", "hij")]
    settings = LawSettings(
        batches=1, prompts_per_batch=2, group_size=2, lr_batches=0, adam_steps=0, max_new_tokens=3
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the random policy is never rewarded, so every group has zero advantages and no step exists
    with pytest.raises(RuntimeError, match="non-zero advantage"):
        run_law(model, tokenizer, rows, settings)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
