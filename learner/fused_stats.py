"""Fused token statistics from hidden states and the LM head, on the GPU (issue 9).

Computes, per token, ``logp = log p_k``, the entropy ``H``, ``S*_k = p_k (H + log p_k)`` and
``E_p[S] = H Σ p_i² + Σ p_i² log p_i`` (ALGORITHM.md §1) for ``p = softmax(h Wᵀ / T)``, together
with ``lse = logsumexp(h Wᵀ / T)``, without ever writing the ``[N, V]`` logits. Only ``logp``
carries gradient. :func:`learner.entropy.token_stats_from_hidden` dispatches here for CUDA
tensors; its torch chunked path stays the CPU default and the reference these kernels are tested
against (``tests/learner/test_fused_stats.py`` runs them on CPU with ``TRITON_INTERPRET=1``).

Design
------
Forward (one Triton kernel, then an ``O(S·N)`` combine in torch). The grid is
``(⌈N / BLOCK_N⌉, S)``: program ``(i, s)`` owns ``BLOCK_N`` tokens and the vocabulary split
``[s·V_SPLIT, (s+1)·V_SPLIT)``. It walks that split in ``BLOCK_V`` tiles; each logit tile
``z = h Wᵀ / T`` (``[BLOCK_N, BLOCK_V]``, float32 accumulation of bf16/fp32 inputs) is built by a
``BLOCK_D`` loop of ``tl.dot`` and lives only in registers. An online softmax keeps, relative to a
running max ``m`` and with ``u = z − m``, ``e = exp(u)``:
``a = Σ e``, ``b = Σ e u``, ``c = Σ e²``, ``d = Σ e² u``. When ``m`` grows by ``−δ`` (``δ ≤ 0``):
``a ← e^δ a``, ``b ← e^δ (b + δ a)``, ``c ← e^{2δ} c``, ``d ← e^{2δ} (d + δ c)``. Sums relative to
``m`` (rather than ``Σ e z``) avoid cancelling large logits. The split's ``(m, a, b, c, d)`` go to
a ``[5, S, N]`` float32 buffer and the sampled token's logit to ``z_k [N]`` (exactly one split
holds each token, so no atomics); the same rescaling merges the ``S`` splits. Then, with
``lse = m + log a``:
``logp = z_k − lse``, ``H = log a − b/a``, ``Σp² = c/a²``, ``Σp² log p = d/a² − Σp² log a``.
Splitting the vocabulary keeps the grid large at small ``N`` (H100 has 132 SMs; ``N = 8192``
with ``BLOCK_N = 128`` is only 64 row blocks) at no extra traffic: ``h`` is re-read from L2 for
every tile anyway, since a ``[BLOCK_N, d]`` row block (0.9 MB at ``d = 3584``) fits no SM.

Backward of ``Σ_t g_t logp_t``: ``dz_{t,i} = g_t (1[i = k_t] − p_{t,i}) / T``,
``grad_h = dz W``, ``grad_W = dzᵀ h``. The vocabulary is processed in chunks of ``VC`` columns:
a Triton kernel recomputes each ``[BLOCK_N, BLOCK_V]`` logit tile of the chunk, turns it into
``dz`` with the saved ``lse`` and writes it to a ``[N, VC]`` slab in the input dtype; two cuBLAS
GEMMs then give ``grad_W[chunk] = slabᵀ h`` (written straight into the gradient, float32
accumulation over all ``N`` inside the GEMM) and ``grad_h += slab W[chunk]`` (float32
accumulator). ``VC`` is chosen so the slab stays within ``dlogits_budget_bytes`` (default
128 MiB): the slab shrinks as ``N`` grows, so it is flat in ``N``. That is 4 GEMM-sized passes
in all (forward, recompute, two gradient GEMMs) against 3 for materialised logits.

Determinism: there are no atomics. Each ``grad_W`` row is one GEMM over all tokens; each
``grad_h`` row is a float32 sum over the chunks in a fixed order; the forward merge is a fixed
reduction over splits. Results are bitwise reproducible for a given shape and block
configuration (the autotuner picks one per process and hidden size; the tile shape sets the
summation order, as cuBLAS's algorithm choice does for its GEMMs).
The alternative (one backward kernel over ``(N, V)`` tiles adding both gradients with fp32
atomics, as Apple's Cut Cross-Entropy does) saves the slab round trip but is not reproducible.

Memory beyond inputs and gradients: forward ``5·S·N`` floats of split sums and a few ``[N]``
vectors (``S = ⌈V / 4096⌉``, 38 for Qwen2.5's 152064); backward the slab
(``dlogits_budget_bytes``), the float32 ``grad_h`` accumulator (``4·N·d`` bytes, none extra when
``hidden`` is float32: it is the gradient) and, for bf16, one ``grad_h`` GEMM output block of at
most 32 MiB. Never ``O(N·V)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from learner.bad_values import raise_on_bad_values

try:
    import triton
    import triton.language as tl
except ModuleNotFoundError:  # the CPU path (learner.entropy) must work without triton
    triton = None
    tl = None

DEFAULT_DLOGITS_BUDGET_BYTES = 128 * 2**20
# bf16 partial products of grad_h are formed this many bytes at a time before the fp32 add
_GRAD_HIDDEN_BLOCK_BYTES = 32 * 2**20
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if triton is not None:
    # the online-softmax state starts at a finite "minus infinity": exp(δ) = 0 and δ·0 = 0, no NaN
    _MINUS_BIG: tl.constexpr = tl.constexpr(-1.0e30)
    _INTERPRET = bool(triton.knobs.runtime.interpret)
    # vocabulary columns per forward program; every BLOCK_V below divides it
    _V_SPLIT = 64 if _INTERPRET else 4096
    # tiny tiles under the CPU interpreter (its cost grows with the tile), H100-sized otherwise
    _INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}
    _GPU_CONFIGS = [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
    ]

    @triton.jit
    def _logits_tile(
        hidden_ptr,
        weight_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        hidden_dim,
        stride_hn,
        stride_hd,
        stride_wv,
        stride_wd,
        inv_temperature,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
        COMPUTE_DTYPE: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """``z = h[rows] W[cols]ᵀ / T`` as a float32 ``[BLOCK_N, BLOCK_V]`` register tile."""
        # int64 offsets: V·d exceeds 2^31 for large vocabularies and hidden sizes
        h_rows = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hn
        w_rows = weight_ptr + cols.to(tl.int64)[None, :] * stride_wv
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, hidden_dim, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_mask = dims < hidden_dim
            h = tl.load(h_rows + dims[None, :] * stride_hd, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
            w = tl.load(w_rows + dims[:, None] * stride_wd, mask=dim_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(h.to(COMPUTE_DTYPE), w.to(COMPUTE_DTYPE), acc, input_precision=INPUT_PRECISION)
        return acc * inv_temperature

    @triton.jit
    def _to_storage_dtype(x, DTYPE: tl.constexpr):
        """Cast a float32 tile for storing, rounding to nearest-even for bf16 explicitly.

        The GPU rounds fp32 -> bf16 to nearest-even anyway; triton 3.9's CPU interpreter
        truncates, which would double the slab's rounding error in the tests. Doing the rounding
        on the bits gives the same result on both (finite inputs: dz is finite).
        """
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + (0x7FFF + ((bits >> 16) & 1))
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DTYPE)

    @triton.jit
    def _token_stats_fwd_kernel(
        hidden_ptr,
        weight_ptr,
        tokens_ptr,
        partials_ptr,
        z_token_ptr,
        n_tokens,
        vocab_size,
        hidden_dim,
        stride_hn,
        stride_hd,
        stride_wv,
        stride_wd,
        inv_temperature,
        V_SPLIT: tl.constexpr,
        COMPUTE_DTYPE: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Online-softmax sums of one (row block, vocabulary split); see the module docstring."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_tokens
        tokens = tl.load(tokens_ptr + rows, mask=row_mask, other=-1)
        v_lo = pid_s * V_SPLIT
        v_hi = tl.minimum(v_lo + V_SPLIT, vocab_size)
        m = tl.full([BLOCK_N], _MINUS_BIG, tl.float32)
        a = tl.zeros([BLOCK_N], tl.float32)
        b = tl.zeros([BLOCK_N], tl.float32)
        c = tl.zeros([BLOCK_N], tl.float32)
        d = tl.zeros([BLOCK_N], tl.float32)
        z_token = tl.zeros([BLOCK_N], tl.float32)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < v_hi
            z = _logits_tile(
                hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask, hidden_dim,
                stride_hn, stride_hd, stride_wv, stride_wd, inv_temperature,
                BLOCK_N, BLOCK_V, BLOCK_D, COMPUTE_DTYPE, INPUT_PRECISION,
            )  # fmt: skip
            z_token += tl.sum(tl.where(cols[None, :] == tokens[:, None], z, 0.0), axis=1)
            z = tl.where(col_mask[None, :], z, _MINUS_BIG)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            delta = m - m_new
            scale = tl.exp(delta)
            scale_sq = scale * scale
            u = z - m_new[:, None]
            e = tl.where(col_mask[None, :], tl.exp(u), 0.0)
            eu = e * u
            b = (b + delta * a) * scale + tl.sum(eu, axis=1)
            a = a * scale + tl.sum(e, axis=1)
            d = (d + delta * c) * scale_sq + tl.sum(e * eu, axis=1)
            c = c * scale_sq + tl.sum(e * e, axis=1)
            m = m_new
        plane = tl.num_programs(1) * n_tokens
        out = partials_ptr + pid_s * n_tokens + rows
        tl.store(out, m, mask=row_mask)
        tl.store(out + plane, a, mask=row_mask)
        tl.store(out + 2 * plane, b, mask=row_mask)
        tl.store(out + 3 * plane, c, mask=row_mask)
        tl.store(out + 4 * plane, d, mask=row_mask)
        # exactly one split holds each in-range token; out-of-range tokens are never written
        in_split = (tokens >= v_lo) & (tokens < v_hi)
        tl.store(z_token_ptr + rows, z_token, mask=row_mask & in_split)

    @triton.jit
    def _dlogits_kernel(
        hidden_ptr,
        weight_ptr,
        tokens_ptr,
        lse_ptr,
        grad_scaled_ptr,
        dlogits_ptr,
        n_tokens,
        v_start,
        v_width,
        hidden_dim,
        stride_hn,
        stride_hd,
        stride_wv,
        stride_wd,
        stride_dn,
        inv_temperature,
        COMPUTE_DTYPE: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """``dz = (g/T) (1[i = k] − exp(z − lse))`` for one tile of the chunk ``[v_start, v_start + v_width)``."""
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_tokens
        local_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = local_cols < v_width
        cols = v_start + local_cols
        z = _logits_tile(
            hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask, hidden_dim,
            stride_hn, stride_hd, stride_wv, stride_wd, inv_temperature,
            BLOCK_N, BLOCK_V, BLOCK_D, COMPUTE_DTYPE, INPUT_PRECISION,
        )  # fmt: skip
        tokens = tl.load(tokens_ptr + rows, mask=row_mask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        grad_scaled = tl.load(grad_scaled_ptr + rows, mask=row_mask, other=0.0)
        one_hot = (cols[None, :] == tokens[:, None]).to(tl.float32)
        dz = grad_scaled[:, None] * (one_hot - tl.exp(z - lse[:, None]))
        out = dlogits_ptr + rows.to(tl.int64)[:, None] * stride_dn + local_cols[None, :]
        tl.store(out, _to_storage_dtype(dz, dlogits_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])

    if _INTERPRET:
        _fwd_launch, _dlogits_launch = _token_stats_fwd_kernel, _dlogits_kernel
        _fixed_blocks = _INTERPRETER_BLOCKS
    else:
        # tuned once per hidden size and dtype, not per N: token counts change every batch
        _fwd_launch = triton.autotune(_GPU_CONFIGS, key=["hidden_dim"])(_token_stats_fwd_kernel)
        _dlogits_launch = triton.autotune(_GPU_CONFIGS, key=["hidden_dim"])(_dlogits_kernel)
        _fixed_blocks = {}

    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dot_config(hidden: Tensor, weight: Tensor) -> tuple[torch.dtype, dict[str, object]]:
    """Dtype the tiles are multiplied in, and the kernels' dtype/precision constexprs.

    Mixed input dtypes meet in the wider one (cast per tile, no copy). Float32 uses IEEE products
    unless the caller enabled TF32 for matmuls, matching what ``torch.matmul`` would do.
    """
    compute = torch.promote_types(hidden.dtype, weight.dtype)
    precision = "tf32" if compute == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    # triton 3.9's interpreter multiplies bf16 tiles as their uint16 storage (create_dot has no
    # bf16 case), so there the tiles are upcast first: bf16·bf16 products are exact in float32
    # and the GPU's bf16 dot accumulates in float32, so only the summation order differs
    dot_dtype = torch.float32 if _INTERPRET else compute
    return compute, {"COMPUTE_DTYPE": _TL_DTYPES[dot_dtype], "INPUT_PRECISION": precision}


def _forward(hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, ...]:
    """Kernel launch and split merge; returns ``(logp, entropy, s_star, s_expect, lse)``, ``[N]`` fp32."""
    n, vocab_size = hidden.shape[0], weight.shape[0]
    num_splits = triton.cdiv(vocab_size, _V_SPLIT)
    partials = torch.empty(5, num_splits, n, device=hidden.device, dtype=torch.float32)
    z_token = torch.zeros(n, device=hidden.device, dtype=torch.float32)
    _, dtypes = _dot_config(hidden, weight)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), num_splits)  # noqa: E731
    _fwd_launch[grid](
        hidden, weight, tokens, partials, z_token, n, vocab_size, hidden.shape[1],
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), 1.0 / temperature,
        V_SPLIT=_V_SPLIT, **dtypes, **_fixed_blocks,
    )  # fmt: skip
    m_s, a_s, b_s, c_s, d_s = partials.unbind(0)
    m = m_s.amax(0)
    delta = m_s - m
    scale = delta.exp()
    scale_sq = scale * scale
    a = (scale * a_s).sum(0)
    b = (scale * (b_s + delta * a_s)).sum(0)
    c = (scale_sq * c_s).sum(0)
    d = (scale_sq * (d_s + delta * c_s)).sum(0)
    log_a = a.log()
    lse = m + log_a
    logp = z_token - lse
    entropy = log_a - b / a
    sum_p2 = c / (a * a)
    sum_p2_logp = d / (a * a) - sum_p2 * log_a
    s_star = logp.exp() * (entropy + logp)
    s_expect = entropy * sum_p2 + sum_p2_logp
    return logp, entropy, s_star, s_expect, lse


def _vocab_chunk(n: int, vocab_size: int, element_bytes: int, budget_bytes: int) -> int:
    """Columns of the ``[N, VC]`` dlogits slab: within the budget, a multiple of 256 when possible."""
    columns = max(1, budget_bytes // (max(n, 1) * element_bytes))
    if columns >= 256:
        columns -= columns % 256  # whole GPU tiles and aligned GEMM operands
    return min(columns, vocab_size)


def _backward(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    lse: Tensor,
    grad_logp: Tensor,
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
    budget_bytes: int,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``Σ_t g_t logp_t`` for ``hidden`` (its dtype) and ``weight`` (its dtype)."""
    n, hidden_dim = hidden.shape
    vocab_size = weight.shape[0]
    compute, dtypes = _dot_config(hidden, weight)
    grad_scaled = (grad_logp.float() / temperature).contiguous()
    chunk = _vocab_chunk(n, vocab_size, compute.itemsize, budget_bytes)
    slab_buffer = torch.empty(n, chunk, device=hidden.device, dtype=compute)
    hidden_c = hidden.to(compute)
    grad_hidden = torch.zeros(n, hidden_dim, device=hidden.device, dtype=torch.float32) if need_hidden else None
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None
    rows_per_block = max(1, _GRAD_HIDDEN_BLOCK_BYTES // (hidden_dim * compute.itemsize))
    for v_start in range(0, vocab_size, chunk):
        width = min(chunk, vocab_size - v_start)
        slab = slab_buffer[:, :width]
        grid = lambda meta, width=width: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(width, meta["BLOCK_V"]))  # noqa: E731
        _dlogits_launch[grid](
            hidden, weight, tokens, lse, grad_scaled, slab, n, v_start, width, hidden_dim,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), slab.stride(0),
            1.0 / temperature, **dtypes, **_fixed_blocks,
        )  # fmt: skip
        weight_chunk = weight[v_start : v_start + width].to(compute)
        if grad_weight is not None:
            rows = grad_weight[v_start : v_start + width]
            if grad_weight.dtype == compute:
                torch.mm(slab.T, hidden_c, out=rows)
            else:
                rows.copy_(slab.T @ hidden_c)
        if grad_hidden is not None:
            if compute == torch.float32:
                grad_hidden.addmm_(slab, weight_chunk)
            else:
                # the bf16/fp16 GEMM output is added to the fp32 accumulator block by block, so
                # its temporary stays bounded as N grows
                for r0 in range(0, n, rows_per_block):
                    grad_hidden[r0 : r0 + rows_per_block] += slab[r0 : r0 + rows_per_block] @ weight_chunk
    return (grad_hidden.to(hidden.dtype) if grad_hidden is not None else None), grad_weight


class _FusedTokenStats(torch.autograd.Function):
    """Autograd wrapper: forward kernel; backward recomputes logits tile by tile from ``lse``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        tokens: Tensor,
        temperature: float,
        budget_bytes: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        logp, entropy, s_star, s_expect, lse = _forward(hidden, weight, tokens, temperature)
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.temperature = temperature
        ctx.budget_bytes = budget_bytes
        ctx.mark_non_differentiable(entropy, s_star, s_expect, lse)
        return logp, entropy, s_star, s_expect, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_logp: Tensor, *_unused: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        hidden, weight, tokens, lse = ctx.saved_tensors
        grad_hidden, grad_weight = _backward(
            hidden, weight, tokens, lse, grad_logp, ctx.temperature,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.budget_bytes,
        )  # fmt: skip
        return grad_hidden, grad_weight, None, None, None


def _check_inputs(hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float, budget_bytes: int) -> None:
    """Shape, dtype, device and argument checks that need no device sync."""
    if triton is None:
        raise RuntimeError(
            "fused_token_stats needs triton; use learner.entropy.token_stats_from_hidden on CPU"
        )
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected [N, d], got shape {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected [V, {hidden.shape[1]}], got shape {list(weight.shape)}")
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name}: expected one of {_SUPPORTED_DTYPES}, got {tensor.dtype}")
        if not (tensor.is_cuda or _INTERPRET):
            raise ValueError(f"{name}: the fused kernel needs a CUDA tensor (or TRITON_INTERPRET=1)")
    if tokens.dim() != 1 or tokens.shape[0] != hidden.shape[0]:
        raise ValueError(f"tokens: expected shape [{hidden.shape[0]}], got {list(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens: expected an integer dtype, got {tokens.dtype}")
    if not (hidden.device == weight.device == tokens.device):
        raise ValueError(f"hidden/weight/tokens: devices differ ({hidden.device}, {weight.device}, {tokens.device})")
    if not (0 < temperature < math.inf):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    if budget_bytes < 1:
        raise ValueError(f"dlogits_budget_bytes: expected >= 1, got {budget_bytes}")
    if hidden.shape[0] == 0 or weight.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"hidden/weight: empty shapes {list(hidden.shape)}, {list(weight.shape)}")


def fused_token_stats(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    *,
    dlogits_budget_bytes: int = DEFAULT_DLOGITS_BUDGET_BYTES,
    return_lse: bool = False,
) -> tuple[Tensor, ...]:
    """Per-token ``(logp, entropy, s_star, s_expect)`` of ``softmax(hidden @ weightᵀ / T)``, fused.

    Same numbers and autograd contract as :func:`learner.entropy.token_stats_from_hidden` (which
    calls this for CUDA tensors); the ``[N, V]`` logits are never written (module docstring).

    Args:
        hidden: ``[N, d]`` final hidden states, float32/bf16/fp16, CUDA (or CPU under
            ``TRITON_INTERPRET=1``). Any strides.
        weight: ``[V, d]`` LM-head weight, float32/bf16/fp16, same device.
        tokens: ``[N]`` integer sampled token ids, ``0 <= tokens < V``.
        temperature: sampling temperature ``T > 0``; the distribution is ``softmax(z / T)``.
        dlogits_budget_bytes: size of the backward's ``[N, VC]`` dlogits slab, which sets ``VC``.
        return_lse: also return ``lse = logsumexp(z / T)`` ``[N]`` float32 (no gradient).

    Returns:
        ``(logp, entropy, s_star, s_expect)`` (then ``lse`` if asked), each ``[N]`` float32. Only
        ``logp`` carries gradient, to ``hidden`` and ``weight`` (in their dtypes).

    Raises:
        ValueError: bad shape, dtype, device or temperature; tokens out of range or non-finite
            logits (checked after the kernel, one device sync, naming the first bad index).
        RuntimeError: triton is not installed.
    """
    _check_inputs(hidden, weight, tokens, temperature, dlogits_budget_bytes)
    vocab_size = weight.shape[0]
    tokens = tokens.contiguous()
    # out-of-range tokens are only ever compared, never used as addresses, so the kernels run
    # safely and one sync afterwards reports both checks
    logp, entropy, s_star, s_expect, lse = _FusedTokenStats.apply(
        hidden, weight, tokens, temperature, dlogits_budget_bytes
    )
    raise_on_bad_values(
        {
            f"tokens (outside [0, {vocab_size}))": (tokens < 0) | (tokens >= vocab_size),
            "logits (hidden @ weight.T non-finite)": ~torch.isfinite(lse + entropy),
        }
    )
    return (logp, entropy, s_star, s_expect, lse) if return_lse else (logp, entropy, s_star, s_expect)
