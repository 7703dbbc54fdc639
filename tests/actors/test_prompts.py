"""PromptSource: loading, validation, sharding, epochs and the persisted cursor."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.prompts import PromptSource, PromptSpec


def write_parquet(path: Path, n: int, columns: tuple[str, ...] = ("prompt_id", "prompt", "answer")) -> Path:
    values = {"prompt_id": [f"p{i}" for i in range(n)], "prompt": [f"s{i}=" for i in range(n)]}
    values["answer"] = [f"a{i}" for i in range(n)]
    pq.write_table(pa.table({c: pa.array(values[c], pa.string()) for c in columns}), path)
    return path


def test_empty_dataset_is_a_clear_error(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "empty.parquet", 0)
    with pytest.raises(ValueError, match=r"empty\.parquet is empty"):
        PromptSource(PromptSpec(path=str(path)))


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "noanswer.parquet", 3, columns=("prompt_id", "prompt"))
    with pytest.raises(ValueError, match=r"noanswer\.parquet: column 'answer' is missing"):
        PromptSource(PromptSpec(path=str(path)))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        PromptSource(PromptSpec(path=str(tmp_path / "nope.jsonl")))


def test_jsonl_without_id_uses_row_index(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(3)))
    source = PromptSource(PromptSpec(path=str(path)))
    items = [source.next() for _ in range(3)]
    assert sorted((i.prompt_id, i.prompt, i.answer) for i in items) == [
        ("0", "q0", "0"),
        ("1", "q1", "1"),
        ("2", "q2", "2"),
    ]


def test_shards_partition_rows_and_epochs_cover_each_row_once(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", 10)
    spec = PromptSpec(path=str(path), seed=3)
    shards = [PromptSource(spec, k, 3) for k in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]  # rows 0,3,6,9 / 1,4,7 / 2,5,8
    seen = [{shard.next().prompt_id for _ in range(len(shard))} for shard in shards]
    assert seen[0] == {"p0", "p3", "p6", "p9"} and seen[1] == {"p1", "p4", "p7"}
    epoch1 = [shards[0].next().prompt_id for _ in range(4)]
    assert set(epoch1) == seen[0] and shards[0].epoch == 2


def test_cursor_survives_restart_and_rejects_other_layout(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", 5)
    cursor = tmp_path / "run" / "cursor.json"
    spec = PromptSpec(path=str(path))
    first = PromptSource(spec, cursor_path=cursor)
    taken = [first.next() for _ in range(7)]
    first.commit(6)  # position 6 still in flight: a restart must generate it again
    again = PromptSource(spec, cursor_path=cursor)
    assert again.next_position == 6 and again.epoch == 1
    assert again.next() == taken[6]
    with pytest.raises(ValueError, match="delete the file"):
        PromptSource(spec, 0, 2, cursor_path=cursor)
