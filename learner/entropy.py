"""Per-token entropy-dynamics statistics of a softmax policy (ALGORITHM.md §1).

For one response token with logits ``z`` (already divided by the sampling temperature ``T``),
``p = softmax(z)`` and sampled token ``k``, the learner needs

* ``logp = log p_k`` (the only quantity that carries gradient),
* ``entropy = H = -Σ_i p_i log p_i``,
* ``s_star = S*_k = p_k (H + log p_k)``: ``ΔH = -ε S*_k`` for a single-logit step ``δz = ε e_k``,
* ``s_expect = E_p[S] = Σ_i p_i S_i = H Σ_i p_i² + Σ_i p_i² log p_i``.

A policy-gradient step ``δz = α (e_k - p)`` changes the entropy by ``-α (S*_k - E_p[S])`` to first
order (Wang et al. 2026, arXiv 2602.03392, §3; ALGORITHM.md §2).

Two entry points give the same numbers:

* :func:`token_stats` from materialised logits ``[N, V]`` (small models, tests, reference);
* :func:`token_stats_from_hidden` from the final hidden states and the LM-head weight, streaming
  over vocabulary chunks with an online log-sum-exp, so no ``[N, V]`` float32 tensor exists in the
  forward or the backward pass. That is the learner's path.

Batch statistics of these per-token values (ALGORITHM.md §3, §5) are over the whole optimisation
batch ``T_B``, across data-parallel ranks: :func:`global_moments` gives exact global means,
population standard deviations and covariances from two SUM all-reduces, and
:func:`entropy_step_scale` the step size that turns the per-unit-step prediction into nats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from learner.bad_values import raise_on_bad_values

DEFAULT_CHUNK_SIZE = 4096


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics, each ``[N]`` float32.

    Attributes:
        logp: ``log p_k`` under ``softmax(z / T)``; differentiable w.r.t. the inputs.
        entropy: ``H``; no gradient.
        s_star: ``S*_k = p_k (H + log p_k)``; no gradient.
        s_expect: ``E_p[S] = H Σ p² + Σ p² log p``; no gradient.
    """

    logp: Tensor
    entropy: Tensor
    s_star: Tensor
    s_expect: Tensor

    @property
    def s_centered(self) -> Tensor:
        """``Sc = S*_k - E_p[S]``, ``[N]`` float32; zero in expectation under on-policy sampling."""
        return self.s_star - self.s_expect


def _check_tokens(tokens: Tensor, n: int, vocab_size: int) -> Tensor:
    """Shape/dtype checks of ``tokens``; returns the bool tensor of out-of-range entries."""
    if tokens.dim() != 1 or tokens.shape[0] != n:
        raise ValueError(f"tokens: expected shape [{n}], got {list(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens: expected an integer dtype, got {tokens.dtype}")
    return (tokens < 0) | (tokens >= vocab_size)


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")


def _scores(logp: Tensor, entropy: Tensor, sum_p2: Tensor, sum_p2_logp: Tensor) -> tuple[Tensor, Tensor]:
    """``(S*_k, E_p[S])`` from the per-token sums, ALGORITHM.md §1 (all ``[N]`` float32, no grad)."""
    s_star = logp.exp() * (entropy + logp)
    s_expect = entropy * sum_p2 + sum_p2_logp
    return s_star, s_expect


def token_stats(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> TokenStats:
    """Token statistics from materialised logits.

    This path upcasts the whole ``[N, V]`` logits to float32 (several temporaries of that size);
    use :func:`token_stats_from_hidden` when ``N * V`` is large.

    Args:
        logits: ``[N, V]``, any float dtype, **before** the temperature division.
        tokens: ``[N]`` integer, the sampled token ids, ``0 <= tokens < V``.
        temperature: the sampling temperature ``T``; the distribution is ``softmax(logits / T)``.

    Returns:
        :class:`TokenStats`, each ``[N]`` float32; ``logp`` carries gradient to ``logits``.

    Raises:
        ValueError: non-finite logits, tokens out of range, shape mismatch (names the first index).
    """
    if logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits: expected a float [N, V] tensor, got {logits.dtype} {list(logits.shape)}")
    _check_temperature(temperature)
    n, vocab_size = logits.shape
    raise_on_bad_values(
        {
            "logits (non-finite)": ~torch.isfinite(logits.detach()),
            f"tokens (outside [0, {vocab_size}))": _check_tokens(tokens, n, vocab_size),
        }
    )
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = log_probs.gather(1, tokens.long()[:, None]).squeeze(1)
    with torch.no_grad():
        log_probs = log_probs.detach()
        probs = log_probs.exp()
        entropy = -(probs * log_probs).sum(-1)
        probs_sq = probs * probs
        s_star, s_expect = _scores(logp.detach(), entropy, probs_sq.sum(-1), (probs_sq * log_probs).sum(-1))
    return TokenStats(logp=logp, entropy=entropy, s_star=s_star, s_expect=s_expect)


def _online_sums(
    hidden32: Tensor, weight: Tensor, tokens: Tensor, temperature: float, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One streaming pass over vocabulary chunks (online softmax, Milakov & Gimelshein 2018).

    Relative to the running max ``m`` it keeps, per token, ``a = Σ e_i``, ``b = Σ e_i u_i``,
    ``c = Σ e_i²``, ``d = Σ e_i² u_i`` with ``u_i = z_i - m`` and ``e_i = exp(u_i)``. When ``m``
    grows to ``m'`` (``δ = m - m' <= 0``): ``u_i' = u_i + δ``, so ``a' = e^δ a``,
    ``b' = e^δ (b + δ a)``, ``c' = e^{2δ} c``, ``d' = e^{2δ} (d + δ c)``.

    Returns:
        ``(m, a, b, c, d, z_k)``, each ``[N]`` float32, ``z_k`` the sampled token's scaled logit.
    """
    n = hidden32.shape[0]
    vocab_size = weight.shape[0]
    m = a = b = c = d = None
    z_k = hidden32.new_zeros(n)
    for start in range(0, vocab_size, chunk_size):
        z = hidden32 @ weight[start : start + chunk_size].float().T
        z /= temperature
        width = z.shape[1]
        in_chunk = (tokens >= start) & (tokens < start + width)
        # clamp keeps gather in range for tokens of other chunks; where() then discards them
        cols = (tokens - start).clamp(0, width - 1)[:, None]
        z_k += torch.where(in_chunk, z.gather(1, cols).squeeze(1), 0.0)
        chunk_max = z.amax(dim=1)
        if m is None:
            m_new = chunk_max
        else:
            m_new = torch.maximum(m, chunk_max)
            delta = m - m_new
            scale = delta.exp()
            scale_sq = scale * scale
            a, b = a * scale, (b + delta * a) * scale
            c, d = c * scale_sq, (d + delta * c) * scale_sq
        z -= m_new[:, None]
        e = z.exp()
        a_k = e.sum(1)
        b_k = (e * z).sum(1)
        e *= e
        c_k = e.sum(1)
        d_k = (e * z).sum(1)
        if m is None:
            a, b, c, d = a_k, b_k, c_k, d_k
        else:
            a, b, c, d = a + a_k, b + b_k, c + c_k, d + d_k
        m = m_new
    return m, a, b, c, d, z_k


class _StreamedTokenStats(torch.autograd.Function):
    """Autograd function: forward streams the vocabulary; backward recomputes each chunk.

    ``d logp_t / d z_{t,i} = (1[i = k_t] - p_{t,i}) / T`` with ``z = h Wᵀ`` (unscaled), so with the
    upstream gradient ``g``: ``grad_h = (g/T) (W_k - Σ_i p_i W_i)`` and
    ``grad_W[i] = Σ_t (g_t/T) (1[i = k_t] - p_{t,i}) h_t``, both formed chunk by chunk.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        tokens: Tensor,
        temperature: float,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        hidden32 = hidden.float()
        m, a, b, c, d, z_k = _online_sums(hidden32, weight, tokens, temperature, chunk_size)
        log_a = a.log()
        lse = m + log_a
        logp = z_k - lse
        # Σ p log p = b/a - log a;  Σ p² = c/a²;  Σ p² log p = d/a² - (c/a²) log a
        entropy = log_a - b / a
        sum_p2 = c / (a * a)
        sum_p2_logp = d / (a * a) - sum_p2 * log_a
        s_star, s_expect = _scores(logp, entropy, sum_p2, sum_p2_logp)
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy, s_star, s_expect)
        return logp, entropy, s_star, s_expect

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_logp: Tensor, *_unused: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        hidden, weight, tokens, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        hidden32 = hidden.float()
        g = grad_logp.float() / temperature
        grad_hidden = torch.zeros_like(hidden32) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        for start in range(0, weight.shape[0], chunk_size):
            w32 = weight[start : start + chunk_size].float()
            coef = hidden32 @ w32.T
            coef /= temperature
            coef -= lse[:, None]
            coef.exp_()
            coef *= -g[:, None]
            width = coef.shape[1]
            in_chunk = (tokens >= start) & (tokens < start + width)
            cols = (tokens - start).clamp(0, width - 1)[:, None]
            coef.scatter_add_(1, cols, torch.where(in_chunk, g, 0.0)[:, None])
            if grad_hidden is not None:
                grad_hidden.addmm_(coef, w32)
            if grad_weight is not None:
                grad_weight[start : start + width] = coef.T @ hidden32
        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight,
            None,
            None,
            None,
        )


def token_stats_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TokenStats:
    """Token statistics of ``softmax(hidden @ lm_head_weightᵀ / T)`` without materialising the logits.

    The forward pass streams over vocabulary chunks of ``chunk_size`` rows of the weight with an
    online log-sum-exp that also accumulates ``Σ p log p``, ``Σ p²`` and ``Σ p² log p``; the
    backward pass of ``logp`` recomputes each chunk's probabilities from the saved log-sum-exp.
    Logits are formed in float32 from the (possibly bf16) inputs and all sums accumulate in float32.

    Memory: besides the inputs, the saved ``[N]`` log-sum-exp and the gradients themselves
    (``[N, d]`` float32 for ``hidden``, ``[V, d]`` in the weight's dtype), the peak is a few
    ``[N, chunk_size]`` float32 temporaries plus one ``[chunk_size, d]`` float32 weight slice:
    ``O(N * chunk_size)``, independent of ``V``. Choose ``chunk_size`` so that ``N * chunk_size``
    fits; it need not divide ``V``.

    On CUDA inputs the fused kernel ``learner.fused_stats.fused_token_stats`` is used when that
    module exists (same numbers, same autograd contract).

    Args:
        hidden: ``[N, d]`` final hidden states (after the final norm), float32 or bf16.
        lm_head_weight: ``[V, d]`` LM-head weight, same device.
        tokens: ``[N]`` integer sampled token ids, ``0 <= tokens < V``.
        temperature: sampling temperature ``T``.
        chunk_size: vocabulary rows per streamed chunk, ``>= 1``.

    Returns:
        :class:`TokenStats`, each ``[N]`` float32; ``logp`` carries gradient to ``hidden`` and
        ``lm_head_weight``.

    Raises:
        ValueError: shape mismatch, tokens out of range, non-finite logits (names the first index).
    """
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden [N, d] and lm_head_weight [V, d] disagree: {list(hidden.shape)} vs "
            f"{list(lm_head_weight.shape)}"
        )
    if not (hidden.dtype.is_floating_point and lm_head_weight.dtype.is_floating_point):
        raise ValueError(
            f"hidden/lm_head_weight: expected float dtypes, got {hidden.dtype}/{lm_head_weight.dtype}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    _check_temperature(temperature)
    n, vocab_size = hidden.shape[0], lm_head_weight.shape[0]
    bad_tokens = _check_tokens(tokens, n, vocab_size)
    if hidden.is_cuda:
        try:
            from learner.fused_stats import fused_token_stats
        except ModuleNotFoundError as err:
            # only the absence of the optional kernel module falls back; a broken kernel stays loud
            if err.name != "learner.fused_stats":
                raise
        else:
            raise_on_bad_values({f"tokens (outside [0, {vocab_size}))": bad_tokens})
            out = fused_token_stats(hidden, lm_head_weight, tokens, temperature)
            return out if isinstance(out, TokenStats) else TokenStats(*out)
    tokens = tokens.long()
    # out-of-range tokens never match a chunk, so the pass runs and the check below reports them;
    # checking after the pass costs one sync for both checks instead of two
    logp, entropy, s_star, s_expect = _StreamedTokenStats.apply(
        hidden, lm_head_weight, tokens, temperature, chunk_size
    )
    raise_on_bad_values(
        {
            f"tokens (outside [0, {vocab_size}))": bad_tokens,
            "logits (hidden @ lm_head_weight.T non-finite)": ~torch.isfinite(logp.detach() + entropy),
        }
    )
    return TokenStats(logp=logp, entropy=entropy, s_star=s_star, s_expect=s_expect)


# sums a float64 vector over the data-parallel ranks (``dist.all_reduce(SUM)``); identity on one rank
SumAllReduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class GlobalMoments:
    """Moments over the valid tokens of every rank, float64 0-d tensors, identical on every rank.

    Attributes:
        count: ``|T_B|``, the valid tokens of all ranks.
        mean: column name -> ``mean_t x_t``.
        std: column name -> population ``σ(x) = sqrt(mean_t (x_t - mean x)²)`` (names asked for).
        cov: ``(a, b)`` -> population ``Cov(a, b) = mean_t (a_t - mean a)(b_t - mean b)``.
    """

    count: Tensor
    mean: dict[str, Tensor]
    std: dict[str, Tensor]
    cov: dict[tuple[str, str], Tensor]


def global_moments(
    columns: Mapping[str, Tensor],
    valid: Tensor,
    stds: Sequence[str] = (),
    covariances: Sequence[tuple[str, str]] = (),
    sum_all_reduce: SumAllReduce | None = None,
) -> GlobalMoments:
    """Exact global means, stds and covariances of per-token columns over all ranks' valid tokens.

    Two passes, each one SUM all-reduce of a small float64 vector: ``(count, Σx)`` gives the global
    means, then ``Σ(x - mean)²`` and ``Σ(a - mean a)(b - mean b)`` around those means give the
    spreads. Averaging per-rank stds or covariances (even token-weighted) misses the spread of the
    rank means and is exact only on one rank; centring on the global mean first also avoids the
    cancellation of ``Σx²/n - mean²``. Every rank must call it with the same column names.

    Args:
        columns: name -> ``[N]`` float tensor of this rank's tokens (entries off ``valid`` ignored,
            even non-finite ones).
        valid: ``[N]`` bool, this rank's tokens of ``T_B`` (padding False).
        stds: names whose population std is wanted.
        covariances: ``(a, b)`` name pairs whose population covariance is wanted.
        sum_all_reduce: sums a vector over the ranks; ``None`` = this rank holds the whole batch.

    Returns:
        :class:`GlobalMoments`; an empty batch gives zeros (means, stds and covariances).
    """
    reduce = sum_all_reduce if sum_all_reduce is not None else (lambda x: x)
    names = list(columns)
    x = {n: torch.where(valid, columns[n].detach().double(), 0.0) for n in names}
    firsts = reduce(torch.stack([valid.sum().double(), *(x[n].sum() for n in names)]))
    count = firsts[0]
    mean = dict(zip(names, (firsts[1:] / count.clamp_min(1)).unbind(0), strict=True))
    spread_names = {*stds, *(n for pair in covariances for n in pair)}
    centred = {n: torch.where(valid, x[n] - mean[n], 0.0) for n in spread_names}
    seconds = [(centred[n] * centred[n]).sum() for n in stds]
    seconds += [(centred[a] * centred[b]).sum() for a, b in covariances]
    if not seconds:
        return GlobalMoments(count=count, mean=mean, std={}, cov={})
    spread = (reduce(torch.stack(seconds)) / count.clamp_min(1)).unbind(0)
    std = {n: v.clamp_min(0).sqrt() for n, v in zip(stds, spread[: len(stds)], strict=True)}
    cov = dict(zip(covariances, spread[len(stds) :], strict=True))
    return GlobalMoments(count=count, mean=mean, std=std, cov=cov)


def entropy_step_scale(update_norm: Tensor | float, grad_norm: Tensor | float) -> Tensor:
    """Step size ``η_eff = ‖Δθ‖ / ‖g‖`` of one optimizer step, float64 0-d (NaN when ``‖g‖ = 0``).

    ALGORITHM.md §2's batch law ``ΔH ≈ -η mean_t(r_t A_t Sc_t)`` is stated for a gradient step
    ``Δθ = -η g``; ``η_eff`` is the ``η`` of that law recovered from the step actually taken: the
    norm of the parameter change over the norm of the (pre-clip) gradient of the loss. For SGD it is
    exactly ``η`` times the gradient-clip factor ``min(1, c/‖g‖)``. For Adam(W) it is an
    approximation: Adam's step is the gradient rescaled per coordinate (not parallel to ``g``), so
    ``η_eff`` is the size of an SGD step of the same length, not the same direction.

    Args:
        update_norm: ``‖θ_after - θ_before‖₂`` over every trainable parameter of every rank.
        grad_norm: ``‖g‖₂``, the global gradient norm before clipping.
    """
    update = torch.as_tensor(update_norm, dtype=torch.float64)
    grad = torch.as_tensor(grad_norm, dtype=torch.float64)
    return torch.where(grad > 0, update / grad, torch.nan)
