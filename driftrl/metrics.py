"""Prometheus endpoint of the driver: ``/metrics`` and ``/healthz`` (ALGORITHM.md §5).

Actors report plain dicts of numbers with each push/step result (DESIGN.md "Metrics"); the driver
keeps the latest snapshot per component in a :class:`RunTelemetry` and a custom collector renders
those snapshots at scrape time. That keeps one metrics server per run (no per-actor ports in local
mode) and lets cumulative counters from restarted actors be shown as the driver's running totals.

Names follow ``driftrl_<component>_<quantity>[_unit]``; the headline policy entropy is
``driftrl_entropy`` so dashboards and alerts can name it without knowing the component layout.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# (metric name, help, key in the learner's per-step metric dict)
LEARNER_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("driftrl_entropy", "Mean token entropy H of the current policy on the last training batch (nats).", "entropy_mean"),
    ("driftrl_learner_step", "Optimizer steps taken.", "step"),
    ("driftrl_policy_version", "Policy version last published to the rollout actors.", "policy_version"),
    ("driftrl_learner_loss", "Surrogate loss of the last step.", "loss"),
    ("driftrl_learner_grad_norm", "Gradient norm of the last step before clipping.", "grad_norm"),
    ("driftrl_learner_lr", "Learning rate of the last step.", "lr"),
    (
        "driftrl_entropy_delta_predicted",
        "First-order predicted entropy change of the last step, -sum(r*A*Sc)/|T| (ALGORITHM.md §2).",
        "predicted_delta_entropy",
    ),
    ("driftrl_learner_cov_adv_rsc", "Batch covariance Cov(A, r*Sc); negative = entropy collapse pressure.", "cov_adv_r_sc"),
    ("driftrl_learner_ratio_mean", "Mean importance ratio current/behaviour over valid tokens.", "ratio_mean"),
    ("driftrl_learner_ratio_max", "Max importance ratio over valid tokens.", "ratio_max"),
    ("driftrl_learner_ratio_clipped_fraction", "Fraction of tokens whose PPO ratio was clipped.", "clip_fraction"),
    ("driftrl_learner_ratio_truncated_fraction", "Fraction of tokens whose importance weight was truncated.", "truncated_fraction"),
    ("driftrl_learner_reward_mean", "Mean reward of the trained batch.", "reward_mean"),
    ("driftrl_learner_response_length_tokens", "Mean response length of the trained batch.", "response_length_mean"),
    ("driftrl_learner_tokens_per_second", "Training throughput (response tokens per second).", "tokens_per_s"),
    ("driftrl_learner_zero_variance_group_fraction", "Groups whose rewards were all equal (no signal).", "zero_variance_group_fraction"),
)
# (stat label, key prefix): exported as driftrl_learner_score{stat, moment}
SCORE_STATS: tuple[tuple[str, str], ...] = (
    ("s_star", "s_star"),
    ("s_expect", "s_expect"),
    ("s_centered", "s_centered"),
    ("r_s_centered", "r_s_centered"),
)
MASK_SIGNS: tuple[tuple[str, str], ...] = (("all", "mask_drop_frac"), ("pos", "mask_drop_frac_pos"), ("neg", "mask_drop_frac_neg"))
STALENESS_BUCKETS: tuple[float, ...] = (0, 1, 2, 3, 4, 6, 8, 16)
SYNC_SECONDS_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[float] = field(default_factory=list)
    total: float = 0.0
    n: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0.0] * len(self.bounds)

    def observe(self, value: float, weight: float = 1.0) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += weight
        self.total += value * weight
        self.n += weight

    def buckets(self) -> list[tuple[str, float]]:
        out = [(repr(float(b)), c) for b, c in zip(self.bounds, self.counts, strict=True)]
        return out + [("+Inf", self.n)]


class RunTelemetry(Collector):
    """Latest numbers of every component, rendered as Prometheus metric families on scrape."""

    def __init__(self, heartbeat_timeout_s: float = 120.0) -> None:
        self._lock = threading.Lock()
        self.learner: dict[str, float] = {}
        self.probe: dict[str, float] = {}
        self.rollout: dict[str, dict[str, float]] = {}
        self.buffer: dict[str, float] = {}
        self.counters: dict[str, float] = {}
        self.staleness = _Histogram(STALENESS_BUCKETS)
        self.sync_seconds = _Histogram(SYNC_SECONDS_BUCKETS)
        self.heartbeats: dict[str, float] = {}
        self.heartbeat_timeout_s = heartbeat_timeout_s

    # -- updates from the driver loop -------------------------------------------------------
    def record_learner(self, metrics: Mapping[str, float]) -> None:
        with self._lock:
            self.learner.update({k: float(v) for k, v in metrics.items() if _is_number(v)})
            self.heartbeats["learner"] = time.time()

    def record_probe(self, entropy: float, delta_realised: float | None) -> None:
        with self._lock:
            self.probe["entropy"] = entropy
            if delta_realised is not None:
                self.probe["delta_realised"] = delta_realised

    def record_rollout(self, actor_id: str, stats: Mapping[str, float]) -> None:
        with self._lock:
            self.rollout[actor_id] = {k: float(v) for k, v in stats.items() if _is_number(v)}
            self.heartbeats[f"rollout/{actor_id}"] = time.time()

    def record_buffer(self, stats: Mapping[str, object]) -> None:
        with self._lock:
            self.buffer = _flatten(stats)
            self.heartbeats["buffer"] = time.time()

    def observe_staleness(self, staleness_counts: Mapping[int, int]) -> None:
        with self._lock:
            for value, count in staleness_counts.items():
                self.staleness.observe(float(value), float(count))

    def observe_sync(self, seconds: float) -> None:
        with self._lock:
            self.sync_seconds.observe(seconds)

    def count(self, name: str, amount: float = 1.0) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0.0) + amount

    def health(self) -> dict[str, object]:
        now = time.time()
        with self._lock:
            ages = {name: round(now - ts, 1) for name, ts in self.heartbeats.items()}
        stale = sorted(n for n, age in ages.items() if age > self.heartbeat_timeout_s)
        return {"ok": not stale, "heartbeat_age_s": ages, "stale": stale}

    # -- rendering --------------------------------------------------------------------------
    def collect(self) -> Iterable:  # noqa: C901 - one flat list of families reads best
        with self._lock:
            learner, probe, rollout, buffer = dict(self.learner), dict(self.probe), dict(self.rollout), dict(self.buffer)
            counters = dict(self.counters)
            staleness, sync = self.staleness, self.sync_seconds
            stale_buckets, stale_sum = staleness.buckets(), staleness.total
            sync_buckets, sync_sum = sync.buckets(), sync.total

        for name, help_text, key in LEARNER_GAUGES:
            if key in learner:
                yield GaugeMetricFamily(name, help_text, value=learner[key])
        scores = GaugeMetricFamily(
            "driftrl_learner_score", "Moments of S*, E_p[S], Sc = S*-E_p[S] and r*Sc over the batch's tokens.",
            labels=["stat", "moment"],
        )
        for stat, prefix in SCORE_STATS:
            for moment in ("mean", "std"):
                key = f"{prefix}_{moment}"
                if key in learner:
                    scores.add_metric([stat, moment], learner[key])
        yield scores
        masks = GaugeMetricFamily(
            "driftrl_learner_mask_fraction", "Fraction of valid tokens dropped by the entropy clip mask.",
            labels=["sign"],
        )
        for sign, key in MASK_SIGNS:
            if key in learner:
                masks.add_metric([sign], learner[key])
        yield masks
        if "entropy" in probe:
            yield GaugeMetricFamily("driftrl_entropy_probe", "Mean token entropy on the fixed probe set.", value=probe["entropy"])
        if "delta_realised" in probe:
            yield GaugeMetricFamily(
                "driftrl_entropy_delta_realised",
                "Realised entropy change on the probe set between the last two weight syncs.",
                value=probe["delta_realised"],
            )

        tokens_per_s = GaugeMetricFamily(
            "driftrl_rollout_tokens_per_second", "Generation throughput per rollout actor.", labels=["actor"]
        )
        generated = CounterMetricFamily("driftrl_rollout_tokens", "Response tokens generated.", labels=["actor"])
        reward_errors = CounterMetricFamily(
            "driftrl_rollout_reward_errors", "Reward calls that raised or timed out (scored 0).", labels=["actor"]
        )
        reward = GaugeMetricFamily("driftrl_rollout_reward_mean", "Mean reward of generated responses.", labels=["actor"])
        version = GaugeMetricFamily("driftrl_rollout_weight_version", "Weight version loaded by the actor.", labels=["actor"])
        for actor_id, stats in sorted(rollout.items()):
            _maybe_add(tokens_per_s, [actor_id], stats.get("tokens_per_s"))
            _maybe_add(generated, [actor_id], stats.get("tokens_generated"))
            _maybe_add(reward_errors, [actor_id], _sum_keys(stats, ("reward_errors", "reward_timeouts")))
            _maybe_add(reward, [actor_id], stats.get("reward_mean"))
            _maybe_add(version, [actor_id], stats.get("weight_version"))
        yield from (tokens_per_s, generated, reward_errors, reward, version)

        rows = GaugeMetricFamily("driftrl_buffer_rows", "Rows in the replay buffer by state.", labels=["state"])
        for state in ("available", "leased"):
            _maybe_add(rows, [state], buffer.get(f"rows_{state}", buffer.get(state)))
        yield rows
        for kind in ("rejected", "evicted"):
            fam = CounterMetricFamily(f"driftrl_buffer_{kind}_rows", f"Rows {kind} by the buffer, by reason.", labels=["reason"])
            prefix = f"{kind}."
            for key, value in sorted(buffer.items()):
                if key.startswith(prefix):
                    fam.add_metric([key[len(prefix):]], value)
            yield fam
        for key, help_text in (("pushed", "Rows pushed to the buffer."), ("acked", "Rows acknowledged by the learner.")):
            if key in buffer:
                yield CounterMetricFamily(f"driftrl_buffer_{key}_rows", help_text, value=buffer[key])

        yield HistogramMetricFamily(
            "driftrl_staleness_versions",
            "Policy versions between the learner and the behaviour policy of each trained row.",
            buckets=stale_buckets, sum_value=stale_sum,
        )
        yield HistogramMetricFamily(
            "driftrl_weight_sync_seconds", "Wall time of one weight publication to all rollout actors.",
            buckets=sync_buckets, sum_value=sync_sum,
        )
        for name, value in sorted(counters.items()):
            yield CounterMetricFamily(f"driftrl_{name}", f"Driver counter {name}.", value=value)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def _flatten(stats: Mapping[str, object], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in stats.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif _is_number(value):
            out[f"{prefix}{key}"] = float(value)  # type: ignore[arg-type]
    return out


def _sum_keys(stats: Mapping[str, float], keys: tuple[str, ...]) -> float | None:
    present = [stats[k] for k in keys if k in stats]
    return sum(present) if present else None


def _maybe_add(family: GaugeMetricFamily | CounterMetricFamily, labels: list[str], value: float | None) -> None:
    if value is not None:
        family.add_metric(labels, value)


class MetricsServer:
    """Serves ``/metrics`` (Prometheus text format) and ``/healthz`` (JSON, 503 when unhealthy)."""

    def __init__(self, telemetry: RunTelemetry, host: str = "127.0.0.1", port: int = 0) -> None:
        self.telemetry = telemetry
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(telemetry)
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                elif path == "/healthz":
                    health = telemetry.health()
                    body = json.dumps(health).encode()
                    status, ctype = (200 if health["ok"] else 503), "application/json"
                else:
                    body, status, ctype = b"not found: try /metrics or /healthz\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes would flood the log
                return

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:
            raise OSError(
                f"cannot serve metrics on {host}:{port} ({err}); choose another port with metrics.port=<n> (0 = any free)"
            ) from err
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="driftrl-metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        return f"http://{host}:{self.port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
