"""A batch-level test of the first-order entropy law on the tiny policy, in float64.

For one on-policy batch (responses sampled from the current policy, so r = 1) and one optimizer
step θ → θ + Δθ on the token-mean policy-gradient loss ``−mean_t A_t log p_t``, three numbers on
**the same tokens** (ALGORITHM.md §2, §5):

* (a) ``realised``: ``H̄(θ + Δθ) − H̄(θ)``, the batch's mean token entropy after minus before;
* (b) ``first_order``: ``∇_θ H̄ · Δθ``, the exact linearisation of (a) along the step actually
  taken (autograd; every token's logits move at once through the shared parameters);
* (c) ``proxy``: ``−η · mean_t(A_t · Sc_t)``, the paper's logit-space prediction, which treats each
  position's logits as free parameters moved by ``α (e_k − p)``.

(a) vs (b) checks that a step is small enough to be first order; (a) vs (c) is the question the
telemetry rests on: does the logit-space proxy track what a real network step does to entropy?
With plain SGD the step is ``Δθ = −η ∇L``; with AdamW it is whatever the optimizer did, and (b) is
taken against that step while (c) keeps the SGD form (the proxy has no notion of Adam's scaling).

Everything is float64: the entropy change of a small step is ~1e-6 relative and drowns in float32
rounding. Sampling uses a float32 copy of the same weights with transformers' sampler at the given
temperature (no top-k/top-p), so the behaviour distribution is the policy's own.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from experiments.entropy_dynamics.loop import Batch, sample_batch, token_advantages


@dataclass(frozen=True)
class LawSettings:
    """One entropy-law measurement.

    Attributes:
        batches: On-policy batches of the SGD part, each stepped from the same starting weights.
        prompts_per_batch: Prompt groups per batch.
        group_size: Responses per prompt (GRPO groups).
        sgd_lr: Plain SGD learning rate η (no momentum, clipping or weight decay).
        lr_scales: Multiples of ``sgd_lr`` for the linearity check.
        lr_batches: Batches (the first ones) that the linearity check repeats at every scale.
        adam_steps: Steps of the AdamW part (a trajectory: Adam's state needs history).
        adam_lr: AdamW learning rate.
        adam_weight_decay: AdamW decoupled weight decay.
        temperature: Sampling temperature; statistics use ``softmax(z / T)``.
        max_new_tokens: Response budget.
        seed: Seed of the prompt order and of the sampler.
    """

    batches: int = 200
    prompts_per_batch: int = 8
    group_size: int = 8
    sgd_lr: float = 1e-5
    lr_scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    lr_batches: int = 20
    adam_steps: int = 200
    adam_lr: float = 3e-5
    adam_weight_decay: float = 0.01
    temperature: float = 1.0
    max_new_tokens: int = 11
    seed: int = 0


def _rms_norm_in_input_dtype(self: Any, hidden_states: Tensor) -> Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def float64_copy(model: Any) -> Any:
    """A float64 copy of ``model`` whose RMSNorms compute in float64 too.

    transformers' Qwen2RMSNorm casts its input to float32 whatever the model's dtype: a float64 model
    would carry float32 rounding (~1e-7 relative) in a quantity that depends on the weights, and the
    entropy changes measured here are ~1e-6. The rotary tables are also float32 but fixed (they do
    not depend on the weights), so they shift both sides of a difference alike.
    """
    import types

    m = copy.deepcopy(model).double()
    for module in m.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
    return m


def response_logprobs64(model: Any, batch: Batch, temperature: float) -> Tensor:
    """``[N, V]`` float64 log-probabilities of a float64 ``model`` at ``batch``'s response tokens.

    Position i's hidden state predicts token i+1, so the positions one left of each response token
    are taken (the order of :func:`experiments.entropy_dynamics.loop.token_advantages`).
    """
    hidden = model.model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).last_hidden_state
    logits = model.lm_head(hidden[:, :-1][batch.response_mask[:, 1:]])
    return torch.log_softmax(logits.double() / temperature, dim=-1)


def centred_scores64(log_probs: Tensor, tokens: Tensor) -> Tensor:
    """``Sc = S*_k − E_p[S]`` in float64 (ALGORITHM.md §1), ``[N]`` from ``[N, V]`` log-probs."""
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1)
    logp_k = log_probs.gather(1, tokens[:, None]).squeeze(1)
    s_star = logp_k.exp() * (entropy + logp_k)
    s_expect = (probs * probs * (entropy[:, None] + log_probs)).sum(-1)
    return s_star - s_expect


def _mean_entropy(log_probs: Tensor) -> Tensor:
    return -(log_probs.exp() * log_probs).sum(-1).mean()


class LawProbe:
    """Measures (a), (b), (c) for one batch at the current float64 weights of ``model``.

    The loss, its gradient and ∇H̄ come from one forward; ``realised`` applies the step to the
    parameters and takes it back exactly (the step is added and subtracted on a saved copy).
    """

    def __init__(self, model: Any, temperature: float) -> None:
        self.model = model
        self.temperature = temperature
        self.params = [p for p in model.parameters() if p.requires_grad]

    def gradients(self, batch: Batch) -> dict[str, Any]:
        """Loss gradient, ∇H̄, H̄ and the proxy's per-unit-step value ``−mean(A·Sc)``."""
        targets = batch.input_ids[:, 1:][batch.response_mask[:, 1:]]
        advantages = token_advantages(batch)[0].double()
        log_probs = response_logprobs64(self.model, batch, self.temperature)
        logp = log_probs.gather(1, targets[:, None]).squeeze(1)
        loss = -(advantages * logp).mean()
        mean_entropy = _mean_entropy(log_probs)
        grad_loss = torch.autograd.grad(loss, self.params, retain_graph=True)
        grad_entropy = torch.autograd.grad(mean_entropy, self.params)
        with torch.no_grad():
            sc = centred_scores64(log_probs.detach(), targets)
        return {
            "grad_loss": grad_loss,
            "grad_entropy": grad_entropy,
            "entropy": float(mean_entropy.detach()),
            "proxy_per_lr": float(-(advantages * sc).mean()),
            "tokens": int(targets.numel()),
        }

    def entropy_after(self, batch: Batch, step: list[Tensor]) -> float:
        """H̄ on ``batch`` at θ + ``step``; the parameters are restored bit for bit afterwards."""
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, d in zip(self.params, step, strict=True):
                    p.add_(d)
                return float(_mean_entropy(response_logprobs64(self.model, batch, self.temperature)))
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)

    @staticmethod
    def dot(a: list[Tensor] | tuple[Tensor, ...], b: list[Tensor] | tuple[Tensor, ...]) -> float:
        return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))

    def sgd_point(self, batch: Batch, lr: float, grads: dict[str, Any] | None = None) -> dict[str, float]:
        """(a), (b), (c) of one plain SGD step at learning rate ``lr``."""
        g = grads or self.gradients(batch)
        step = [-lr * x for x in g["grad_loss"]]
        return {
            "lr": lr,
            "tokens": g["tokens"],
            "entropy": g["entropy"],
            "realised": self.entropy_after(batch, step) - g["entropy"],
            "first_order": self.dot(g["grad_entropy"], step),
            "proxy": lr * g["proxy_per_lr"],
        }


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation (float64); NaN when either side is constant."""
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / den if den > 0 else float("nan")


def sign_agreement(xs: list[float], ys: list[float]) -> float:
    """Fraction of pairs with the same strict sign (pairs where either is 0 count as disagreement)."""
    same = [(x > 0 and y > 0) or (x < 0 and y < 0) for x, y in zip(xs, ys, strict=True)]
    return sum(same) / len(same) if same else float("nan")


def slope_through_origin(xs: list[float], ys: list[float]) -> float:
    """Least-squares ``b`` in ``y ≈ b·x``: how many units of realised change per unit of prediction."""
    sxx = sum(x * x for x in xs)
    return sum(x * y for x, y in zip(xs, ys, strict=True)) / sxx if sxx > 0 else float("nan")


def agreement(points: list[dict[str, float]]) -> dict[str, float]:
    """Correlations, sign agreement and slopes of realised vs first-order and vs proxy."""
    a = [p["realised"] for p in points]
    b = [p["first_order"] for p in points]
    c = [p["proxy"] for p in points]
    return {
        "points": len(points),
        "corr_realised_vs_first_order": pearson(a, b),
        "corr_realised_vs_proxy": pearson(a, c),
        "corr_first_order_vs_proxy": pearson(b, c),
        "sign_realised_vs_first_order": sign_agreement(a, b),
        "sign_realised_vs_proxy": sign_agreement(a, c),
        "slope_realised_on_first_order": slope_through_origin(b, a),
        "slope_realised_on_proxy": slope_through_origin(c, a),
        "mean_realised": sum(a) / len(a),
        "mean_proxy": sum(c) / len(c),
        "max_rel_second_order": max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True) if y != 0),
    }


def _sample(
    sampler: Any, model64: Any, tokenizer: Any, rows: list[dict[str, Any]], settings: LawSettings, seed: int
) -> Batch:
    """An on-policy batch: the float32 sampler carries ``model64``'s current weights."""
    sampler.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    return sample_batch(
        sampler, tokenizer, rows, settings.group_size, settings.temperature, settings.max_new_tokens, seed
    )


def run_law(
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    settings: LawSettings,
    progress: Any = None,
) -> dict[str, Any]:
    """The SGD part (``settings.batches`` batches at fixed weights + the lr sweep) and the AdamW part.

    ``model`` (float32, eval) is not changed. Batches whose group rewards are all equal have zero
    advantages and no step; they are skipped and counted (``skipped_zero_advantage``).

    Returns ``{"sgd": [...], "linearity": [...], "adam": [...], "summary": {...}}``.
    """
    rng = random.Random(settings.seed)
    sampler = copy.deepcopy(model).float().eval()
    model64 = float64_copy(model).train()
    probe = LawProbe(model64, settings.temperature)
    sgd: list[dict[str, float]] = []
    linearity: list[dict[str, float]] = []
    skipped = {"sgd": 0, "adam": 0}
    draws = 0

    def next_batch(part: str) -> Batch:
        """The next sampled batch with a non-zero advantage (the others have no step: counted)."""
        nonlocal draws
        while True:
            if skipped[part] > 10 * max(settings.batches, settings.adam_steps):
                raise RuntimeError(
                    f"only {draws - sum(skipped.values())} of {draws} batches had a non-zero advantage"
                )
            rows = rng.sample(train_rows, settings.prompts_per_batch)
            batch = _sample(sampler, model64, tokenizer, rows, settings, settings.seed * 1_000_003 + draws)
            draws += 1
            if bool(token_advantages(batch)[0].ne(0).any()):
                return batch
            skipped[part] += 1

    while len(sgd) < settings.batches:
        batch = next_batch("sgd")
        grads = probe.gradients(batch)
        sgd.append(probe.sgd_point(batch, settings.sgd_lr, grads))
        if len(sgd) <= settings.lr_batches:
            for scale in settings.lr_scales:
                point = probe.sgd_point(batch, settings.sgd_lr * scale, grads)
                linearity.append({"batch": len(sgd) - 1, "scale": scale, **point})
        if progress is not None:
            progress.update(1)

    # AdamW: a trajectory (its moment estimates need history); (b) against the step Adam took.
    optimizer = torch.optim.AdamW(probe.params, lr=settings.adam_lr, weight_decay=settings.adam_weight_decay)
    adam: list[dict[str, float]] = []
    while len(adam) < settings.adam_steps:
        batch = next_batch("adam")
        grads = probe.gradients(batch)
        before = [p.detach().clone() for p in probe.params]
        for p, g in zip(probe.params, grads["grad_loss"], strict=True):
            p.grad = g.clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step = [p.detach() - b for p, b in zip(probe.params, before, strict=True)]
        with torch.no_grad():
            for p, b in zip(probe.params, before, strict=True):
                p.copy_(b)
        adam.append(
            {
                "lr": settings.adam_lr,
                "tokens": grads["tokens"],
                "entropy": grads["entropy"],
                "realised": probe.entropy_after(batch, step) - grads["entropy"],
                "first_order": probe.dot(grads["grad_entropy"], step),
                "proxy": settings.adam_lr * grads["proxy_per_lr"],
            }
        )
        with torch.no_grad():  # move on along the trajectory
            for p, d in zip(probe.params, step, strict=True):
                p.add_(d)
        if progress is not None:
            progress.update(1)

    return {
        "sgd": sgd,
        "linearity": linearity,
        "adam": adam,
        "skipped_zero_advantage": skipped,
        "summary": {
            "sgd": agreement(sgd),
            "adam": agreement(adam),
            "linearity": linearity_summary(linearity),
        },
    }


def linearity_summary(points: list[dict[str, float]]) -> dict[str, Any]:
    """Per lr scale s: mean of ``ΔH(s·η) / (s·ΔH(η))`` over batches (1 for an exactly linear law)
    and the fitted log-log slope of |ΔH| against lr (1 = linear)."""
    if not points:
        return {}
    base = {p["batch"]: p["realised"] for p in points if p["scale"] == 1.0}
    by_scale: dict[float, list[float]] = {}
    for p in points:
        ref = base.get(p["batch"])
        if ref:
            by_scale.setdefault(p["scale"], []).append(p["realised"] / (p["scale"] * ref))
    # within-batch slope: centre each batch's logs on its own mean so batches of different size pool
    per_batch: dict[int, list[tuple[float, float]]] = {}
    for p in points:
        if p["realised"] != 0:
            per_batch.setdefault(int(p["batch"]), []).append(
                (math.log(p["lr"]), math.log(abs(p["realised"])))
            )
    num = den = 0.0
    for pairs in per_batch.values():
        bx = sum(x for x, _ in pairs) / len(pairs)
        by = sum(y for _, y in pairs) / len(pairs)
        num += sum((x - bx) * (y - by) for x, y in pairs)
        den += sum((x - bx) ** 2 for x, _ in pairs)
    return {
        "ratio_to_linear_by_scale": {str(s): sum(v) / len(v) for s, v in sorted(by_scale.items())},
        "loglog_slope": num / den if den > 0 else float("nan"),
        "batches": len(base),
    }
