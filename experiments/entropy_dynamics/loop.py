"""An in-process GRPO loop on the tiny policy, built from the learner's pure functions.

Why not the Ray pipeline: on a 2-core machine the comparison needs 4 methods × several seeds × tens
of steps in ~20 minutes, and every method must see the same prompts, the same behaviour policy lag
and the same random draws. So rollouts are sampled here with transformers (temperature 1, no top-k
or top-p: the behaviour distribution is exactly ``softmax(logits)``) and the learner step is the
learner's maths — :func:`learner.entropy.token_stats_from_hidden`, :func:`learner.clipping.clip_mask`,
:func:`learner.losses.policy_loss`, :func:`learner.losses.entropy_metrics` — with plain AdamW.

Off-policy: the rollouts of step t come from the policy of step ``max(0, t − staleness)``, and
the behaviour log-probs are that policy's, so importance ratios ≠ 1 exactly as in the async system.
"""

from __future__ import annotations

import copy
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from learner.clipping import clip_mask
from learner.config import LossConfig
from learner.entropy import TokenStats, token_stats_from_hidden
from learner.losses import LossInputs, entropy_metrics, grpo_advantages, policy_loss
from tasks.synthetic import is_correct

# method name -> (clip method, importance-weighted ClipV statistic)
METHODS: dict[str, tuple[str, bool]] = {
    "grpo": ("none", False),
    "clip_b": ("clip_b", False),
    "clip_v": ("clip_v", False),
    "clip_v_r": ("clip_v", True),
}


@dataclass(frozen=True)
class LoopSettings:
    """One RL run.

    Attributes:
        method: Key of :data:`METHODS`.
        steps: Optimizer steps.
        prompts_per_step: Prompt groups per step.
        group_size: Responses per prompt (G).
        lr: AdamW learning rate.
        staleness: Policy versions the behaviour policy lags the learner (> 0: off-policy).
        mu: Mask threshold in population standard deviations (symmetric form, ALGORITHM.md §3).
        clip_eps: PPO ratio clip (symmetric, plain GRPO).
        temperature: Rollout temperature.
        max_new_tokens: Response budget (longest answer + EOS).
        seed: Seed of prompt order and sampling; the same for every method.
    """

    method: str = "grpo"
    steps: int = 40
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 3e-4
    staleness: int = 2
    mu: float = 2.5
    clip_eps: float = 0.2
    temperature: float = 1.0
    max_new_tokens: int = 11
    seed: int = 0


@dataclass
class Batch:
    """Sampled responses of one step, flattened to their valid tokens.

    Attributes:
        input_ids: ``[B, L]`` prompt (left-padded) + response (right-padded).
        attention_mask: ``[B, L]``.
        position_ids: ``[B, L]``, counting from the first real token (left padding skipped).
        response_mask: ``[B, L]`` bool, True at response tokens up to and including EOS.
        rewards: ``[B]`` float.
        group_index: ``[B]`` int.
        texts: decoded responses.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    response_mask: Tensor
    rewards: Tensor
    group_index: Tensor
    texts: list[str]


def sample_batch(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    group_size: int,
    temperature: float,
    max_new_tokens: int,
    generator_seed: int,
) -> Batch:
    """``group_size`` responses to each row's prompt from ``model``, rewarded by exact match."""
    prompts = [r["prompt"] for r in rows for _ in range(group_size)]
    answers = [r["answer"] for r in rows for _ in range(group_size)]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(generator_seed)
    # no_grad, not inference_mode: the sampled ids feed the learner's autograd forward
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    prompt_len = enc["input_ids"].shape[1]
    response = out[:, prompt_len:]
    # valid = up to and including the first EOS; generate pads after it
    is_eos = response == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    response_valid = ~after_eos
    attention = torch.cat([enc["attention_mask"], response_valid.long()], dim=1)
    response_mask = torch.cat(
        [torch.zeros_like(enc["attention_mask"], dtype=torch.bool), response_valid], dim=1
    )
    texts = tokenizer.batch_decode(
        torch.where(response_valid, response, tokenizer.pad_token_id), skip_special_tokens=True
    )
    rewards = torch.tensor([float(is_correct(t, a)) for t, a in zip(texts, answers, strict=True)])
    return Batch(
        input_ids=out,
        attention_mask=attention,
        position_ids=(attention.cumsum(1) - 1).clamp_min(0),
        response_mask=response_mask,
        rewards=rewards,
        group_index=torch.arange(len(rows)).repeat_interleave(group_size),
        texts=texts,
    )


def response_token_stats(model: Any, batch: Batch, temperature: float) -> TokenStats:
    """Token statistics of ``model`` at every valid response token of ``batch``, ``[N]`` each.

    Hidden state at position i predicts token i+1, so the states one left of each response token
    are taken; the LM head is applied by the streamed statistics, never as ``[N, V]`` logits.
    """
    hidden = model.model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).last_hidden_state
    targets = batch.response_mask[:, 1:]
    h = hidden[:, :-1][targets]
    tokens = batch.input_ids[:, 1:][targets]
    return token_stats_from_hidden(h, model.lm_head.weight, tokens, temperature)


def token_advantages(batch: Batch) -> tuple[Tensor, Tensor]:
    """GRPO advantages broadcast to valid response tokens ``[N]``, and the zero-variance fraction."""
    adv, zero_frac = grpo_advantages(batch.rewards, batch.group_index)
    per_token = adv[:, None].expand_as(batch.response_mask)[:, 1:][batch.response_mask[:, 1:]]
    return per_token, zero_frac


def learner_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    behaviour_logprobs: Tensor,
    settings: LoopSettings,
) -> dict[str, float]:
    """One optimisation step on ``batch`` with the method's mask; metrics as floats."""
    clip_method, weighted = METHODS[settings.method]
    stats = response_token_stats(model, batch, settings.temperature)
    advantages, zero_frac = token_advantages(batch)
    valid = torch.ones_like(advantages, dtype=torch.bool)
    ratio = (stats.logp.detach() - behaviour_logprobs).exp()
    keep = None
    if clip_method != "none":
        keep = clip_mask(
            clip_method,
            "symmetric",
            settings.mu,
            stats.s_star,
            stats.s_expect,
            advantages,
            valid,
            ratio=ratio if weighted else None,
        )
    loss_cfg = LossConfig(clip_eps_low=settings.clip_eps, clip_eps_high=settings.clip_eps)
    loss, metrics = policy_loss(
        LossInputs(
            logprobs=stats.logp,
            behaviour_logprobs=behaviour_logprobs,
            advantages=advantages,
            loss_mask=valid,
            keep_mask=keep,
        ),
        loss_cfg,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    metrics.update(entropy_metrics(stats, advantages, valid, ratio=ratio, keep_mask=keep))
    metrics["grad_norm"] = grad_norm.detach()
    metrics["zero_variance_frac"] = zero_frac
    metrics["reward_mean"] = batch.rewards.mean()
    metrics["tokens"] = torch.tensor(float(advantages.numel()))
    return {k.removeprefix("driftrl_learner_"): float(v) for k, v in metrics.items()}


def run_rl(
    model: Any, tokenizer: Any, train_rows: list[dict[str, Any]], settings: LoopSettings
) -> list[dict[str, float]]:
    """Train ``model`` in place for ``settings.steps`` steps; per-step metrics.

    The prompt sequence and the sampling seeds depend only on ``settings.seed``, so every method of
    a seed starts from the same first batch.
    """
    if settings.method not in METHODS:
        raise ValueError(f"unknown method {settings.method!r}; expected one of {sorted(METHODS)}")
    rng = random.Random(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    behaviour = copy.deepcopy(model).eval()
    # versions[0] is the policy of `staleness` steps ago (or the start)
    versions: deque[dict[str, Tensor]] = deque(maxlen=settings.staleness + 1)
    history = []
    for step in range(settings.steps):
        versions.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        behaviour.load_state_dict(versions[0])
        rows = rng.sample(train_rows, settings.prompts_per_step)
        batch = sample_batch(
            behaviour,
            tokenizer,
            rows,
            settings.group_size,
            settings.temperature,
            settings.max_new_tokens,
            generator_seed=settings.seed * 1_000_003 + step,
        )
        with torch.no_grad():
            behaviour_logprobs = response_token_stats(behaviour, batch, settings.temperature).logp
        model.train()
        metrics = learner_step(model, optimizer, batch, behaviour_logprobs, settings)
        metrics["step"] = step
        metrics["staleness"] = step - max(0, step - settings.staleness)
        history.append(metrics)
    model.eval()
    return history


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two ``[N]`` tensors (float64)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / den if den > 0 else float("nan")


def _float64_logprobs(model: Any, batch: Batch, temperature: float) -> Tensor:
    """``[N, V]`` float64 log-probabilities at the valid response positions of a float64 model.

    The learner's statistics accumulate in float32 (enough for training); entropy *differences* of
    a small step are ~1e-6 and drown in float32 rounding, so the check measures them in float64.
    """
    hidden = model.model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).last_hidden_state
    logits = model.lm_head(hidden[:, :-1][batch.response_mask[:, 1:]])
    return torch.log_softmax(logits.double() / temperature, dim=-1)


def _entropy(logprobs: Tensor) -> Tensor:
    return -(logprobs.exp() * logprobs).sum(-1)


def entropy_change_check(
    model: Any, batch: Batch, lr: float, temperature: float = 1.0, eps: float = 1e-3
) -> dict[str, Any]:
    """Realised vs predicted per-token entropy change of one real policy-gradient step.

    On a float64 copy of the model, one SGD step of the on-policy token-mean PG loss
    ``−mean_t A_t log p_t`` (r = 1) with learning rate ``lr``. For every response token t:

    * ``realised``: ``H_t(θ') − H_t(θ)``, the entropy at that position before and after the step;
    * ``paper``: ``−A_t Sc_t`` (ALGORITHM.md §2; the per-token prediction if each position's logits
      moved alone, up to the positive factor η/N), with ``Sc`` from the learner's statistics;
    * ``first_order``: ``∇_θ H_t · Δθ`` by central finite difference along the actual step (the
      exact linearisation, including the coupling of positions through shared parameters).

    SGD rather than Adam because the theory is about gradient steps; Adam rescales each
    parameter's step and the logit-space prediction would no longer apply even to first order.
    """
    m = copy.deepcopy(model).double().train()
    params = [p for p in m.parameters() if p.requires_grad]
    targets = batch.input_ids[:, 1:][batch.response_mask[:, 1:]]
    advantages, _ = token_advantages(batch)
    with torch.no_grad():
        s_centered = response_token_stats(model, batch, temperature).s_centered.double()
    logprobs = _float64_logprobs(m, batch, temperature)
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)
    loss = -(advantages.double() * logp).mean()
    step = [-lr * g for g in torch.autograd.grad(loss, params)]
    h0 = _entropy(logprobs.detach())

    def entropy_at(scale: float) -> Tensor:
        with torch.no_grad():
            for p, d in zip(params, step, strict=True):
                p.add_(scale * d)
            h = _entropy(_float64_logprobs(m, batch, temperature))
            for p, d in zip(params, step, strict=True):
                p.sub_(scale * d)
        return h

    realised = entropy_at(1.0) - h0
    first_order = (entropy_at(eps) - entropy_at(-eps)) / (2 * eps)
    paper = -(advantages.double() * s_centered)
    nonzero = advantages != 0
    return {
        "tokens": int(realised.numel()),
        "tokens_nonzero_advantage": int(nonzero.sum()),
        "lr": lr,
        "corr_realised_vs_first_order": pearson(realised, first_order),
        "corr_realised_vs_paper": pearson(realised, paper),
        "corr_realised_vs_paper_nonzero_adv": pearson(realised[nonzero], paper[nonzero]),
        "corr_first_order_vs_paper": pearson(first_order, paper),
        "mean_realised": float(realised.mean()),
        "mean_first_order": float(first_order.mean()),
        "mean_paper": float(paper.mean()),
        "sign_agreement_realised_vs_paper": float(((realised > 0) == (paper > 0))[nonzero].double().mean()),
        "realised": realised.tolist(),
        "first_order": first_order.tolist(),
        "paper": paper.tolist(),
    }


def sample_k_correct(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> list[list[bool]]:
    """``[q][j]`` exact-match verdicts of K sampled responses per held-out question."""
    batch = sample_batch(model, tokenizer, rows, k, temperature, max_new_tokens, generator_seed=seed)
    verdicts = batch.rewards.bool().view(len(rows), k)
    return verdicts.tolist()
