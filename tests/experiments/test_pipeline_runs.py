"""The pipeline experiment's summaries on synthetic metrics tables (no Ray, no training)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from experiments.entropy_dynamics.pipeline_runs import (
    WARM,
    block_sums,
    compare_report,
    compare_with_baseline,
    method_overrides,
    question_se,
    run_name,
    summarise,
    summarise_run,
    summary_markdown,
)


def _rows(offset: float = 0.0) -> list[dict[str, float]]:
    cov = [0.1, 0.3, -0.2, -0.4]
    predicted_since_sync = [-0.1, -0.2, -0.2, -0.2]
    return [
        {
            "step": float(i + 1),
            "entropy_mean": 1.0 - 0.1 * i + offset,
            "reward_mean": 0.2 + 0.1 * i,
            "probe_entropy": 1.3 - 0.1 * i + offset,
            # realised = predicted / 2 at every sync: Pearson r = 1
            "realised_delta_entropy": predicted_since_sync[i] / 2,
            "predicted_delta_entropy_since_sync": predicted_since_sync[i],
            "cov_adv_weighted_s_centered": cov[i],
            "predicted_entropy_change_per_unit_step": -cov[i],
            "clip_dropped_frac": 0.01 * i,
            "clip_dropped_frac_pos_adv": 0.0,
            "clip_dropped_frac_neg_adv": 0.02 * i,
            "staleness_mean": 2.0,
            "ratio_mean": 1.0,
            "ratio_max": 1.5 + i,
            "clipped_frac": 0.0,
            "wall_seconds": 10.0 + i,
        }
        for i in range(4)
    ]


def test_run_summary_worked_by_hand() -> None:
    s = summarise_run(_rows(), window=2)
    # entropy 1.0, 0.9, 0.8, 0.7: first two average 0.95, last two 0.75
    assert s["entropy_first"] == pytest.approx(0.95)
    assert s["entropy_last"] == pytest.approx(0.75)
    assert s["entropy_change"] == pytest.approx(-0.2)
    # probe before step 1 = 1.3 - (-0.05); last window (1.1 + 1.0) / 2
    assert s["probe_entropy_start"] == pytest.approx(1.35)
    assert s["probe_entropy_last"] == pytest.approx(1.05)
    # cov 0.1, 0.3, -0.2, -0.4: mean -0.05, halves 0.2 and -0.3, two of four negative
    assert s["cov_mean"] == pytest.approx(-0.05)
    assert s["cov_mean_first_half"] == pytest.approx(0.2)
    assert s["cov_mean_second_half"] == pytest.approx(-0.3)
    assert s["cov_negative_frac"] == 0.5
    assert s["cov_vs_predicted_r"] == pytest.approx(-1.0)
    # dropped 0, .01, .02, .03 -> .015; A<0 twice that
    assert s["dropped_frac"] == pytest.approx(0.015)
    assert s["dropped_frac_neg_adv"] == pytest.approx(0.03)
    assert s["ratio_max"] == 4.5
    assert s["delta_entropy_syncs"] == 4
    assert s["delta_entropy_pearson_r"] == pytest.approx(1.0)
    assert s["delta_entropy_sign_agreement"] == 1.0
    assert s["delta_entropy_realised_negative_frac"] == 1.0
    # two blocks of two syncs: too few pairs for a correlation
    assert math.isnan(s["delta_entropy_block_r"])
    assert s["wall_seconds"] == 13.0


def test_block_sums_leave_out_an_incomplete_block() -> None:
    assert block_sums([(1.0, 2.0), (3.0, 4.0), (5.0, 6.0)], 2) == [(4.0, 6.0)]


def test_comparison_needs_both_seeds_and_twice_the_noise() -> None:
    per_run = {
        "grpo": {0: {"x": 0.5}, 1: {"x": 0.6}},
        "clip_b": {0: {"x": 0.7}, 1: {"x": 0.8}},
        "clip_v": {0: {"x": 0.7}, 1: {"x": 0.5}},
    }
    # +0.2 on both seeds; std over seeds 0.05 for each method -> 0.2 > 2 * 0.05
    higher = compare_with_baseline(per_run, "x", "clip_b")
    assert higher["mean"] == pytest.approx(0.2)
    assert higher["noise"] == pytest.approx(0.05)
    assert higher["verdict"] == "higher"
    # the same differences under a sampling error of 0.15: 0.2 < 2 * 0.15
    assert compare_with_baseline(per_run, "x", "clip_b", noise_floor=0.15)["verdict"] == "within noise"
    # +0.2 and -0.1 disagree in sign
    mixed = compare_with_baseline(per_run, "x", "clip_v")
    assert mixed["per_seed"] == {0: pytest.approx(0.2), 1: pytest.approx(-0.1)}
    assert mixed["verdict"] == "within noise"


def test_question_standard_errors() -> None:
    score = {"correct_counts": [0, 8, 4, 4], "greedy_accuracy": 0.5}
    # Avg@8 per question 0, 1, .5, .5: pstdev sqrt(0.5 / 4), over sqrt(4) questions
    assert question_se(score, 8, "avg_at_k") == pytest.approx(math.sqrt(0.125) / 2)
    # solved 0, 1, 1, 1: pstdev sqrt(0.1875)
    assert question_se(score, 8, "pass_at_k") == pytest.approx(math.sqrt(0.1875) / 2)
    assert question_se(score, 8, "greedy_accuracy") == pytest.approx(math.sqrt(0.25 / 4))


def test_method_overrides_select_the_clip() -> None:
    assert method_overrides("grpo") == ["learner.clip.method=none", "learner.clip.importance_weighted=false"]
    assert method_overrides("clip_v_r") == [
        "learner.clip.method=clip_v",
        "learner.clip.importance_weighted=true",
    ]


def test_report_from_synthetic_runs(tmp_path: Path) -> None:
    runs = {
        m: {s: {"rows": _rows(0.1 * s + (0.05 if m != "grpo" else 0.0)), "seconds": 30.0} for s in (0, 1)}
        for m in ("grpo", "clip_v")
    }

    def score(avg: float) -> dict:
        return {
            "avg_at_k": avg,
            "pass_at_k": avg + 0.2,
            "pass_at": {"1": avg, "2": avg + 0.1, "4": avg + 0.15, "8": avg + 0.2},
            "greedy_accuracy": avg,
            "correct_counts": [0, 8, 4, 4],
        }

    evals = {WARM: score(0.3)} | {run_name(m, s): score(0.4 + 0.01 * s) for m in runs for s in (0, 1)}
    summary = summarise(runs, evals, window=2, k=8)
    # clip_v's batch entropy is 0.05 above grpo's on both seeds, seed spread 0.05: not beyond 2x noise
    entropy = summary["vs_grpo"]["clip_v"]["entropy_last"]
    assert entropy["mean"] == pytest.approx(0.05)
    assert entropy["verdict"] == "within noise"
    pooled = summary["pooled_delta_entropy"]["grpo"]
    assert pooled["syncs"] == 8
    # blocks of two syncs: (-0.3, -0.15) and (-0.4, -0.2) from each seed, realised = predicted / 2
    assert pooled["blocks"] == 4
    assert pooled["block_pearson_r"] == pytest.approx(1.0)
    results = {
        "settings": {
            "command": "python -m experiments.entropy_dynamics.pipeline_runs",
            "methods": list(runs),
            "seeds": [0, 1],
            "steps": 4,
            "k": 8,
            "heldout": 4,
            "window": 2,
            "warm_start": "warm",
            "config": "configs/tiny-cpu.yaml",
            "lr": 3e-5,
            "groups_per_step": 8,
            "group_size": 8,
            "rollout_temperature": 1.0,
            "max_staleness": 2,
            "mu": 2.5,
            "form": "symmetric",
            "eval_temperature": 0.7,
        },
        "seconds": 60.0,
        "train_seconds": 50.0,
        "eval_seconds": 10.0,
        "question_se": {"avg_at_k": 0.1, "pass_at_k": 0.1, "greedy_accuracy": 0.1},
        "summary": summary,
        "evals": evals,
        "runs": runs,
        "plots": compare_report(tmp_path, runs, evals, k=8, window=2),
    }
    text = summary_markdown(results)
    assert "| ClipV | batch entropy (last window) | +0.050 | +0.050 |" in text
    # 4 runs of 30 s each
    assert "training 2.0 min (4 runs, 30 s each" in text
    assert all((tmp_path / name).stat().st_size > 0 for name in results["plots"])
