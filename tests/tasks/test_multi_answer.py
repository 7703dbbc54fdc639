"""The synthetic task's multi_answer variant: generator, scorer and what the warm start is taught."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.rewards import exact_match
from driftrl.cli import make_verifier
from driftrl.config import load_config
from tasks.synthetic import (
    ANSWER_SEPARATOR,
    SFT_TARGET,
    ReversalSpec,
    TaskSpecError,
    is_correct,
    load_rows,
    make_rows,
    reverse_answer,
    valid_answers,
    write_dataset,
)

SPEC = ReversalSpec(min_len=3, max_len=6, alphabet_size=3)


def _text(row: dict) -> str:
    return row["prompt"][:-1]


def test_every_row_lists_reversal_then_copy_and_no_palindromes() -> None:
    train, held = make_rows(0, 400, 100, SPEC, SPEC, variant="multi_answer", rare_frac=0.25)
    for row in train + held:
        text = _text(row)
        assert text != text[::-1], "a palindrome has one answer, not two"
        assert valid_answers(row["answer"]) == [reverse_answer(text), text]
        assert row["difficulty"] == len(text)
    # held-out rows carry every valid answer as their target, so a warm start's accuracy counts any
    assert all(row[SFT_TARGET] == row["answer"] for row in held)
    assert not {_text(r) for r in train} & {_text(r) for r in held}


def test_warm_start_targets_the_copy_on_exactly_rare_frac_of_train_rows() -> None:
    train, _ = make_rows(3, 400, 10, SPEC, SPEC, variant="multi_answer", rare_frac=0.25)
    copies = [r for r in train if r[SFT_TARGET] == _text(r)]
    reversals = [r for r in train if r[SFT_TARGET] == reverse_answer(_text(r))]
    assert len(copies) == 100 and len(reversals) == 300
    # a single answer, one of the two valid ones
    assert all(ANSWER_SEPARATOR not in r[SFT_TARGET] for r in train)
    # deterministic for a seed, different for another
    assert make_rows(3, 400, 10, SPEC, SPEC, variant="multi_answer", rare_frac=0.25)[0] == train
    assert make_rows(4, 400, 10, SPEC, SPEC, variant="multi_answer", rare_frac=0.25)[0] != train


def test_reversal_variant_is_unchanged() -> None:
    train, held = make_rows(0, 50, 10, SPEC, SPEC)
    assert all(set(r) == {"prompt_id", "prompt", "answer", "difficulty"} for r in train + held)
    assert all(r["answer"] == reverse_answer(_text(r)) for r in train)
    # the reversal task still draws palindromes
    tiny = ReversalSpec(min_len=3, max_len=3, alphabet_size=2)
    every, _ = make_rows(0, 8, 0, tiny, tiny)
    assert sum(_text(r) == _text(r)[::-1] for r in every) == 4
    # without palindromes 8 - 4 strings are left, and asking for more is refused, not a hang
    assert len(make_rows(0, 4, 0, tiny, tiny, variant="multi_answer")[0]) == 4
    with pytest.raises(TaskSpecError, match="cannot draw 5"):
        make_rows(0, 5, 0, tiny, tiny, variant="multi_answer")


@pytest.mark.parametrize("score", [is_correct, lambda r, a: exact_match(r, a) == 1.0])
def test_any_valid_answer_scores_and_nothing_else(score) -> None:
    answer = "cba|abc"
    assert score("cba", answer) and score("abc", answer) and score(" abc\n", answer)
    for wrong in ("", "bca", "cb", "cbaabc", "cba|abc", "abcc", "|"):
        assert not score(wrong, answer), wrong
    # one-answer cells are exact match as before
    assert score("cba", "cba") and not score("abc", "cba")


def test_evaluation_verifier_accepts_either_answer() -> None:
    verify = make_verifier("synthetic")
    assert verify(["dcba", "abcd", "abdc"], ["dcba|abcd"] * 3) == [True, True, False]


def test_bad_variant_or_rare_frac_is_refused() -> None:
    with pytest.raises(TaskSpecError, match="variant"):
        make_rows(0, 5, 5, SPEC, SPEC, variant="copy")
    with pytest.raises(TaskSpecError, match="rare_frac"):
        make_rows(0, 5, 5, SPEC, SPEC, variant="multi_answer", rare_frac=1.0)


def test_written_split_and_config_option(tmp_path: Path) -> None:
    train, held = write_dataset(
        tmp_path / "t.parquet", tmp_path / "h.parquet", n_train=40, n_heldout=8, variant="multi_answer"
    )
    rows = load_rows(train)
    assert len(rows) == 40 and all(len(valid_answers(r["answer"])) == 2 for r in rows)
    assert '"task": "multi_answer"' in (tmp_path / "t.spec.json").read_text()
    cfg = load_config(None, ["task.variant=multi_answer", "task.rare_frac=0.3"])
    assert (cfg.task.variant, cfg.task.rare_frac) == ("multi_answer", 0.3)
    assert load_config(None).task.variant == "reversal"
