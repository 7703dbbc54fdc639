"""The ``math`` reward (actors/rewards.py, math-verify) on a table of cases, and under the scorer's deadline.

Reference answers come in two shapes: integers (DAPO-Math-17k and AIME answers are all integers)
and bare LaTeX without ``$`` delimiters (MATH-style sets: ``\\frac{3}{8}``, ``5\\sqrt{2}``). The
second shape is where a verifier can go quietly wrong: math-verify's plain-expression parser reads
a bare ``5\\sqrt{2}`` as ``5``.
"""

from __future__ import annotations

import time

import pytest

from actors.config import RewardConfig
from actors.rewards import RewardScorer, latex_reference, math_equivalent

CASES = [
    # equivalent fractions
    pytest.param(r"The answer is \boxed{\frac{6}{16}}", r"\frac{3}{8}", 1.0, id="frac-unreduced"),
    pytest.param(r"\boxed{3/8}", r"\frac{3}{8}", 1.0, id="frac-slash"),
    pytest.param(r"\boxed{0.375}", r"\frac{3}{8}", 1.0, id="frac-decimal"),
    pytest.param(r"\boxed{\dfrac{2}{3}}", r"\frac{2}{3}", 1.0, id="dfrac"),
    pytest.param(r"\boxed{\frac{3}{7}}", r"\frac{3}{8}", 0.0, id="frac-wrong"),
    # equivalent radicals: sqrt(50) = 5 sqrt(2) = 10 / sqrt(2). A bare-LaTeX reference parsed
    # without "$...$" reads "5\sqrt{2}" as 5 and "9\pi" as 9 (right answers 0, "\boxed{5}" 1); these
    # cases pin the wrapping in actors.rewards.latex_reference.
    pytest.param(r"so $\boxed{\sqrt{50}}$", r"5\sqrt{2}", 1.0, id="radical-unsimplified"),
    pytest.param(r"\boxed{\frac{10}{\sqrt{2}}}", r"5\sqrt{2}", 1.0, id="radical-in-denominator"),
    pytest.param(r"\boxed{5\sqrt{2}}", r"5\sqrt{2}", 1.0, id="radical-same"),
    pytest.param(r"\boxed{5}", r"5\sqrt{2}", 0.0, id="radical-dropped"),
    # 7.07 != 5 sqrt(2) = 7.0710678...: an approximation is not the answer
    pytest.param(r"\boxed{7.07}", r"5\sqrt{2}", 0.0, id="radical-approximation"),
    pytest.param(r"\boxed{9\pi}", r"9\pi", 1.0, id="pi-same"),
    # other bare-LaTeX references the plain-expression parser misreads: a polynomial (no parse at
    # all), an escaped dollar (no parse), an interval (read as its right endpoint 3)
    pytest.param(r"\boxed{1+x^2}", "x^2+1", 1.0, id="polynomial-reordered"),
    pytest.param(r"\boxed{x^2}", "x^2+1", 0.0, id="polynomial-wrong"),
    pytest.param(r"\boxed{18.9}", r"\$18.90", 1.0, id="escaped-dollar"),
    pytest.param(r"\boxed{[-2,3)}", "[-2, 3)", 1.0, id="interval-same"),
    pytest.param(r"\boxed{[-2,3]}", "[-2, 3)", 0.0, id="interval-closed-vs-half-open"),
    pytest.param(r"\boxed{3}", "[-2, 3)", 0.0, id="interval-endpoint-only"),
    # references with delimiters or a box already parse as LaTeX and are not wrapped again
    pytest.param(r"\boxed{\sqrt{50}}", r"$5\sqrt{2}$", 1.0, id="radical-delimited-gold"),
    pytest.param(r"\boxed{\sqrt{50}}", r"\(5\sqrt{2}\)", 1.0, id="radical-paren-delimited-gold"),
    pytest.param(r"\boxed{\sqrt{50}}", r"\boxed{5\sqrt{2}}", 1.0, id="radical-boxed-gold"),
    # boxed vs plain
    pytest.param(r"\boxed{42}", "42", 1.0, id="boxed-int"),
    pytest.param("The answer is 42", "42", 1.0, id="plain-int"),
    pytest.param("Answer: 42", "42", 1.0, id="dapo-answer-line"),
    pytest.param(r"We have 3 apples and 4 pears, so \boxed{7}", "7", 1.0, id="boxed-wins-over-text"),
    pytest.param(r"We have 3 apples and 4 pears, so \boxed{7}", "4", 0.0, id="number-in-text-not-answer"),
    # AIME references are often zero-padded
    pytest.param(r"\boxed{33}", "033", 1.0, id="aime-zero-padded"),
    # wrong answers
    pytest.param(r"\boxed{41}", "42", 0.0, id="int-wrong"),
    pytest.param(r"\boxed{42} or maybe \boxed{41}", "42", 0.0, id="hedged-two-answers"),
    # malformed output scores 0, never raises
    pytest.param(r"\boxed{\frac{3}{", r"\frac{3}{8}", 0.0, id="unclosed-brace"),
    pytest.param("", "42", 0.0, id="empty"),
    pytest.param("no answer here", "42", 0.0, id="no-number"),
    pytest.param("}}}{{{\\\\", "42", 0.0, id="brace-soup"),
]


@pytest.mark.parametrize(("response", "answer", "expected"), CASES)
def test_math_reward_table(response: str, answer: str, expected: float) -> None:
    assert math_equivalent(response, answer) == expected


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        (r"5\sqrt{2}", r"$5\sqrt{2}$"),
        (" 42\n", "$42$"),
        (r"\$18.90", r"$\$18.90$"),  # an escaped dollar is content, not a delimiter
        (r"$5\sqrt{2}$", r"$5\sqrt{2}$"),
        (r"\(5\sqrt{2}\)", r"\(5\sqrt{2}\)"),
        (r"\[5\sqrt{2}\]", r"\[5\sqrt{2}\]"),
        (r"\boxed{5\sqrt{2}}", r"\boxed{5\sqrt{2}}"),
    ],
)
def test_reference_is_wrapped_in_dollars_only_when_bare(answer: str, parsed: str) -> None:
    assert latex_reference(answer) == parsed


def test_huge_output_is_scored_by_its_final_answer() -> None:
    # 400 k characters of noise before the boxed answer
    response = "1 " * 200_000 + r"\boxed{42}"
    start = time.monotonic()
    assert math_equivalent(response, "42") == 1.0
    assert math_equivalent(response, "41") == 0.0
    assert time.monotonic() - start < 5.0


def test_scorer_deadline_bounds_a_pathological_answer_and_keeps_scoring() -> None:
    # 9^(9^(9^9)) sends sympy into an unbounded evaluation; the scorer's deadline (1 s here, below
    # math-verify's own 5 s alarm) must score it 0, count it, and go on with the next response.
    scorer = RewardScorer(RewardConfig(type="math", timeout_s=1.0))
    try:
        start = time.monotonic()
        rewards = scorer.score(
            [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{\frac{6}{16}}", "garbage"], ["42", r"\frac{3}{8}", "1"]
        )
        elapsed = time.monotonic() - start
    finally:
        scorer.close()
    assert rewards == [0.0, 1.0, 0.0]
    assert scorer.stats.timeouts == 1 and scorer.stats.errors == 0
    # one deadline plus two child start-ups (spawn + importing math-verify/sympy: ~1-3 s each on this
    # machine); a scorer waiting on math-verify's own alarm instead would still finish, so the bound
    # is loose on purpose and the timeout counter above is the real check.
    assert elapsed < 30.0
