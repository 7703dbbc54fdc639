"""Token statistics against a float64 reference written from the definitions of ALGORITHM.md §1."""

from __future__ import annotations

import pytest
import torch

from learner.entropy import token_stats, token_stats_from_hidden

FIELDS = ("logp", "entropy", "s_star", "s_expect")
EPS32 = torch.finfo(torch.float32).eps


def reference(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """float64, straight from the table: S_i = p_i (H + log p_i), s_star = S_k, s_expect = Σ p_i S_i."""
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    scores = p * (entropy[:, None] + log_p)
    return {
        "logp": log_p.gather(1, tokens[:, None]).squeeze(1),
        "entropy": entropy,
        "s_star": scores.gather(1, tokens[:, None]).squeeze(1),
        "s_expect": (p * scores).sum(-1),
    }


def assert_matches(stats, expected: dict[str, torch.Tensor], logit_scale: float) -> None:
    # float32 rounds each scaled logit by up to |z|·2^-24 and the log-sum-exp inherits a few such
    # ulps, so the absolute tolerance grows with max|z|; 16 ulps leaves room for the sums over V
    atol = 16 * EPS32 * max(1.0, logit_scale)
    for name in FIELDS:
        got = getattr(stats, name)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), expected[name], rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("scale", [1.0, 8.0, 50.0])
@pytest.mark.parametrize("vocab_size", [2, 97, 1000])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_stats_matches_float64(scale, vocab_size, temperature, dtype):
    gen = torch.Generator().manual_seed(vocab_size)
    logits = ((torch.rand(33, vocab_size, generator=gen) * 2 - 1) * scale).to(dtype)
    tokens = torch.randint(0, vocab_size, (33,), generator=gen)
    stats = token_stats(logits, tokens, temperature)
    # the reference sees exactly the (possibly bf16-rounded) values the code saw
    assert_matches(stats, reference(logits, tokens, temperature), scale / temperature)
    assert not stats.entropy.requires_grad


@pytest.mark.parametrize("scale", [1.0, 50.0])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.3])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 97, 500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hidden_matches_float64_and_logits_path(scale, temperature, chunk_size, dtype):
    vocab_size, dim = 97, 16
    gen = torch.Generator().manual_seed(chunk_size)
    hidden = torch.randn(29, dim, generator=gen).to(dtype)
    # weight scaled so that the logits span about ±scale
    weight = (torch.randn(vocab_size, dim, generator=gen) * scale / 8).to(dtype)
    tokens = torch.randint(0, vocab_size, (29,), generator=gen)
    logits64 = hidden.double() @ weight.double().T
    stats = token_stats_from_hidden(hidden, weight, tokens, temperature, chunk_size=chunk_size)
    max_z = float(logits64.abs().max()) / temperature
    assert_matches(stats, reference(logits64, tokens, temperature), max_z)
    via_logits = token_stats(hidden.float() @ weight.float().T, tokens, temperature)
    assert_matches(stats, {k: getattr(via_logits, k).double() for k in FIELDS}, max_z)


@pytest.mark.parametrize("temperature", [0.6, 1.3])
@pytest.mark.parametrize("chunk_size", [5, 40, 64])
def test_from_hidden_gradients_match_float64_autograd(temperature, chunk_size):
    vocab_size, dim, n = 40, 12, 23
    gen = torch.Generator().manual_seed(3)
    hidden = (torch.randn(n, dim, generator=gen) * 2).requires_grad_()
    weight = torch.randn(vocab_size, dim, generator=gen).requires_grad_()
    tokens = torch.randint(0, vocab_size, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)
    stats = token_stats_from_hidden(hidden, weight, tokens, temperature, chunk_size=chunk_size)
    grad_h, grad_w = torch.autograd.grad((stats.logp * upstream).sum(), (hidden, weight))

    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    logp64 = torch.log_softmax(h64 @ w64.T / temperature, -1).gather(1, tokens[:, None]).squeeze(1)
    ref_h, ref_w = torch.autograd.grad((logp64 * upstream.double()).sum(), (h64, w64))
    torch.testing.assert_close(grad_h.double(), ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-5, atol=1e-5)


def test_from_hidden_bf16_gradients_keep_dtype_and_value():
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(16, 8, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(50, 8, generator=gen).bfloat16().requires_grad_()
    tokens = torch.randint(0, 50, (16,), generator=gen)
    stats = token_stats_from_hidden(hidden, weight, tokens, chunk_size=16)
    stats.logp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    torch.log_softmax(h64 @ w64.T, -1).gather(1, tokens[:, None]).sum().backward()
    # the gradients are computed in float32 and rounded once to bf16 (8-bit mantissa): 2^-8 relative
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=2**-8, atol=2**-8)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=2**-8, atol=2**-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_path_gradient_matches_float64(dtype):
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(11, 30, generator=gen) * 10).to(dtype).requires_grad_()
    tokens = torch.randint(0, 30, (11,), generator=gen)
    upstream = torch.randn(11, generator=gen)
    (grad,) = torch.autograd.grad((token_stats(logits, tokens, 0.6).logp * upstream).sum(), logits)
    z64 = logits.detach().double().requires_grad_()
    logp64 = torch.log_softmax(z64 / 0.6, -1).gather(1, tokens[:, None]).squeeze(1)
    (ref,) = torch.autograd.grad((logp64 * upstream.double()).sum(), z64)
    assert grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2**-8  # bf16 gradient: one rounding to 8 mantissa bits
    torch.testing.assert_close(grad.double(), ref, rtol=tol, atol=tol)


def test_only_logp_carries_gradient():
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(9, 3, requires_grad=True)
    stats = token_stats_from_hidden(hidden, weight, torch.tensor([0, 8, 3, 3]), chunk_size=4)
    assert stats.logp.requires_grad
    assert not (stats.entropy.requires_grad or stats.s_star.requires_grad or stats.s_expect.requires_grad)


def test_extreme_logits_stay_finite():
    # one dominant logit (+50 over -50 at T=0.6: a gap of 167 nats): p_k underflows nothing to NaN
    logits = torch.full((2, 64), -50.0)
    logits[:, 5] = 50.0
    tokens = torch.tensor([5, 6])
    for stats in (token_stats(logits, tokens, 0.6), token_stats_from_hidden(logits, torch.eye(64), tokens, 0.6, 7)):
        expected = reference(logits, tokens, 0.6)
        assert_matches(stats, expected, 50 / 0.6)


def test_bad_inputs_name_the_tensor_and_index():
    logits = torch.zeros(3, 5)
    logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"logits.*\(1, 2\)"):
        token_stats(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"tokens.*\(2,\)"):
        token_stats(torch.zeros(3, 5), torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="tokens: expected shape"):
        token_stats(torch.zeros(3, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="temperature"):
        token_stats(torch.zeros(3, 5), torch.tensor([0, 1, 2]), temperature=0.0)
    with pytest.raises(ValueError, match=r"tokens.*\(0,\)"):
        token_stats_from_hidden(torch.zeros(3, 4), torch.zeros(5, 4), torch.tensor([-1, 1, 2]))
    hidden = torch.zeros(3, 4)
    hidden[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"logits.*\(2,\)"):
        token_stats_from_hidden(hidden, torch.ones(5, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="disagree"):
        token_stats_from_hidden(torch.zeros(3, 4), torch.zeros(5, 3), torch.tensor([0, 1, 2]))
