"""Sequence packing: the real tokens of several padded rows concatenated into one row.

A packed row keeps every sequence intact and in row order; position ids restart at 0 at the start
of each sequence and attention is confined to it (causal within the sequence, nothing across), so
every hidden state, log-prob and token statistic equals the padded row's at the same token::

    padded [b, L]               packed [1, T], T = sum of row lengths
    a0 a1 a2 .  .               a0 a1 a2 b0 b1 b2 b3 c0
    b0 b1 b2 b3 .      ->       sequence_ids  0 0 0 1 1 1 1 2
    c0 .  .  .  .               position_ids  0 1 2 0 1 2 3 0

Attention per backend: flash-attention takes no mask and finds each sequence from the restarts of
``position_ids`` (transformers' varlen path, ``cu_seqlens`` from the position ids). Without it, a
model switched to :data:`SEGMENT_ATTENTION` (:func:`use_segment_attention`, what the learner does
when packing) runs sdpa causally on each sequence's slice of the row, its "mask" a
:class:`PackedSegments` of the sequence lengths; that costs ``sum_i n_i²`` like the padded rows,
not ``T²``: on the learner benchmark's response lengths the dense ``T × T`` mask of a 512-token
micro-batch did ~3x the attention work of its sequences, and a larger budget made it worse.
Plain sdpa and eager models take a ``[1, 1, T, T]`` boolean block-diagonal causal mask (eager as
an additive float one). Masks are built here rather than left to transformers' detection of
restarted position ids, so a change in that detection cannot silently let sequences attend across.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# backends that find packed sequences from position ids and take no mask (transformers' varlen path)
VARLEN_ATTENTION = (
    "flash_attention_2",
    "flash_attention_3",
    "kernels-community/flash-attn",
    "kernels-community/vllm-flash-attn3",
)


@dataclass(frozen=True)
class PackedLayout:
    """Where each token of a padded ``[b, L]`` batch goes in the packed ``[1, T]`` row.

    Attributes:
        token_index: ``[T]`` int64 flat index into the ``b * L`` padded positions, row-major.
        sequence_ids: ``[1, T]`` int64 row of each packed token.
        shape: ``(b, L)`` of the padded batch.
    """

    token_index: Tensor
    sequence_ids: Tensor
    shape: tuple[int, int]

    @classmethod
    def from_attention_mask(cls, attention_mask: Tensor) -> PackedLayout:
        """Layout of the real tokens (``attention_mask`` ``[b, L]``, True = real; any padding side)."""
        real = attention_mask.bool()
        rows = torch.arange(real.shape[0], device=real.device)[:, None].expand_as(real)
        return cls(
            token_index=real.reshape(-1).nonzero().squeeze(1),
            sequence_ids=rows[real][None, :],
            shape=(real.shape[0], real.shape[1]),
        )

    def pack(self, padded: Tensor) -> Tensor:
        """``[b, L, ...]`` to ``[1, T, ...]`` (real tokens only, row-major)."""
        return padded.reshape(-1, *padded.shape[2:])[self.token_index][None]

    def unpack(self, packed: Tensor, fill: float = 0.0) -> Tensor:
        """``[1, T, ...]`` back to ``[b, L, ...]``, ``fill`` at padding."""
        flat = packed[0]
        out = flat.new_full((self.shape[0] * self.shape[1], *flat.shape[1:]), fill)
        out[self.token_index] = flat
        return out.reshape(*self.shape, *flat.shape[1:])


def packed_position_ids(sequence_ids: Tensor) -> Tensor:
    """Position of each token within its sequence, restarting at 0 where ``sequence_ids`` changes.

    Args:
        sequence_ids: ``[n, T]`` int64, each sequence's tokens contiguous.

    Returns:
        ``[n, T]`` int64.
    """
    t = torch.arange(sequence_ids.shape[1], device=sequence_ids.device).expand_as(sequence_ids)
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    first = torch.where(starts, t, 0).cummax(dim=1).values
    return t - first


def block_causal_mask(sequence_ids: Tensor) -> Tensor:
    """Boolean ``[n, 1, T, T]`` mask, True where query ``q`` may attend key ``k``: same sequence, ``k <= q``.

    Args:
        sequence_ids: ``[n, T]`` int64, each sequence's tokens contiguous.
    """
    t = sequence_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=sequence_ids.device).tril()
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    return (same & causal)[:, None]


# sdpa per packed sequence; registered with transformers by use_segment_attention
SEGMENT_ATTENTION = "driftrl_segment_sdpa"


@dataclass(frozen=True)
class PackedSegments:
    """The sequences of one packed ``[1, T]`` row: the attention "mask" of :data:`SEGMENT_ATTENTION`.

    Passed inside the model's per-layer mask mapping (``attention_mask={layer type: ...}``), the one
    argument transformers hands unchanged from the model's forward to every attention call.

    Attributes:
        lengths: tokens of each sequence, in row order; they sum to ``T``.
    """

    lengths: tuple[int, ...]

    @classmethod
    def from_sequence_ids(cls, sequence_ids: Tensor) -> PackedSegments:
        """Segments of a ``[1, T]`` int64 row whose sequences are contiguous."""
        if sequence_ids.shape[0] != 1:
            raise ValueError(f"one packed row expected, got {sequence_ids.shape[0]}")
        _, counts = torch.unique_consecutive(sequence_ids[0], return_counts=True)
        return cls(tuple(counts.tolist()))


def segment_sdpa_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: causal sdpa on each packed sequence, else plain sdpa.

    Args:
        module: the attention module (transformers' interface).
        query: ``[1, H, T, D]``; key, value: ``[1, H_kv, T, D]`` (grouped-query heads allowed).
        attention_mask: :class:`PackedSegments` for a packed row; anything else (a padded batch's
            mask, None) goes to transformers' own sdpa function unchanged.
        dropout, scaling: as sdpa's ``dropout_p`` and ``scale``.
        sliding_window: must be None or cover the longest sequence (no window is applied here).

    Returns:
        ``([1, T, H, D] output, None)``, the layout transformers' attention functions return.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, PackedSegments):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            **kwargs,
        )
    lengths = list(attention_mask.lengths)
    if sliding_window is not None and max(lengths) > sliding_window:
        raise NotImplementedError(
            f"a {max(lengths)}-token packed sequence exceeds the sliding window {sliding_window}"
        )
    if query.shape[0] != 1 or sum(lengths) != query.shape[2]:
        raise ValueError(f"segments of {sum(lengths)} tokens for a query of shape {tuple(query.shape)}")
    gqa = query.shape[1] != key.shape[1]
    # each slice is one sequence from its first token, so sdpa's own causal flag is exactly its mask
    # and no kernel sees a mask (CPU and CUDA then take their fused paths)
    out = [
        torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa
        )
        for q, k, v in zip(
            query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True
        )
    ]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def use_segment_attention(model: nn.Module) -> None:
    """Switch an sdpa transformers model to :data:`SEGMENT_ATTENTION` (others are left as they are).

    Unpacked calls still get sdpa with transformers' sdpa mask, so only packed rows change path.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if model.config._attn_implementation != "sdpa":
        return
    AttentionInterface.register(SEGMENT_ATTENTION, segment_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SEGMENT_ATTENTION)


def packed_attention_mask(
    sequence_ids: Tensor, attn_implementation: str, dtype: torch.dtype
) -> Tensor | dict[str, PackedSegments] | None:
    """The attention mask a transformers backend needs for packed rows.

    Args:
        sequence_ids: ``[n, T]`` int64 (``n = 1`` for :data:`SEGMENT_ATTENTION`).
        attn_implementation: the model config's ``_attn_implementation``.
        dtype: the activations' dtype (eager adds the mask to the scores).

    Returns:
        None for flash-attention (varlen from the position ids); for :data:`SEGMENT_ATTENTION` the
        per-layer-type mapping to the row's :class:`PackedSegments`; the boolean
        :func:`block_causal_mask` for sdpa and other mask-taking backends, its additive form
        (0 / dtype min) for eager.
    """
    if attn_implementation in VARLEN_ATTENTION:
        return None
    if attn_implementation == SEGMENT_ATTENTION:
        segments = PackedSegments.from_sequence_ids(sequence_ids)
        return {"full_attention": segments, "sliding_attention": segments}
    mask = block_causal_mask(sequence_ids)
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return mask
