"""Sampled rollout rows (an Arrow table from the replay buffer) to padded tensors, vectorised.

Layout of one row ``i`` with prompt length ``P_i`` and response length ``R_i`` in a ``[B, L]`` batch,
``L = max_i (P_i + R_i)``::

    position:   0 .. P_i-1        P_i .. P_i+R_i-1        P_i+R_i .. L-1
    input_ids:  prompt_ids        response_ids            pad_id
    attention:  True              True                    False
    response:   False             True                    False

Alignment: every per-token field is indexed by the position of the token it describes in
``input_ids``. ``behaviour_logprobs[i, t]`` is the behaviour log-prob of ``input_ids[i, t]``, which
the model predicts from the logits at position ``t - 1``. So the learner compares
``log_softmax(logits[:, :-1] / T)`` gathered at ``input_ids[:, 1:]`` with
``behaviour_logprobs[:, 1:]`` under ``response_mask[:, 1:]``. Position 0 is never a response
token: the buffer rejects empty prompts (``empty_prompt``), so every response token has a
predecessor.

No per-row Python loop: the Arrow list offsets give each token's row and column, and one numpy
fancy-indexed assignment scatters all tokens of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor


@dataclass(frozen=True)
class RolloutBatch:
    """Padded tensors of ``B`` sampled responses (see the module docstring for the alignment).

    Attributes:
        input_ids: ``[B, L]`` int64, prompt then response, right-padded with ``pad_id``.
        attention_mask: ``[B, L]`` bool, True on prompt and response tokens.
        response_mask: ``[B, L]`` bool, True on response tokens.
        behaviour_logprobs: ``[B, L]`` float32, the response token's behaviour log-prob at its own
            position, 0 elsewhere.
        prompt_lengths: ``[B]`` int64 ``P_i``.
        response_lengths: ``[B]`` int64 ``R_i``.
        rewards: ``[B]`` float32.
        advantages: ``[B]`` float32, NaN where the actor left it null (the learner computes it).
        group_index: ``[B]`` int64, ``0 .. G-1`` in order of first appearance of each ``group_id``.
        temperature: ``[B]`` float32 sampling temperature.
        version_start: ``[B]`` int64 oldest policy version that produced the response.
        version_end: ``[B]`` int64 newest policy version that produced the response.
        traj_ids: the ``B`` ids, to ``ack`` after the checkpoint.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    behaviour_logprobs: Tensor
    prompt_lengths: Tensor
    response_lengths: Tensor
    rewards: Tensor
    advantages: Tensor
    group_index: Tensor
    temperature: Tensor
    version_start: Tensor
    version_end: Tensor
    traj_ids: list[str]

    @property
    def n_groups(self) -> int:
        """Distinct groups in the batch."""
        return int(self.group_index.max()) + 1 if self.group_index.numel() else 0


def table_to_batch(table: pa.Table, pad_id: int = 0) -> RolloutBatch:
    """Convert a rollout table (``buffers.schema.ROLLOUT_SCHEMA``) to a :class:`RolloutBatch`.

    Args:
        table: validated rows (the buffer's ``sample`` output); may have several chunks.
        pad_id: token id written into padding positions (masked out everywhere).
    """
    table = table.combine_chunks()
    n_rows = table.num_rows
    prompt = _list_column(table, "prompt_ids")
    response = _list_column(table, "response_ids")
    logprobs = _list_column(table, "behaviour_logprobs")
    prompt_len = _np(pc.list_value_length(prompt), np.int64)
    response_len = _np(pc.list_value_length(response), np.int64)
    total_len = prompt_len + response_len
    width = int(total_len.max()) if n_rows else 0

    input_ids = np.full((n_rows, width), pad_id, dtype=np.int64)
    response_mask = np.zeros((n_rows, width), dtype=bool)
    behaviour_logprobs = np.zeros((n_rows, width), dtype=np.float32)
    prompt_rows, prompt_cols = _token_positions(prompt_len, np.zeros(n_rows, dtype=np.int64))
    input_ids[prompt_rows, prompt_cols] = _np(pc.list_flatten(prompt), np.int64)
    rows, cols = _token_positions(response_len, prompt_len)
    input_ids[rows, cols] = _np(pc.list_flatten(response), np.int64)
    response_mask[rows, cols] = True
    # lengths match response_ids: the buffer rejected every row where they do not (length_mismatch)
    behaviour_logprobs[rows, cols] = _np(pc.list_flatten(logprobs), np.float32)
    attention_mask = np.arange(width)[None, :] < total_len[:, None]

    group_codes = pc.dictionary_encode(table.column("group_id")).combine_chunks().indices
    return RolloutBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        response_mask=torch.from_numpy(response_mask),
        behaviour_logprobs=torch.from_numpy(behaviour_logprobs),
        prompt_lengths=torch.from_numpy(prompt_len),
        response_lengths=torch.from_numpy(response_len),
        rewards=torch.from_numpy(_np(table.column("reward"), np.float32)),
        advantages=torch.from_numpy(_np(pc.fill_null(table.column("advantage"), float("nan")), np.float32)),
        group_index=torch.from_numpy(_np(group_codes, np.int64)),
        temperature=torch.from_numpy(_np(table.column("temperature"), np.float32)),
        version_start=torch.from_numpy(_np(table.column("version_start"), np.int64)),
        version_end=torch.from_numpy(_np(table.column("version_end"), np.int64)),
        traj_ids=table.column("traj_id").to_pylist(),
    )


def _list_column(table: pa.Table, name: str) -> pa.ListArray:
    column = table.column(name)
    return column.chunk(0) if column.num_chunks else pa.array([], type=column.type)


def _np(arr: pa.Array | pa.ChunkedArray, dtype: type) -> np.ndarray:
    """Arrow to a writable numpy array of ``dtype`` (torch.from_numpy warns on read-only views)."""
    return np.array(arr.to_numpy(zero_copy_only=False) if len(arr) else [], dtype=dtype)


def _token_positions(lengths: np.ndarray, first_col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column in the padded matrix of every flattened list element.

    Element ``k`` of row ``i`` (flattened index ``starts[i] + k``) goes to column ``first_col[i] + k``.
    """
    n_tokens = int(lengths.sum())
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(n_tokens) - starts[rows] + first_col[rows]
    return rows, cols
