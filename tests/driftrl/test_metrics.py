"""The driver's Prometheus endpoint, scraped by our parser and by a real Prometheus server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from driftrl.metrics import MetricsServer, RunTelemetry
from tests.driftrl.prometheus_server import PrometheusServer


@pytest.fixture
def server():
    telemetry = RunTelemetry(heartbeat_timeout_s=60)
    srv = MetricsServer(telemetry, host="127.0.0.1", port=0).start()
    yield srv
    srv.stop()


def _scrape(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {fam.name: fam.samples for fam in text_string_to_metric_families(text)}


def test_learner_numbers_appear_with_their_names(server):
    server.telemetry.record_learner(
        {"entropy_mean": 1.25, "step": 3, "s_star_mean": -0.1, "s_star_std": 0.2, "mask_drop_frac_neg": 0.01,
         "not_a_number": "x", "nan_value": float("nan")}
    )
    server.telemetry.observe_staleness({0: 5, 2: 3})
    server.telemetry.record_buffer({"rows_available": 7, "rejected": {"nan_logprob": 2}})
    families = _scrape(server.url)
    assert families["driftrl_entropy"][0].value == 1.25
    assert families["driftrl_learner_step"][0].value == 3
    scores = {(s.labels["stat"], s.labels["moment"]): s.value for s in families["driftrl_learner_score"]}
    assert scores == {("s_star", "mean"): -0.1, ("s_star", "std"): 0.2}
    masks = {s.labels["sign"]: s.value for s in families["driftrl_learner_mask_fraction"]}
    assert masks == {"neg": 0.01}
    # 5 rows at staleness 0 and 3 at staleness 2: cumulative buckets le=0 -> 5, le=1 -> 5, le=2 -> 8.
    buckets = {s.labels["le"]: s.value for s in families["driftrl_staleness_versions"] if s.name.endswith("_bucket")}
    assert (buckets["0.0"], buckets["1.0"], buckets["2.0"], buckets["+Inf"]) == (5, 5, 8, 8)
    rejected = {s.labels["reason"]: s.value for s in families["driftrl_buffer_rejected_rows"]}
    assert rejected == {"nan_logprob": 2}


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


def test_real_prometheus_scrapes_driftrl_entropy(server, tmp_path):
    server.telemetry.record_learner({"entropy_mean": 0.75})
    with PrometheusServer(f"127.0.0.1:{server.port}", tmp_path) as prom:
        result = prom.wait_for("driftrl_entropy", timeout_s=60)
    assert float(result[0]["value"][1]) == 0.75
