"""The driver's Prometheus endpoint, fed the learner's real metric names, scraped by our parser and
by a real Prometheus server (which also evaluates every Grafana dashboard expression)."""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from buffers.config import BufferConfig
from buffers.replay import ReplayBuffer
from driftrl.metrics import MetricsServer, RunTelemetry
from tests.driftrl.learner_metrics import rollout_table, train_step_metrics
from tests.driftrl.prometheus_server import PrometheusServer

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "driftrl-dashboard.json"
P = "driftrl_learner_"

# the critic's, under loss.advantage = gae (learner/critic.py CRITIC_METRIC_REDUCTIONS + value_grad_norm)
CRITIC_SAMPLES: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {
    ("driftrl_learner_value_loss", ()): "value_loss",
    ("driftrl_learner_value_clipped_fraction", ()): "value_clipped_frac",
    ("driftrl_learner_value_mean", ()): "value_mean",
    ("driftrl_learner_return_mean", ()): "return_mean",
    ("driftrl_learner_explained_variance", ()): "explained_variance",
    ("driftrl_learner_advantage", (("moment", "mean"),)): "advantage_mean",
    ("driftrl_learner_advantage", (("moment", "std"),)): "advantage_std",
    ("driftrl_learner_value_grad_norm", ()): "value_grad_norm",
}
# the contract with dashboards and alerts: (sample name, labels) -> key of the train_step dict
LEARNER_SAMPLES: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {
    ("driftrl_entropy", ()): "entropy_mean",
    ("driftrl_entropy_delta_predicted", ()): "predicted_entropy_change",
    ("driftrl_entropy_delta_predicted_per_unit_step", ()): "predicted_entropy_change_per_unit_step",
    ("driftrl_entropy_delta_realised_batch", ()): "realised_entropy_change",
    ("driftrl_entropy_after_step", ()): "entropy_mean_after_step",
    ("driftrl_learner_entropy_step_scale", ()): "entropy_step_scale",
    ("driftrl_learner_update_norm", ()): "update_norm",
    ("driftrl_learner_entropy_change_seconds", ()): "entropy_change_seconds",
    ("driftrl_learner_adv_weighted_s_centered_mean_term", ()): "adv_weighted_s_centered_mean_term",
    ("driftrl_learner_cov_adv_weighted_s_centered", ()): "cov_adv_weighted_s_centered",
    **{
        ("driftrl_learner_score", (("moment", moment), ("stat", stat))): f"{key}_{moment}"
        for stat, key in (
            ("s_star", "s_star"),
            ("s_expect", "s_expect"),
            ("s_centered", "s_centered"),
            ("r_s_centered", "weighted_s_centered"),
        )
        for moment in ("mean", "std")
    },
    ("driftrl_learner_mask_fraction", (("sign", "all"),)): "clip_dropped_frac",
    ("driftrl_learner_mask_fraction", (("sign", "pos"),)): "clip_dropped_frac_pos_adv",
    ("driftrl_learner_mask_fraction", (("sign", "neg"),)): "clip_dropped_frac_neg_adv",
    ("driftrl_learner_clip_threshold", (("threshold", "center"),)): "clip_center",
    ("driftrl_learner_clip_threshold", (("threshold", "bound"),)): "clip_bound",
    ("driftrl_learner_clip_threshold", (("threshold", "cutoff"),)): "clip_cutoff",
    ("driftrl_learner_ratio_mean", ()): "ratio_mean",
    ("driftrl_learner_ratio_max", ()): "ratio_max",
    ("driftrl_learner_ratio_clipped_fraction", ()): "clipped_frac",
    ("driftrl_learner_ratio_truncated_fraction", ()): "truncated_frac",
    ("driftrl_learner_reward_mean", ()): "reward_mean",
    ("driftrl_learner_response_length_tokens", ()): "response_length_mean",
    ("driftrl_learner_staleness_mean_versions", ()): "staleness_mean",
    ("driftrl_learner_staleness_max_versions", ()): "staleness_max",
    ("driftrl_learner_train_tokens_per_second", ()): "train_tokens_per_s",
    ("driftrl_learner_zero_variance_group_fraction", ()): "grpo_zero_variance_frac",
    **CRITIC_SAMPLES,
    ("driftrl_learner_grad_norm", ()): "grad_norm",
    ("driftrl_learner_lr", ()): "lr",
    ("driftrl_learner_step", ()): "step",
    ("driftrl_learner_optimizer_step", ()): "optimizer_step",
    ("driftrl_learner_mismatch_kl", ()): "mismatch_kl",
    ("driftrl_learner_is_masked_fraction", ()): "is_masked_frac",
    ("driftrl_learner_step_skipped", ()): "step_skipped",
    ("driftrl_learner_skipped_steps_total", ()): "skipped_steps_total",
    ("driftrl_policy_version", ()): "policy_version",
}

# RolloutWorker.stats() of actors/rollout.py, nested and non-numeric entries included
ROLLOUT_STATS = {
    "actor_id": "0",
    "weight_version": 4,
    "learner_version": 5,
    "accepted_groups": 12,
    "in_flight_groups": 3,
    "pending_push_groups": 0,
    "groups_generated": 15,
    "responses_generated": 60,
    "tokens_generated": 4096,
    "generate_seconds": 8.0,
    "engine_errors": 1,
    "resubmitted_groups": 0,
    "admission_blocked": 2,
    "syncs": 4,
    "sync_seconds_total": 2.5,
    "last_sync_seconds": 0.75,
    "push_failures": 1,
    "push_full": 3,
    "push_retries": 5,
    "push_duplicate_groups": 1,
    "push_retry_in_s": 0.0,
    "push_rejected_rows": {"nonfinite_reward": 1, "incomplete_group": 3},
    "tokens_per_s": 512.0,
    "reward_calls": 60,
    "reward_mean": 0.375,
    "reward_errors": 2,
    "reward_timeouts": 1,
    "reward_nonfinite": 4,
    "reward_over_budget": 6,
    "reward_last_error": "ZeroDivisionError",
    "skipped_prompts": {"prompt_too_long": 1, "null_prompt": 2, "blank_answer": 0},
    "last_push_result": None,
    "last_push_error": None,
    "broken": None,
    "prompt_cursor": {"epoch": 0, "index": 15},
}
ROLLOUT_SAMPLES = {
    "driftrl_rollout_tokens_per_second": "tokens_per_s",
    "driftrl_rollout_tokens_total": "tokens_generated",
    "driftrl_rollout_reward_mean": "reward_mean",
    "driftrl_rollout_reward_errors_total": "reward_errors",
    "driftrl_rollout_reward_timeouts_total": "reward_timeouts",
    "driftrl_rollout_weight_version": "weight_version",
    "driftrl_rollout_weight_syncs_total": "syncs",
    "driftrl_rollout_weight_sync_seconds_total": "sync_seconds_total",
    "driftrl_rollout_weight_sync_last_seconds": "last_sync_seconds",
    "driftrl_rollout_push_failures_total": "push_failures",
    "driftrl_rollout_push_full_total": "push_full",
    "driftrl_rollout_push_retries_total": "push_retries",
    "driftrl_rollout_pending_push_groups": "pending_push_groups",
    "driftrl_rollout_reward_nonfinite_total": "reward_nonfinite",
    "driftrl_rollout_reward_over_budget_total": "reward_over_budget",
    "driftrl_rollout_engine_errors_total": "engine_errors",
    "driftrl_rollout_in_flight_groups": "in_flight_groups",
    "driftrl_rollout_accepted_groups_total": "accepted_groups",
}


@pytest.fixture
def server():
    telemetry = RunTelemetry(heartbeat_timeout_s=60)
    srv = MetricsServer(telemetry, host="127.0.0.1", port=0).start()
    yield srv
    srv.stop()


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics`` as ``(name, sorted labels) -> value``."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def real_buffer_stats(tmp_path: Path) -> dict:
    """``stats()`` of a real buffer after accepted, rejected, leased, acked and evicted rows."""
    buffer = ReplayBuffer(BufferConfig(), str(tmp_path / "buffer"))
    rng = np.random.default_rng(0)
    # 4 groups of 2 rows at behaviour versions 0, 3, 3, 3; a learner at version 3 with
    # max_staleness 2 evicts the version-0 group (2 rows, "stale") and leases 2 of the others
    assert buffer.push(rollout_table(rng, [0, 3, 3, 3])).accepted == 8
    assert buffer.push("not a table").accepted == 0  # counted as 1 row rejected as bad_input
    leased = buffer.sample(2, learner_version=3, max_staleness=2)
    buffer.ack(leased.column("traj_id").to_pylist()[:2])
    stats = buffer.stats()
    # rows: 2 evicted, 2 acked, 2 still leased, 2 available
    assert (stats["rows_available"], stats["rows_leased"], stats["acked"]) == (2, 2, 2)
    assert (stats["pushed"], stats["rejected"], stats["evicted"]) == (9, {"bad_input": 1}, {"stale": 2})
    return stats


def record_everything(telemetry: RunTelemetry, tmp_path: Path) -> tuple[dict[str, float], dict]:
    """One learner step, a probe, one actor, the buffer and a sync, as the driver records them;
    returns the learner's dict and the buffer's stats."""
    metrics = train_step_metrics(seed=1, policy_version=3, version_starts=[3, 2, 1, 0, 3], critic=True)
    telemetry.record_learner(metrics)
    telemetry.record_probe(1.5, -0.25)
    telemetry.record_rollout("0", ROLLOUT_STATS)
    buffer_stats = real_buffer_stats(tmp_path)
    telemetry.record_buffer(buffer_stats)
    telemetry.observe_sync(0.3)
    telemetry.count("weight_sync_failures_total")
    return metrics, buffer_stats


def test_every_learner_metric_is_exported_under_its_name(server, tmp_path):
    metrics, _ = record_everything(server.telemetry, tmp_path)
    samples = _scrape(server.url)
    for (name, labels), key in LEARNER_SAMPLES.items():
        assert samples.get((name, labels)) == metrics[P + key], (name, labels, key)
    assert samples[("driftrl_entropy_probe", ())] == 1.5
    assert samples[("driftrl_entropy_delta_realised", ())] == -0.25
    # nothing the learner reports is dropped: its values are distinct, so each must show up somewhere
    shown = set(samples.values())
    missing = [k for k, v in metrics.items() if "staleness_count" not in k and v not in shown]
    assert missing == []


def test_advantage_sign_weights_and_entropy_controller_are_exported(server):
    # train_updates adds these after the host metrics: w+/w- always, the controller's terms when on
    metrics = train_step_metrics(seed=7, policy_version=1, version_starts=[1])
    metrics |= {
        P + "pos_adv_weight": 0.75,
        P + "neg_adv_weight": 1.25,
        P + "entropy_control_error": -0.125,
        P + "entropy_control_integral": -0.5,
    }
    server.telemetry.record_learner(metrics)
    samples = _scrape(server.url)
    assert samples[("driftrl_learner_adv_sign_weight", (("sign", "pos"),))] == 0.75
    assert samples[("driftrl_learner_adv_sign_weight", (("sign", "neg"),))] == 1.25
    assert samples[("driftrl_learner_entropy_control", (("term", "error"),))] == -0.125
    assert samples[("driftrl_learner_entropy_control", (("term", "integral"),))] == -0.5


def test_unprefixed_keys_and_absent_keys(server):
    metrics = train_step_metrics(seed=2, policy_version=1, version_starts=[1], clip=False)
    server.telemetry.record_learner({k.removeprefix(P): v for k, v in metrics.items()})
    samples = _scrape(server.url)
    assert samples[("driftrl_entropy", ())] == metrics[P + "entropy_mean"]
    # no clip method: no thresholds, and no empty family either
    assert not [key for key in samples if key[0] == "driftrl_learner_clip_threshold"]


def test_nan_grad_norm_of_a_skipped_step_is_not_exported(server):
    server.telemetry.record_learner(train_step_metrics(seed=3, policy_version=2, version_starts=[2]))
    assert _scrape(server.url)[("driftrl_learner_grad_norm", ())] == 0.5
    skipped = train_step_metrics(seed=4, policy_version=2, version_starts=[2], grad_norm=None)
    assert math.isnan(skipped[P + "grad_norm"])
    server.telemetry.record_learner(skipped)
    samples = _scrape(server.url)
    # the previous step's 0.5 must not be shown for a step that had no gradient
    assert ("driftrl_learner_grad_norm", ()) not in samples
    assert samples[("driftrl_learner_step_skipped", ())] == 1.0
    assert samples[("driftrl_learner_skipped_steps_total", ())] == skipped[P + "skipped_steps_total"]


def test_critic_metrics_only_with_a_critic_and_not_on_a_skipped_step(server):
    critic_names = {name for name, _ in CRITIC_SAMPLES}
    server.telemetry.record_learner(train_step_metrics(seed=5, policy_version=1, version_starts=[1]))
    assert not critic_names & {name for name, _ in _scrape(server.url)}
    skipped = train_step_metrics(seed=6, policy_version=1, version_starts=[1], grad_norm=None, critic=True)
    server.telemetry.record_learner(skipped)
    samples = _scrape(server.url)
    assert ("driftrl_learner_value_grad_norm", ()) not in samples
    assert samples[("driftrl_learner_explained_variance", ())] == skipped[P + "explained_variance"]


def test_staleness_histogram_counts_the_learner_bins(server):
    # max_staleness 2. Step 1 at version 3, groups of 2 rows at versions 3, 2, 1, 0, 3 ->
    # staleness 0, 1, 2, 3, 0: bins 0: 4, 1: 2, 2: 2, over: 2 (observed at 3 = max_staleness + 1).
    # Step 2 at version 5, versions 5, 4 -> bins 0: 2, 1: 2.
    steps = [
        train_step_metrics(seed=5, policy_version=3, version_starts=[3, 2, 1, 0, 3]),
        train_step_metrics(seed=6, policy_version=5, version_starts=[5, 4]),
    ]
    assert [steps[0][f"{P}staleness_count_{k}"] for k in ("0", "1", "2", "over")] == [4, 2, 2, 2]
    assert [steps[1][f"{P}staleness_count_{k}"] for k in ("0", "1", "2", "over")] == [2, 2, 0, 0]
    for metrics in steps:
        server.telemetry.record_learner(metrics)
    samples = _scrape(server.url)
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in samples.items()
        if name == "driftrl_staleness_versions_bucket"
    }
    # totals 0: 6, 1: 4, 2: 2, 3: 2 -> cumulative 6, 10, 12, 14
    assert [buckets[le] for le in ("0.0", "1.0", "2.0", "3.0", "4.0", "+Inf")] == [6, 10, 12, 14, 14, 14]
    assert samples[("driftrl_staleness_versions_count", ())] == 14
    assert samples[("driftrl_staleness_versions_sum", ())] == 0 * 6 + 1 * 4 + 2 * 2 + 3 * 2


def test_rollout_and_buffer_stats_under_their_names(server, tmp_path):
    _, stats = record_everything(server.telemetry, tmp_path)
    samples = _scrape(server.url)
    for name, key in ROLLOUT_SAMPLES.items():
        assert samples[(name, (("actor", "0"),))] == ROLLOUT_STATS[key], name
    assert samples[("driftrl_buffer_rows", (("state", "available"),))] == stats["rows_available"]
    assert samples[("driftrl_buffer_rows", (("state", "leased"),))] == stats["rows_leased"]
    assert samples[("driftrl_buffer_pushed_rows_total", ())] == stats["pushed"]
    assert samples[("driftrl_buffer_acked_rows_total", ())] == stats["acked"]
    assert samples[("driftrl_buffer_evicted_rows_total", (("reason", "stale"),))] == 2
    assert samples[("driftrl_buffer_rejected_rows_total", (("reason", "bad_input"),))] == 1
    for family, key in (
        ("driftrl_rollout_skipped_prompts_total", "skipped_prompts"),
        ("driftrl_rollout_push_rejected_rows_total", "push_rejected_rows"),
    ):
        exported = {
            dict(labels)["reason"]: value
            for (name, labels), value in samples.items()
            if name == family and dict(labels)["actor"] == "0"
        }
        assert exported == ROLLOUT_STATS[key], family
    assert samples[("driftrl_weight_sync_seconds_count", ())] == 1
    assert samples[("driftrl_weight_sync_failures_total", ())] == 1


def test_every_rejection_reason_is_a_series_from_the_first_scrape_and_counts_real_rejections(
    server, tmp_path
):
    from buffers.replay import BUFFER_FULL
    from buffers.validation import INCOMPLETE_GROUP, NONFINITE_REWARD, REJECT_REASONS

    buffer = ReplayBuffer(BufferConfig(), str(tmp_path / "buffer"))
    server.telemetry.record_buffer(buffer.stats())
    samples = _scrape(server.url)
    rejected = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "driftrl_buffer_rejected_rows_total"
    }
    assert rejected == dict.fromkeys((*REJECT_REASONS, BUFFER_FULL, "storage_error"), 0.0)

    # a group of 3 with one NaN reward: that row for its reward, the other two for the group
    table = rollout_table(np.random.default_rng(0), [0, 0], group_size=3)
    rewards = table.column("reward").to_pylist()
    rewards[1] = float("nan")
    table = table.set_column(
        table.schema.get_field_index("reward"), "reward", pa.array(rewards, pa.float32())
    )
    assert buffer.push(table).accepted == 3
    server.telemetry.record_buffer(buffer.stats())
    samples = _scrape(server.url)
    assert samples[("driftrl_buffer_rejected_rows_total", (("reason", NONFINITE_REWARD),))] == 1
    assert samples[("driftrl_buffer_rejected_rows_total", (("reason", INCOMPLETE_GROUP),))] == 2
    assert samples[("driftrl_buffer_rejected_rows_total", (("reason", "null_field"),))] == 0


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_names_only_emitted_metrics(server, tmp_path):
    record_everything(server.telemetry, tmp_path)
    emitted = {name for name, _ in _scrape(server.url)}
    words = {w for expr in dashboard_expressions() for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)}
    used = {w for w in words if w.startswith("driftrl_")}
    assert used - emitted == set()
    # the §5 entropy-drift metrics are all on the dashboard
    assert {
        "driftrl_entropy",
        "driftrl_entropy_probe",
        "driftrl_entropy_delta_predicted",
        "driftrl_entropy_delta_realised",
        "driftrl_learner_cov_adv_weighted_s_centered",
        "driftrl_learner_score",
        "driftrl_learner_mask_fraction",
        "driftrl_staleness_versions_bucket",
    } <= used


def test_healthz_turns_503_when_a_heartbeat_is_old(server):
    server.telemetry.record_rollout("0", {"tokens_per_s": 10.0})
    with urllib.request.urlopen(server.url + "/healthz", timeout=5) as resp:
        assert resp.status == 200 and json.loads(resp.read())["ok"] is True
    server.telemetry.heartbeats["rollout/0"] -= 3600
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url + "/healthz", timeout=5)
    assert err.value.code == 503
    assert json.loads(err.value.read())["stale"] == ["rollout/0"]


def test_port_in_use_is_an_actionable_error(server):
    with pytest.raises(OSError, match="metrics.port"):
        MetricsServer(RunTelemetry(), host="127.0.0.1", port=server.port)


def test_real_prometheus_scrapes_and_evaluates_the_dashboard(server, tmp_path):
    metrics, _ = record_everything(server.telemetry, tmp_path)
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    with PrometheusServer(f"127.0.0.1:{server.port}", prom_dir) as prom:
        result = prom.wait_for("driftrl_entropy", timeout_s=60)
        assert float(result[0]["value"][1]) == metrics[P + "entropy_mean"]
        # every panel query parses and returns series (rate() needs a second scrape: wait_for polls)
        for expr in dashboard_expressions():
            assert prom.wait_for(expr, timeout_s=30), expr
