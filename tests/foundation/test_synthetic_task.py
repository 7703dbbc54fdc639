"""The reversal task: deterministic splits, disjoint, with correct answers."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from driftrl.synthetic_task import (
    COLUMNS,
    ReversalSpec,
    is_correct,
    load_rows,
    make_dataset,
    make_rows,
    normalise_response,
)


def test_same_seed_same_files_other_seed_other_rows(tmp_path: Path) -> None:
    a_train, a_held = make_dataset(tmp_path / "a", seed=3, n_train=500, n_heldout=100)
    b_train, b_held = make_dataset(tmp_path / "b", seed=3, n_train=500, n_heldout=100)
    assert load_rows(a_train) == load_rows(b_train)
    assert load_rows(a_held) == load_rows(b_held)
    c_train, _ = make_dataset(tmp_path / "c", seed=4, n_train=500, n_heldout=100)
    assert load_rows(c_train) != load_rows(a_train)


def test_columns_types_and_row_counts(tmp_path: Path) -> None:
    train, held = make_dataset(tmp_path, seed=0, n_train=300, n_heldout=50)
    assert (train.name, held.name) == ("train.parquet", "heldout.parquet")
    table = pq.read_table(train)
    assert tuple(table.column_names) == COLUMNS
    assert [str(t) for t in table.schema.types] == ["string", "string", "string", "int64"]
    assert table.num_rows == 300 and pq.read_table(held).num_rows == 50
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"


def test_splits_are_disjoint_even_on_a_small_space() -> None:
    # 3 letters, lengths 1..3: 3 + 9 + 27 = 39 distinct strings; ask for 30 + 9 of them.
    spec = ReversalSpec(min_len=1, max_len=3, alphabet_size=3)
    assert spec.capacity() == 39
    train, held = make_rows(0, 30, 9, spec, spec)
    prompts_train = {r["prompt"] for r in train}
    prompts_held = {r["prompt"] for r in held}
    assert len(prompts_train) == 30 and len(prompts_held) == 9
    assert not prompts_train & prompts_held
    assert len({r["prompt_id"] for r in train + held}) == 39
    with pytest.raises(ValueError, match="cannot draw"):
        make_rows(0, 31, 9, spec, spec)


def test_answers_are_the_reversed_prompts_within_the_spec() -> None:
    spec = ReversalSpec(min_len=4, max_len=7, alphabet_size=5)
    train, held = make_rows(1, 400, 100, spec, ReversalSpec(min_len=8, max_len=9, alphabet_size=5))
    for r in train:
        text = r["prompt"].removesuffix("=")
        assert r["prompt"] == text + "="
        assert r["answer"] == text[::-1]
        assert r["difficulty"] == len(text)
        assert 4 <= len(text) <= 7 and set(text) <= set("abcde")
    assert {r["difficulty"] for r in train} == {4, 5, 6, 7}
    assert {r["difficulty"] for r in held} == {8, 9}
    assert make_rows(1, 3, 0, spec, spec)[0][0]["prompt_id"] == "train-000000"


def test_exact_match_ignores_only_surrounding_whitespace() -> None:
    assert is_correct("cba", "cba")
    assert is_correct(" cba\n", "cba")
    assert not is_correct("cb a", "cba")
    assert not is_correct("cbaa", "cba")
    assert not is_correct("", "cba")
    assert normalise_response("\tx y ") == "x y"


@pytest.mark.parametrize(("min_len", "max_len", "alphabet_size"), [(0, 3, 5), (4, 3, 5), (1, 3, 1), (1, 3, 27)])
def test_bad_spec_is_rejected(min_len: int, max_len: int, alphabet_size: int) -> None:
    with pytest.raises(ValueError):
        ReversalSpec(min_len=min_len, max_len=max_len, alphabet_size=alphabet_size)
