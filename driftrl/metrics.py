"""Prometheus endpoint of the driver: ``/metrics`` and ``/healthz`` (ALGORITHM.md §5).

Actors report plain dicts of numbers with each push/step result (DESIGN.md "Metrics"); the driver
keeps the latest snapshot per component in a :class:`RunTelemetry` and a custom collector renders
those snapshots at scrape time. That keeps one metrics server per run (no per-actor ports in local
mode). Cumulative counters of a restarted actor start again from zero, which Prometheus' ``rate``
treats as a counter reset.

The learner's snapshot is the raw :meth:`learner.engine.Learner.train_step` dict
(``driftrl_learner_*`` keys, :data:`learner.losses.METRIC_REDUCTIONS` and
:data:`learner.engine.LEARNER_METRIC_REDUCTIONS`); keys a loss type does not produce, and NaN
values (the grad norm and loss of a skipped step), are simply not exported.

Names follow ``driftrl_<component>_<quantity>[_unit]``; the headline policy entropy is
``driftrl_entropy`` so dashboards and alerts can name it without knowing the component layout.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from buffers.replay import BUFFER_FULL, PARTIAL_GROUP, STALE, STORAGE_ERROR
from buffers.validation import REJECT_REASONS
from driftrl.report import learner_row


@dataclass(frozen=True)
class Export:
    """One exported metric family: a sample per ``(label values, snapshot key)`` present.

    Attributes:
        name: family name; a counter's ``_total`` suffix is added by the text format.
        help: the HELP line.
        samples: ``(label values, key in the component's snapshot)`` pairs.
        labels: label names of ``samples`` (after any per-component label such as ``actor``).
        counter: a cumulative count (``rate()``-able) rather than a gauge.
    """

    name: str
    help: str
    samples: tuple[tuple[tuple[str, ...], str], ...]
    labels: tuple[str, ...] = ()
    counter: bool = False


def scalar(name: str, help_text: str, key: str, counter: bool = False) -> Export:
    """An unlabelled :class:`Export` of one snapshot key."""
    return Export(name, help_text, (((), key),), counter=counter)


# keys are those of Learner.train_step without the driftrl_learner_ prefix (learner/losses.py
# METRIC_REDUCTIONS, learner/engine.py LEARNER_METRIC_REDUCTIONS, learner/critic.py
# CRITIC_METRIC_REDUCTIONS + value_grad_norm under loss.advantage = gae, and Learner._host_metrics)
LEARNER_EXPORTS: tuple[Export, ...] = (
    scalar(
        "driftrl_entropy",
        "Mean token entropy H of the current policy on the last training batch (nats).",
        "entropy_mean",
    ),
    scalar(
        "driftrl_entropy_delta_predicted",
        "Predicted entropy change of the last measured step on its own tokens (nats): eta_eff times "
        "-mean over kept tokens of r*A*Sc, eta_eff = |dtheta|/|grad| (approximate for Adam); present on "
        "steps that measure it (learner.realised_entropy_interval).",
        "predicted_entropy_change",
    ),
    scalar(
        "driftrl_entropy_delta_predicted_per_unit_step",
        "First-order entropy change of the last step per unit step size, -sum(r*A*Sc)/|T| over kept tokens "
        "(ALGORITHM.md §2).",
        "predicted_entropy_change_per_unit_step",
    ),
    scalar(
        "driftrl_entropy_delta_realised_batch",
        "Realised entropy change of the last measured step on its own tokens (nats): batch mean token entropy "
        "right after the optimizer step minus before, same tokens and temperature.",
        "realised_entropy_change",
    ),
    scalar(
        "driftrl_learner_entropy_step_scale",
        "eta_eff = |theta_after - theta_before| / |pre-clip gradient| of the last measured step (exact for SGD, "
        "approximate for Adam).",
        "entropy_step_scale",
    ),
    scalar(
        "driftrl_entropy_after_step",
        "Mean token entropy of the last measured step's batch right after its optimizer step (nats).",
        "entropy_mean_after_step",
    ),
    scalar(
        "driftrl_learner_update_norm",
        "|theta_after - theta_before| over every trainable parameter, last measured step.",
        "update_norm",
    ),
    scalar(
        "driftrl_learner_entropy_change_seconds",
        "Wall time of the post-step entropy forward and update norm of the last measured step.",
        "entropy_change_seconds",
    ),
    scalar(
        "driftrl_learner_cov_adv_weighted_s_centered",
        "Global batch covariance Cov(A, r*Sc); first order dH = -eta*(Cov + mean term) (ALGORITHM.md §2), "
        "so positive = entropy falling.",
        "cov_adv_weighted_s_centered",
    ),
    scalar(
        "driftrl_learner_adv_weighted_s_centered_mean_term",
        "mean(A)*mean(r*Sc) over the batch, the part of mean(A*r*Sc) that is not Cov(A, r*Sc).",
        "adv_weighted_s_centered_mean_term",
    ),
    Export(
        "driftrl_learner_score",
        "Mean and population std over the batch's tokens of S*, E_p[S], Sc = S* - E_p[S] and r*Sc.",
        tuple(
            ((stat, moment), f"{prefix}_{moment}")
            for stat, prefix in (
                ("s_star", "s_star"),
                ("s_expect", "s_expect"),
                ("s_centered", "s_centered"),
                ("r_s_centered", "weighted_s_centered"),
            )
            for moment in ("mean", "std")
        ),
        labels=("stat", "moment"),
    ),
    Export(
        "driftrl_learner_mask_fraction",
        "Fraction of valid tokens dropped by the entropy clip mask: all, among A > 0, among A < 0.",
        (
            (("all",), "clip_dropped_frac"),
            (("pos",), "clip_dropped_frac_pos_adv"),
            (("neg",), "clip_dropped_frac_neg_adv"),
        ),
        labels=("sign",),
    ),
    Export(
        "driftrl_learner_clip_threshold",
        "Entropy clip thresholds of the last step: centre, bound (mu*sigma) and the capped cutoff.",
        ((("center",), "clip_center"), (("bound",), "clip_bound"), (("cutoff",), "clip_cutoff")),
        labels=("threshold",),
    ),
    scalar(
        "driftrl_learner_ratio_mean",
        "Mean importance ratio current/behaviour over the loss tokens.",
        "ratio_mean",
    ),
    scalar(
        "driftrl_learner_ratio_max",
        "Max importance ratio current/behaviour over the loss tokens.",
        "ratio_max",
    ),
    scalar(
        "driftrl_learner_ratio_clipped_fraction",
        "Fraction of loss tokens whose PPO ratio was clipped.",
        "clipped_frac",
    ),
    scalar(
        "driftrl_learner_ratio_dual_clipped_fraction",
        "Fraction of loss tokens capped by the dual clip.",
        "dual_clipped_frac",
    ),
    scalar(
        "driftrl_learner_ratio_truncated_fraction",
        "Fraction of loss tokens whose importance weight was truncated at C.",
        "truncated_frac",
    ),
    scalar(
        "driftrl_learner_mismatch_kl",
        "k3 estimate of KL(behaviour || learner) over the last step's tokens, from the recomputed log-probs: "
        "rollout-engine vs learner mismatch on fresh rows, plus policy lag on stale ones (nats).",
        "mismatch_kl",
    ),
    scalar(
        "driftrl_learner_is_masked_fraction",
        "Fraction of valid tokens dropped by masked importance sampling (learner.loss.is_mask) in the last step.",
        "is_masked_frac",
    ),
    Export(
        "driftrl_learner_adv_sign_weight",
        "Weight of the surrogate of tokens with A > 0 (pos) and A < 0 (neg) in the last step; moved by the "
        "entropy controller when learner.loss.entropy_control is set.",
        ((("pos",), "pos_adv_weight"), (("neg",), "neg_adv_weight")),
        labels=("sign",),
    ),
    Export(
        "driftrl_learner_entropy_control",
        "Entropy PI controller after the last step: error = target - batch entropy (nats) and its clamped sum.",
        ((("error",), "entropy_control_error"), (("integral",), "entropy_control_integral")),
        labels=("term",),
    ),
    scalar("driftrl_learner_loss", "Total loss of the last step.", "loss"),
    scalar("driftrl_learner_pg_loss", "Policy-gradient part of the last step's loss.", "pg_loss"),
    scalar(
        "driftrl_learner_loss_tokens", "Tokens in the last step's loss (after the clip mask).", "loss_tokens"
    ),
    scalar("driftrl_learner_empty_batch", "1 when the last step had no loss tokens.", "empty_batch"),
    scalar(
        "driftrl_learner_entropy_bonus",
        "Entropy-bonus term of the last step (nats; entropy_coef > 0).",
        "entropy_bonus",
    ),
    scalar(
        "driftrl_learner_cov_selected_fraction",
        "Fraction of tokens selected by Clip-Cov / KL-Cov.",
        "cov_selected_frac",
    ),
    scalar(
        "driftrl_learner_kl_cov_penalty", "Mean KL-Cov penalty over the selected tokens.", "kl_cov_penalty"
    ),
    scalar(
        "driftrl_learner_zero_variance_group_fraction",
        "Fraction of the step's groups whose rewards were all equal (zero advantage, no signal).",
        "grpo_zero_variance_frac",
    ),
    scalar(
        "driftrl_learner_value_loss",
        "PPO value loss of the critic on the last step (loss.advantage = gae; absent on a skipped step).",
        "value_loss",
    ),
    scalar(
        "driftrl_learner_value_clipped_fraction",
        "Fraction of response tokens whose clipped value term was the larger (no gradient; critic.value_clip).",
        "value_clipped_frac",
    ),
    scalar(
        "driftrl_learner_value_mean",
        "Mean critic value V over the response tokens of the last step, before its update.",
        "value_mean",
    ),
    scalar(
        "driftrl_learner_return_mean",
        "Mean GAE return (the critic's target) over the response tokens of the last step.",
        "return_mean",
    ),
    scalar(
        "driftrl_learner_explained_variance",
        "1 - Var(G - V) / Var(G) of the last step's GAE returns G and the values V they used "
        "(1 = perfect critic, 0 = a constant, negative = worse; 0 when Var(G) = 0).",
        "explained_variance",
    ),
    Export(
        "driftrl_learner_advantage",
        "Mean and std of the last step's GAE advantages over response tokens, before whitening.",
        ((("mean",), "advantage_mean"), (("std",), "advantage_std")),
        labels=("moment",),
    ),
    scalar(
        "driftrl_learner_value_grad_norm",
        "Global gradient norm of the critic's last step (absent when skipped).",
        "value_grad_norm",
    ),
    scalar("driftrl_learner_reward_mean", "Mean reward of the trained batch.", "reward_mean"),
    scalar(
        "driftrl_learner_response_length_tokens",
        "Mean response length of the trained batch.",
        "response_length_mean",
    ),
    scalar("driftrl_learner_batch_groups", "Groups (prompts) in the trained batch.", "groups"),
    scalar("driftrl_learner_batch_responses", "Responses in the trained batch.", "responses"),
    scalar(
        "driftrl_learner_staleness_mean_versions", "Mean staleness of the trained batch.", "staleness_mean"
    ),
    scalar("driftrl_learner_staleness_max_versions", "Max staleness of the trained batch.", "staleness_max"),
    scalar("driftrl_learner_train_tokens", "Valid response tokens of the last step.", "train_tokens"),
    scalar(
        "driftrl_learner_nonfinite_tokens",
        "Tokens with a non-finite forward pass in the last step.",
        "nonfinite_tokens",
    ),
    scalar(
        "driftrl_learner_train_tokens_per_second",
        "Training throughput (valid response tokens per second).",
        "train_tokens_per_s",
    ),
    scalar("driftrl_learner_step_seconds", "Wall time of the last train_step.", "step_seconds"),
    scalar(
        "driftrl_learner_grad_norm",
        "Global gradient norm of the last step (absent when skipped).",
        "grad_norm",
    ),
    scalar("driftrl_learner_lr", "Learning rate of the last step.", "lr"),
    scalar(
        "driftrl_learner_step_skipped",
        "1 when the last step was skipped (non-finite loss or gradient).",
        "step_skipped",
    ),
    scalar(
        "driftrl_learner_skipped_steps",
        "Steps skipped since the run started.",
        "skipped_steps_total",
        counter=True,
    ),
    scalar("driftrl_learner_step", "Learner steps (sampled batches) taken.", "step"),
    scalar(
        "driftrl_learner_optimizer_step",
        "Optimizer steps taken, skipped ones included (learner.mini_batches x learner.epochs per learner step).",
        "optimizer_step",
    ),
    scalar("driftrl_policy_version", "Version of the weights the learner last published.", "policy_version"),
)
PROBE_EXPORTS: tuple[Export, ...] = (
    scalar("driftrl_entropy_probe", "Mean token entropy on the fixed probe set (nats).", "entropy"),
    scalar(
        "driftrl_entropy_delta_realised",
        "Drift gauge: entropy change on the fixed probe set between the last two weight syncs (nats); "
        "other prompts than the trained batch, so not a test of the first-order law "
        "(that is driftrl_entropy_delta_realised_batch).",
        "delta_realised",
    ),
)
# keys of actors/rollout.py RolloutWorker.stats(); rendered with an `actor` label
ROLLOUT_EXPORTS: tuple[Export, ...] = (
    scalar("driftrl_rollout_tokens_per_second", "Generation throughput while generating.", "tokens_per_s"),
    scalar("driftrl_rollout_tokens", "Response tokens generated.", "tokens_generated", counter=True),
    scalar("driftrl_rollout_reward_mean", "Mean reward of all responses scored by the actor.", "reward_mean"),
    scalar(
        "driftrl_rollout_reward_errors", "Reward calls that raised (scored 0).", "reward_errors", counter=True
    ),
    scalar(
        "driftrl_rollout_reward_timeouts",
        "Reward calls that timed out (scored 0).",
        "reward_timeouts",
        counter=True,
    ),
    scalar("driftrl_rollout_weight_version", "Weight version loaded by the actor.", "weight_version"),
    scalar("driftrl_rollout_weight_syncs", "Weight versions loaded.", "syncs", counter=True),
    scalar(
        "driftrl_rollout_weight_sync_seconds",
        "Time spent loading weights.",
        "sync_seconds_total",
        counter=True,
    ),
    scalar(
        "driftrl_rollout_weight_sync_last_seconds", "Time the last weight load took.", "last_sync_seconds"
    ),
    scalar(
        "driftrl_rollout_reward_nonfinite",
        "Reward calls that returned NaN or inf (scored 0).",
        "reward_nonfinite",
        counter=True,
    ),
    scalar(
        "driftrl_rollout_reward_over_budget",
        "Responses left unscored when a batch spent rollout.reward.batch_budget_s (scored 0).",
        "reward_over_budget",
        counter=True,
    ),
    scalar(
        "driftrl_rollout_push_failures",
        "Pushes to the replay buffer that raised (kept and retried).",
        "push_failures",
        counter=True,
    ),
    scalar(
        "driftrl_rollout_push_full",
        "Pushes the buffer refused in part or whole for room (the groups kept and retried).",
        "push_full",
        counter=True,
    ),
    scalar("driftrl_rollout_push_retries", "Pushes retried after a backoff.", "push_retries", counter=True),
    scalar(
        "driftrl_rollout_pending_push_groups",
        "Finished groups waiting in the actor for the buffer to take them.",
        "pending_push_groups",
    ),
    scalar("driftrl_rollout_engine_errors", "vLLM generation errors.", "engine_errors", counter=True),
    scalar("driftrl_rollout_in_flight_groups", "Groups being generated.", "in_flight_groups"),
    scalar(
        "driftrl_rollout_accepted_groups",
        "Groups the buffer accepted from the actor.",
        "accepted_groups",
        counter=True,
    ),
)
# keys of buffers/replay.py ReplayBuffer.stats() (rows throughout: pushed = accepted + rejected,
# accepted = available + leased + acked + evicted); `rejected`/`evicted` reason dicts are added per scrape
BUFFER_EXPORTS: tuple[Export, ...] = (
    Export(
        "driftrl_buffer_rows",
        "Rows in the replay buffer by state.",
        ((("available",), "rows_available"), (("leased",), "rows_leased")),
        labels=("state",),
    ),
    Export(
        "driftrl_buffer_groups",
        "Groups in the replay buffer by state.",
        ((("available",), "groups_available"), (("leased",), "groups_leased")),
        labels=("state",),
    ),
    scalar("driftrl_buffer_capacity_groups", "Groups the buffer holds at most.", "capacity_groups"),
    scalar("driftrl_buffer_held_bytes", "Bytes of rows held in memory.", "bytes_held"),
    scalar("driftrl_buffer_pushed_rows", "Rows pushed to the buffer.", "pushed", counter=True),
    scalar("driftrl_buffer_accepted_rows", "Rows the buffer accepted.", "accepted", counter=True),
    scalar("driftrl_buffer_sampled_rows", "Rows leased to the learner.", "sampled", counter=True),
    scalar("driftrl_buffer_acked_rows", "Rows acknowledged by the learner.", "acked", counter=True),
    scalar(
        "driftrl_buffer_requeued_rows", "Leased rows put back for another learner.", "requeued", counter=True
    ),
    scalar(
        "driftrl_buffer_lease_expired", "Leases that expired unacknowledged.", "lease_expired", counter=True
    ),
)
BUFFER_REJECT_REASONS: tuple[str, ...] = (*REJECT_REASONS, BUFFER_FULL, STORAGE_ERROR)
BUFFER_EVICT_REASONS: tuple[str, ...] = (STALE, PARTIAL_GROUP)
STALENESS_BUCKETS: tuple[float, ...] = (0, 1, 2, 3, 4, 6, 8, 16)
SYNC_SECONDS_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STALENESS_COUNT_KEY = "staleness_count_"


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


def staleness_counts(row: Mapping[str, float]) -> dict[int, float]:
    """Rows per staleness from a learner row's ``staleness_count_<k>`` / ``staleness_count_over``.

    The learner bins ``0..max_staleness`` and one bin for anything older; that one is placed at
    the largest ``k`` plus one, i.e. ``max_staleness + 1``.
    """
    numbered = {
        int(key.removeprefix(STALENESS_COUNT_KEY)): value
        for key, value in row.items()
        if key.startswith(STALENESS_COUNT_KEY) and key.removeprefix(STALENESS_COUNT_KEY).isdigit()
    }
    over = row.get(f"{STALENESS_COUNT_KEY}over")
    if over is not None:
        numbered[max(numbered, default=-1) + 1] = over
    return numbered


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
        """Take one ``Learner.train_step`` result (prefixed or not) as the learner's snapshot.

        The snapshot is replaced, not merged, so a value the last step did not produce (the grad
        norm of a skipped step is NaN) is not shown from an older step. Its staleness counts are
        added to the staleness histogram.
        """
        row = {key: value for key, value in learner_row(metrics).items() if math.isfinite(value)}
        self.observe_staleness(staleness_counts(row))
        with self._lock:
            self.learner = row
            self.heartbeats["learner"] = time.time()

    def record_probe(self, entropy: float, delta_realised: float | None) -> None:
        """Probe-set entropy after a sync and its change since the previous one (None/NaN: none yet)."""
        with self._lock:
            self.probe.update(
                {k: v for k, v in (("entropy", entropy), ("delta_realised", delta_realised)) if _is_number(v)}
            )

    def record_rollout(self, actor_id: str, stats: Mapping[str, object]) -> None:
        with self._lock:
            self.rollout[actor_id] = _flatten(stats)
            self.heartbeats[f"rollout/{actor_id}"] = time.time()

    def record_buffer(self, stats: Mapping[str, object]) -> None:
        with self._lock:
            self.buffer = _flatten(stats)
            self.heartbeats["buffer"] = time.time()

    def observe_staleness(self, staleness_counts: Mapping[int, float]) -> None:
        with self._lock:
            for value, count in staleness_counts.items():
                self.staleness.observe(float(value), float(count))

    def observe_sync(self, seconds: float) -> None:
        with self._lock:
            self.sync_seconds.observe(seconds)

    def count(self, name: str, amount: float = 1.0) -> None:
        """Add to the driver counter ``driftrl_<name>`` (a trailing ``_total`` is the format's own)."""
        with self._lock:
            self.counters[name] = self.counters.get(name, 0.0) + amount

    def health(self) -> dict[str, object]:
        now = time.time()
        with self._lock:
            ages = {name: round(now - ts, 1) for name, ts in self.heartbeats.items()}
        stale = sorted(n for n, age in ages.items() if age > self.heartbeat_timeout_s)
        return {"ok": not stale, "heartbeat_age_s": ages, "stale": stale}

    # -- rendering --------------------------------------------------------------------------
    def collect(self) -> Iterable[Metric]:
        with self._lock:
            learner, probe = dict(self.learner), dict(self.probe)
            buffer, counters = dict(self.buffer), dict(self.counters)
            rollout = {(actor_id,): dict(stats) for actor_id, stats in sorted(self.rollout.items())}
            stale_buckets, stale_sum = self.staleness.buckets(), self.staleness.total
            sync_buckets, sync_sum = self.sync_seconds.buckets(), self.sync_seconds.total

        yield from _render(LEARNER_EXPORTS, {(): learner})
        yield from _render(PROBE_EXPORTS, {(): probe})
        rollout_reasons = [
            _by_reason(
                "driftrl_rollout_skipped_prompts",
                "Prompts an actor skipped, by reason (null/blank prompt or answer, too long, engine error).",
                "skipped_prompts",
                rollout.values(),
            ),
            _by_reason(
                "driftrl_rollout_push_rejected_rows",
                "Rows of an actor's pushes the buffer rejected for good, by validation reason.",
                "push_rejected_rows",
                rollout.values(),
            ),
        ]
        yield from _render((*ROLLOUT_EXPORTS, *rollout_reasons), rollout, ("actor",))
        if buffer:
            # every reason from the first scrape, so a rate() alert has a series before the first one
            buffer = {f"rejected.{reason}": 0.0 for reason in BUFFER_REJECT_REASONS} | buffer
            buffer = {f"evicted.{reason}": 0.0 for reason in BUFFER_EVICT_REASONS} | buffer
        reasons = [
            _by_reason(
                f"driftrl_buffer_{kind}_rows", f"Rows {kind} by the buffer, by reason.", kind, [buffer]
            )
            for kind in ("rejected", "evicted")
        ]
        yield from _render((*BUFFER_EXPORTS, *reasons), {(): buffer})
        yield HistogramMetricFamily(
            "driftrl_staleness_versions",
            "Policy versions between the learner and the behaviour policy of each trained row.",
            buckets=stale_buckets,
            sum_value=stale_sum,
        )
        yield HistogramMetricFamily(
            "driftrl_weight_sync_seconds",
            "Wall time of one weight publication to all rollout actors.",
            buckets=sync_buckets,
            sum_value=sync_sum,
        )
        driver = [
            scalar(f"driftrl_{name}", f"Driver counter {name}.", name, counter=True)
            for name in sorted(counters)
        ]
        yield from _render(driver, {(): counters})


def _by_reason(name: str, help_text: str, kind: str, snapshots: Iterable[Mapping[str, float]]) -> Export:
    """A counter family labelled ``reason`` from the ``<kind>.<reason>`` keys of flattened stats dicts."""
    keys = sorted({key for snapshot in snapshots for key in snapshot if key.startswith(f"{kind}.")})
    samples = tuple(((key.removeprefix(f"{kind}."),), key) for key in keys)
    return Export(name, help_text, samples, labels=("reason",), counter=True)


def _render(
    exports: Sequence[Export],
    snapshots: Mapping[tuple[str, ...], Mapping[str, float]],
    outer_labels: tuple[str, ...] = (),
) -> Iterator[Metric]:
    """The families of ``exports`` with one sample set per snapshot (keyed by ``outer_labels``
    values); absent keys give no sample and a family without samples is left out."""
    for export in exports:
        family_type = CounterMetricFamily if export.counter else GaugeMetricFamily
        family = family_type(export.name, export.help, labels=[*outer_labels, *export.labels])
        for outer, snapshot in snapshots.items():
            for values, key in export.samples:
                if key in snapshot:
                    family.add_metric([*outer, *values], snapshot[key])
        if family.samples:
            yield family


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
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="driftrl-metrics", daemon=True
        )

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
