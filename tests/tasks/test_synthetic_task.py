"""The reversal task: deterministic splits, disjoint, with correct answers."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from driftrl.cli import main
from tasks.synthetic import (
    COLUMNS,
    ReversalSpec,
    TaskSpecError,
    is_correct,
    load_rows,
    make_dataset,
    make_rows,
    normalise_response,
    write_dataset,
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


@pytest.mark.parametrize(
    ("min_len", "max_len", "alphabet_size"),
    [(0, 3, 5), (-2, 3, 5), (4, 3, 5), (1, 3, 1), (1, 3, 27), (1.5, 3, 5), (1, True, 5)],
)
def test_bad_spec_is_rejected(min_len: int, max_len: int, alphabet_size: int) -> None:
    with pytest.raises(TaskSpecError):
        ReversalSpec(min_len=min_len, max_len=max_len, alphabet_size=alphabet_size)


def test_bad_row_counts_are_rejected_before_writing(tmp_path: Path) -> None:
    spec = ReversalSpec()
    with pytest.raises(TaskSpecError, match="n_train must be an integer >= 0, got -1"):
        make_rows(0, -1, 5, spec, spec)
    with pytest.raises(TaskSpecError, match="n_heldout must be an integer >= 0, got 2.5"):
        make_rows(0, 5, 2.5, spec, spec)  # type: ignore[arg-type]
    # an empty split is fine in memory but is not written: its parquet would have no columns
    with pytest.raises(TaskSpecError, match="n_heldout must be an integer >= 1, got 0"):
        write_dataset(tmp_path / "train.parquet", tmp_path / "heldout.parquet", n_train=5, n_heldout=0)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-len", "-3"], "need 1 <= min_len <= max_len, got min_len=-3, max_len=10"),
        (["--min-len", "5", "--max-len", "3"], "need 1 <= min_len <= max_len, got min_len=5, max_len=3"),
        (["--min-len", "12"], "need 1 <= min_len <= max_len, got min_len=12, max_len=10"),
        (["--alphabet-size", "30"], "alphabet_size must be in 2..26, got 30"),
        (["--n-train", "-5"], "n_train must be an integer >= 1, got -5"),
        (["--n-heldout", "0"], "n_heldout must be an integer >= 1, got 0"),
        # 2 letters of length 1 make 2 strings: 1 held out leaves 1 for train
        (
            [
                "--min-len",
                "1",
                "--max-len",
                "1",
                "--alphabet-size",
                "2",
                "--n-heldout",
                "1",
                "--n-train",
                "2",
            ],
            "ReversalSpec(min_len=1, max_len=1, alphabet_size=2) holds 2 distinct strings, cannot draw 2 new ones",
        ),
    ],
)
def test_make_data_bad_knob_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "data"
    assert main(["make-data", str(out), *args]) == 2
    stdout, stderr = capsys.readouterr()
    assert stdout == ""
    assert stderr == f"driftrl make-data: error: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus", "1"], "driftrl: error: unrecognized arguments: --bogus 1"),
        (["--min-len", "three"], "driftrl make-data: error: argument --min-len: invalid int value: 'three'"),
    ],
)
def test_make_data_unknown_option_or_non_integer_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    # argparse answers these itself: its usage lines, then the one error line, and exit code 2
    with pytest.raises(SystemExit) as info:
        main(["make-data", str(tmp_path / "data"), *args])
    assert info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.splitlines()[-1] == message
    assert "Traceback" not in stderr
    assert not (tmp_path / "data").exists()


def test_make_data_writes_the_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--n-train", "40", "--n-heldout", "8", "--min-len", "2", "--max-len", "4", "--alphabet-size", "3"]
    assert main(["make-data", str(tmp_path), *args]) == 0
    assert capsys.readouterr().out.startswith("reversal task written: ")
    train, held = load_rows(tmp_path / "train.parquet"), load_rows(tmp_path / "heldout.parquet")
    assert (len(train), len(held)) == (40, 8)
    assert {r["difficulty"] for r in train + held} <= {2, 3, 4}
