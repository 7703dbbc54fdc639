"""Shared fixtures of the buffer tests: rollout groups with controllable shapes and versions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from buffers.schema import records_to_table

GroupFactory = Callable[..., pa.Table]


def group_records(
    group_key: str,
    group_size: int = 4,
    version_start: int = 0,
    rng: np.random.Generator | None = None,
    max_tokens: int = 6,
) -> list[dict[str, Any]]:
    """One valid group: ``group_size`` rows with ids ``<group_key>/<j>`` and random ragged tokens."""
    rng = rng or np.random.default_rng(0)
    records = []
    for j in range(group_size):
        n_prompt, n_response = rng.integers(1, max_tokens + 1, size=2)
        records.append(
            {
                "traj_id": f"{group_key}/{j}",
                "prompt_id": f"p-{group_key}",
                "group_id": group_key,
                "group_size": group_size,
                "prompt_ids": rng.integers(0, 100, n_prompt).tolist(),
                "response_ids": rng.integers(0, 100, n_response).tolist(),
                "behaviour_logprobs": (-rng.random(n_response)).tolist(),
                "temperature": 1.0,
                "reward": float(rng.random()),
                "version_start": version_start,
                "version_end": version_start,
                "actor_id": "actor-0",
                "finish_reason": "stop",
            }
        )
    return records


@pytest.fixture
def make_groups() -> GroupFactory:
    """``make_groups(keys, group_size=4, version_start=0)`` -> a table of whole valid groups."""

    def make(keys: list[str], group_size: int = 4, version_start: int = 0, seed: int = 0) -> pa.Table:
        rng = np.random.default_rng(seed)
        records = [r for k in keys for r in group_records(k, group_size, version_start, rng)]
        return records_to_table(records)

    return make
