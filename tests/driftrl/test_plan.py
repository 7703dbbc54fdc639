"""driftrl/plan.py: the pipeline simulation on hand-given rates whose answer is worked out by hand,
rates read back from a run directory, and the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from driftrl.cli import main
from driftrl.config import load_config
from driftrl.plan import (
    PipelineRates,
    PipelineShape,
    best_split,
    rates_from_run_dir,
    search_splits,
    simulate,
)
from driftrl.run_dir import create_run_dir

REPO = Path(__file__).resolve().parents[2]
# 4 groups x 2 responses x 10 tokens = 80 tokens per step
SMALL = {"groups_per_step": 4, "group_size": 2, "prompts_per_request": 4}


def test_learner_bound_async_runs_at_the_learner_step_time() -> None:
    # generation ~free: step = 80 tokens / 1000 tokens/s + 0.02 s post-step = 0.1 s -> 10 steps/s.
    # An exact admission count: with the driver's lagging one, free generation floods the buffer
    # with groups that go stale (test below)
    rates = PipelineRates(1e7, 1000.0, learner_post_step_s=0.02, response_lengths=(10,))
    got = simulate(rates, PipelineShape(max_staleness=2, admission_lag_s=0, **SMALL), steps=40)
    assert got.steps_per_s == pytest.approx(10.0, rel=1e-6)
    assert got.learner_idle_frac == pytest.approx(0.0, abs=1e-6)
    assert got.rollout_idle_frac > 0.99
    assert 0.0 < got.staleness_mean <= 2.0


def test_a_lagging_admission_count_over_generates_when_generation_is_fast() -> None:
    # 20x the learner's need: every generate_step call resets the actor's count to the driver's
    # figure from the last stats (2 s old), so it admits again what it has already pushed
    rates = PipelineRates(2e4, 1000.0, learner_post_step_s=0.02, response_lengths=(10,))
    exact = simulate(rates, PipelineShape(max_staleness=2, admission_lag_s=0, **SMALL), steps=40)
    lagging = simulate(rates, PipelineShape(max_staleness=2, **SMALL), steps=40)
    assert lagging.generated_per_trained > 3 * exact.generated_per_trained
    assert lagging.stale_groups > exact.stale_groups


def test_generation_bound_async_runs_at_the_engine_rate() -> None:
    # learner ~free: a step needs 80 tokens at 800 tokens/s = 0.1 s -> 10 steps/s, engine never idle
    rates = PipelineRates(800.0, 1e9, response_lengths=(10,))
    got = simulate(rates, PipelineShape(max_staleness=2, **SMALL), steps=40)
    assert got.steps_per_s == pytest.approx(10.0, rel=1e-6)
    assert got.rollout_idle_frac == pytest.approx(0.0, abs=1e-6)
    assert got.generated_per_trained == pytest.approx(1.0)
    assert got.stale_groups == 0


def test_two_rollout_gpus_double_a_generation_bound_pipeline() -> None:
    rates = PipelineRates(800.0, 1e9, response_lengths=(10,))
    # a group takes 0.1 s to generate while the learner moves 2 versions: max_staleness 8 keeps
    # the staleness bound out of the way
    got = simulate(rates, PipelineShape(max_staleness=8, **SMALL), rollout_actors=2, steps=80)
    # the two engines finish their batches together, so steps end in pairs: the window from step 1
    # to step 80 holds 79 steps in 39 pair intervals of 0.1 s -> 79 / 3.9 = 20.26 steps/s
    assert got.steps_per_s == pytest.approx(79 / 3.9, rel=1e-6)
    assert got.stale_groups == 0
    # with max_staleness 2 the same groups arrive at the bound and some are evicted: slower
    bound = simulate(rates, PipelineShape(max_staleness=2, **SMALL), rollout_actors=2, steps=40)
    assert bound.stale_groups > 0 and bound.steps_per_s < 0.9 * got.steps_per_s


def test_sync_mode_is_the_sum_of_its_phases() -> None:
    # generate 80 / 800 = 0.1 s, train 80 / 400 = 0.2 s, publish 0.03 s, load 0.05 s: 0.38 s a step
    rates = PipelineRates(800.0, 400.0, learner_post_step_s=0.03, weight_load_s=0.05, response_lengths=(10,))
    got = simulate(rates, PipelineShape(mode="sync", max_staleness=2, **SMALL), steps=40)
    assert got.steps_per_s == pytest.approx(1 / 0.38, rel=1e-6)
    assert got.staleness_mean == 0.0
    # the driver calls the actor again before the sample's answer lands, with the lagging buffer
    # count: one batch more is generated each step, at the old version, and evicted as stale
    assert got.generated_per_trained == pytest.approx(2.0, rel=0.03)
    assert got.stale_groups > 0


def test_per_group_rollout_overhead_adds_to_the_sync_generation_phase() -> None:
    # as above, plus 4 groups x 0.01 s outside the engine: 0.38 + 0.04 = 0.42 s a step
    rates = PipelineRates(
        800.0,
        400.0,
        learner_post_step_s=0.03,
        weight_load_s=0.05,
        response_lengths=(10,),
        rollout_group_overhead_s=0.01,
    )
    # an exact admission count: with the lagging one, the stale extra batch's overhead now and
    # then runs into the next generation phase (0.4206 s a step)
    got = simulate(rates, PipelineShape(mode="sync", admission_lag_s=0, **SMALL), steps=40)
    assert got.steps_per_s == pytest.approx(1 / 0.42, rel=1e-6)


def test_async_overlaps_what_sync_adds_up() -> None:
    rates = PipelineRates(800.0, 400.0, learner_post_step_s=0.03, weight_load_s=0.05, response_lengths=(10,))
    sync = simulate(rates, PipelineShape(mode="sync", **SMALL), steps=40)
    asyn = simulate(rates, PipelineShape(mode="async", max_staleness=2, **SMALL), steps=40)
    # async: learner-bound at 0.2 + 0.03 = 0.23 s a step (the engine needs 0.1 s + 0.05 s load)
    assert asyn.steps_per_s == pytest.approx(1 / 0.23, rel=0.01)
    assert asyn.steps_per_s / sync.steps_per_s == pytest.approx(0.38 / 0.23, rel=0.01)


def test_learner_ranks_divide_the_token_work_not_the_post_step_time() -> None:
    # 80 tokens / (2 x 1000) + 0.02 = 0.06 s a step
    rates = PipelineRates(1e7, 1000.0, learner_post_step_s=0.02, response_lengths=(10,))
    got = simulate(rates, PipelineShape(admission_lag_s=0, **SMALL), learner_ranks=2, steps=40)
    assert got.steps_per_s == pytest.approx(1 / 0.06, rel=1e-6)


def test_the_split_search_tries_every_split_and_finds_the_balanced_one() -> None:
    # per GPU: generation 800 tokens/s, learner 800 tokens/s; with 4 GPUs the 2 + 2 split balances
    rates = PipelineRates(800.0, 800.0, response_lengths=(10,))
    results = search_splits(
        rates, PipelineShape(max_staleness=4, admission_lag_s=0, **SMALL), gpus=4, steps=60
    )
    assert [(r.rollout_actors, r.learner_ranks) for r in results] == [(1, 3), (2, 2), (3, 1)]
    best = best_split(results)
    assert (best.rollout_actors, best.learner_ranks) == (2, 2)
    # 1 + 3 is generation-bound at 800 / 80 = 10 steps/s
    assert results[0].steps_per_s == pytest.approx(10.0, rel=0.01)
    with pytest.raises(ValueError, match="at least 2"):
        search_splits(rates, PipelineShape(**SMALL), gpus=1)


def test_bad_rates_are_refused() -> None:
    with pytest.raises(ValueError):
        PipelineRates(0.0, 1.0)
    with pytest.raises(ValueError):
        PipelineRates(1.0, 1.0, response_lengths=())
    with pytest.raises(ValueError):
        PipelineShape(max_staleness=-1)


def _fake_run(tmp_path: Path) -> Path:
    cfg = load_config(
        REPO / "configs" / "tiny-cpu.yaml",
        [f"run.root_dir={tmp_path}", "run.name=fake", "run.mode=sync", "learner.groups_per_step=4"],
    )
    run = create_run_dir(cfg)
    rows = []
    for step in range(1, 6):
        rows.append(
            {
                "step": float(step),
                "wall_seconds": 10.0 + 0.5 * step,
                "train_tokens": 600.0,
                "step_seconds": 0.2,
                "sync_seconds": 0.05,
                "learner_wait_seconds": 0.35,
                "rollout_tokens_generated": 1000.0 * step,
                "rollout_generate_seconds": 0.25 * step,
                "rollout_weight_load_seconds": 0.01 * step,
                "response_length_mean": 9.4 + 0.1 * step,
                "staleness_mean": 0.0,
            }
        )
    names = sorted(rows[0])
    pq.write_table(pa.table({n: [r[n] for r in rows] for n in names}), run.metrics)
    return run.root


def test_rates_from_a_run_directory(tmp_path: Path) -> None:
    measured = rates_from_run_dir(_fake_run(tmp_path))
    rates = measured.rates
    # steps 1 -> 5: 4000 generated tokens in 1.0 busy second
    assert rates.generation_tokens_per_s == pytest.approx(4000.0)
    # steps 2..5: 4 x 600 trained tokens in 4 x 0.2 s
    assert rates.learner_tokens_per_s == pytest.approx(3000.0)
    # 0.04 s of loads over 4 syncs; the driver's 0.05 s sync less the 0.01 s load
    assert rates.weight_load_s == pytest.approx(0.01)
    assert rates.learner_post_step_s == pytest.approx(0.04)
    assert rates.response_lengths == (10, 10, 10, 10)
    # generation phases: 4 x (0.35 - 0.05) = 1.2 s, the engine explains 2400 / 4000 = 0.6 s of it,
    # over 4 steps x 4 groups: 0.0375 s a group
    assert rates.rollout_group_overhead_s == pytest.approx(0.0375)
    assert measured.shape.mode == "sync" and measured.shape.groups_per_step == 4
    assert measured.steps_per_s == pytest.approx(2.0)
    # 4000 generated over 2400 trained
    assert measured.generated_per_trained == pytest.approx(4000 / 2400)


def test_cli_plan_from_a_run_dir_and_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _fake_run(tmp_path)
    assert main(["plan", str(root), "--gpus", "3", "--mode", "async", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "rollout  learner" in out and out.strip().splitlines()[-1].startswith("best: ")
    assert sum("<- best" in line for line in out.splitlines()) == 1
    assert main(["plan", "--gpus", "2", "--learner-tokens-per-s", "100"]) == 2
    assert "generation_tokens_per_s" in capsys.readouterr().err
    assert (
        main(
            [
                "plan",
                "--gpus",
                "2",
                "--generation-tokens-per-s",
                "800",
                "--learner-tokens-per-s",
                "800",
                "--response-length",
                "10",
                "--json",
            ]
        )
        == 0
    )
    assert math.isfinite(__import__("json").loads(capsys.readouterr().out)["best"]["steps_per_s"])


def test_a_run_shorter_than_one_stats_period_falls_back_to_trained_tokens(tmp_path: Path) -> None:
    root = _fake_run(tmp_path)
    table = pq.read_table(root / "metrics.parquet").to_pylist()
    for row in table:
        row.update(rollout_tokens_generated=0.0, rollout_generate_seconds=0.0, rollout_tokens_per_s=0.0)
    pq.write_table(pa.Table.from_pylist(table), root / "metrics.parquet")
    # steps 2..5 trained 2400 tokens; the wall clock went from 10.5 to 12.5 s
    assert rates_from_run_dir(root).rates.generation_tokens_per_s == pytest.approx(1200.0)
