"""Bad rows are rejected with their reason, good rows of the same push are kept, nothing raises."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from buffers.config import BufferConfig
from buffers.replay import ReplayBuffer
from buffers.schema import ROLLOUT_SCHEMA, SCHEMA_VERSION_KEY, records_to_table
from buffers.validation import INCOMPLETE_GROUP, UNKNOWN_TRAJ_ID
from tests.buffers.conftest import group_records

# reason -> how to break row 0 of a 4-row group (the other 3 rows then fail as incomplete_group)
ROW_BREAKERS = {
    "null_field": lambda r: r.update(reward=None),
    "empty_prompt": lambda r: r.update(prompt_ids=[]),
    "empty_response": lambda r: r.update(response_ids=[], behaviour_logprobs=[]),
    "length_mismatch": lambda r: r.update(behaviour_logprobs=r["behaviour_logprobs"] + [-0.5]),
    "negative_token_id": lambda r: r.update(response_ids=[-3] + r["response_ids"][1:]),
    "nonfinite_logprob": lambda r: r.update(behaviour_logprobs=[math.nan] + r["behaviour_logprobs"][1:]),
    "positive_logprob": lambda r: r.update(behaviour_logprobs=[0.25] + r["behaviour_logprobs"][1:]),
    "nonfinite_reward": lambda r: r.update(reward=math.inf),
    "nonfinite_advantage": lambda r: r.update(advantage=math.nan),
    "bad_temperature": lambda r: r.update(temperature=0.0),
    "negative_version": lambda r: r.update(version_start=-1, version_end=-1),
    "version_order": lambda r: r.update(version_start=3, version_end=2),
    "duplicate_traj_id": lambda r: r.update(traj_id="good-a/0"),
}


@pytest.fixture
def buffer(tmp_path) -> ReplayBuffer:
    return ReplayBuffer(BufferConfig(fsync=False), str(tmp_path / "buf"))


def test_each_bad_row_kind_is_rejected_with_its_reason_and_good_groups_are_kept(buffer):
    records = group_records("good-a") + group_records("good-b")
    expected: dict[str, str] = {}
    for reason, breaker in ROW_BREAKERS.items():
        group = group_records(f"bad-{reason}")
        breaker(group[0])
        expected[group[0]["traj_id"]] = reason
        expected.update({r["traj_id"]: INCOMPLETE_GROUP for r in group[1:]})
        records += group
    # whole-group problems: every row gets the group's reason
    zero_size = group_records("bad-size")
    for r in zero_size:
        r["group_size"] = 0
    mixed_prompts = group_records("bad-mixed")
    mixed_prompts[2]["prompt_id"] = "another prompt"
    short = group_records("bad-short")[:3]
    whole_group_cases = (
        (zero_size, "bad_group_size"),
        (mixed_prompts, "inconsistent_group"),
        (short, INCOMPLETE_GROUP),
    )
    for group, reason in whole_group_cases:
        expected.update({r["traj_id"]: reason for r in group})
        records += group
    # a group of 4 that really has 5 rows (two rows share an index)
    five = group_records("bad-five") + [dict(group_records("bad-five")[0], traj_id="bad-five/extra")]
    expected.update({r["traj_id"]: INCOMPLETE_GROUP for r in five})
    records += five

    result = buffer.push(records_to_table(records))

    assert result.accepted == 8
    assert not result.full
    assert dict(result.rejected) == expected
    # "good-a/0" appears twice (the duplicate row); the rejection list carries each row once
    assert len(result.rejected) == len(records) - 8
    stats = buffer.stats()
    assert stats["rows_available"] == 8
    assert stats["pushed"] == len(records) == stats["accepted"] + sum(stats["rejected"].values())
    assert stats["rejected"]["nonfinite_logprob"] == 1
    assert stats["rejected"][INCOMPLETE_GROUP] == 3 * len(ROW_BREAKERS) + 3 + 5
    sampled = buffer.sample(10, learner_version=0)
    assert sorted(set(sampled.column("group_id").to_pylist())) == ["good-a", "good-b"]


def test_duplicates_of_rows_and_groups_already_in_the_buffer_are_rejected(buffer, make_groups):
    assert buffer.push(make_groups(["g1"])).accepted == 4
    again = buffer.push(make_groups(["g1", "g2"]))
    assert again.accepted == 4
    assert {reason for _, reason in again.rejected} == {"duplicate_traj_id"}
    # same group id, new row ids: a group arrives in one push
    renamed = make_groups(["g2"]).set_column(0, "traj_id", pa.array([f"new/{i}" for i in range(4)]))
    assert {reason for _, reason in buffer.push(renamed).rejected} == {"duplicate_group_id"}


@pytest.mark.parametrize(
    "rows, reason, n_rows",
    [
        (None, "bad_input", 1),
        ("not a table", "bad_input", 1),
        ([{"traj_id": "x"}, {"traj_id": "y"}], "bad_input", 2),
        (pa.table({"traj_id": ["a", "b"]}), "schema_mismatch", 2),
    ],
)
def test_wrong_inputs_are_rejected_whole_without_raising(buffer, rows, reason, n_rows):
    result = buffer.push(rows)
    assert result.accepted == 0
    assert [r for _, r in result.rejected] == [reason] * n_rows
    assert result.detail
    assert buffer.stats()["rejected"] == {reason: n_rows}


def test_schema_mismatch_names_the_column_and_keeps_readable_ids(buffer, make_groups):
    table = make_groups(["g"])
    wrong = table.set_column(5, "response_ids", table.column("response_ids").cast(pa.list_(pa.int64())))
    result = buffer.push(wrong)
    assert "response_ids: expected list<item: int32>, got list<item: int64>" in result.detail
    assert [t for t, _ in result.rejected] == table.column("traj_id").to_pylist()

    future = table.replace_schema_metadata({SCHEMA_VERSION_KEY: b"99"})
    result = buffer.push(future)
    assert result.accepted == 0 and "version 99" in result.detail
    assert buffer.push(table.append_column("extra", pa.array([1] * 4))).accepted == 0
    assert buffer.stats()["rejected"] == {"schema_mismatch": 12}


def test_batches_reordered_columns_and_lost_nullability_are_accepted(buffer, make_groups):
    table = make_groups(["g1", "g2"])
    assert buffer.push(table.to_batches(max_chunksize=3)).accepted == 8
    # pa.table() from plain columns: every field nullable, no metadata, another column order
    loose = pa.table({name: table.column(name) for name in reversed(ROLLOUT_SCHEMA.names)})
    renamed = loose.set_column(
        loose.schema.get_field_index("traj_id"), "traj_id", pa.array([f"x/{i}" for i in range(8)])
    ).set_column(loose.schema.get_field_index("group_id"), "group_id", pa.array(["h1"] * 4 + ["h2"] * 4))
    assert buffer.push(renamed).accepted == 8
    assert buffer.push([]).accepted == 0
    assert buffer.stats()["pushed"] == 16
    assert UNKNOWN_TRAJ_ID not in str(buffer.stats())


def test_bad_tokens_are_found_beside_null_tokens_in_the_same_push(buffer):
    # the per-token checks look at all values of a push at once; a null value (NaN to numpy, skipped
    # by Arrow's min) must not hide a bad value in another row
    breakers = {
        "null-token": ("null_field", lambda r: r.update(prompt_ids=[None] + r["prompt_ids"][1:])),
        "negative": ("negative_token_id", lambda r: r.update(prompt_ids=[-1] + r["prompt_ids"][1:])),
        "null-logprob": (
            "null_field",
            lambda r: r.update(behaviour_logprobs=[None] + r["behaviour_logprobs"][1:]),
        ),
        "positive": (
            "positive_logprob",
            lambda r: r.update(behaviour_logprobs=[0.5] * len(r["response_ids"])),
        ),
        "minus-inf": (
            "nonfinite_logprob",
            lambda r: r.update(behaviour_logprobs=[-math.inf] + r["behaviour_logprobs"][1:]),
        ),
    }
    records = group_records("good")
    expected = {}
    for key, (reason, breaker) in breakers.items():
        group = group_records(key)
        breaker(group[1])
        expected[group[1]["traj_id"]] = reason
        records += group
    result = buffer.push(records_to_table(records))
    assert result.accepted == 4
    assert {t: r for t, r in result.rejected if r != INCOMPLETE_GROUP} == expected
