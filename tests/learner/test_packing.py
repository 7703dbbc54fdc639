"""Micro-batch planning and sequence packing in isolation: the plan covers every row once with
equal counts per rank, and a packed forward of the tiny Qwen2 equals the padded one (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.micro_batches import balance_rows_across_ranks, micro_batch_cost, plan_micro_batches
from learner.packing import (
    SEGMENT_ATTENTION,
    PackedLayout,
    PackedSegments,
    block_causal_mask,
    packed_attention_mask,
    packed_position_ids,
    use_segment_attention,
)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_token_budget_plan_covers_every_row_once_within_budget(packed, world_size):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=13)
    group_index = np.repeat(np.arange(4), [4, 3, 3, 3])
    plan = plan_micro_batches(group_index, lengths, world_size, 4, max_tokens=100, packed=packed)
    assert len(plan) == world_size and len({len(micro) for micro in plan}) == 1
    rows = np.concatenate([r for micro in plan for r in micro])
    assert sorted(rows.tolist()) == list(range(13))
    for micro in plan:
        for r in micro:
            assert micro_batch_cost(lengths[r], packed) <= 100


def test_one_long_row_gives_an_empty_micro_batch_to_the_other_rank():
    # rank 0 gets the 90-token row alone; rank 1 the others: 3 micro-batches of <= 30 packed tokens
    lengths = np.array([90, 20, 10, 20, 10, 20])
    plan = plan_micro_batches(np.arange(6), lengths, 2, 4, max_tokens=30, packed=True)
    assert [r.tolist() for r in plan[0]] == [[0], [], []]
    assert sorted(sum((r.tolist() for r in plan[1]), [])) == [1, 2, 3, 4, 5] and len(plan[1]) == 3


def test_balance_puts_longest_first_on_the_lightest_rank():
    # 9 -> r0, 7 -> r1, 5 -> r1 (7 < 9), 4 -> r0 (9 < 12): loads 13 and 12
    ranks = balance_rows_across_ranks(np.array([5, 9, 4, 7]), 2)
    assert [r.tolist() for r in ranks] == [[1, 2], [0, 3]]


def test_count_plan_is_the_group_slices():
    plan = plan_micro_batches(np.repeat(np.arange(3), 4), np.full(12, 5), 2, 3, None, packed=False)
    assert [[r.tolist() for r in micro] for micro in plan] == [
        [[0, 1, 2], [3, 4, 5], [6, 7]],
        [[8, 9, 10], [11], []],
    ]


def test_layout_positions_and_mask():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    layout = PackedLayout.from_attention_mask(mask)
    assert layout.sequence_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    assert packed_position_ids(layout.sequence_ids).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    values = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(layout.unpack(layout.pack(values)), torch.where(mask, values, 0.0))
    block = block_causal_mask(layout.sequence_ids)[0, 0]
    assert block[4].tolist() == [False, False, False, True, True, False, False, False]
    assert packed_attention_mask(layout.sequence_ids, "flash_attention_2", torch.float32) is None


@pytest.mark.parametrize("attn", ["sdpa", "eager", SEGMENT_ATTENTION])
def test_packed_forward_equals_padded_forward(tmp_path, attn):
    from transformers import AutoModelForCausalLM

    from tasks.tiny_model import make_tiny_model

    def load(implementation):
        return AutoModelForCausalLM.from_pretrained(
            str(make_tiny_model(tmp_path / "m")), dtype=torch.float64, attn_implementation=implementation
        ).eval()

    model = load("eager" if attn == "eager" else "sdpa")
    if attn == SEGMENT_ATTENTION:
        use_segment_attention(model)
    assert model.config._attn_implementation == attn
    ids = torch.randint(4, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(7)[None, :] < torch.tensor([[5], [7], [2]])
    layout = PackedLayout.from_attention_mask(mask)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask.long()).logits
        seq = layout.sequence_ids
        packed = model(
            input_ids=layout.pack(ids),
            attention_mask=packed_attention_mask(seq, attn, torch.float64),
            position_ids=packed_position_ids(seq),
        ).logits
        if attn == SEGMENT_ATTENTION:
            # unpacked calls on the switched model are plain sdpa's, bit for bit
            plain = load("sdpa")(input_ids=ids, attention_mask=mask.long()).logits
            assert torch.equal(padded, plain)
    torch.testing.assert_close(layout.unpack(packed)[mask], padded[mask])


def test_segment_attention_gradients_equal_the_dense_block_mask():
    # float64 reference: one sdpa call over the whole row with the block-diagonal causal mask;
    # 4 query heads on 2 key/value heads exercise the grouped-query path
    from learner.packing import segment_sdpa_attention

    gen = torch.Generator().manual_seed(1)
    seq = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2, 2]])
    q = torch.randn(1, 4, 9, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 9, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 9, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    segments = PackedSegments.from_sequence_ids(seq)
    assert segments.lengths == (3, 1, 5)
    module = torch.nn.Module()
    out, _ = segment_sdpa_attention(module, q, k, v, segments, scaling=0.3)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=block_causal_mask(seq), scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(out, reference)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((reference * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError):
        segment_sdpa_attention(module, q, k, v, PackedSegments((3, 1)))
