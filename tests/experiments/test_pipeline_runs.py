"""The pipeline experiment's summaries on synthetic metrics tables (no Ray, no training)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from experiments.entropy_dynamics.pipeline_runs import (
    METHOD_LABELS,
    METHODS,
    WARM,
    answer_modes,
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
            # same-batch pair: realised = -predicted at three of four steps (step 3 unmeasured)
            "predicted_entropy_change": [-1.0, -2.0, math.nan, -4.0][i],
            "realised_entropy_change": [1.0, 2.5, 0.5, -4.0][i],
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
    # same batch: pairs (-1, 1), (-2, 2.5), (-4, -4); one of three with equal signs
    assert s["same_batch_steps"] == 3
    assert s["same_batch_sign_agreement"] == pytest.approx(1 / 3)
    xs, ys = [-1.0, -2.0, -4.0], [1.0, 2.5, -4.0]
    mx, my = sum(xs) / 3, sum(ys) / 3
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    r = sxy / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    assert s["same_batch_pearson_r"] == pytest.approx(r)
    assert s["wall_seconds"] == 13.0


def test_block_sums_leave_out_an_incomplete_block() -> None:
    assert block_sums([(1.0, 2.0), (3.0, 4.0), (5.0, 6.0)], 2) == [(4.0, 6.0)]


def test_comparison_needs_every_seed_and_twice_the_noise() -> None:
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
    # three seeds: one disagreeing seed is enough to withhold a verdict
    three = {m: {**v, 2: {"x": v[0]["x"]}} for m, v in per_run.items()}
    three["clip_b"][2] = {"x": 0.4}
    assert compare_with_baseline(three, "x", "clip_b")["verdict"] == "within noise"
    assert compare_with_baseline({m: {0: v[0]} for m, v in per_run.items()}, "x", "clip_b")["verdict"] == (
        "one seed: no verdict"
    )


def test_question_standard_errors() -> None:
    score = {"correct_counts": [0, 8, 4, 4], "greedy_accuracy": 0.5}
    # Avg@8 per question 0, 1, .5, .5: pstdev sqrt(0.5 / 4), over sqrt(4) questions
    assert question_se(score, 8, "avg_at_k") == pytest.approx(math.sqrt(0.125) / 2)
    # solved 0, 1, 1, 1: pstdev sqrt(0.1875)
    assert question_se(score, 8, "pass_at_k") == pytest.approx(math.sqrt(0.1875) / 2)
    assert question_se(score, 8, "greedy_accuracy") == pytest.approx(math.sqrt(0.25 / 4))


def test_methods_are_vanilla_grpo_clip_higher_and_the_released_masks() -> None:
    from driftrl.config import load_config

    base = Path(__file__).resolve().parents[2] / "configs/tiny-cpu.yaml"
    cfg = {m: load_config(base, method_overrides(m)).learner for m in METHODS}
    eps = {m: (c.loss.clip_eps_low, c.loss.clip_eps_high) for m, c in cfg.items()}
    assert eps == {m: (0.2, 0.28 if m == "clip_higher" else 0.2) for m in METHODS}
    assert cfg["grpo"].clip.method == cfg["clip_higher"].clip.method == "none"
    # ALGORITHM.md §3 released forms, whatever the base config's clip says
    b, v, vr = cfg["clip_b"].clip, cfg["clip_v"].clip, cfg["clip_v_r"].clip
    assert (b.preset, b.method, b.form, b.mu, b.max_frac, b.importance_weighted) == (
        "released", "clip_b", "negative_lower", 2.5, None, False
    )
    assert (v.preset, v.method, v.form, v.mu, v.max_frac, v.importance_weighted) == (
        "released", "clip_v", "negative_lower", 8.5, 1e-4, False
    )
    # ours: the released ClipV but thresholding r·Sc, and labelled as ours
    assert (vr.method, vr.form, vr.mu, vr.max_frac, vr.importance_weighted) == (
        "clip_v", "negative_lower", 8.5, 1e-4, True
    )
    assert "ours" in METHOD_LABELS["clip_v_r"]


def test_answer_modes_by_hand() -> None:
    samples = [["cba", "abc", "cba", "x"], ["fed", "fed", "zz", "zz"], ["def", "zz", "zz", "zz"], ["a", "b", "c", "d"]]
    answers = ["cba|abc", "fed|def", "fed|def", "cba|abc"]
    modes = answer_modes(samples, answers)
    # 16 samples: reversals cba, cba, fed, fed = 4; copies abc, def = 2
    assert modes["share"] == [pytest.approx(4 / 16), pytest.approx(2 / 16)]
    # a reversal among the K on questions 0 and 1, a copy on 0 and 2
    assert modes["pass_by"] == [0.5, 0.5]
    # question 2 is solved only by its copy
    assert modes["only_rare_pass"] == 0.25
    # reversal cells have one alternative
    assert answer_modes([["ab", "ba"]], ["ba"]) == {"share": [0.5], "pass_by": [1.0], "only_rare_pass": 0.0}


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
            "answer_modes": {"share": [avg, avg / 4], "pass_by": [avg, avg / 2], "only_rare_pass": avg / 10},
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
            "variant": "multi_answer",
            "rare_frac": 0.15,
            "clip_eps": {"grpo": "0.2/0.2", "clip_v": "0.2/0.2"},
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
    assert "| ClipV (released) | batch entropy (last window) | +0.050 | +0.050 |" in text
    assert "| warm start (measured in this run) | | | | | | | | 0.300 | 0.500 | 0.300 |" in text
    # multi_answer: the copy's share per method, the warm start's from its own evaluation
    assert "| warm start (this run's evaluation) | 0.300 | 0.075 | 0.150 | 0.030 |" in text
    assert "| ClipV (released) | 0.405 ± 0.005 | 0.101 ± 0.001 |" in text
    assert "| GRPO (ε 0.2/0.2) | 2 | 0.2/0.2 |" in text
    assert "## Same-batch entropy change" in text
    assert "all 4 runs reported." in text
    # 4 runs of 30 s each
    assert "training 2.0 min (4 runs, 30 s each" in text
    assert all((tmp_path / name).stat().st_size > 0 for name in results["plots"])
    # a run merged from an earlier report's records is named with its source
    results["runs"]["grpo"][1]["stored_from"] = "old/results.json"
    assert "1 of them (grpo-s1) were made earlier" in summary_markdown(results)
    assert "`old/results.json`" in summary_markdown(results)
    del results["runs"]["grpo"][1]["stored_from"]
    # a run left out is named, and the one-seed method gets no verdict
    del results["runs"]["clip_v"][1]
    results["summary"] = summarise({m: dict(v) for m, v in results["runs"].items()}, evals, window=2, k=8)
    text = summary_markdown(results)
    assert "**3 of 4 runs finished and reported** (`--reuse-only`; missing: clip_v-s1)" in text
    assert "one seed: no verdict" in text


def test_evaluation_cache_is_read_back_only_for_the_same_settings(tmp_path: Path) -> None:
    import json
    from types import SimpleNamespace

    from experiments.entropy_dynamics.pipeline_runs import evaluate_models

    cfg = SimpleNamespace(task=SimpleNamespace(eval_path="h.parquet"))
    model = tmp_path / "final_model"
    file = tmp_path / "eval.json"
    settings = {"k": 8, "questions": 4, "temperature": 0.7, "seed": 0, "eval_path": "h.parquet", "model": str(model)}
    file.write_text(json.dumps({"settings": settings, "score": {"avg_at_k": 0.25}}))
    assert evaluate_models({"m": model}, cfg, 8, 4, 0.7, 0, {"m": file}) == {"m": {"avg_at_k": 0.25}}
    # another K is another evaluation: it is attempted (and fails here: no model on disk)
    with pytest.raises(Exception) as err:  # noqa: B017 - whichever loader fails first, it must not reuse
        evaluate_models({"m": model}, cfg, 4, 4, 0.7, 0, {"m": file})
    assert "avg_at_k" not in str(err.value)


def test_stored_runs_merge_only_from_the_same_start(tmp_path: Path) -> None:
    import json

    from experiments.entropy_dynamics.pipeline_runs import (
        MERGE_SETTINGS,
        _jsonable,
        _series_of,
        stored_runs,
    )

    rows = _rows(0.123456789)
    warm = {"greedy_accuracy": 0.4, "correct_counts": [0, 8, 3, 1], "avg_at_k": 0.375}
    settings = {key: f"value of {key}" for key in MERGE_SETTINGS}
    record = {
        "settings": settings,
        "evals": {WARM: warm, "clip_v-s2": {"avg_at_k": 0.5}},
        "runs": {"clip_v": {"2": {"seconds": 120.0, "reused": False, "series": _series_of(rows)}}},
    }
    file = tmp_path / "results.json"
    file.write_text(json.dumps(_jsonable(record), allow_nan=False))
    runs, evals = stored_runs(file, settings, warm, [("clip_v", 2), ("clip_v", 0), ("grpo", 2)])
    # only what the file holds; the rows give the summary the full-precision rows give
    assert list(runs) == ["clip_v"] and list(runs["clip_v"]) == [2]
    assert evals == {"clip_v-s2": {"avg_at_k": 0.5}}
    got, want = summarise_run(runs["clip_v"][2]["rows"], 2), summarise_run(rows, 2)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-5, nan_ok=True), key
    assert [r["step"] for r in runs["clip_v"][2]["rows"]] == [1.0, 2.0, 3.0, 4.0]
    assert runs["clip_v"][2]["stored_from"] == str(file)
    # another warm start (one question's count differs), or another setting: refused
    with pytest.raises(SystemExit, match="warm start evaluates differently"):
        stored_runs(file, settings, {**warm, "correct_counts": [0, 8, 3, 2]}, [("clip_v", 2)])
    with pytest.raises(SystemExit, match="settings differ"):
        stored_runs(file, {**settings, "steps": 200}, warm, [("clip_v", 2)])
    # rare_frac makes multi_answer's data and warm start, and nothing of reversal's
    assert stored_runs(file, {**settings, "rare_frac": 0.35}, warm, [("clip_v", 2)])[1] == evals
    multi = {**settings, "variant": "multi_answer"}
    file.write_text(json.dumps(_jsonable({**record, "settings": multi}), allow_nan=False))
    with pytest.raises(SystemExit, match=r"settings differ.*rare_frac"):
        stored_runs(file, {**multi, "rare_frac": 0.35}, warm, [("clip_v", 2)])
