"""The end-of-run report from a metrics table written the way the driver writes it."""

from __future__ import annotations

import json
import math

import matplotlib
import pytest

from driftrl.report import (
    DRIVER_COLUMNS,
    PLOTS,
    SAME_BATCH_PAIR,
    MetricsLog,
    delta_entropy_agreement,
    learner_row,
    write_report,
)
from tests.driftrl.learner_metrics import train_step_metrics

SYNC_EVERY = 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def driver_rows(n_steps: int = 20) -> list[dict[str, float]]:
    """Rows as the driver appends them: learner_row(train_step) plus its own columns; a sync (and
    a probe) every SYNC_EVERY steps, the first without a previous probe (realised ΔH NaN)."""
    rows = []
    predicted_since_sync = 0.0
    last_probe = None
    for step in range(1, n_steps + 1):
        metrics = train_step_metrics(
            seed=step,
            policy_version=step // SYNC_EVERY,
            version_starts=[step // SYNC_EVERY] * 2,
            grad_norm=None if step == 7 else 0.1 * step,
        )
        row = learner_row(metrics)
        predicted_since_sync += row["predicted_entropy_change"]
        row.update(
            step=float(step),
            wall_seconds=1.5 * step,
            buffer_rows_available=float(40 - step),
            buffer_rows_leased=8.0,
            rollout_tokens_per_s=100.0 + step,
            rollout_tokens_generated=700.0 * step,
            rollout_generate_seconds=1.2 * step,
            rollout_weight_load_seconds=0.01 * step,
            buffer_rows_evicted_stale=float(step // 3),
        )
        if step % SYNC_EVERY == 0:
            probe = 2.0 - 0.001 * step**2
            row.update(
                probe_entropy=probe,
                realised_delta_entropy=math.nan if last_probe is None else probe - last_probe,
                predicted_delta_entropy_since_sync=predicted_since_sync,
                sync_seconds=0.2,
            )
            last_probe, predicted_since_sync = probe, 0.0
        rows.append(row)
    return rows


def test_learner_row_strips_the_prefix_and_keeps_nan():
    row = learner_row(
        {
            "driftrl_learner_entropy_mean": 1.5,
            "step": 3,
            "driftrl_learner_grad_norm": math.nan,
            "note": "x",
            "flag": True,
        }
    )
    assert row.keys() == {"entropy_mean", "step", "grad_norm"}
    assert row["entropy_mean"] == 1.5 and row["step"] == 3.0 and math.isnan(row["grad_norm"])


def test_delta_entropy_agreement_by_hand():
    rows = [
        {"predicted_delta_entropy_since_sync": 1.0, "realised_delta_entropy": 2.0},
        {"predicted_delta_entropy_since_sync": 2.0, "realised_delta_entropy": 4.0},
        {"predicted_delta_entropy_since_sync": 0.5},  # a step without a sync
        {"predicted_delta_entropy_since_sync": 9.0, "realised_delta_entropy": math.nan},  # first probe
        {"predicted_delta_entropy_since_sync": 3.0, "realised_delta_entropy": 5.0},
        {"predicted_delta_entropy_since_sync": -1.0, "realised_delta_entropy": None},  # parquet null
    ]
    # pairs (1, 2), (2, 4), (3, 5): dx = -1, 0, 1; dy = -5/3, 1/3, 4/3; sxy = 3, sxx = 2,
    # syy = 42/9 -> r = 3 / sqrt(2 * 42 / 9) = 0.98198...
    got = delta_entropy_agreement(rows)
    assert got["syncs"] == 3 and got["sign_agreement"] == 1.0
    assert got["pearson_r"] == pytest.approx(3 / math.sqrt(2 * 42 / 9))
    # opposite signs, and a constant side has no correlation
    flat = [
        {"predicted_delta_entropy_since_sync": x, "realised_delta_entropy": -1.0} for x in (1.0, 2.0, 3.0)
    ]
    assert delta_entropy_agreement(flat) == {"syncs": 3, "pearson_r": None, "sign_agreement": 0.0}


def test_report_from_a_driver_written_table(tmp_path):
    rows = driver_rows()
    learner_columns = {*learner_row(train_step_metrics(seed=0, policy_version=0, version_starts=[0])), "step"}
    assert {c for row in rows for c in row} - learner_columns == {name for name, _ in DRIVER_COLUMNS}
    log = MetricsLog(tmp_path / "metrics.parquet")
    for row in rows[:10]:
        log.append(row)
    log.flush()
    log = MetricsLog(tmp_path / "metrics.parquet")  # a resumed run reopens it
    assert len(log.rows) == 10
    for row in rows[10:]:
        log.append(row)
    log.flush()

    summary_txt = write_report(tmp_path, extra={"policy_version": 5})

    assert matplotlib.get_backend().lower() == "agg"
    report = tmp_path / "report"
    for plot in PLOTS:
        assert (report / plot.file_name).read_bytes().startswith(PNG_MAGIC), plot.file_name
    assert (report / "delta_entropy_scatter.png").read_bytes().startswith(PNG_MAGIC)
    summary = json.loads((report / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["policy_version"] == 5
    syncs = [r for r in rows if "probe_entropy" in r]
    for key, first, last in (
        ("reward_mean", rows[0]["reward_mean"], rows[-1]["reward_mean"]),
        ("entropy_mean", rows[0]["entropy_mean"], rows[-1]["entropy_mean"]),
        (
            "cov_adv_weighted_s_centered",
            rows[0]["cov_adv_weighted_s_centered"],
            rows[-1]["cov_adv_weighted_s_centered"],
        ),
        ("clip_dropped_frac", rows[0]["clip_dropped_frac"], rows[-1]["clip_dropped_frac"]),
        ("mismatch_kl", rows[0]["mismatch_kl"], rows[-1]["mismatch_kl"]),
        ("is_masked_frac", rows[0]["is_masked_frac"], rows[-1]["is_masked_frac"]),
        ("truncated_frac", rows[0]["truncated_frac"], rows[-1]["truncated_frac"]),
        ("staleness_mean", rows[0]["staleness_mean"], rows[-1]["staleness_mean"]),
        ("train_tokens_per_s", rows[0]["train_tokens_per_s"], rows[-1]["train_tokens_per_s"]),
        ("probe_entropy", 2.0 - 0.001 * 4**2, 2.0 - 0.001 * 20**2),  # syncs at steps 4, 8, ..., 20
        ("rollout_tokens_per_s", 101.0, 120.0),
        ("sync_seconds", 0.2, 0.2),
        ("wall_seconds", 1.5, 30.0),
    ):
        assert summary[key] == {"first": first, "last": last}, key
    # 5 syncs, the first without a realised change (the predictions are random: only the count
    # is fixed by hand)
    assert len(syncs) == 5 and summary["delta_entropy_agreement"]["syncs"] == 4
    text = summary_txt.read_text()
    assert "behaviour KL" in text and "IS masked" in text
    assert "20 learner steps" in text and "probe entropy" in text and "ΔH probe drift" in text
    # every step measured its same-batch change (the learner rows hold random values for both)
    assert (report / "delta_entropy_same_batch_scatter.png").read_bytes().startswith(PNG_MAGIC)
    assert summary["same_batch_entropy_agreement"]["steps"] == 20
    assert "ΔH same batch" in text and "20 measured steps" in text


def test_same_batch_agreement_by_hand():
    # steps 1 and 3 are not measured (NaN, as the learner reports them between intervals)
    nan = math.nan
    rows = [
        {"predicted_entropy_change": -1.0, "realised_entropy_change": -2.0},
        {"predicted_entropy_change": nan, "realised_entropy_change": nan},
        {"predicted_entropy_change": -2.0, "realised_entropy_change": -3.0},
        {"predicted_entropy_change": nan, "realised_entropy_change": nan},
        {"predicted_entropy_change": 1.0, "realised_entropy_change": -1.0},
    ]
    got = delta_entropy_agreement(rows, SAME_BATCH_PAIR, count_key="steps")
    # x = [-1, -2, 1] (mean -2/3), y = [-2, -3, -1] (mean -2): sxy = (-1/3)(0) + (-4/3)(-1) + (5/3)(1) = 3,
    # sxx = 1/9 + 16/9 + 25/9 = 42/9, syy = 0 + 1 + 1 = 2 -> r = 3 / sqrt(84/9) = 0.98198; signs 2 of 3
    assert got["steps"] == 3
    assert got["pearson_r"] == pytest.approx(3 / math.sqrt(84 / 9))
    assert got["sign_agreement"] == pytest.approx(2 / 3)


def test_report_skips_plots_without_data(tmp_path):
    log = MetricsLog(tmp_path / "metrics.parquet")
    for step in range(3):
        log.append({"step": step, "reward_mean": 0.5})
    log.flush()
    write_report(tmp_path)
    assert sorted(p.name for p in (tmp_path / "report").glob("*.png")) == ["reward.png"]
