"""Sequence packing: the real tokens of several padded rows concatenated into one row.

A packed row keeps every sequence intact and in row order; position ids restart at 0 at the start
of each sequence and attention is confined to it (causal within the sequence, nothing across), so
every hidden state, log-prob and token statistic equals the padded row's at the same token::

    padded [b, L]               packed [1, T], T = sum of row lengths
    a0 a1 a2 .  .               a0 a1 a2 b0 b1 b2 b3 c0
    b0 b1 b2 b3 .      ->       sequence_ids  0 0 0 1 1 1 1 2
    c0 .  .  .  .               position_ids  0 1 2 0 1 2 3 0

Attention per backend: sdpa takes a ``[1, 1, T, T]`` boolean block-diagonal causal mask, eager the
same mask as an additive float one; flash-attention takes no mask and finds each sequence from the
restarts of ``position_ids`` (transformers' varlen path, ``cu_seqlens`` from the position ids), so
it never forms ``T × T``. The mask is built here rather than left to transformers' detection of
restarted position ids, so a change in that detection cannot silently let sequences attend across.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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


def packed_attention_mask(
    sequence_ids: Tensor, attn_implementation: str, dtype: torch.dtype
) -> Tensor | None:
    """The attention mask a transformers backend needs for packed rows.

    Args:
        sequence_ids: ``[n, T]`` int64.
        attn_implementation: the model config's ``_attn_implementation``.
        dtype: the activations' dtype (eager adds the mask to the scores).

    Returns:
        None for flash-attention (varlen from the position ids), the boolean
        :func:`block_causal_mask` for sdpa and other mask-taking backends, its additive form
        (0 / dtype min) for eager.
    """
    if attn_implementation in VARLEN_ATTENTION:
        return None
    mask = block_causal_mask(sequence_ids)
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return mask
