"""table_to_batch against a per-row Python reference on random ragged rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from buffers.schema import records_to_table
from learner.batch import table_to_batch


def random_table(rng: np.random.Generator, n_rows: int) -> pa.Table:
    records = []
    for i in range(n_rows):
        n_prompt, n_response = int(rng.integers(1, 9)), int(rng.integers(1, 13))
        records.append(
            {
                "traj_id": f"t{i}",
                "prompt_id": f"p{i // 3}",
                "group_id": f"g{(i // 3) * 7 % 5}",  # groups not in sorted order
                "group_size": 3,
                "prompt_ids": rng.integers(1, 1000, n_prompt).tolist(),
                "response_ids": rng.integers(1, 1000, n_response).tolist(),
                "behaviour_logprobs": (-rng.exponential(size=n_response)).tolist(),
                "temperature": float(rng.choice([0.7, 1.0])),
                "reward": float(rng.normal()),
                "advantage": None if i % 2 else float(rng.normal()),
                "version_start": int(rng.integers(0, 3)),
                "version_end": 3,
                "actor_id": "a",
                "finish_reason": "stop",
            }
        )
    return records_to_table(records)


def reference(table: pa.Table, pad_id: int) -> dict[str, torch.Tensor]:
    """One row at a time, the obvious way."""
    rows = table.to_pylist()
    width = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows)
    out = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.int64),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.bool),
        "response_mask": torch.zeros(len(rows), width, dtype=torch.bool),
        "behaviour_logprobs": torch.zeros(len(rows), width, dtype=torch.float32),
    }
    group_index: dict[str, int] = {}
    for i, r in enumerate(rows):
        p, n = len(r["prompt_ids"]), len(r["response_ids"])
        out["input_ids"][i, : p + n] = torch.tensor(r["prompt_ids"] + r["response_ids"])
        out["attention_mask"][i, : p + n] = True
        out["response_mask"][i, p : p + n] = True
        out["behaviour_logprobs"][i, p : p + n] = torch.tensor(r["behaviour_logprobs"])
        group_index.setdefault(r["group_id"], len(group_index))
    out["group_index"] = torch.tensor([group_index[r["group_id"]] for r in rows])
    out["rewards"] = torch.tensor([r["reward"] for r in rows], dtype=torch.float32)
    out["advantages"] = torch.tensor(
        [float("nan") if r["advantage"] is None else r["advantage"] for r in rows], dtype=torch.float32
    )
    out["version_start"] = torch.tensor([r["version_start"] for r in rows])
    out["temperature"] = torch.tensor([r["temperature"] for r in rows], dtype=torch.float32)
    return out


@pytest.mark.parametrize("seed, pad_id", [(0, 0), (1, -100), (2, 7)])
def test_matches_the_per_row_reference_on_chunked_sliced_tables(seed, pad_id):
    rng = np.random.default_rng(seed)
    table = random_table(rng, 24)
    # what sample() returns: several chunks; slices exercise non-zero list offsets
    chunked = pa.concat_tables([table.slice(0, 5), table.slice(5, 11), table.slice(16)])
    batch = table_to_batch(chunked, pad_id=pad_id)
    expected = reference(table, pad_id)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(batch, name), value, equal_nan=True, msg=name)
    assert batch.traj_ids == [f"t{i}" for i in range(24)]
    assert batch.n_groups == len(set(table.column("group_id").to_pylist()))


def test_behaviour_logprobs_sit_on_the_positions_of_their_tokens():
    table = records_to_table(
        [
            {
                "traj_id": "t",
                "prompt_id": "p",
                "group_id": "g",
                "group_size": 1,
                "prompt_ids": [11, 12],
                "response_ids": [21, 22, 23],
                "behaviour_logprobs": [-1.0, -2.0, -3.0],
                "temperature": 1.0,
                "reward": 1.0,
                "version_start": 0,
                "version_end": 0,
                "actor_id": "a",
                "finish_reason": "stop",
            }
        ]
    )
    batch = table_to_batch(table)
    # logits at t-1 predict token t: targets input_ids[:, 1:] = [12, 21, 22, 23], of which the last
    # three are response tokens with behaviour log-probs -1, -2, -3
    assert batch.input_ids[0, 1:].tolist() == [12, 21, 22, 23]
    assert batch.response_mask[0, 1:].tolist() == [False, True, True, True]
    assert batch.behaviour_logprobs[0, 1:].tolist() == [0.0, -1.0, -2.0, -3.0]


def test_empty_table_gives_empty_tensors():
    batch = table_to_batch(random_table(np.random.default_rng(0), 3).slice(0, 0))
    assert batch.input_ids.shape == (0, 0) and batch.n_groups == 0 and batch.traj_ids == []
