"""Math loaders on the local fixtures: DAPO layout, DAPO500 split, AIME layouts, prompt template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from tasks import math_data
from tasks.evaluation import load_prompt_set
from tasks.tiny_model import build_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DAPO_JSONL = FIXTURES / "dapo_math_sample.jsonl"
AIME_JSONL = FIXTURES / "aime_sample.jsonl"


def _raw_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dapo_rows_are_normalised_and_deduplicated() -> None:
    raw = _raw_rows(DAPO_JSONL)
    ds = math_data.load_math_dataset(str(DAPO_JSONL))
    assert ds.column_names == list(math_data.MATH_COLUMNS)
    # 20 stored rows, 4 of them repeats of earlier questions
    assert len(raw) == 20 and len(ds) == 16
    first = ds[0]
    assert first == {
        "prompt_id": raw[0]["extra_info"]["index"],
        "problem": "What is $17 + 25$?",
        "answer": "42",
        "data_source": "math_dapo",
    }
    for problem in ds["problem"]:
        assert "Solve the following" not in problem and "Answer:" not in problem
    assert ds[1]["answer"] == "\\frac{3}{8}"
    assert len(set(ds["prompt_id"])) == len(ds)


def test_parquet_file_and_hub_layout_directory_load_the_same_rows(tmp_path: Path) -> None:
    expected = math_data.load_math_dataset(str(DAPO_JSONL)).to_list()
    stored = Dataset.from_list(_raw_rows(DAPO_JSONL))
    parquet = tmp_path / "dapo.parquet"
    stored.to_parquet(str(parquet))
    assert math_data.load_math_dataset(str(parquet)).to_list() == expected
    # A directory laid out like a hub dataset repo goes through load_dataset(name, split=...),
    # the production branch for "BytedTsinghua-SIA/DAPO-Math-17k".
    repo = tmp_path / "DAPO-Math-17k"
    (repo / "data").mkdir(parents=True)
    stored.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    assert math_data.load_math_dataset(f"{repo}@train").to_list() == expected


def test_heldout_split_is_deterministic_disjoint_and_order_independent() -> None:
    ds = math_data.load_math_dataset(str(DAPO_JSONL))
    train, heldout = math_data.split_heldout(ds, n_heldout=5, seed=3)
    assert len(heldout) == 5 and len(train) == 11
    assert set(train["problem"]).isdisjoint(heldout["problem"])
    assert set(train["problem"]) | set(heldout["problem"]) == set(ds["problem"])
    # same seed, rows reversed -> same held-out questions
    _, again = math_data.split_heldout(ds.select(range(len(ds) - 1, -1, -1)), n_heldout=5, seed=3)
    assert set(again["prompt_id"]) == set(heldout["prompt_id"])
    _, other_seed = math_data.split_heldout(ds, n_heldout=5, seed=4)
    assert set(other_seed["prompt_id"]) != set(heldout["prompt_id"])
    with pytest.raises(ValueError, match="cannot hold out 16 of 16"):
        math_data.split_heldout(ds, n_heldout=16)


def test_train_and_heldout_parts_of_a_spec_partition_the_questions() -> None:
    train = math_data.load_math_dataset(f"{DAPO_JSONL}#train", n_heldout=4, heldout_seed=0)
    heldout = math_data.load_math_dataset(f"{DAPO_JSONL}#heldout", n_heldout=4, heldout_seed=0)
    assert len(train) == 12 and len(heldout) == 4
    assert set(train["prompt_id"]).isdisjoint(heldout["prompt_id"])


def test_named_sources_map_to_the_paper_sets() -> None:
    assert math_data.parse_source_spec("dapo500") == ("BytedTsinghua-SIA/DAPO-Math-17k", "train", "heldout")
    assert math_data.parse_source_spec("dapo-math-17k")[2] == "train"
    assert math_data.parse_source_spec("org/name@test") == ("org/name", "test", "all")
    assert math_data.parse_source_spec("data/x.parquet#heldout") == ("data/x.parquet", "train", "heldout")
    with pytest.raises(ValueError, match="part must be"):
        math_data.parse_source_spec("x.parquet#dev")


def test_aime_problem_answer_layouts(tmp_path: Path) -> None:
    ds = math_data.load_math_dataset(str(AIME_JSONL))
    assert len(ds) == 5
    assert ds[0] == {
        "prompt_id": "60",
        "problem": "Find the number of ordered pairs $(a,b)$ of positive integers with $a+b=20$ and $a<b$.",
        "answer": "9",
        "data_source": "aime_sample",
    }
    # AIME25 copies name the column 'question' and store int answers, without ids
    variant = tmp_path / "aime25.jsonl"
    variant.write_text(json.dumps({"question": "Find $2+3$.", "answer": 5}) + "\n")
    row = math_data.load_math_dataset(str(variant))[0]
    assert row == {
        "prompt_id": "aime25-000000",
        "problem": "Find $2+3$.",
        "answer": "5",
        "data_source": "aime25",
    }


def test_unknown_layout_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": 1}) + "\n")
    with pytest.raises(ValueError, match="unrecognised math data layout"):
        math_data.load_math_dataset(str(bad))
    with pytest.raises(FileNotFoundError):
        math_data.load_math_dataset(str(tmp_path / "missing.parquet"))


def test_strip_dapo_wrapper_leaves_bare_problems_alone() -> None:
    assert math_data.strip_dapo_wrapper("  Find $x$.\n") == "Find $x$."
    wrapped = _raw_rows(DAPO_JSONL)[2]["prompt"][0]["content"]
    assert math_data.strip_dapo_wrapper(wrapped) == "Compute $\\sqrt{50}$ in simplest radical form."


def test_prompt_template_uses_the_chat_template_when_present() -> None:
    tokenizer = build_tokenizer()
    plain = math_data.render_prompt("Find $x$.", tokenizer)
    assert plain == "Find $x$.\nPlease reason step by step, and put your final answer within \\boxed{}.\n"
    # A minimal Qwen-style template: the instruction must land inside the user turn, and the
    # generation prompt must open the assistant turn.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    chat = math_data.render_prompt("Find $x$.", tokenizer)
    assert chat == (
        "<|im_start|>user\nFind $x$.\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_prompt_sets_for_math_and_synthetic_data(tmp_path: Path) -> None:
    math_set = load_prompt_set("aime", str(AIME_JSONL), "math", tokenizer=None, limit=3)
    assert math_set.prompt_ids == ["60", "61", "62"]
    assert math_set.answers == ["9", "61", "100"]
    assert math_set.prompts[2].startswith("A square has diagonal") and math_set.prompts[2].endswith(
        "\\boxed{}.\n"
    )
    synthetic = tmp_path / "heldout.parquet"
    Dataset.from_list([{"prompt_id": "h-0", "prompt": "abc=", "answer": "cba", "difficulty": 3}]).to_parquet(
        str(synthetic)
    )
    syn = load_prompt_set("heldout", str(synthetic), "synthetic", tokenizer=None)
    assert (syn.prompt_ids, syn.prompts, syn.answers) == (["h-0"], ["abc="], ["cba"])
    with pytest.raises(ValueError, match="missing column"):
        load_prompt_set("heldout", str(synthetic), "synthetic", tokenizer=None, answer_key="target")


def test_bad_rows_are_skipped_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from collections import Counter

    good = _raw_rows(AIME_JSONL)[:3]
    bad = [
        {"id": 90, "problem": "What is $1+1$?", "answer": None},
        {"id": 91, "problem": "   ", "answer": "3"},
        {"id": 92, "problem": ["not", "text"], "answer": "4"},
        {"id": 93, "problem": "What is $2+2$?", "answer": ""},
    ]
    path = tmp_path / "mixed.jsonl"
    rows = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skipped: Counter[str] = Counter()
    with caplog.at_level("WARNING", logger="tasks.math_data"):
        ds = math_data.load_math_dataset(str(path), skipped=skipped)
    assert ds["problem"] == [r["problem"] for r in good]
    assert skipped == {"no_answer": 2, "empty_problem": 1, "malformed": 1}
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "mixed: skipped 4 of 7 rows that cannot be used (empty_problem 1, malformed 1, no_answer 2); "
        "first: row 1:"
    )


def test_a_set_without_one_usable_row_is_an_error_naming_why(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "q", "answer": None}) + "\n")
    with pytest.raises(
        ValueError, match=r"bad: no usable rows \(skipped: no_answer 1; row 0: no reference answer"
    ):
        math_data.load_math_dataset(str(path))


def test_a_non_utf8_math_file_names_the_file_and_byte(tmp_path: Path) -> None:
    from tasks.data_files import DataFileError

    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"problem": "\xe9", "answer": "1"}\n')
    with pytest.raises(DataFileError, match=r"bad\.jsonl: not UTF-8 text at byte offset 13 \(line 1\)"):
        math_data.load_math_dataset(str(path))
