"""The rollout record: one Arrow row per sampled response, defined once for the whole system.

Invariants (checked by :func:`buffers.validation.validate_rows` on every push):

* ``traj_id`` is unique across the run; ``group_id`` names the G responses sampled for one prompt
  and every row of a group carries the same ``group_size`` == G, so the buffer can hand out whole
  groups only (GRPO advantages are a function of the complete group).
* every per-token array has ``len(response_ids)`` entries: ``behaviour_logprobs[i]`` is the log-prob
  under the behaviour policy (vLLM, ``processed_logprobs``: the sampling temperature already
  applied) of ``response_ids[i]``.
* ``version_start <= version_end``: the oldest and newest policy versions whose weights produced
  tokens of this response (vLLM ``weight_versions`` spans). Staleness is measured from
  ``version_start``, the conservative end.
* ``advantage`` may be null: actors never import learner code, the learner computes GRPO
  advantages from ``reward`` over each complete group.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"driftrl.schema_version"


class SchemaMismatchError(ValueError):
    """A table or segment file was written with another schema (or schema version)."""


ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("traj_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("group_size", pa.int32(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("behaviour_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("temperature", pa.float32(), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("advantage", pa.float32(), nullable=True),
        pa.field("version_start", pa.int64(), nullable=False),
        pa.field("version_end", pa.int64(), nullable=False),
        pa.field("actor_id", pa.string(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)

COLUMN_NAMES: tuple[str, ...] = tuple(ROLLOUT_SCHEMA.names)


def check_schema(schema: pa.Schema, where: str = "table") -> None:
    """Raise :class:`SchemaMismatchError` unless ``schema`` is the rollout schema of this version.

    Args:
        schema: the schema to check (metadata included).
        where: what is being checked, for the message (a file name, "push", ...).
    """
    meta = schema.metadata or {}
    found = meta.get(SCHEMA_VERSION_KEY)
    if found != str(SCHEMA_VERSION).encode():
        shown = found.decode() if found else "none"
        raise SchemaMismatchError(
            f"{where}: rollout schema version {shown}, this driftrl reads version {SCHEMA_VERSION}"
        )
    if not schema.equals(ROLLOUT_SCHEMA, check_metadata=False):
        expected = {f.name: str(f.type) for f in ROLLOUT_SCHEMA}
        got = {f.name: str(f.type) for f in schema}
        diff = sorted(
            f"{k}: expected {expected.get(k, 'absent')}, got {got.get(k, 'absent')}"
            for k in set(expected) | set(got)
            if expected.get(k) != got.get(k)
        )
        raise SchemaMismatchError(f"{where}: columns differ from the rollout schema: {'; '.join(diff)}")


def records_to_table(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build a rollout table from per-response dicts (keys = column names).

    ``advantage`` defaults to null and ``created_at`` to now; other keys are required. Types are
    coerced by Arrow; a record Arrow cannot coerce raises ``pa.ArrowInvalid``/``TypeError``.
    """
    now = time.time()
    columns: dict[str, list[Any]] = {name: [] for name in COLUMN_NAMES}
    for rec in records:
        for name in COLUMN_NAMES:
            if name == "advantage":
                columns[name].append(rec.get("advantage"))
            elif name == "created_at":
                columns[name].append(int(rec.get("created_at", now) * 1_000_000))
            else:
                columns[name].append(rec[name])
    arrays = [pa.array(columns[f.name], type=f.type) for f in ROLLOUT_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=ROLLOUT_SCHEMA)
