"""Micro-batch planning: which rows of the sampled batch every rank runs in each micro-batch.

Pure index arithmetic on row lengths (numpy, no model, no devices). Two plans:

* **by count** (``max_tokens = None``): rank ``r`` takes a contiguous slice of the groups and splits
  it into micro-batches of ``micro_batch_size`` rows (the original layout);
* **by token budget**: rows are spread over the ranks by length, longest first, each to the rank
  with the fewest tokens so far (LPT scheduling; verl's sequence-length balancing does the same),
  then each rank's rows go first-fit-decreasing into micro-batches whose cost stays within
  ``max_tokens``. The cost of a micro-batch is its real tokens when rows are packed into one
  sequence (:mod:`learner.packing`), ``rows × longest row`` when they are padded.

Either way every rank gets the same number of micro-batches, the short ones padded with empty
micro-batches (empty index arrays), because every micro-batch's forward and backward join ZeRO's
collectives. Which rows share a micro-batch does not change the loss: its denominator and the
clip thresholds are reduced over the whole batch before any loss pass (:mod:`learner.engine`).
"""

from __future__ import annotations

import numpy as np

# rows[rank][k]: int64 row indices of micro-batch k of that rank, ascending, possibly empty
RankPlan = list[list[np.ndarray]]


def plan_micro_batches(
    group_index: np.ndarray,
    lengths: np.ndarray,
    world_size: int,
    micro_batch_size: int,
    max_tokens: int | None,
    packed: bool,
) -> RankPlan:
    """Rows of every rank's micro-batches, the same number of micro-batches on every rank.

    Args:
        group_index: ``[B]`` int64 group of each row, numbered ``0 .. G-1`` in order of first
            appearance (:class:`learner.batch.RolloutBatch`).
        lengths: ``[B]`` int64 tokens of each row (prompt + response).
        world_size: data-parallel ranks.
        micro_batch_size: rows per micro-batch of the by-count plan (unused with a budget).
        max_tokens: token budget of one micro-batch, None = plan by count. A row longer than the
            budget gets a micro-batch of its own.
        packed: the budget counts real tokens (packed rows) instead of ``rows × longest``.

    Returns:
        ``plan[rank][k]``: int64 row indices (ascending), at least one micro-batch per rank; the
        union over ranks and micro-batches is every row exactly once.
    """
    if max_tokens is None:
        plan = [
            split_by_count(rows, micro_batch_size)
            for rows in split_groups_across_ranks(group_index, world_size)
        ]
    else:
        plan = [
            fill_token_budget(rows, lengths[rows], max_tokens, packed)
            for rows in balance_rows_across_ranks(lengths, world_size)
        ]
    return pad_to_equal_counts(plan)


def split_groups_across_ranks(group_index: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Rows of every rank: contiguous slices of the groups, so each rank holds whole groups."""
    n_groups = int(group_index.max()) + 1 if group_index.size else 0
    return [
        np.flatnonzero(np.isin(group_index, groups)).astype(np.int64)
        for groups in np.array_split(np.arange(n_groups), world_size)
    ]


def split_by_count(rows: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive chunks of ``size`` rows (none for no rows)."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def balance_rows_across_ranks(lengths: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Rows of every rank with near-equal token sums: longest first, each to the lightest rank.

    LPT's makespan is within 4/3 of the optimum; ties go to the lower rank, so the plan is the
    same on every rank (each computes it from the same table).

    Args:
        lengths: ``[B]`` int64 tokens of each row.

    Returns:
        ``world_size`` ascending int64 index arrays.
    """
    load = np.zeros(world_size, dtype=np.int64)
    owner = np.empty(len(lengths), dtype=np.int64)
    for row in np.argsort(-lengths, kind="stable"):
        rank = int(np.argmin(load))
        owner[row] = rank
        load[rank] += lengths[row]
    return [np.flatnonzero(owner == rank).astype(np.int64) for rank in range(world_size)]


def micro_batch_cost(lengths: np.ndarray, packed: bool) -> int:
    """Tokens the forward pass processes: the sum when packed, ``rows × longest`` when padded."""
    if lengths.size == 0:
        return 0
    return int(lengths.sum()) if packed else int(lengths.size * lengths.max())


def fill_token_budget(
    rows: np.ndarray, lengths: np.ndarray, max_tokens: int, packed: bool
) -> list[np.ndarray]:
    """First-fit decreasing of ``rows`` into micro-batches of cost ``<= max_tokens``.

    Args:
        rows: ``[b]`` int64 row indices; lengths: ``[b]`` their token counts.
        max_tokens: budget per micro-batch (a single longer row is a micro-batch of its own).
        packed: cost model of :func:`micro_batch_cost`.

    Returns:
        Micro-batches as ascending index arrays, in the order they were opened.
    """
    bins: list[list[int]] = []
    bin_lengths: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        length = int(lengths[i])
        for members, member_lengths in zip(bins, bin_lengths, strict=True):
            if micro_batch_cost(np.array([*member_lengths, length]), packed) <= max_tokens:
                members.append(int(rows[i]))
                member_lengths.append(length)
                break
        else:
            bins.append([int(rows[i])])
            bin_lengths.append([length])
    return [np.sort(np.array(members, dtype=np.int64)) for members in bins]


def pad_to_equal_counts(plan: RankPlan) -> RankPlan:
    """Append empty micro-batches so every rank has ``max(1, most micro-batches of any rank)``."""
    count = max(1, max(len(micro) for micro in plan))
    empty = np.zeros(0, dtype=np.int64)
    return [micro + [empty] * (count - len(micro)) for micro in plan]

