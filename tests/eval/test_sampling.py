"""KSampler seeding and the pass-rate filter, over a scripted stand-in for a vLLM engine.

The real engine runs in test_eval_e2e.py; here the engine is a small scripted object so the
bookkeeping (order, seeds, thresholds, written file) is checked in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from tasks.evaluation import (
    KSampler,
    PromptSet,
    SamplingSetup,
    evaluate_prompt_set,
    filter_by_pass_rate,
    write_filtered,
)


class ScriptedEngine:
    """Answers prompt ``"q<i>"`` with ``correct[i]`` copies of "right" then "wrong", out of order.

    Records every request's SamplingParams so seeds can be checked.
    """

    def __init__(self, correct: list[int]) -> None:
        self.correct = correct
        self.params: list = []

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for prompt, p in zip(prompts, params, strict=True):
            self.params.append(p)
            c = self.correct[int(prompt[1:])]
            completions = [SimpleNamespace(index=j, text="right" if j < c else "wrong") for j in range(p.n)]
            # vLLM does not promise the order of a request's n completions; index does.
            outs.append(SimpleNamespace(outputs=completions[::-1]))
        return outs


def _prompt_set(n: int) -> PromptSet:
    return PromptSet(
        name="toy",
        prompt_ids=[f"id{i}" for i in range(n)],
        prompts=[f"q{i}" for i in range(n)],
        answers=["right"] * n,
    )


def _exact(responses: list[str], answers: list[str]) -> list[bool]:
    return [r == a for r, a in zip(responses, answers, strict=True)]


def test_per_prompt_seeds_never_share_random_streams() -> None:
    engine = ScriptedEngine([0] * 7)
    samples = KSampler(engine).sample(
        [f"q{i}" for i in range(7)], n=4, setup=SamplingSetup(seed=100), chunk_size=3
    )
    assert len(samples) == 7 and all(len(s) == 4 for s in samples)
    # vLLM seeds sample j of a request with seed + j: the ranges [seed, seed + n) must be disjoint
    streams = [s for p in engine.params for s in range(p.seed, p.seed + p.n)]
    assert len(streams) == len(set(streams)) == 28
    assert [p.seed for p in engine.params] == [100 + 4 * i for i in range(7)]
    assert {p.temperature for p in engine.params} == {0.7}


def test_eval_scores_in_prompt_order() -> None:
    engine = ScriptedEngine([4, 0, 1, 2])
    score = evaluate_prompt_set(KSampler(engine), _prompt_set(4), k=4, setup=SamplingSetup(), verifier=_exact)
    assert score.correct_counts == [4, 0, 1, 2]
    # Avg@4 = (4 + 0 + 1 + 2) / 16 = 7/16; Pass@4 = 3 of 4 questions solved
    assert score.avg_at_k == pytest.approx(7 / 16)
    assert score.pass_at_k == pytest.approx(3 / 4)


def test_filter_keeps_strictly_inside_bounds_and_writes_parquet(tmp_path: Path) -> None:
    counts = [0, 1, 2, 9, 14, 15, 16]
    engine = ScriptedEngine(counts)
    prompt_set = _prompt_set(len(counts))
    kept, got_counts, summary = filter_by_pass_rate(
        KSampler(engine), prompt_set, k=16, setup=SamplingSetup(), verifier=_exact
    )
    assert got_counts == counts
    assert kept == [2, 3, 4]
    assert (summary.kept, summary.dropped_too_hard, summary.dropped_too_easy) == (3, 2, 2)
    assert (
        summary.correct_histogram[0] == 1
        and summary.correct_histogram[9] == 1
        and sum(summary.correct_histogram) == 7
    )
    out = write_filtered(tmp_path / "f" / "train.parquet", prompt_set, kept, [c / 16 for c in counts])
    table = pq.read_table(out).to_pylist()
    assert [r["prompt_id"] for r in table] == ["id2", "id3", "id4"]
    assert [r["pass_rate"] for r in table] == [2 / 16, 9 / 16, 14 / 16]
    assert not list(out.parent.glob(".*tmp"))
    json.dumps(summary.__dict__)  # the summary is JSON-serialisable as written by the command
    with pytest.raises(ValueError, match="low < high"):
        filter_by_pass_rate(KSampler(engine), prompt_set, 16, SamplingSetup(), _exact, low=0.5, high=0.5)
