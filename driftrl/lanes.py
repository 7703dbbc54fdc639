"""The driver's event loop as three lanes, each owning its in-flight refs and its on-ready handler.

* :class:`GenerationLane`: one ``generate_step`` in flight per rollout actor, and the actors' and
  the buffer's stats every :data:`STATS_EVERY_S`.
* :class:`TrainingLane`: at most one buffer ``sample`` -> learner ``train_step`` chain, the next
  batch sampled while the current one trains.
* :class:`SyncLane`: what follows a trained step, in its order, in one place: the probe of the
  previous sync is recorded, the previous sync finished, the next published with its probe queued,
  then the checkpoint.

:meth:`driftrl.pipeline.Driver.loop` only asks each lane for its requests and refs, waits on all of
them, and hands each ready ref to the lane that owns it. The lanes keep the driver's shared state
(step, policy version, unacknowledged rows, telemetry) on the driver, whose methods do the work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# a lane's ``driver`` is the driftrl.pipeline.Driver that runs it, typed Any so that this module stays
# below pipeline.py (the lanes call its methods; it builds the lanes)
Driver = Any

# how long one generate_step call waits for a finished group: also the longest a weight update
# queues behind it on the actor
GENERATE_WAIT_S = 1.0
STATS_EVERY_S = 2.0


@dataclass
class PendingSync:
    """One weight publication waiting for the rollout actors to load it."""

    version: int
    refs: dict[Any, int]
    started: float
    deadline: float
    publish: list[Any]  # the learner ranks' publish_weights calls (rank 0's result is the manifest)


def _groups_in(table: Any) -> int:
    """Distinct groups of a rollout table (0 for None)."""
    import pyarrow.compute as pc

    return 0 if table is None or table.num_rows == 0 else pc.count_distinct(table.column("group_id")).as_py()


class GenerationLane:
    """Rollout actors' ``generate_step`` calls and the periodic actor and buffer stats."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.gen_refs: dict[Any, int] = {}  # ref -> actor index
        self.stats_refs: dict[Any, int] = {}
        self.buffer_stats_ref: Any = None
        self.last_stats = 0.0

    def request(self, now: float, learner_busy: bool) -> None:
        """Give every idle actor a ``generate_step`` (none in sync mode while the learner is busy)."""
        d = self.driver
        if not (d.sync_mode and learner_busy):
            # groups sampled so far + groups waiting: leased groups are in consumed_groups already
            admitted = d.consumed_groups + int(d.buffer_stats.get("groups_available", 0))
            busy = set(self.gen_refs.values())
            for index, actor in enumerate(d.actors):
                if index not in busy and d.retry_at.get(index, 0.0) <= now:
                    self.gen_refs[actor.generate_step.remote(d.version, admitted, GENERATE_WAIT_S)] = index
        if now - self.last_stats >= STATS_EVERY_S:
            self.last_stats = now
            if self.buffer_stats_ref is None:
                self.buffer_stats_ref = d.buffer.stats.remote()
            asked = set(self.stats_refs.values())
            for index, actor in enumerate(d.actors):
                if index not in asked:
                    self.stats_refs[actor.stats.remote()] = index

    def refs(self) -> list[Any]:
        extra = [self.buffer_stats_ref] if self.buffer_stats_ref is not None else []
        return list(self.gen_refs) + list(self.stats_refs) + extra

    def owns(self, ref: Any) -> bool:
        return ref in self.gen_refs or ref in self.stats_refs or ref is self.buffer_stats_ref

    def handle(self, ref: Any) -> None:
        from ray.exceptions import RayActorError

        d = self.driver
        if ref in self.gen_refs:
            d._generate_done(self.gen_refs.pop(ref), ref)
        elif ref in self.stats_refs:
            index = self.stats_refs.pop(ref)
            try:
                stats = d._get(ref, f"rollout actor {index}'s stats")
            except RayActorError:
                return  # the generate_step ref reports the death
            d.rollout_stats[index] = stats
            d._check_incarnation(index, stats.get("pid"))
            d.telemetry.record_rollout(stats["actor_id"], stats)
            if stats.get("broken"):
                d._restart_broken(index, stats["broken"])
        else:
            self.buffer_stats_ref = None
            d.buffer_stats = d._get(ref, "the buffer's stats")
            d.telemetry.record_buffer(d.buffer_stats)

    def cancel(self) -> None:
        import ray

        for ref in self.gen_refs:
            ray.cancel(ref)


class TrainingLane:
    """The buffer ``sample`` and the learner ranks' ``train_step`` of one batch at a time."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.sample_ref: Any = None
        self.sample_started = 0.0
        self.next_table: Any = None  # a sampled batch waiting for the learner
        self.partial_table: Any = None  # part of the next batch, when a restarted buffer redelivered the rest
        self.train_refs: list[Any] | None = None
        self.train_started = 0.0
        self.train_ids: Any = None

    @property
    def busy(self) -> bool:
        return self.train_refs is not None

    def version_of_next_step(self) -> int:
        """The learner's policy version when the next step to be dispatched runs."""
        d = self.driver
        if self.train_refs is None:
            return d.version
        syncs = (d.step + 1) % d.cfg.learner.sync_interval == 0 or d.step + 1 == d.cfg.learner.total_steps
        return d.version + (1 if syncs else 0)

    def request(self, now: float) -> None:
        """Sample the next batch if none is on its way, and enforce the learner's and buffer's deadlines."""
        d = self.driver
        cfg = d.cfg.learner
        steps_left = cfg.total_steps - d.step - (1 if self.busy else 0)
        if self.sample_ref is None and self.next_table is None and steps_left > 0:
            wanted = cfg.groups_per_step - _groups_in(self.partial_table)
            self.sample_ref = d.buffer.sample.remote(
                wanted, self.version_of_next_step(), d.max_staleness, cfg.sample_timeout_s
            )
            self.sample_started = now
        if self.train_refs is not None and now - self.train_started > cfg.step_timeout_s:
            d._learner_get(self.train_refs, f"train_step of step {d.step + 1}", self.train_started)
        if (
            self.sample_ref is not None
            and now - self.sample_started > cfg.sample_timeout_s + d.cfg.run.rpc_timeout_s
        ):
            d._buffer_hangs(now - self.sample_started)

    def refs(self) -> list[Any]:
        return ([self.sample_ref] if self.sample_ref is not None else []) + (self.train_refs or [])

    def owns(self, ref: Any) -> bool:
        return ref is self.sample_ref or (self.train_refs is not None and ref in self.train_refs)

    def dispatch(self) -> None:
        """Send the waiting batch to every learner rank (once the previous step has finished)."""
        import ray

        d = self.driver
        if self.next_table is None or self.train_refs is not None or d.step >= d.cfg.learner.total_steps:
            return
        table, self.next_table = self.next_table, None
        self.train_ids = table.column("traj_id").combine_chunks()
        table_ref = ray.put(table)
        method = "train_step" if d.updates_log is None else "train_updates"
        self.train_refs = [a.call.remote(method, table_ref) for a in d.learners.actors]
        self.train_started = time.monotonic()
        if d.last_train_done is not None:
            d.learner_wait_s = time.monotonic() - d.last_train_done

    def handle(self, ref: Any) -> tuple[dict[str, float], list[str]] | None:
        """A sample (kept for the learner) or a rank's step; returns (metrics, trained traj ids) once
        every rank has finished the step."""
        if ref is self.sample_ref:
            self._sampled(ref)
            return None
        import ray

        d = self.driver
        assert self.train_refs is not None
        if len(ray.wait(self.train_refs, num_returns=len(self.train_refs), timeout=0)[0]) < len(
            self.train_refs
        ):
            return None
        metrics = d._learner_get(self.train_refs, f"train_step of step {d.step + 1}")[0]
        self.train_refs = None
        return metrics, self.train_ids.to_pylist()

    def _sampled(self, ref: Any) -> None:
        import pyarrow as pa

        d = self.driver
        groups = d.cfg.learner.groups_per_step
        self.sample_ref = None
        table = d._get(ref, "the buffer's sample")
        held = [i for ids in d.unacked.values() for i in ids]
        held += self.train_ids.to_pylist() if self.train_refs is not None else []
        if self.partial_table is not None:
            held += self.partial_table.column("traj_id").to_pylist()
        fresh = d._without_redelivered(table, held)
        kept = fresh if self.partial_table is None else pa.concat_tables([self.partial_table, fresh])
        self.partial_table = None
        if fresh.num_rows < table.num_rows and _groups_in(kept) < groups:
            self.partial_table = kept  # the rest is sampled afresh at the next turn
            return
        self.next_table = d._checked_batch(kept)
        d.startup.mark_once("first batch sampled (rollout engine start, generation)")
        d.consumed_groups += groups
        self.dispatch()


class SyncLane:
    """Weight syncs, the entropy probe queued with each, and checkpoints, after each trained step."""

    def __init__(self, driver: Driver, bar: Any) -> None:
        self.driver = driver
        self.bar = bar
        self.pending_sync: PendingSync | None = None
        # the probe's refs, its step's row, the predicted ΔH since the previous sync, when queued
        self.pending_probe: tuple[list[Any], dict[str, float], float, float] | None = None

    @property
    def busy(self) -> bool:
        return self.pending_sync is not None

    def after_step(self, row: dict[str, float]) -> None:
        """The order after step ``driver.step``: sync (and its probe) on a sync step, else the row is
        written; then the checkpoint on a checkpoint step."""
        d = self.driver
        cfg = d.cfg.learner
        last = d.step == cfg.total_steps
        if d.step % cfg.sync_interval == 0 or last:
            self.finish_probe(wait=True)  # keeps realised ΔH between consecutive syncs
            if self.pending_sync is not None:
                d._finish_sync(self.pending_sync, wait=True)
            self.pending_sync, probe_refs = d._start_sync()
            # snapshotted now, when the probe is queued: a later step must not add to this pair
            self.pending_probe = (probe_refs, row, d._take_predicted(), time.monotonic())
        else:
            d._append_row(row, self.bar)
        if d.step % cfg.checkpoint_interval == 0 or last:
            self.finish_probe(wait=True)
            d._checkpoint()

    def refs(self) -> list[Any]:
        return list(self.pending_sync.refs if self.pending_sync else []) + (
            self.pending_probe[0] if self.pending_probe else []
        )

    def owns(self, ref: Any) -> bool:
        return (self.pending_sync is not None and ref in self.pending_sync.refs) or (
            self.pending_probe is not None and ref in self.pending_probe[0]
        )

    def handle(self, ref: Any) -> None:
        if self.pending_sync is not None and ref in self.pending_sync.refs:
            if self.driver._finish_sync(self.pending_sync, wait=False):
                self.pending_sync = None
        else:
            self.finish_probe(wait=False)

    def check_deadline(self) -> None:
        """A sync past its deadline is finished now: the actors that have not loaded it are named."""
        if self.pending_sync is not None and time.monotonic() > self.pending_sync.deadline:
            self.driver._finish_sync(self.pending_sync, wait=True)
            self.pending_sync = None

    def finish_probe(self, wait: bool) -> None:
        import ray

        if self.pending_probe is None:
            return
        refs, row, predicted, queued = self.pending_probe
        if not wait and len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < len(refs):
            return
        self.pending_probe = None
        d = self.driver
        probe = d._learner_get(refs, f"probe_entropy after step {int(row['step'])}", queued)[0]
        d._record_probe(float(probe), row, predicted)
        d._append_row(row, self.bar)

    def drain(self) -> None:
        """At the end of the run: the last probe recorded, the last sync finished."""
        self.finish_probe(wait=True)
        if self.pending_sync is not None:
            self.driver._finish_sync(self.pending_sync, wait=True)
            self.pending_sync = None
