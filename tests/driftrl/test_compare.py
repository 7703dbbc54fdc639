"""``driftrl compare`` over synthetic run directories in the real format (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from driftrl.cli import main
from driftrl.compare import REALISED_ENTROPY_CHANGE, group_by_method, load_run
from driftrl.config import load_config
from driftrl.report import MetricsLog
from driftrl.run_dir import create_run_dir

STEPS = 6


def _make_run(root: Path, name: str, method: str, seed: int, scale: float, realised: bool) -> Path:
    """A run directory as the driver leaves it: config.yaml, metrics.parquet, an eval JSON."""
    cfg = load_config(
        None,
        [f"run.root_dir={root}", f"run.name={name}", f"run.seed={seed}", f"learner.clip.method={method}"],
    )
    run = create_run_dir(cfg)
    log = MetricsLog(run.metrics)
    for step in range(1, STEPS + 1):
        row = {
            "step": float(step),
            "entropy_mean": scale * (1.0 - 0.05 * step),
            "reward_mean": 0.1 * step + seed * 0.02,
            "clip_dropped_frac": 0.01 * scale * step,
            "staleness_mean": 1.0 + 0.5 * (step % 2),
            "train_tokens_per_s": 1000.0 * scale,
            "rollout_tokens_per_s": 2000.0,
            "probe_entropy": math.nan if step % 2 else 1.2,
            "realised_delta_entropy": math.nan if step % 2 else -0.01 * step,
            "predicted_delta_entropy_since_sync": math.nan if step % 2 else -0.02 * step,
            "wall_seconds": 5.0 + 0.5 * step * scale,
        }
        if realised:
            row[REALISED_ENTROPY_CHANGE] = -0.001 * step
        log.append(row)
    log.flush()
    (run.root / "final_model.eval-k4.json").write_text(
        json.dumps(
            {"k": 4, "datasets": {"heldout": {"avg_at_k": 0.3 + 0.1 * seed, "pass_at_k": 0.6 * scale}}}
        )
    )
    return run.root


def test_compare_table_matches_the_runs(tmp_path: Path) -> None:
    runs = [
        _make_run(tmp_path / "runs", "grpo-s0", "none", 0, 1.0, realised=True),
        _make_run(tmp_path / "runs", "grpo-s1", "none", 1, 1.0, realised=True),
        _make_run(tmp_path / "runs", "clipv-s0", "clip_v", 0, 0.5, realised=False),
    ]
    groups = group_by_method([load_run(r) for r in runs])
    assert {m: [r.path.name for r in g] for m, g in groups.items()} == {
        "method=none": ["grpo-s0", "grpo-s1"],
        "method=clip_v": ["clipv-s0"],
    }
    out = tmp_path / "report"
    assert main(["compare", *map(str, runs), "--out", str(out), "--window", "2"]) == 0

    record = json.loads((out / "compare.json").read_text())
    grpo, clipv = record["summary"]["method=none"], record["summary"]["method=clip_v"]
    # entropy (last 2 steps of 6): (0.75 + 0.70) / 2 = 0.725 on both seeds -> std 0
    assert grpo["entropy_mean"]["mean"] == pytest.approx(0.725)
    assert grpo["entropy_mean"]["std"] == pytest.approx(0.0)
    assert clipv["entropy_mean"]["mean"] == pytest.approx(0.3625)
    # reward (last 2): seed 0 (0.5 + 0.6) / 2 = 0.55, seed 1 0.57 -> mean 0.56, pstdev 0.01
    assert grpo["reward_mean"]["mean"] == pytest.approx(0.56)
    assert grpo["reward_mean"]["std"] == pytest.approx(0.01)
    assert grpo["reward_mean"]["n"] == 2
    # mask fraction mean over all steps: 0.01 * 3.5 = 0.035; clip_v at half scale 0.0175
    assert grpo["clip_dropped_frac"]["mean"] == pytest.approx(0.035)
    assert clipv["clip_dropped_frac"]["mean"] == pytest.approx(0.0175)
    # staleness alternates 1.5, 1.0: mean 1.25
    assert grpo["staleness_mean"]["mean"] == pytest.approx(1.25)
    # 5 steps over 0.5 * 5 s = 2.5 s -> 2 steps/s; half the wall step at half scale -> 4
    assert grpo["steps_per_s"]["mean"] == pytest.approx(2.0)
    assert clipv["steps_per_s"]["mean"] == pytest.approx(4.0)
    # same-batch ΔH: -0.001 * mean(1..6) = -0.0035; clip_v's runs lack the column
    assert grpo[REALISED_ENTROPY_CHANGE]["mean"] == pytest.approx(-0.0035)
    assert REALISED_ENTROPY_CHANGE not in clipv
    # evals: Avg@4 0.3 and 0.4 -> 0.35 ± 0.05
    assert grpo["eval/heldout/avg_at_k"]["mean"] == pytest.approx(0.35)
    assert grpo["eval/heldout/avg_at_k"]["std"] == pytest.approx(0.05)

    text = (out / "compare.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    grpo_row = next(line for line in text.splitlines() if line.startswith("| method=none"))
    clipv_row = next(line for line in text.splitlines() if line.startswith("| method=clip_v"))
    table = dict(zip(cells, [c.strip() for c in grpo_row.strip("|").split("|")], strict=True))
    assert table["runs"] == "2"
    assert table["entropy (last)"] == "0.725 ± 0.000"
    assert table["reward (last)"] == "0.560 ± 0.010"
    assert table["steps/s"] == "2.000 ± 0.000"
    assert table["Avg@4"] == "0.350 ± 0.050"
    assert table["same-batch ΔH (mean)"] == "-0.00350 ± 0.00000"
    assert (
        dict(zip(cells, [c.strip() for c in clipv_row.strip("|").split("|")], strict=True))[
            "same-batch ΔH (mean)"
        ]
        == ""
    )
    for name in record["plots"]:
        assert (out / name).stat().st_size > 0
    assert {
        "entropy_mean.png",
        "reward_mean.png",
        f"{REALISED_ENTROPY_CHANGE}.png",
        "eval.png",
        "delta_entropy_scatter.png",
    } <= set(record["plots"])


def test_compare_without_the_realised_column_or_evals(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "runs", "a", "none", 0, 1.0, realised=False)
    (run / "final_model.eval-k4.json").unlink()
    out = tmp_path / "report"
    assert main(["compare", f"mine={run}", "--out", str(out)]) == 0
    text = (out / "compare.md").read_text()
    assert "same-batch ΔH" not in text and "Avg@" not in text
    assert "| mine | 1 |" in text
