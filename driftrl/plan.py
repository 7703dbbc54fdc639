"""Cluster sizing: simulate the rollout/learner pipeline from measured rates (``driftrl plan``).

A discrete-event simulation of the driver's loop (driftrl/pipeline.py) with the real rules and
modelled engines, so a split of N GPUs between rollout actors and learner ranks can be judged
before it is paid for:

* **rollout actor** (one per rollout GPU): one vLLM engine decoding every running response at
  once, ``generation_tokens_per_s`` in total, shared equally by the running responses (a
  response's tokens come from ``response_lengths``; a group finishes with its longest response).
  At most ``prompts_per_request`` groups in flight or waiting to be pushed. A group's
  ``version_start`` is the actor's weight version when it was submitted. Each finished group then
  holds the actor ``rollout_group_overhead_s`` (scoring, push, the next call) before it is pushed.
* **admission** (actors/admission.py): a group starts only while
  ``accepted + in_flight + 1 <= (max_staleness + v + 1) * groups_per_step * sync_interval``.
  As in the driver, ``accepted`` is reset at every ``generate_step`` call to
  ``consumed_groups + groups_available`` of the buffer stats the driver fetched last
  (every ``STATS_EVERY_S``), and the actor adds its own pushes in between. Those stats lag, so
  the actors over-admit; in ``sync`` mode (``max_staleness = 0``) the surplus goes stale and the
  buffer evicts it at the next sample: the over-generation a sync run's metrics record
  (``rollout_tokens_generated`` vs trained tokens) comes out of the same rule here.
* **buffer**: whole groups, oldest first; a sample for the next step evicts every group older than
  ``max_staleness`` versions and leases ``groups_per_step`` groups as soon as there are that many,
  even while the learner still trains the previous step (the driver's prefetch).
* **learner** (``learner_ranks`` data-parallel ranks): a step takes
  ``batch_tokens / (ranks * learner_tokens_per_s)`` plus ``learner_post_step_s`` (weight
  publication and probe on the learner after a sync step, and the call round trips).
* **weight sync** every ``sync_interval`` steps: each actor pauses ``weight_load_s`` after the
  publication; its in-flight groups keep their old ``version_start``.
* ``sync`` mode: ``max_staleness = 0`` and no ``generate_step`` call while a learner step or a
  weight sync is in flight (engines still finish what they hold; it is pushed at the next call).

Rates come from a run directory (:func:`rates_from_run_dir`) or by hand; :func:`search_splits`
runs every split of N GPUs. Not modelled: tensor/pipeline parallel rollout, the engine's rate
changing with its batch, network contention between syncs and the learner's collectives.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

# the driver's constants: stats refresh period (the admission rule's lag)
from driftrl.lanes import STATS_EVERY_S

Mode = Literal["sync", "async"]


@dataclass(frozen=True)
class PipelineRates:
    """What one rollout GPU and one learner GPU achieve (measured or given by hand).

    Attributes:
        generation_tokens_per_s: response tokens/s of one rollout engine while it has work.
        learner_tokens_per_s: trained (response) tokens/s of one learner rank inside ``train_step``.
        learner_post_step_s: learner seconds per step outside ``train_step`` (publish, probe,
            call round trips); not divided by the ranks.
        weight_load_s: seconds a rollout actor pauses to load one new version.
        response_lengths: response lengths (tokens) to draw from; one value = fixed length.
        rollout_group_overhead_s: rollout-side seconds per finished group outside the engine
            (reward scoring, the Arrow table, the push, the driver's next call); the engine
            makes no progress meanwhile (on the CPU stack they share a core; on a GPU the
            engine waits for the next call's requests).
    """

    generation_tokens_per_s: float
    learner_tokens_per_s: float
    learner_post_step_s: float = 0.0
    weight_load_s: float = 0.0
    response_lengths: tuple[int, ...] = (64,)
    rollout_group_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.generation_tokens_per_s > 0 and self.learner_tokens_per_s > 0):
            raise ValueError(f"token rates must be > 0: {self}")
        if min(self.learner_post_step_s, self.weight_load_s, self.rollout_group_overhead_s) < 0:
            raise ValueError(f"seconds must be >= 0: {self}")
        if not self.response_lengths or min(self.response_lengths) < 1:
            raise ValueError("response_lengths: need at least one length, each >= 1")

    @property
    def response_length_mean(self) -> float:
        return sum(self.response_lengths) / len(self.response_lengths)


@dataclass(frozen=True)
class PipelineShape:
    """The run's knobs that shape the pipeline (same names as the config)."""

    mode: Mode = "async"
    groups_per_step: int = 8
    group_size: int = 8
    max_staleness: int = 2
    sync_interval: int = 1
    prompts_per_request: int = 8
    # how old the buffer count behind the driver's admission figure is: the driver's stats period
    # (0: an exact count, what the rule intends)
    admission_lag_s: float = STATS_EVERY_S

    def __post_init__(self) -> None:
        if min(self.groups_per_step, self.group_size, self.sync_interval, self.prompts_per_request) < 1:
            raise ValueError(
                f"groups_per_step, group_size, sync_interval, prompts_per_request must be >= 1: {self}"
            )
        if self.max_staleness < 0 or self.admission_lag_s < 0:
            raise ValueError(f"max_staleness and admission_lag_s must be >= 0: {self}")

    @property
    def effective_max_staleness(self) -> int:
        return 0 if self.mode == "sync" else self.max_staleness


@dataclass(frozen=True)
class SimResult:
    """One simulated run.

    Attributes:
        steps_per_s: steps 2..N over their wall time (the first step's start-up excluded, as the
            async_vs_sync benchmark times it).
        staleness_mean: mean ``learner_version - version_start`` over trained rows.
        rollout_idle_frac / learner_idle_frac: fraction of the timed window a side had no work
            (a rollout engine paused for a weight load counts as busy).
        generated_per_trained: generated response tokens per trained token (over-generation).
        stale_groups: groups the buffer evicted as too stale.
    """

    rollout_actors: int
    learner_ranks: int
    steps: int
    seconds: float
    steps_per_s: float
    trained_tokens_per_s: float
    staleness_mean: float
    rollout_idle_frac: float
    learner_idle_frac: float
    generated_per_trained: float
    stale_groups: int


@dataclass
class _Group:
    seq: int
    version_start: int
    remaining: list[float]  # tokens left per unfinished response
    tokens: int


@dataclass
class _Actor:
    version: int = 0
    accepted: int = 0
    running: list[_Group] = field(default_factory=list)
    pending_push: list[_Group] = field(default_factory=list)
    scoring: list[tuple[float, _Group]] = field(default_factory=list)  # (ready time, group) in overhead
    paused_until: float = 0.0
    load_at: list[tuple[float, int]] = field(default_factory=list)  # (time, version) of queued loads
    loading_version: int | None = None  # the version being loaded until paused_until
    busy_s: float = 0.0


class _Simulation:
    """The event loop; :func:`simulate` is its interface."""

    def __init__(
        self, rates: PipelineRates, shape: PipelineShape, actors: int, ranks: int, steps: int, seed: int
    ) -> None:
        self.rates, self.shape, self.ranks, self.total = rates, shape, ranks, steps
        self.rng = random.Random(seed)
        self.actors = [_Actor() for _ in range(actors)]
        self.staleness = shape.effective_max_staleness
        self.capacity_per_version = shape.groups_per_step * shape.sync_interval
        self.now = 0.0
        self.version = 0
        self.step = 0
        self.consumed = 0
        self.available: list[_Group] = []
        self.snapshot_available = 0
        self.next_stats = 0.0
        self.seq = 0
        self.next_batch: list[_Group] | None = None
        self.training: list[_Group] | None = None
        self.train_end = math.inf
        self.learner_free_at = 0.0
        self.sync_pending_until = -math.inf
        self.generated_tokens = 0
        self.trained_tokens = 0
        self.stale_groups = 0
        self.staleness_sum = 0.0
        self.rows_trained = 0
        self.step_end_times: list[float] = []
        self.learner_busy_s = 0.0
        self.window_start_busy = (0.0, 0.0)  # (learner busy s, rollout busy s) at the end of step 1

    # -- rules ---------------------------------------------------------------------------------

    def _calls_allowed(self) -> bool:
        if self.shape.mode == "async":
            return True
        return self.training is None and self.now >= self.sync_pending_until

    def _capacity(self) -> int:
        return (self.staleness + self.version + 1) * self.capacity_per_version

    def _top_up(self, actor: _Actor) -> None:
        while self._held(actor) < self.shape.prompts_per_request:
            in_flight = self._held(actor)
            if actor.accepted + in_flight + 1 > self._capacity():
                return
            lengths = [self.rng.choice(self.rates.response_lengths) for _ in range(self.shape.group_size)]
            self.seq += 1
            actor.running.append(_Group(self.seq, actor.version, [float(n) for n in lengths], sum(lengths)))

    @staticmethod
    def _held(actor: _Actor) -> int:
        """Groups the actor holds: generating, in its per-group overhead, or waiting to be pushed."""
        return len(actor.running) + len(actor.scoring) + len(actor.pending_push)

    def _call_boundary(self, actor: _Actor) -> None:
        """One ``generate_step`` call: the driver's accepted count, pushes, top-up."""
        if self.shape.admission_lag_s == 0:
            self.snapshot_available = len(self.available)
        actor.accepted = self.consumed + self.snapshot_available
        self._push(actor)
        self._top_up(actor)

    def _push(self, actor: _Actor) -> None:
        for group in actor.pending_push:
            self.available.append(group)
            actor.accepted += 1
        actor.pending_push = []

    def _version_of_next_step(self) -> int:
        if self.training is None:
            return self.version
        syncs = (self.step + 1) % self.shape.sync_interval == 0 or self.step + 1 == self.total
        return self.version + (1 if syncs else 0)

    def _try_sample(self) -> None:
        steps_left = self.total - self.step - (1 if self.training is not None else 0)
        if self.next_batch is not None or steps_left <= 0:
            return
        oldest_ok = self._version_of_next_step() - self.staleness
        stale = [g for g in self.available if g.version_start < oldest_ok]
        if stale:
            self.stale_groups += len(stale)
            self.available = [g for g in self.available if g.version_start >= oldest_ok]
        if len(self.available) >= self.shape.groups_per_step:
            self.available.sort(key=lambda g: g.seq)
            self.next_batch = self.available[: self.shape.groups_per_step]
            self.available = self.available[self.shape.groups_per_step :]
            self.consumed += self.shape.groups_per_step

    def _try_dispatch(self) -> None:
        if self.training is not None or self.next_batch is None or self.step >= self.total:
            return
        batch, self.next_batch = self.next_batch, None
        tokens = sum(g.tokens for g in batch)
        start = max(self.now, self.learner_free_at)
        seconds = tokens / (self.ranks * self.rates.learner_tokens_per_s)
        self.training = batch
        self.train_end = start + seconds
        self.learner_busy_s += seconds
        for group in batch:
            self.staleness_sum += (self.version - group.version_start) * self.shape.group_size
        self.rows_trained += len(batch) * self.shape.group_size
        self.trained_tokens += tokens

    def _finish_step(self) -> None:
        self.step += 1
        self.training = None
        self.train_end = math.inf
        post = self.rates.learner_post_step_s
        self.learner_free_at = self.now + post
        self.learner_busy_s += post
        self.step_end_times.append(self.now)
        if self.step % self.shape.sync_interval == 0 or self.step == self.total:
            self.version += 1
            publish_done = self.now + post
            self.sync_pending_until = publish_done + self.rates.weight_load_s
            for actor in self.actors:
                actor.load_at.append((publish_done, self.version))
        if self.step == 1:
            self.window_start_busy = (self.learner_busy_s, sum(a.busy_s for a in self.actors))

    # -- engine --------------------------------------------------------------------------------

    def _rate_per_response(self, actor: _Actor) -> float:
        n = sum(len(g.remaining) for g in actor.running)
        return self.rates.generation_tokens_per_s / n if n else 0.0

    def _next_completion(self, actor: _Actor) -> float:
        if not actor.running or self.now < actor.paused_until:
            return actor.paused_until if actor.running else math.inf
        rate = self._rate_per_response(actor)
        least = min(min(g.remaining) for g in actor.running)
        return self.now + least / rate

    def _advance(self, until: float) -> None:
        dt = until - self.now
        if dt <= 0:
            return
        for actor in self.actors:
            paused = max(0.0, min(actor.paused_until, until) - self.now)
            if actor.running or paused > 0:
                actor.busy_s += dt if actor.running else paused
            work = dt - paused
            if actor.running and work > 0:
                rate = self._rate_per_response(actor)
                for g in actor.running:
                    g.remaining = [r - rate * work for r in g.remaining]
        self.now = until

    def _settle_engine(self, actor: _Actor) -> bool:
        """Retire finished responses and groups; True when a group finished."""
        finished = False
        still = []
        for g in actor.running:
            g.remaining = [r for r in g.remaining if r > 1e-6]
            if g.remaining:
                still.append(g)
            else:
                finished = True
                self.generated_tokens += g.tokens
                if self.rates.rollout_group_overhead_s > 0:
                    # scored and pushed after the overhead, which holds the engine too
                    overhead = self.rates.rollout_group_overhead_s
                    actor.paused_until = max(actor.paused_until, self.now) + overhead
                    actor.scoring.append((actor.paused_until, g))
                else:
                    actor.pending_push.append(g)
        actor.running = still
        ready = [g for t, g in actor.scoring if t <= self.now + 1e-12]
        if ready:
            actor.scoring = [(t, g) for t, g in actor.scoring if t > self.now + 1e-12]
            actor.pending_push.extend(ready)
            finished = True
        return finished

    def _handle_due(self) -> None:
        """Everything that happens at ``now``: the step's end, the stats refresh, loads, finished groups."""
        if self.training is not None and self.now >= self.train_end - 1e-12:
            self._finish_step()
        if self.now >= self.next_stats:
            self.snapshot_available = len(self.available)
            self.next_stats = self.now + (self.shape.admission_lag_s or math.inf)
        for actor in self.actors:
            for when, version in [x for x in actor.load_at if x[0] <= self.now]:
                actor.load_at.remove((when, version))
                actor.paused_until = max(actor.paused_until, self.now) + self.rates.weight_load_s
                # the weights change when the load ends; a group submitted before keeps its old
                # version_start (the min over the versions its tokens came from)
                actor.loading_version = version
            if actor.loading_version is not None and self.now >= actor.paused_until:
                actor.version, actor.loading_version = actor.loading_version, None
            if self._settle_engine(actor) and self._calls_allowed():
                self._call_boundary(actor)

    def _react(self) -> None:
        """The driver's loop body: calls to idle actors, the sample, the next learner step."""
        if self._calls_allowed():
            for actor in self.actors:
                if not actor.running and self.now >= actor.paused_until:
                    # an actor with nothing in flight answers at once and is called again: the
                    # second call no longer has its pushes to count, only the driver's figure
                    self._call_boundary(actor)
                    if not actor.running:
                        self._call_boundary(actor)
        self._try_sample()
        self._try_dispatch()
        self._try_sample()

    def _next_event(self) -> float:
        candidates = [self.train_end, self.next_stats]
        if self.sync_pending_until > self.now:
            candidates.append(self.sync_pending_until)
        for actor in self.actors:
            candidates.append(self._next_completion(actor))
            candidates.extend(t for t, _ in actor.load_at)
            candidates.extend(t for t, _ in actor.scoring)
            if actor.loading_version is not None:
                candidates.append(actor.paused_until)
        return min(candidates)

    def run(self) -> None:
        for _ in range(50_000_000):
            if self.step >= self.total:
                return
            self._handle_due()
            if self.step >= self.total:
                return
            self._react()
            t = self._next_event()
            if not math.isfinite(t):
                raise RuntimeError(
                    "plan simulation stalled: no generation possible and the learner has no batch "
                    f"(step {self.step}, version {self.version}, {len(self.available)} groups available)"
                )
            self._advance(max(t, self.now))
        raise RuntimeError("plan simulation did not finish in 50M events")

    def result(self) -> SimResult:
        ends = self.step_end_times
        window = ends[-1] - ends[0] if len(ends) > 1 else ends[-1]
        timed_steps = len(ends) - 1 if len(ends) > 1 else 1
        learner_busy = self.learner_busy_s - self.window_start_busy[0]
        rollout_busy = sum(a.busy_s for a in self.actors) - self.window_start_busy[1]
        n_actors = len(self.actors)
        return SimResult(
            rollout_actors=n_actors,
            learner_ranks=self.ranks,
            steps=self.step,
            seconds=window,
            steps_per_s=timed_steps / window,
            trained_tokens_per_s=self.trained_tokens / ends[-1],
            staleness_mean=self.staleness_sum / max(self.rows_trained, 1),
            rollout_idle_frac=max(0.0, 1.0 - rollout_busy / (n_actors * window)),
            learner_idle_frac=max(0.0, 1.0 - learner_busy / window),
            generated_per_trained=self.generated_tokens / max(self.trained_tokens, 1),
            stale_groups=self.stale_groups,
        )


def simulate(
    rates: PipelineRates,
    shape: PipelineShape,
    rollout_actors: int = 1,
    learner_ranks: int = 1,
    steps: int = 100,
    seed: int = 0,
) -> SimResult:
    """Simulate ``steps`` learner steps of the pipeline on ``rollout_actors`` + ``learner_ranks`` GPUs."""
    if rollout_actors < 1 or learner_ranks < 1 or steps < 2:
        raise ValueError("need rollout_actors >= 1, learner_ranks >= 1 and steps >= 2")
    sim = _Simulation(rates, shape, rollout_actors, learner_ranks, steps, seed)
    sim.run()
    return sim.result()


def search_splits(
    rates: PipelineRates, shape: PipelineShape, gpus: int, steps: int = 100, seed: int = 0
) -> list[SimResult]:
    """Every split of ``gpus`` into rollout actors and learner ranks (each >= 1), by rollout count."""
    if gpus < 2:
        raise ValueError(f"--gpus: need at least 2 (one rollout, one learner), got {gpus}")
    return [simulate(rates, shape, r, gpus - r, steps, seed) for r in range(1, gpus)]


def best_split(results: Sequence[SimResult]) -> SimResult:
    """The split with the most steps/s (ties: the lower mean staleness)."""
    return max(results, key=lambda r: (round(r.steps_per_s, 9), -r.staleness_mean))


# ---- rates from a run directory ---------------------------------------------------------------


@dataclass(frozen=True)
class MeasuredRun:
    """A run directory's rates, its pipeline shape and what it achieved (to compare with a simulation)."""

    rates: PipelineRates
    shape: PipelineShape
    rollout_actors: int
    learner_ranks: int
    steps: int
    steps_per_s: float
    staleness_mean: float
    generated_per_trained: float
    sync_seconds: float


def _column(rows: Sequence[dict[str, float]], name: str) -> list[float]:
    return [r[name] for r in rows if r.get(name) is not None and math.isfinite(r[name])]


def _delta(rows: Sequence[dict[str, float]], name: str) -> float:
    values = _column(rows, name)
    if len(values) < 2:
        raise ValueError(
            f"metrics.parquet: column {name!r} has fewer than 2 values (a run from before it existed?)"
        )
    return values[-1] - values[0]


def rates_from_run_dir(path: str | Path) -> MeasuredRun:
    """Rates measured in a finished run directory (``metrics.parquet`` + ``config.yaml``).

    Steps 2..N only (step 1 carries start-up and engine warm-up):

    * generation tokens/s per actor: generated response tokens (trained or not) over the seconds
      the engines had work, both summed over actors (``rollout_tokens_generated``,
      ``rollout_generate_seconds``); not trained tokens over wall time, which in ``sync`` mode
      counts the groups the buffer dropped as stale and the time the engine waited;
    * learner tokens/s per rank: trained tokens over ``step_seconds``, over the ranks;
    * weight load: the actors' load seconds per sync; the learner's post-step time: the driver's
      ``sync_seconds`` (publication to every actor loaded) less that load;
    * response lengths: the per-step means of ``response_length_mean`` (the table keeps no
      per-response lengths; the engine model is work-conserving, so the mean is what matters).
    """
    import pyarrow.parquet as pq

    from driftrl.run_dir import open_run_dir

    run, cfg = open_run_dir(path)
    if not run.metrics.is_file():
        raise ValueError(f"{run.root}: no metrics.parquet (the run has not finished a step)")
    rows = sorted(pq.read_table(run.metrics).to_pylist(), key=lambda r: r["step"])
    if len(rows) < 3:
        raise ValueError(f"{run.root}: {len(rows)} learner steps; need at least 3 to measure rates")
    timed = rows[1:]
    actors = cfg.rollout.num_actors
    ranks = cfg.learner.data_parallel_size
    generated = _delta(rows, "rollout_tokens_generated")
    busy = _delta(rows, "rollout_generate_seconds")
    if generated > 0 and busy > 0:
        generation_tokens_per_s = generated / busy
    else:
        # the actors' stats come every STATS_EVERY_S: a run of a few seconds may have one
        # snapshot or none; then the cumulative rate (start-up included), else trained tokens
        # over wall time (a crude bound: it counts the learner's time too)
        last_rate = _column(rows, "rollout_tokens_per_s")
        walls = _column(rows, "wall_seconds")
        if last_rate and last_rate[-1] > 0:
            generation_tokens_per_s = last_rate[-1] / actors
        else:
            generation_tokens_per_s = sum(_column(timed, "train_tokens")) / (walls[-1] - walls[0]) / actors
        generated = max(max(_column(rows, "rollout_tokens_generated")), sum(_column(rows, "train_tokens")))
    trained_tokens = sum(_column(timed, "train_tokens"))
    step_seconds = sum(_column(timed, "step_seconds"))
    syncs = max(1, len(_column(timed, "sync_seconds")))
    load_per_actor = _delta(rows, "rollout_weight_load_seconds") / actors / syncs
    sync_seconds = sum(_column(timed, "sync_seconds")) / syncs
    lengths = tuple(max(1, round(x)) for x in _column(timed, "response_length_mean"))
    group_overhead_s = 0.0
    if cfg.run.mode == "sync":
        # the learner waits for the sync, then for the batch: the wait less the sync is the
        # generation phase; what the engine rate does not explain of it is per-group overhead
        waits = [
            r["learner_wait_seconds"] - r["sync_seconds"]
            for r in timed
            if math.isfinite(r.get("learner_wait_seconds", math.nan))
            and math.isfinite(r.get("sync_seconds", math.nan))
        ]
        tokens = [
            r["train_tokens"]
            for r in timed
            if math.isfinite(r.get("learner_wait_seconds", math.nan))
            and math.isfinite(r.get("sync_seconds", math.nan))
        ]
        if waits:
            engine_s = sum(tokens) / (generation_tokens_per_s * actors)
            groups = len(waits) * cfg.learner.groups_per_step / actors
            group_overhead_s = max(0.0, (sum(waits) - engine_s) / groups)
    rates = PipelineRates(
        generation_tokens_per_s=generation_tokens_per_s,
        learner_tokens_per_s=trained_tokens / step_seconds / ranks,
        learner_post_step_s=max(0.0, sync_seconds - load_per_actor) / cfg.learner.sync_interval,
        weight_load_s=load_per_actor,
        response_lengths=lengths,
        rollout_group_overhead_s=group_overhead_s,
    )
    shape = PipelineShape(
        mode=cfg.run.mode,
        groups_per_step=cfg.learner.groups_per_step,
        group_size=cfg.rollout.group_size,
        max_staleness=cfg.learner.max_staleness,
        sync_interval=cfg.learner.sync_interval,
        prompts_per_request=cfg.rollout.prompts_per_request,
    )
    walls = _column(rows, "wall_seconds")
    return MeasuredRun(
        rates=rates,
        shape=shape,
        rollout_actors=actors,
        learner_ranks=ranks,
        steps=len(rows),
        steps_per_s=(len(walls) - 1) / (walls[-1] - walls[0]),
        staleness_mean=sum(_column(rows, "staleness_mean")) / len(rows),
        generated_per_trained=generated / max(trained_tokens, 1.0),
        sync_seconds=sync_seconds,
    )


def format_table(results: Sequence[SimResult]) -> str:
    """One line per split, the best marked."""
    best = best_split(results)
    lines = [
        "rollout  learner   steps/s  train tok/s  staleness  rollout idle  learner idle  gen/trained",
    ]
    for r in results:
        lines.append(
            f"{r.rollout_actors:>7}  {r.learner_ranks:>7}  {r.steps_per_s:>8.3f}  {r.trained_tokens_per_s:>11.0f}  "
            f"{r.staleness_mean:>9.2f}  {r.rollout_idle_frac:>12.0%}  {r.learner_idle_frac:>12.0%}  "
            f"{r.generated_per_trained:>11.2f}" + ("   <- best" if r is best else "")
        )
    return "\n".join(lines)


def with_overrides(rates: PipelineRates | None, **given: Any) -> PipelineRates:
    """``rates`` with the non-None values in ``given`` replacing its fields (``rates`` None: all by hand)."""
    given = {k: v for k, v in given.items() if v is not None}
    if rates is None:
        missing = {"generation_tokens_per_s", "learner_tokens_per_s"} - set(given)
        if missing:
            raise ValueError(f"without a run directory give {', '.join(sorted(missing))} by hand")
        return PipelineRates(**given)
    return replace(rates, **given)


def plan_main(args: Any) -> int:
    """``driftrl plan [RUN_DIR] --gpus N [overrides]``: every split, then the best one."""
    import json
    from dataclasses import asdict

    measured = rates_from_run_dir(args.run_dir) if args.run_dir else None
    rates = with_overrides(
        measured.rates if measured else None,
        generation_tokens_per_s=args.generation_tokens_per_s,
        learner_tokens_per_s=args.learner_tokens_per_s,
        learner_post_step_s=args.learner_post_step_s,
        weight_load_s=args.weight_load_s,
        rollout_group_overhead_s=args.rollout_group_overhead_s,
        response_lengths=None if args.response_length is None else (args.response_length,),
    )
    shape_given = {
        "mode": args.mode,
        "groups_per_step": args.groups_per_step,
        "group_size": args.group_size,
        "max_staleness": args.max_staleness,
        "sync_interval": args.sync_interval,
        "prompts_per_request": args.prompts_per_request,
        "admission_lag_s": args.admission_lag_s,
    }
    shape_given = {k: v for k, v in shape_given.items() if v is not None}
    shape = replace(measured.shape if measured else PipelineShape(), **shape_given)
    results = search_splits(rates, shape, args.gpus, steps=args.steps, seed=args.seed)
    best = best_split(results)
    if args.json:
        print(
            json.dumps(
                {
                    "rates": asdict(rates) | {"response_lengths": len(rates.response_lengths)},
                    "shape": asdict(shape),
                    "splits": [asdict(r) for r in results],
                    "best": asdict(best),
                }
            )
        )
        return 0
    source = f"measured in {args.run_dir}" if measured else "given by hand"
    print(
        f"rates ({source}): generation {rates.generation_tokens_per_s:.0f} tokens/s per rollout GPU, learner "
        f"{rates.learner_tokens_per_s:.0f} tokens/s per rank, {rates.learner_post_step_s:.3f} s learner time per "
        f"step outside train_step, weight load {rates.weight_load_s:.3f} s, rollout overhead "
        f"{rates.rollout_group_overhead_s:.4f} s per group, mean response "
        f"{rates.response_length_mean:.1f} tokens"
    )
    if measured:
        print(
            f"that run: {measured.rollout_actors} rollout + {measured.learner_ranks} learner, {measured.shape.mode}, "
            f"{measured.steps_per_s:.3f} steps/s, staleness {measured.staleness_mean:.2f}, "
            f"{measured.generated_per_trained:.2f} generated tokens per trained token"
        )
    print(
        f"{shape.mode}, max_staleness {shape.effective_max_staleness}, sync_interval {shape.sync_interval}, "
        f"{shape.groups_per_step} groups x {shape.group_size} per step, {args.gpus} GPUs, {args.steps} simulated steps:"
    )
    print(format_table(results))
    print(
        f"best: {best.rollout_actors} rollout + {best.learner_ranks} learner GPUs, {best.steps_per_s:.3f} steps/s"
    )
    return 0
