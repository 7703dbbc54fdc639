"""The driver of a training run: ``driftrl train`` and ``driftrl run`` (DESIGN.md, "One learner step").

One code path for both modes. The driver owns no model: it places the Ray actors (replay buffer,
weight board, learner ranks, rollout actors), then runs an event loop over their object refs:

* each rollout actor always has one ``generate_step`` call in flight (it tops its vLLM engine up
  within the admission rule, waits briefly for finished groups and pushes them to the buffer);
* the learner has at most one ``sample`` -> ``train_step`` chain in flight;
* every ``sync_interval`` steps the learner publishes version ``v+1`` to the weight board and to
  every rollout actor (calls queue between the actor's ``generate_step`` calls, i.e. between
  engine steps), with a deadline;
* every ``checkpoint_interval`` steps (and at the end) the learner checkpoints and the driver then
  acknowledges every row leased since the previous checkpoint (at-least-once delivery, exactly-once
  effect on the model).

``async`` lets generation run while the learner trains (staleness bounded by ``max_staleness`` at
sample time and by the admission rule at generation time). ``sync`` is the on-policy baseline of
the same loop: ``max_staleness`` is forced to 0 and no generation is requested while a learner
step or a weight sync is in flight.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driftrl.checkpoints import CheckpointWriter, ResumePoint
from driftrl.config import ConfigError, DriftConfig, load_config
from driftrl.lanes import GENERATE_WAIT_S, GenerationLane, PendingSync, SyncLane, TrainingLane
from driftrl.run_dir import RunDir, RunLocks, create_run_dir, in_use, open_run_dir, write_atomic

log = logging.getLogger("driftrl.pipeline")

KEEP_CHECKPOINTS = 2
# longest a restarting rollout actor may stay away (a vLLM engine starts in well under a minute)
RESTART_DEADLINE_S = 600.0
# how long a rollout failure waits for the learner ranks to answer a ping before it is blamed on the actor
LEARNER_PING_S = 2.0
# tries at starting a local Ray (its raylet must register within a fixed 30 s)
LOCAL_RAY_ATTEMPTS = 2


class PipelineError(RuntimeError):
    """The run cannot go on; the message says what failed and what to do."""


@dataclass
class TrainResult:
    """What a finished ``driftrl train`` leaves behind."""

    run_dir: Path
    steps: int
    policy_version: int
    final_model: Path
    summary_path: Path
    metrics_url: str
    seconds: float
    buffer_stats: dict[str, Any] = field(default_factory=dict)
    rows_acked_by_driver: int = 0
    rollout_restarts: int = 0
    sync_failures: int = 0
    resumed_from: str | None = None  # which checkpoint a resume started from (ResumePoint.describe)


def _probe_batch(cfg: DriftConfig) -> tuple[Any, Any]:
    """Fixed probe sequences (held-out prompt + reference answer) for the realised entropy change."""
    import torch
    from transformers import AutoTokenizer

    from actors.prompts import PromptSpec, load_prompt_dataset
    from tasks.data_files import row_text

    data = load_prompt_dataset(
        PromptSpec(path=cfg.task.eval_path, prompt_key=cfg.task.prompt_key, answer_key=cfg.task.answer_key)
    )
    texts = []
    for row in data:
        prompt, answer, rejected = row_text(row[cfg.task.prompt_key], row[cfg.task.answer_key])
        if rejected is None:
            texts.append(prompt + answer)
        if len(texts) == cfg.metrics.probe_prompts:
            break
    if not texts:
        raise ConfigError(f"task.eval_path {cfg.task.eval_path}: no row has a non-blank prompt and answer")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    encoded = [tokenizer(t)["input_ids"][: cfg.rollout.max_model_len] for t in texts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask


def _init_ray(cfg: DriftConfig) -> bool:
    """Connect to the configured cluster or start local Ray on 127.0.0.1; returns whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.run.ray_address:
        ray.init(address=cfg.run.ray_address, log_to_driver=False)
        return True
    if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`
        ray.init(log_to_driver=False)
        return True
    # vLLM and DeepSpeed write a lot to stdout; their logs stay in Ray's session folder so the
    # progress bar stays readable (errors come back as exceptions through the object refs)
    start_local_ray(cfg.run.ray_num_cpus, log_to_driver=False)
    return True


def start_local_ray(num_cpus: int | None, **init_kwargs: Any) -> None:
    """``ray.init`` of a new single-machine Ray that listens on 127.0.0.1 only.

    Ray's GCS, raylets, workers and agents bind every interface unless the node IP is exactly
    127.0.0.1, which ``ray.init(_node_ip_address=...)`` cannot give (it maps a loopback address to
    the machine's); Ray's own single-machine switch (what it does on macOS, normally read once from
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` at import) does, and is put back afterwards so a later
    connection to a cluster from this process is unaffected. The learner ranks then rendezvous on
    loopback too (learner/actor.py). tests/pipeline/test_local_binding.py checks that no process of
    a local run listens elsewhere.
    """
    import ray
    from ray._private import ray_constants

    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        for attempt in range(LOCAL_RAY_ATTEMPTS):
            try:
                ray.init(num_cpus=num_cpus, include_dashboard=False, **init_kwargs)
                return
            except Exception as err:
                # Ray gives its raylet a fixed 30 s to register; a machine busy with other jobs
                # (seen at load average 6-10 on 2 cores) can miss that once without anything wrong
                if "timed out during startup" not in str(err) or attempt == LOCAL_RAY_ATTEMPTS - 1:
                    raise
                log.warning("local Ray did not start within its 30 s (a loaded machine?); trying again")
                ray.shutdown()
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


UPDATES_FILE = "updates.parquet"


class StartupClock:
    """Where a run's start-up time goes: named phases in the order they end, seconds each, from the
    driver's start (``to_first_step`` is their sum). ``before_driver`` is the process's life before
    it (interpreter, imports, config: meaningful for ``driftrl run``/``train``, not for a long-lived
    process that calls :func:`train`), reported apart.
    """

    def __init__(self, t0: float) -> None:
        self.last = t0
        self.phases: dict[str, float] = {}
        self.before_driver: float | None = None
        try:
            import psutil

            before = time.time() - psutil.Process().create_time()
            self.before_driver = round(max(before - (time.monotonic() - t0), 0.0), 3)
        except Exception:  # noqa: BLE001 - a platform without process times just lacks the figure
            pass

    def lap(self, name: str) -> None:
        """Close phase ``name``: the seconds since the previous phase ended."""
        now = time.monotonic()
        self.phases[name] = round(now - self.last, 3)
        self.last = now

    def mark_once(self, name: str) -> None:
        """:meth:`lap`, the first time only (the loop passes here every step)."""
        if name not in self.phases:
            self.lap(name)

    def to_first_step(self) -> float:
        return float(sum(self.phases.values()))


class Driver:
    """One run: start the actors, run the step loop, write the run directory."""

    def __init__(
        self,
        cfg: DriftConfig,
        run: RunDir,
        resume: bool = False,
        progress: bool = True,
        on_step: Callable[[Driver, dict[str, float]], None] | None = None,
        checkpoint_hook: Callable[[str, int], None] | None = None,
    ) -> None:
        from driftrl.metrics import RunTelemetry
        from driftrl.report import MetricsLog

        self.cfg = cfg
        self.run = run
        self.resume = resume
        self.checkpoint_hook = checkpoint_hook
        self.resumed_from: ResumePoint | None = None
        self.progress = progress
        self.on_step = on_step
        self.sync_mode = cfg.run.mode == "sync"
        self.max_staleness = cfg.effective_max_staleness
        self.telemetry = RunTelemetry()
        self.metrics_log = MetricsLog(run.metrics)
        # several optimizer steps per sampled batch: metrics.parquet keeps a row per batch (its last
        # update), updates.parquet one per optimizer step
        per_batch = cfg.learner.mini_batches * cfg.learner.epochs
        self.updates_log = MetricsLog(run.root / UPDATES_FILE) if per_batch > 1 else None
        self.step_loggers: list[Any] = []  # driftrl.loggers.StepLogger, from metrics.loggers
        self.server: Any = None
        self.started_ray = False
        self.buffer: Any = None
        self.board: Any = None
        self.board_posted: Any = None  # ref of the last board.post
        self.announcement: Any = None  # a push transport's manifest template (transports.base)
        self.learners: Any = None
        self.actors: list[Any] = []
        self.step = 0
        self.version = 0
        self.consumed_groups = 0
        self.rows_acked = 0
        self.rollout_restarts = 0
        self.restarts_by_actor: dict[int, int] = {}
        self.actor_pids: dict[int, int] = {}  # the process id each rollout actor last reported
        self.restart_counted: set[int] = set()  # restarts counted that no new process id has shown yet
        self.unavailable_since: dict[int, float] = {}
        self.retry_at: dict[int, float] = {}
        self.sync_failures = 0
        self.unacked: dict[int, list[str]] = {}  # step -> traj ids trained since the last checkpoint
        self.predicted_since_sync = 0.0
        self.last_sync_seconds = math.nan  # the latest finished sync, publish to every actor loaded
        self.last_train_done: float | None = None
        self.learner_wait_s = math.nan
        self.last_probe: float | None = None
        self.wall_offset = 0.0
        self.t0 = time.monotonic()
        self.startup = StartupClock(self.t0)
        self.rollout_stats: dict[int, dict[str, Any]] = {}
        self.buffer_stats: dict[str, Any] = {}
        self.affinity_before: list[int] | None = None  # the driver's cores before run.pin_learner_cpus

    # ---- setup --------------------------------------------------------------------------------

    def start(self) -> None:

        from actors.admission import AdmissionRule
        from actors.prompts import PromptSpec, load_prompt_dataset
        from actors.rollout import launch_rollout_actors
        from buffers.actor import launch_buffer_actor
        from driftrl.metrics import MetricsServer
        from learner.actor import launch_learners
        from transports.base import launch_weight_board

        cfg = self.cfg
        spec = PromptSpec(
            path=cfg.task.train_path,
            prompt_key=cfg.task.prompt_key,
            answer_key=cfg.task.answer_key,
            seed=cfg.run.seed,
        )
        # a bad train file fails here, at once and in one line, not in every actor's constructor
        load_prompt_dataset(spec)
        if cfg.metrics.loggers:
            from driftrl.loggers import open_loggers

            config = cfg.model_dump(mode="json")
            self.step_loggers = open_loggers(
                cfg.metrics.loggers, self.run.root, cfg.run.name, config, cfg.metrics.wandb_project
            )
        self.server = MetricsServer(self.telemetry, cfg.metrics.host, cfg.metrics.port).start()
        log.info("metrics at %s/metrics", self.server.url)
        self.startup.lap("config, data check and metrics server")
        learner_cpus = self._pin_for_learner()
        self.started_ray = _init_ray(cfg)
        self.startup.lap("ray init")
        uri = cfg.buffer.uri or str(self.run.buffer)
        # the buffer is file I/O and Arrow kernels: no CPU reserved, so a 2-core machine keeps one
        # core each for the rollout actor and the learner
        self.buffer = launch_buffer_actor(
            cfg.buffer,
            uri,
            max_concurrency=cfg.rollout.num_actors + cfg.learner.data_parallel_size + 4,
            num_cpus=0,
        )
        self.board = launch_weight_board()
        self.startup.lap("buffer and weight board")
        admission = AdmissionRule(self.max_staleness, cfg.learner.groups_per_step * cfg.learner.sync_interval)

        def launch_actors() -> None:
            self.actors = launch_rollout_actors(
                cfg.rollout,
                cfg.model.path,
                spec,
                self.buffer,
                run_dir=str(self.run.root),
                admission=admission,
                weight_board=self.board,
            )

        # vLLM's engine starts in its actor while the learner builds DeepSpeed: on the tiny default
        # the two start-ups overlap instead of adding up. Not for a resumed run (its actors start
        # once the board holds the checkpoint's weights) nor for a push transport (actors join its
        # groups from the announcement learner rank 0 posts once it is up).
        early_actors = not self.resume and cfg.rollout.weight_sync.transport == "ray_bytes"
        if early_actors:
            launch_actors()
        # the learner bins staleness up to the bound the buffer applies (0 in sync mode)
        learner_cfg = cfg.learner.model_copy(update={"max_staleness": self.max_staleness})
        self.learners = launch_learners(learner_cfg, cfg.model.path, seed=cfg.run.seed, cpus=learner_cpus)
        # both ends from one config (transports/factory.py): the publisher lives on learner rank 0
        self.announcement = self._learner_get(
            [
                self.learners.actors[0].open_weight_publisher.remote(
                    cfg.rollout.weight_sync, cfg.rollout.num_actors, cfg.rollout.tensor_parallel_size
                )
            ],
            "open_weight_publisher",
        )[0]
        if self.announcement is not None:
            # a push transport: actors join its groups at start, before any version is published
            self._get(self.board.post.remote(self.announcement), "the weight board's post")
        self.startup.lap("learner ranks (placement, model load, DeepSpeed init, weight publisher)")
        self.probe_ids, self.probe_mask = _probe_batch(cfg)

        if self.resume:
            point = self._checkpoints().resume_point()
            if point is None:
                raise ConfigError(
                    f"{self.run.root} holds no complete checkpoint to resume from; start a new run instead"
                )
            self.resumed_from = point
            log.info(point.describe())
            self._learner_call("load_checkpoint", str(point.path))
            driver_state = point.driver_state
            self.step = driver_state["step"]
            self.version = driver_state["policy_version"]
            self.consumed_groups = driver_state["consumed_groups"]
            self.rows_acked = driver_state["rows_acked"]
            self.wall_offset = driver_state["wall_seconds"]
            self.last_probe = driver_state.get("probe_entropy")
            self.metrics_log.truncate_after(self.step)
            if self.updates_log is not None:
                self.updates_log.truncate_after(self.step)
            requeued = self._get(self.buffer.requeue_leased.remote(), "the buffer's requeue_leased")
            log.info(
                "resumed at step %d, version %d; %d leased rows requeued", self.step, self.version, requeued
            )
            if self.version > 0:
                # actors start from cfg.model.path: the board hands them the checkpoint's weights
                self._learner_get(
                    self._publish(self.version)[0], f"publish_weights of version {self.version}"
                )
                self._get(self.board_posted, "the weight board's post")
        if self.last_probe is None:
            self.last_probe = self._probe()
            self.startup.lap("entropy probe")
        if not early_actors:
            launch_actors()

    def _pin_for_learner(self) -> list[int] | None:
        """``run.pin_learner_cpus``: this process (and the local Ray it starts next) onto the cores the
        learner ranks leave; returns the learner's cores (None: not pinned). learner/cpu_pinning.py."""
        import ray

        from learner.cpu_pinning import cores_per_rank, pin_process, split_cores

        cfg = self.cfg
        local = not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
        if not cfg.run.pin_learner_cpus or not local or not hasattr(os, "sched_setaffinity"):
            return None
        cores = sorted(os.sched_getaffinity(0))
        try:
            rest, learner = split_cores(
                cores, cfg.learner.data_parallel_size * cores_per_rank(cfg.learner.num_cpus)
            )
        except ValueError as err:
            log.warning("not pinned: %s", err)
            return None
        self.affinity_before = cores
        pin_process(rest)
        log.info(
            "learner ranks pinned to cores %s, the driver, Ray and the rollout actors to %s", learner, rest
        )
        return learner

    def _probe(self) -> float:
        return float(self._learner_call("probe_entropy", self.probe_ids, self.probe_mask)[0])

    def _publish(self, version: int) -> tuple[list[Any], Any]:
        """Queue publication of ``version`` on every learner rank and post it on the board.

        Returns the ranks' call refs and what the rollout actors load from: a pull transport's
        manifest is rank 0's result (Ray hands the ref to the board and to each actor's
        ``update_weights`` without the driver fetching it); a push transport's is its announcement,
        so the actors are receiving while rank 0 streams.
        """
        refs = [a.publish_weights.remote(version) for a in self.learners.actors]
        manifest = refs[0] if self.announcement is None else self.announcement.for_version(version)
        # the board first: an actor restarting meanwhile catches up from it
        self.board_posted = self.board.post.remote(manifest)
        return refs, manifest

    # ---- the loop -----------------------------------------------------------------------------

    def loop(self) -> None:
        """Run learner steps until ``learner.total_steps``.

        The learner never waits for the driver: when step ``k`` ends, the weight publication and the
        probe are queued on the learner actors at once (their results are handled when they come),
        followed by step ``k+1`` on a batch sampled while step ``k`` was training. Each kind of call
        belongs to one lane (:mod:`driftrl.lanes`), which owns its refs and handles them when ready.
        """
        import ray

        total = self.cfg.learner.total_steps
        bar = self._progress_bar(total)
        generation, training, syncing = GenerationLane(self), TrainingLane(self), SyncLane(self, bar)
        try:
            while self.step < total:
                now = time.monotonic()
                generation.request(now, learner_busy=training.busy or syncing.busy)
                training.request(now)
                waiting = generation.refs() + training.refs() + syncing.refs()
                ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
                for ref in ready:
                    if generation.owns(ref):
                        generation.handle(ref)
                    elif training.owns(ref):
                        done = training.handle(ref)
                        if done is not None:
                            syncing.after_step(self._step_trained(*done))
                            training.dispatch()
                    elif syncing.owns(ref):
                        syncing.handle(ref)
                syncing.check_deadline()
            syncing.drain()
        finally:
            if bar is not None:
                bar.close()
            generation.cancel()

    def _step_trained(self, metrics: dict[str, float], traj_ids: list[str]) -> dict[str, float]:
        """Step ``self.step + 1`` finished on every rank: count it, hold its rows until the next
        checkpoint acknowledges them, and return its metrics row."""
        if self.updates_log is not None:
            metrics = self._log_updates(metrics)
        self.last_train_done = time.monotonic()
        self.step += 1
        if "first step trained" not in self.startup.phases:
            self.startup.lap("first step trained")
            log.info(
                "first step trained %.1f s after start: %s",
                self.startup.to_first_step(),
                ", ".join(f"{k} {v:.1f} s" for k, v in self.startup.phases.items()),
            )
        self.unacked[self.step] = traj_ids
        return self._after_step(metrics)

    def _buffer_hangs(self, waited_s: float) -> None:
        raise PipelineError(
            f"the replay buffer has not answered a sample call for {waited_s:.0f} s "
            f"(learner.sample_timeout_s + run.rpc_timeout_s): it hangs. The run can go on from "
            f"its last checkpoint: driftrl train --resume {self.run.root}"
        )

    def _without_redelivered(self, table: Any, held: list[str]) -> Any:
        """``table`` less the rows this run holds: trained since the last checkpoint, or in flight.

        A buffer that Ray restarted (a SIGKILL, an OOM kill) forgets its leases (buffers/replay.py),
        so those rows are available again and a sample hands them out a second time. Training them
        again would put their effect in the model twice; they are dropped from the batch instead and
        stay leased by this sample until the next checkpoint acks them (or a resume requeues them).
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        if not held or table.num_rows == 0:
            return table
        again = pc.is_in(table.column("traj_id"), value_set=pa.array(held, pa.string()))
        redelivered = pc.sum(again).as_py() or 0
        if not redelivered:
            return table
        self.telemetry.count("buffer_redelivered_rows_total", redelivered)
        log.warning(
            "the buffer handed out %d rows again that this run trained since its last checkpoint or is "
            "training (it restarted and forgot their leases); they are not trained twice",
            redelivered,
        )
        return table.filter(pc.invert(again))

    def _checked_batch(self, table: Any) -> Any:
        """The sampled table, or a clear error when the rollout side produced too little in time."""
        import pyarrow.compute as pc

        groups = self.cfg.learner.groups_per_step
        n_groups = pc.count_distinct(table.column("group_id")).as_py() if table.num_rows else 0
        if n_groups < groups:
            if table.num_rows:
                self._get(
                    self.buffer.release.remote(table.column("traj_id").to_pylist()), "the buffer's release"
                )
            raise PipelineError(
                f"the learner waited {self.cfg.learner.sample_timeout_s:.0f} s for {groups} groups and got "
                f"{n_groups}: the rollout actors produce nothing (see their stats at {self.server.url}/metrics "
                "and Ray's logs under /tmp/ray/session_latest/logs)"
            )
        return table

    def _get(self, ref: Any, what: str) -> Any:
        """``ray.get`` of one non-learner call (buffer, board, rollout actor) within ``run.rpc_timeout_s``."""
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            return ray.get(ref, timeout=self.cfg.run.rpc_timeout_s)
        except GetTimeoutError as err:
            raise PipelineError(
                f"{what} did not answer within run.rpc_timeout_s={self.cfg.run.rpc_timeout_s:g} s after step "
                f"{self.step}: that process hangs. Its log is under /tmp/ray/session_latest/logs; the run can "
                f"go on from its last checkpoint: driftrl train --resume {self.run.root}"
            ) from err

    def _learner_call(self, method: str, *args: Any) -> list[Any]:
        """``Learner.<method>(*args)`` on every rank, waited for within ``learner.step_timeout_s``."""
        import ray

        refs = [ray.put(a) for a in args]  # a large argument goes to the object store once
        calls = [a.call.remote(method, *refs) for a in self.learners.actors]
        return self._learner_get(calls, f"{method} after step {self.step}")

    def _learner_get(self, refs: list[Any], what: str, started: float | None = None) -> list[Any]:
        """The ranks' results of one learner call queued at ``started`` (None: now), rank ``i`` = ``refs[i]``.

        A rank that has not answered ``learner.step_timeout_s`` after ``started`` hangs (a stuck
        collective, a wedged device): the run ends naming it. A dead rank becomes the resume instruction.
        """
        import ray
        from ray.exceptions import RayActorError

        timeout_s = self.cfg.learner.step_timeout_s
        elapsed = 0.0 if started is None else time.monotonic() - started
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, timeout_s - elapsed))
        hung = [rank for rank, ref in enumerate(refs) if ref not in ready]
        if hung:
            ranks = ", ".join(map(str, hung))
            raise PipelineError(
                f"learner rank {ranks} did not finish {what} within learner.step_timeout_s={timeout_s:g} s: "
                f"it hangs (a stuck collective, a wedged device, swapping). Its log is under "
                f"/tmp/ray/session_latest/logs; the run can go on from its last checkpoint: driftrl train "
                f"--resume {self.run.root} (raise learner.step_timeout_s if its steps are this slow)"
            )
        try:
            return ray.get(refs, timeout=self.cfg.run.rpc_timeout_s)
        except RayActorError as err:
            raise PipelineError(
                f"a learner rank died after step {self.step}; the run can go on from its last checkpoint: "
                f"driftrl train --resume {self.run.root}"
            ) from err

    def _append_row(self, row: dict[str, float], bar: Any) -> None:
        self.metrics_log.append(row)
        for step_logger in self.step_loggers:
            step_logger.log(row, int(row["step"]))
        if self.on_step is not None:
            self.on_step(self, row)
        self._update_bar(bar, row)

    def _log_updates(self, updates: list[dict[str, float]]) -> dict[str, float]:
        """One ``updates.parquet`` row per optimizer step of this batch; returns the last update's
        metrics, which stand for the batch in metrics.parquet, /metrics and the report."""
        from driftrl.report import learner_row

        for update in updates:
            row = learner_row(update)
            row["step"] = float(self.step + 1)
            row["wall_seconds"] = self.wall_offset + time.monotonic() - self.t0
            self.updates_log.append(row)
        return updates[-1]

    def _take_predicted(self) -> float:
        """The predicted ΔH summed since the last sync, reset: taken when that sync's probe is queued,
        so a step handled before the probe's answer counts towards the next sync, not this one."""
        predicted, self.predicted_since_sync = self.predicted_since_sync, 0.0
        return predicted

    def _record_probe(self, probe: float, row: dict[str, float], predicted: float) -> None:
        """Pair the probe's realised ΔH with ``predicted`` (:meth:`_take_predicted` at queue time)."""
        realised = probe - self.last_probe if self.last_probe is not None else math.nan
        row["probe_entropy"] = probe
        row["realised_delta_entropy"] = realised
        row["predicted_delta_entropy_since_sync"] = predicted
        self.telemetry.record_probe(probe, realised)
        self.last_probe = probe

    def _after_step(self, metrics: dict[str, float]) -> dict[str, float]:
        from driftrl.report import learner_row

        self.telemetry.record_learner(metrics)
        row = learner_row(metrics)
        predicted = row.get("predicted_entropy_change")
        if predicted is not None and math.isfinite(predicted):
            self.predicted_since_sync += predicted
        row["wall_seconds"] = self.wall_offset + time.monotonic() - self.t0
        row["buffer_rows_available"] = float(self.buffer_stats.get("rows_available", 0))
        row["buffer_rows_leased"] = float(self.buffer_stats.get("rows_leased", 0))
        stats = list(self.rollout_stats.values())
        row["rollout_tokens_per_s"] = sum(float(s.get("tokens_per_s", 0.0)) for s in stats)
        # cumulative rollout-side work, as of the latest stats: `driftrl plan` needs generated (not
        # only trained) tokens, the engines' busy seconds and their weight-load pauses
        row["rollout_tokens_generated"] = sum(float(s.get("tokens_generated", 0)) for s in stats)
        row["rollout_generate_seconds"] = sum(float(s.get("generate_seconds", 0.0)) for s in stats)
        row["rollout_weight_load_seconds"] = sum(float(s.get("sync_seconds_total", 0.0)) for s in stats)
        row["buffer_rows_evicted_stale"] = float(self.buffer_stats.get("evicted", {}).get("stale", 0))
        row["sync_seconds"] = self.last_sync_seconds
        row["learner_wait_seconds"] = self.learner_wait_s
        row["step"] = float(self.step)
        return row

    def _start_sync(self) -> tuple[PendingSync, list[Any]]:
        """Queue publication of version ``v+1`` and the probe on the learner; send it to the actors.

        Nothing here waits: the manifest travels as an object ref that Ray resolves for the board
        and for each actor's ``update_weights``. Returns the sync and the probe's refs.
        """
        started = time.monotonic()
        self.version += 1
        publish_refs, manifest = self._publish(self.version)
        probe_refs = [
            a.call.remote("probe_entropy", self.probe_ids, self.probe_mask) for a in self.learners.actors
        ]
        refs = {a.update_weights.remote(manifest): i for i, a in enumerate(self.actors)}
        timeout = self.cfg.rollout.weight_sync.timeout_s
        # the update queues behind at most one generate_step call (and that call's push)
        deadline = started + timeout + GENERATE_WAIT_S + self.cfg.rollout.push_timeout_s
        sync = PendingSync(
            version=self.version, refs=refs, started=started, deadline=deadline, publish=publish_refs
        )
        return sync, probe_refs

    def _finish_sync(self, sync: PendingSync, wait: bool) -> bool:
        """Collect the actors' answers to a sync; True when all answered (or were handled)."""
        import ray
        from ray.exceptions import RayActorError

        timeout = max(0.0, sync.deadline - time.monotonic()) if wait else 0
        # an actor Ray is restarting answers only once its constructor (engine start-up and its own
        # catch-up from the board, which holds this version) is done: not waited for, so a sync (and,
        # in sync mode, the run) never stalls behind a restart, nor kills it for being slow to start
        restarting = [ref for ref, index in sync.refs.items() if index in self.unavailable_since]
        awaited = [ref for ref in sync.refs if ref not in restarting]
        done, pending = ray.wait(awaited, num_returns=len(awaited), timeout=timeout) if awaited else ([], [])
        if pending and not wait:
            return False
        if restarting:
            done += ray.wait(restarting, num_returns=len(restarting), timeout=0)[0]
        # a failed publication is the learner's error, not the actors'
        published = self._learner_get(
            sync.publish, f"publish_weights of version {sync.version}", sync.started
        )[0]
        if published.failed_peers:
            # the actors' own answers below say what happened to them; this is rank 0's view
            log.warning("version %d did not reach %s", sync.version, ", ".join(published.failed_peers))
        for ref in done:
            index = sync.refs[ref]
            try:
                self._get(ref, f"rollout actor {index}'s update_weights")
            except RayActorError as err:
                # it died while loading: Ray restarts it and it catches up from the board
                self._actor_died(index, err)
            except Exception as err:  # WeightSyncError and friends: the engine may hold mixed weights
                self.sync_failures += 1
                self.telemetry.count("weight_sync_failures_total")
                self._restart_broken(index, f"weight sync to version {sync.version} failed: {err}")
        for ref in pending:
            index = sync.refs[ref]
            self.sync_failures += 1
            self.telemetry.count("weight_sync_failures_total")
            self._restart_broken(
                index,
                f"did not load weight version {sync.version} within "
                f"{self.cfg.rollout.weight_sync.timeout_s:.0f} s (rollout.weight_sync.timeout_s)",
            )
        seconds = time.monotonic() - sync.started
        self.last_sync_seconds = seconds
        self.telemetry.observe_sync(seconds)
        log.info("weight version %d on %d rollout actors in %.2f s", sync.version, len(done), seconds)
        return True

    def _generate_done(self, index: int, ref: Any) -> None:
        """Handle rollout actor ``index``'s finished ``generate_step``.

        Its process gone: :meth:`_actor_died`. Any other exception (vLLM's ``EngineDeadError``, a
        bug in a reward function's wrapper, ...) leaves an actor in an unknown state: it is
        restarted like a broken one, counted against ``rollout.max_restarts``, and the run goes on.
        """
        from ray.exceptions import RayActorError, RayTaskError

        try:
            self._get(ref, f"rollout actor {index}'s generate_step")
            self.unavailable_since.pop(index, None)
        except RayActorError as err:
            self._actor_died(index, err)
        except PipelineError:
            raise
        except Exception as err:
            cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
            text = str(cause).strip().splitlines()
            self.telemetry.count("rollout_step_errors_total")
            self._restart_broken(
                index, f"generate_step raised {type(cause).__name__}" + (f": {text[0]}" if text else "")
            )

    def _check_incarnation(self, index: int, pid: int | None) -> None:
        """Count a restart the driver did not see: an actor killed while no call of the driver was in
        flight comes back (Ray restarts it) without any call failing; its stats then carry a new pid."""
        known = self.actor_pids.get(index)
        if pid is None:
            return
        self.actor_pids[index] = pid
        if known is None or pid == known:
            return
        if index in self.restart_counted:
            self.restart_counted.discard(index)  # the restart a failed call already counted
            return
        log.warning("rollout actor %d was restarted between calls (process %d -> %d)", index, known, pid)
        self.telemetry.count("rollout_actor_deaths_total")
        self._count_restart(index, f"restarted between calls (process {known} -> {pid})")
        self.restart_counted.discard(index)

    def _count_restart(self, index: int, reason: str) -> None:
        """Count one restart of actor ``index``; past ``rollout.max_restarts`` the run stops."""
        self.restart_counted.add(index)
        self.rollout_restarts += 1
        self.restarts_by_actor[index] = self.restarts_by_actor.get(index, 0) + 1
        if self.restarts_by_actor[index] > self.cfg.rollout.max_restarts:
            raise PipelineError(
                f"rollout actor {index}: {reason}; it has been restarted {self.restarts_by_actor[index] - 1} "
                f"times (rollout.max_restarts={self.cfg.rollout.max_restarts}). Check its log under "
                "/tmp/ray/session_latest/logs (worker-*.err)"
            )

    def _actor_died(self, index: int, err: Exception) -> None:
        """A call to rollout actor ``index`` failed because its process is gone.

        ``ActorUnavailableError``: Ray is restarting it (``max_restarts``); the restarted actor
        catches up from the weight board and its prompt cursor, so the driver only counts the
        restart once and backs off until a call succeeds again. ``ActorDiedError``: Ray gave up
        (restarts exhausted, or its constructor failed), so the run stops with the cause.
        """
        from ray.exceptions import ActorUnavailableError

        now = time.monotonic()
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not isinstance(err, ActorUnavailableError):
            self._raise_if_learner_died()
            raise PipelineError(
                f"rollout actor {index} is dead and Ray will not restart it "
                f"(rollout.max_restarts={self.cfg.rollout.max_restarts}): {first_line}. "
                "Its log is under /tmp/ray/session_latest/logs (worker-*.err)"
            ) from err
        if index not in self.unavailable_since:
            self.unavailable_since[index] = now
            self.telemetry.count("rollout_actor_deaths_total")
            self._count_restart(index, f"died ({first_line})")
            log.warning("rollout actor %d died (%s); Ray restarts it", index, first_line)
        elif now - self.unavailable_since[index] > RESTART_DEADLINE_S:
            raise PipelineError(
                f"rollout actor {index} has not come back {RESTART_DEADLINE_S:.0f} s after it died "
                f"({first_line}); see /tmp/ray/session_latest/logs"
            ) from err
        self.retry_at[index] = now + 1.0

    def _raise_if_learner_died(self) -> None:
        """Name a dead learner rank as the cause of a rollout failure it brought about.

        The weights a rollout actor loads (or catches up from when restarted) live in the learner
        ranks' processes: a learner killed meanwhile makes the actor's weight sync fail and its
        restarted constructor raise, and Ray then gives the actor up. Blaming the actor would hide
        the one instruction that helps, ``--resume``. A live rank busy with a step does not answer
        within the short wait and counts as alive; a dead one answers at once with its death.
        """
        import ray
        from ray.exceptions import RayActorError

        if self.learners is None:  # not launched yet: nothing of theirs can have failed a rollout actor
            return
        pings = [actor.pid.remote() for actor in self.learners.actors]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=LEARNER_PING_S)
        for rank, ref in enumerate(pings):
            if ref not in ready:
                continue
            try:
                ray.get(ref, timeout=0)
            except RayActorError as err:
                raise PipelineError(
                    f"learner rank {rank} died after step {self.step} (the rollout actors' weights live in "
                    f"its process, so their weight sync failed too); the run can go on from its last "
                    f"checkpoint: driftrl train --resume {self.run.root}"
                ) from err

    def _restart_broken(self, index: int, reason: str) -> None:
        """Kill a rollout actor whose engine may hold mixed weights so Ray starts it afresh."""
        import ray

        self._raise_if_learner_died()
        log.error("rollout actor %d: %s; restarting it", index, reason)
        self.telemetry.count("rollout_actor_restarts_total")
        self._count_restart(index, reason)
        ray.kill(self.actors[index], no_restart=False)
        # its next calls fail while Ray restarts it: that is this restart, not another death
        self.unavailable_since[index] = time.monotonic()

    def _checkpoints(self) -> CheckpointWriter:

        return CheckpointWriter(
            self.run,
            save_learner=lambda path: self._learner_call("save_checkpoint", str(path)),
            ack=lambda ids: self._get(self.buffer.ack.remote(ids), "the buffer's ack"),
            keep=KEEP_CHECKPOINTS,
            hook=self.checkpoint_hook,
        )

    def _checkpoint(self) -> None:
        """Checkpoint this step; rows trained since the last one are acked only once it holds their effect."""
        started = time.monotonic()
        # the metrics rows first: a checkpoint that has driver state has its steps' rows
        self.metrics_log.flush()
        if self.updates_log is not None:
            self.updates_log.flush()
        acking = sum(len(ids) for ids in self.unacked.values())
        state = {
            "step": self.step,
            "policy_version": self.version,
            "consumed_groups": self.consumed_groups,
            "rows_acked": self.rows_acked + acking,
            "wall_seconds": self.wall_offset + time.monotonic() - self.t0,
            "probe_entropy": self.last_probe,
        }
        self.rows_acked += self._checkpoints().write(self.step, state, self.unacked)
        self.unacked = {}
        log.info(
            "checkpoint step %d committed (%d rows acked) in %.1f s",
            self.step,
            acking,
            time.monotonic() - started,
        )

    # ---- progress -----------------------------------------------------------------------------

    def _progress_bar(self, total: int) -> Any:
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(
            total=total, initial=self.step, desc=f"{self.cfg.run.name} [{self.cfg.run.mode}]", unit="step"
        )

    @staticmethod
    def _update_bar(bar: Any, row: dict[str, float]) -> None:
        if bar is None:
            return
        # postfix first, so the redraw that update() triggers shows this step's numbers
        bar.set_postfix(
            reward=f"{row.get('reward_mean', math.nan):.3f}",
            entropy=f"{row.get('entropy_mean', math.nan):.3f}",
            stale=f"{row.get('staleness_mean', math.nan):.2f}",
            tok_s=f"{row.get('train_tokens_per_s', math.nan):.0f}",
            refresh=False,
        )
        bar.update(1)

    # ---- the end ------------------------------------------------------------------------------

    def finish(self) -> TrainResult:

        from driftrl.report import write_report

        self._learner_call("export_pretrained", str(self.run.final_model), self.cfg.model.path)
        self.buffer_stats = self._get(self.buffer.stats.remote(), "the buffer's stats")
        self.telemetry.record_buffer(self.buffer_stats)
        self.metrics_log.flush()
        if self.updates_log is not None:
            self.updates_log.flush()
        summary = write_report(
            self.run.root,
            extra={
                "policy_version": self.version,
                "rows_acked": self.rows_acked,
                "rollout_restarts": self.rollout_restarts,
                "weight_sync_failures": self.sync_failures,
                "final_model": str(self.run.final_model),
                "seconds_to_first_step": round(self.startup.to_first_step(), 2),
                "process_seconds_before_driver": self.startup.before_driver,
                "startup_seconds": self.startup.phases,
            },
        )
        return TrainResult(
            run_dir=self.run.root,
            steps=self.step,
            policy_version=self.version,
            final_model=self.run.final_model,
            summary_path=summary,
            metrics_url=self.server.url,
            seconds=self.wall_offset + time.monotonic() - self.t0,
            buffer_stats=self.buffer_stats,
            rows_acked_by_driver=self.rows_acked,
            rollout_restarts=self.rollout_restarts,
            sync_failures=self.sync_failures,
            resumed_from=self.resumed_from.describe() if self.resumed_from else None,
        )

    def close(self) -> None:
        import ray

        if self.affinity_before is not None:
            from learner.cpu_pinning import pin_process

            pin_process(self.affinity_before)  # first: nothing below can keep the caller's threads pinned
            self.affinity_before = None
        if ray.is_initialized():
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            if self.learners is not None:
                self.learners.shutdown()
            for handle in (self.buffer, self.board):
                if handle is not None:
                    ray.kill(handle, no_restart=True)
            if self.started_ray:
                ray.shutdown()
        if self.server is not None:
            self.server.stop()
        for step_logger in self.step_loggers:
            step_logger.close()
        self.step_loggers = []


def train(
    cfg: DriftConfig,
    resume: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[Driver, dict[str, float]], None] | None = None,
    checkpoint_hook: Callable[[str, int], None] | None = None,
) -> TrainResult:
    """Run (or resume) one training run; returns where its results are.

    Args:
        cfg: the run config (for a resume: the stored config with any overrides applied).
        resume: a run directory to continue from its newest checkpoint.
        progress: draw the progress bar.
        on_step: called after every learner step with the driver and the step's metrics row
            (tests use it to inject faults).
        checkpoint_hook: called with ``(point, step)`` at each point of the checkpoint protocol
            (driftrl/checkpoints.py; tests crash there).

    Raises:
        RunDirInUseError: another run holds the run directory (or the buffer): nothing was touched.
    """
    root = Path(resume) if resume is not None else Path(cfg.run.root_dir) / cfg.run.name
    with RunLocks(root, cfg.buffer.uri):
        if resume is not None:
            run = RunDir(root)
            if run.latest_checkpoint() is None:
                raise ConfigError(f"{run.root} holds no checkpoint to resume from; start a new run instead")
        else:
            run = create_run_dir(cfg)
        _log_to(run)
        driver = Driver(
            cfg,
            run,
            resume=resume is not None,
            progress=progress,
            on_step=on_step,
            checkpoint_hook=checkpoint_hook,
        )
        try:
            driver.start()
            driver.loop()
            return driver.finish()
        finally:
            driver.close()


def _log_to(run: RunDir) -> None:
    run.logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run.logs / "driver.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("driftrl")
    root.setLevel(logging.INFO)
    for old in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)


def _config_for(args: argparse.Namespace) -> tuple[DriftConfig, str | None]:
    resume = getattr(args, "resume", None)
    if resume:
        _, cfg = open_run_dir(resume, args.overrides)
        return cfg, resume
    return load_config(args.config, args.overrides), None


def _print_result(result: TrainResult) -> None:
    if result.resumed_from:
        print(result.resumed_from)
    print(result.summary_path.read_text(), end="")
    print(f"run directory: {result.run_dir}   final model: {result.final_model}   ({result.seconds:.0f} s)")


def train_main(args: argparse.Namespace) -> int:
    """``driftrl train --config FILE [overrides]`` or ``driftrl train --resume RUN_DIR [overrides]``."""
    cfg, resume = _config_for(args)
    result = train(cfg, resume=resume, progress=not getattr(args, "no_progress", False))
    _print_result(result)
    return 0


def heldout_accuracy(cfg: DriftConfig, model_dir: str | Path) -> float:
    """Greedy exact-match accuracy of ``model_dir`` on the held-out split (synthetic task)."""
    from transformers import AutoTokenizer

    from tasks.heldout import answer_token_budget, evaluate_accuracy
    from tasks.synthetic import load_rows

    rows = load_rows(cfg.task.eval_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    budget = answer_token_budget(tokenizer, rows, cfg.task.answer_key)
    return evaluate_accuracy(
        str(model_dir), None, rows, budget, prompt_key=cfg.task.prompt_key, answer_key=cfg.task.answer_key
    )


def next_free_run(cfg: DriftConfig) -> DriftConfig:
    """``cfg`` itself, or with ``run.name`` suffixed ``-2``, ``-3``… past run directories holding a run
    (a checkpoint, or a live run's lock).

    ``driftrl run`` is the one-command demo: a second call starts a new run beside the first instead
    of refusing (``driftrl train`` refuses and points at ``--resume``).
    """
    root = Path(cfg.run.root_dir)
    name, n = cfg.run.name, 1
    while RunDir(root / name).latest_checkpoint() is not None or in_use(root / name):
        n += 1
        name = f"{cfg.run.name}-{n}"
    if name == cfg.run.name:
        return cfg
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})


def ensure_tiny_default(cfg: DriftConfig, progress: bool = True) -> dict[str, Any] | None:
    """Build the data, tiny model and warm start ``cfg`` points at where missing (cached).

    Returns the warm-start record (None for a model that is not a warm-started tiny model).
    """
    from tasks.warm_start import WarmStartMismatchError, ensure_tiny_setup

    try:
        return ensure_tiny_setup(
            train_path=cfg.task.train_path,
            eval_path=cfg.task.eval_path,
            model_path=cfg.model.path,
            seed=cfg.run.seed,
            synthetic=cfg.task.type == "synthetic",
            build_tiny=cfg.model.tiny,
            prompt_key=cfg.task.prompt_key,
            answer_key=cfg.task.answer_key,
            progress=progress,
            variant=cfg.task.variant,
            rare_frac=cfg.task.rare_frac,
        )
    except WarmStartMismatchError as err:
        raise ConfigError(str(err)) from None


def run_main(args: argparse.Namespace) -> int:
    """``driftrl run``: set up the tiny default (cached), train, and compare held-out accuracy."""

    cfg, resume = _config_for(args)
    if resume is None and cfg.task.type != "synthetic":
        raise ConfigError(
            "driftrl run is the embedded synthetic default; use `driftrl train` for task.type=math"
        )
    if resume is None:
        fresh = next_free_run(cfg)
        if fresh.run.name != cfg.run.name:
            print(
                f"{Path(cfg.run.root_dir) / cfg.run.name} holds an earlier run; this one is {fresh.run.name}"
            )
        cfg = fresh
    ensure_tiny_default(cfg, progress=not getattr(args, "no_progress", False))
    before = heldout_accuracy(cfg, cfg.model.path)
    print(f"held-out greedy accuracy of the starting policy {cfg.model.path}: {before:.3f}")
    result = train(cfg, resume=resume, progress=not getattr(args, "no_progress", False))
    after = heldout_accuracy(cfg, result.final_model)
    _print_result(result)
    print(f"held-out greedy accuracy: {before:.3f} before -> {after:.3f} after RL ({after - before:+.3f})")
    write_atomic(
        result.run_dir / "heldout_accuracy.json",
        json.dumps({"before": before, "after": after, "steps": result.steps}) + "\n",
    )
    return 0
