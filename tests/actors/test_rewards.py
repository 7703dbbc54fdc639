"""Reward registry and the scorer's error/timeout handling (no engine)."""

from __future__ import annotations

import time

import pytest

from actors.config import RewardConfig
from actors.rewards import REWARDS, RewardScorer, exact_match, load_function, partial_match, resolve_reward
from tasks.synthetic import is_correct


def test_exact_match_strips_whitespace() -> None:
    assert exact_match(" cba\n", "cba") == 1.0
    assert exact_match("cb a", "cba") == 0.0
    assert exact_match("", "cba") == 0.0


# Decoded responses of the reversal task against the answer "cba", with the held-out verdict worked
# by hand: only surrounding whitespace is forgiven; EOS text that was not skipped, inner spaces,
# case and extra letters are wrong.
HELDOUT_VERDICTS = [
    ("cba", True),
    ("cba ", True),
    ("cba\n", True),
    ("\tcba\r\n", True),
    ("  cba  \n\n", True),
    ("cba</s>", False),
    ("cba </s>", False),
    ("cba\n</s>", False),
    ("<s>cba", False),
    ("c ba", False),
    ("CBA", False),
    ("cbaa", False),
    ("cb", False),
    ("abc", False),
    ("", False),
    ("   ", False),
]


@pytest.mark.parametrize(("response", "correct"), HELDOUT_VERDICTS)
def test_exact_match_reward_agrees_with_heldout_accuracy(response: str, correct: bool) -> None:
    # Training reward and held-out accuracy (tasks.synthetic.is_correct) must judge every
    # response alike, or RL optimises something the held-out number does not measure.
    assert is_correct(response, "cba") is correct
    assert exact_match(response, "cba") == float(correct)
    # the dense reward reaches its maximum exactly on the responses held-out counts as correct
    assert (partial_match(response, "cba") == 1.0) is correct


def test_exact_match_in_the_scorer_child_agrees_with_heldout_accuracy() -> None:
    scorer = RewardScorer(RewardConfig(type="exact_match", timeout_s=10))
    try:
        rewards = scorer.score([r for r, _ in HELDOUT_VERDICTS], ["cba"] * len(HELDOUT_VERDICTS))
    finally:
        scorer.close()
    assert rewards == [float(correct) for _, correct in HELDOUT_VERDICTS]


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("cba", "cba", 1.0),
        ("cbx", "cba", 2 / 3),  # c, b agree at positions 0, 1; 2 of max(3, 3)
        ("cb", "cba", 2 / 3),  # right prefix, one short: 2 of max(2, 3)
        ("cbaaa", "cba", 3 / 5),  # right answer plus 2 extra characters: 3 of max(5, 3)
        ("abc", "cba", 1 / 3),  # only the middle 'b' is in place
        ("", "cba", 0.0),
        ("", "", 1.0),
        ("  cba ", "cba", 1.0),
    ],
)
def test_partial_match_is_positionwise_over_longer_length(
    response: str, answer: str, expected: float
) -> None:
    assert partial_match(response, answer) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("0.5", "1/2", 1.0),
        (r"The answer is $\boxed{\frac{1}{2}}$.", "1/2", 1.0),
        (r"$\boxed{0.5}$", r"\frac{1}{2}", 1.0),
        (r"\frac{1}{2}", "0.5", 1.0),
        (r"$\boxed{1/3}$", "1/2", 0.0),
        (r"\boxed{", "1/2", 0.0),  # malformed: nothing to extract
        ("no number here", "1/2", 0.0),
        ("7" * 20000, "1/2", 0.0),  # huge output, wrong
    ],
)
def test_math_reward_accepts_equivalent_forms(response: str, answer: str, expected: float) -> None:
    assert REWARDS["math"](response, answer) == expected


def test_python_reward_by_import_path() -> None:
    fn = resolve_reward(RewardConfig(type="python", function="tests.actors.reward_fns:length_reward"))
    assert fn("abcd", "x") == 4.0
    with pytest.raises(ValueError, match="package.module:function"):
        load_function("no_colon_here")
    with pytest.raises(ValueError, match="cannot import"):
        load_function("tests.actors.does_not_exist:fn")
    with pytest.raises(ValueError, match="no callable"):
        load_function("tests.actors.reward_fns:missing")
    with pytest.raises(ValueError, match="reward.function"):
        resolve_reward(RewardConfig(type="python"))


def test_scorer_counts_errors_and_timeouts_and_keeps_going() -> None:
    scorer = RewardScorer(
        RewardConfig(type="python", function="tests.actors.reward_fns:flaky_reward", timeout_s=0.5)
    )
    try:
        responses = ["cba", "x", "y", "cb", "z"]
        answers = ["cba", "boom", "hang", "cba", "hang"]
        started = time.monotonic()
        rewards = scorer.score(responses, answers)
        elapsed_s = time.monotonic() - started
        assert rewards == pytest.approx([1.0, 0.0, 0.0, 2 / 3, 0.0])
        assert scorer.stats.errors == 1 and scorer.stats.timeouts == 2 and scorer.stats.calls == 5
        assert scorer.stats.errors_by_type == {"RuntimeError": 1}
        assert scorer.stats.child_restarts == 2
        # Two 0.5 s deadlines plus two child start-ups; a hang that was not killed would never return.
        assert elapsed_s < 30
        assert scorer.score(["ab"], ["ab"]) == [1.0]  # fine afterwards
    finally:
        scorer.close()


def test_nan_and_inf_rewards_score_zero_and_are_counted() -> None:
    scorer = RewardScorer(RewardConfig(type="python", function="tests.actors.reward_fns:nonfinite_reward"))
    try:
        rewards = scorer.score(["a", "b", "c", "d"], ["nan", "inf", "-inf", "ok"])
        assert rewards == [0.0, 0.0, 0.0, 1.0]
        assert scorer.stats.nonfinite == 3 and scorer.stats.calls == 4 and scorer.stats.errors == 0
        assert scorer.stats.reward_sum == 1.0
        assert scorer.stats.last_error == "reward function returned -inf"  # the last of them
    finally:
        scorer.close()


def test_batch_budget_scores_the_rest_zero_and_counts_it() -> None:
    # each call takes 0.3 s, well inside the per-call timeout; the batch may take 1.2 s in all
    cfg = RewardConfig(
        type="python", function="tests.actors.reward_fns:slow_reward", timeout_s=5.0, batch_budget_s=1.2
    )
    scorer = RewardScorer(cfg)
    try:
        assert scorer.score(["warm"], ["0"]) == [1.0]  # the child is up: its start-up is not timed below
        started = time.monotonic()
        rewards = scorer.score(["r"] * 10, ["0.3"] * 10)
        elapsed_s = time.monotonic() - started
        scored = rewards.count(1.0)
        # 1.2 s / 0.3 s = 4 calls fit at most (a loaded machine may fit fewer); without a budget all 10
        # would score 1.0, after 10 x 0.3 = 3 s
        assert 1 <= scored <= 4 and rewards == [1.0] * scored + [0.0] * (10 - scored), rewards
        assert scorer.stats.over_budget == 10 - scored and scorer.stats.timeouts == 0
        assert elapsed_s < 2.9
        # the busy child was replaced; the next batch gets its own budget
        assert scorer.score(["r"], ["0"]) == [1.0]
    finally:
        scorer.close()


def test_scorer_builtin_in_child() -> None:
    scorer = RewardScorer(RewardConfig(type="math", timeout_s=10))
    try:
        assert scorer.score([r"\boxed{0.5}", "2"], ["1/2", "3"]) == [1.0, 0.0]
    finally:
        scorer.close()
