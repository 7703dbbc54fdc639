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


def test_null_and_blank_rows_are_rejected_with_a_reason_never_the_string_none(tmp_path: Path) -> None:
    rows = [
        ("ok", "abc=", "cba"),
        ("null-prompt", None, "x"),
        ("blank-prompt", " \t", "x"),
        ("null-answer", "q=", None),
        ("blank-answer", "q=", "  "),
    ]
    table = pa.table(
        {
            "prompt_id": [r[0] for r in rows],
            "prompt": pa.array([r[1] for r in rows], pa.string()),
            "answer": pa.array([r[2] for r in rows], pa.string()),
        }
    )
    pq.write_table(table, tmp_path / "p.parquet")
    source = PromptSource(PromptSpec(path=str(tmp_path / "p.parquet")))
    items = {item.prompt_id: item for item in (source.next() for _ in range(len(rows)))}
    assert {k: v.rejected for k, v in items.items()} == {
        "ok": None,
        "null-prompt": "null_prompt",
        "blank-prompt": "blank_prompt",
        "null-answer": "null_answer",
        "blank-answer": "blank_answer",
    }
    assert (items["ok"].prompt, items["ok"].answer) == ("abc=", "cba")
    assert all(v.prompt == v.answer == "" for k, v in items.items() if k != "ok")
    assert source.next_position == len(rows)  # rejected rows are consumed: the cursor moves past them


def test_chat_lists_and_numbers_in_a_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    lines = [
        {"prompt_id": "chat", "prompt": [{"role": "user", "content": "hi"}], "answer": "x"},
        {"prompt_id": "int-answer", "prompt": "1+1=", "answer": 2},
        {"prompt_id": "list-answer", "prompt": "q", "answer": ["a"]},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = PromptSource(PromptSpec(path=str(path)))
    items = {item.prompt_id: item for item in (source.next() for _ in range(3))}
    assert items["chat"].rejected == "non_text_prompt"
    assert (items["int-answer"].answer, items["int-answer"].rejected) == ("2", None)
    assert items["list-answer"].rejected == "non_text_answer"


def test_a_non_utf8_jsonl_is_one_line_naming_the_file_and_byte_offset(tmp_path: Path) -> None:
    from tasks.data_files import DataFileError

    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "café=", "answer": "x"}) + "\n"  # UTF-8 é: fine
    bad = json.dumps({"prompt": "PLACEHOLDER", "answer": "x"}).replace("PLACEHOLDER", "caf\\u00e9") + "\n"
    data = good.encode() + bad.encode().replace(b"caf\\u00e9", "café".encode("latin-1"))
    path.write_bytes(data)
    offset = data.index(b"\xe9", len(good.encode()))
    with pytest.raises(DataFileError) as info:
        PromptSource(PromptSpec(path=str(path)))
    # latin-1 é (0xe9) followed by a quote is not a UTF-8 sequence
    assert str(info.value) == (
        f"{path}: not UTF-8 text at byte offset {offset} (line 2): invalid continuation byte; save the file "
        "as UTF-8"
    )
