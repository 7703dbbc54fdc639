"""The first-order entropy law of ALGORITHM.md §2 checked on our own statistics and a real model.

Wang et al. 2026 (arXiv 2602.03392), §3: a policy-gradient step on the single-token surrogate
``A · log p_k`` moves the logits by ``δz = α (e_k - p)`` and the entropy by
``ΔH = -α (S*_k - E_p[S]) + O(α²)``. The tests take the ``S*`` and ``E_p[S]`` of
:func:`learner.entropy.token_stats` (float32) and compare the predicted change with the entropy
change realised in float64 on a tiny transformers Qwen2 model.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from learner.entropy import token_stats

N_PAIRS = 200


def entropy64(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


@pytest.fixture(scope="module")
def tiny_qwen():
    """Seeded 2-layer Qwen2 in float64 with an untied LM head, and its final hidden states/logits."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=False,
    )
    model = transformers.Qwen2ForCausalLM(config).double().eval()
    # the default init gives near-uniform policies; a larger LM head gives a spread of entropies
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    input_ids = torch.randint(0, 64, (4, 25))
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids).last_hidden_state.reshape(-1, 128)
    return model, hidden


def pairs(n_positions: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(position, token, advantage) triples: many positions, random tokens, advantages of both signs."""
    positions = torch.randint(0, n_positions, (N_PAIRS,), generator=gen)
    tokens = torch.randint(0, 64, (N_PAIRS,), generator=gen)
    advantages = torch.randn(N_PAIRS, generator=gen, dtype=torch.float64)
    return positions, tokens, advantages


def correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def test_logit_space_step_follows_minus_alpha_centered_score(tiny_qwen):
    """The paper's theory step: the single-token surrogate on the final logits, δz = α (e_k - p)."""
    model, hidden = tiny_qwen
    gen = torch.Generator().manual_seed(1)
    positions, tokens, advantages = pairs(hidden.shape[0], gen)
    with torch.no_grad():
        logits = model.lm_head(hidden)[positions]
    for temperature in (0.6, 1.0, 1.3):
        z = logits / temperature
        step = 1e-3
        alpha = step * advantages
        p = torch.softmax(z, -1)
        # gradient ascent on A·log p_k with respect to z is A (e_k - p)
        z_new = z + alpha[:, None] * (torch.nn.functional.one_hot(tokens, 64).double() - p)
        realised = entropy64(z_new) - entropy64(z)
        stats = token_stats(logits.float(), tokens, temperature)
        predicted = -alpha * stats.s_centered.double()
        assert correlation(predicted, realised) >= 0.999
        # first order: the residual is O(α²), far below the typical change
        assert float((predicted - realised).abs().max()) < 0.05 * float(realised.abs().max())


def test_lm_head_parameter_step_follows_the_same_law(tiny_qwen):
    """An SGD step on the real LM-head weight (autograd of A·log p_k, then a forward with the new weight).

    With the hidden state fixed (only the untied LM head changes), ``∇_W = A (e_k - p) hᵀ`` and the
    step moves the logits by exactly ``η A ‖h‖² (e_k - p)``: the theory step with ``α = η A ‖h‖²``.
    A step through all parameters would move ``h`` too and is not of that form, so it is not tested.
    """
    model, hidden = tiny_qwen
    gen = torch.Generator().manual_seed(2)
    positions, tokens, advantages = pairs(hidden.shape[0], gen)
    weight = model.lm_head.weight.detach()
    lr = 1e-6
    predicted, realised = [], []
    for pos, tok, adv in zip(positions.tolist(), tokens.tolist(), advantages.tolist(), strict=True):
        h = hidden[pos]
        w = weight.clone().requires_grad_()
        logits = torch.func.functional_call(model.lm_head, {"weight": w}, (h,))
        objective = adv * torch.log_softmax(logits, -1)[tok]
        (grad,) = torch.autograd.grad(objective, w)
        with torch.no_grad():
            new_logits = torch.func.functional_call(model.lm_head, {"weight": w + lr * grad}, (h,))
            realised.append(entropy64(new_logits) - entropy64(logits))
            stats = token_stats(logits[None].float(), torch.tensor([tok]))
            alpha = lr * adv * float(h @ h)
            predicted.append(-alpha * stats.s_centered.double()[0])
    assert correlation(torch.stack(predicted), torch.stack(realised)) >= 0.999


def test_centered_score_has_zero_mean_on_policy():
    """E_{k~p}[S*_k - E_p[S]] = 0: on-policy sampling moves entropy only via Cov(A, Sc)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 50, generator=gen) * 4
    stats = token_stats(logits.expand(50, 50), torch.arange(50))
    p = torch.softmax(logits[0].double(), -1)
    expected_sc = (p * stats.s_centered.double()).sum()
    # each Sc is O(1); float32 statistics leave ~1e-7 per term
    assert abs(float(expected_sc)) < 1e-6
