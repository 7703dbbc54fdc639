"""Property-based invariants of the replay buffer under random pushes, samples, acks and failures.

A hypothesis state machine drives one buffer (restarted from its files now and then) and keeps a
model of what the learner knows: ids it was handed since the last failure and ids it acknowledged.
"""

from __future__ import annotations

import math
import shutil
import tempfile

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from buffers.config import BufferConfig
from buffers.replay import ReplayBuffer
from buffers.schema import records_to_table
from tests.buffers.conftest import group_records


class BufferMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="driftrl-buffer-props-")
        self.next_group = 0
        self.learner_version = 0
        self.accepted: set[str] = set()
        self.acked: set[str] = set()
        self.leased: set[str] = set()
        self.handed_out_since_failure: set[str] = set()

    @initialize(order=st.sampled_from(["fifo", "freshest"]), capacity_groups=st.integers(2, 8))
    def open_buffer(self, order: str, capacity_groups: int) -> None:
        self.config = BufferConfig(
            fsync=False,
            order=order,
            capacity_groups=capacity_groups,
            when_full="reject",
            compact_min_files=3,
            segment_rows=10,
            retire_log_compact_files=3,
        )
        self.buffer = ReplayBuffer(self.config, self.root)

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- actions --------------------------------------------------------------------------------
    @rule(
        group_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
        version_lag=st.integers(0, 3),
        broken_group=st.none() | st.integers(0, 2),
        seed=st.integers(0, 2**16),
    )
    def push(self, group_sizes: list[int], version_lag: int, broken_group: int | None, seed: int) -> None:
        rng = np.random.default_rng(seed)
        version = max(0, self.learner_version - version_lag)
        groups = []
        for size in group_sizes:
            groups.append(group_records(f"g{self.next_group}", size, version, rng))
            self.next_group += 1
        if broken_group is not None and broken_group < len(groups):
            groups[broken_group][-1]["reward"] = math.nan
        result = self.buffer.push(records_to_table([r for g in groups for r in g]))
        rejected = dict(result.rejected)
        assert result.accepted + len(rejected) == sum(group_sizes)
        for i, group in enumerate(groups):
            ids = {r["traj_id"] for r in group}
            if i == broken_group:
                assert ids <= rejected.keys()  # the whole group goes with its bad row
            if ids.isdisjoint(rejected):
                self.accepted |= ids
            else:
                assert ids <= rejected.keys(), "a group was split at push time"

    @rule(n_groups=st.integers(1, 4), max_staleness=st.none() | st.integers(0, 2))
    def sample(self, n_groups: int, max_staleness: int | None) -> None:
        table = self.buffer.sample(n_groups, self.learner_version, max_staleness)
        ids = table.column("traj_id").to_pylist()
        assert len(ids) == len(set(ids))
        assert self.handed_out_since_failure.isdisjoint(ids), "an id was sampled twice without a failure"
        assert self.acked.isdisjoint(ids), "an acknowledged id came back"
        assert set(ids) <= self.accepted
        # whole groups, each in one run of rows, at most n_groups of them
        group_ids = table.column("group_id").to_pylist()
        runs = [g for i, g in enumerate(group_ids) if i == 0 or group_ids[i - 1] != g]
        assert len(runs) == len(set(runs)) <= n_groups
        sizes = table.column("group_size").to_pylist()
        for g in runs:
            assert group_ids.count(g) == sizes[group_ids.index(g)]
        if max_staleness is not None:
            assert all(
                self.learner_version - v <= max_staleness for v in table.column("version_start").to_pylist()
            )
        self.handed_out_since_failure |= set(ids)
        self.leased |= set(ids)

    @rule(data=st.data())
    def ack_checkpointed_groups(self, data: st.DataObject) -> None:
        groups = sorted({t.split("/")[0] for t in self.leased})
        chosen = set(data.draw(st.lists(st.sampled_from(groups), unique=True))) if groups else set()
        ids = [t for t in self.leased if t.split("/")[0] in chosen]
        result = self.buffer.ack(ids + sorted(self.acked)[:2])  # plus a retried ack
        assert result.acked == len(ids) and result.unknown == 0
        self.acked |= set(ids)
        self.leased -= set(ids)

    @rule()
    def publish_weights(self) -> None:
        self.learner_version += 1

    @rule()
    def learner_restarts(self) -> None:
        self.buffer.requeue_leased()
        self.leased.clear()
        self.handed_out_since_failure.clear()

    @rule()
    def buffer_restarts(self) -> None:
        self.buffer = ReplayBuffer(self.config, self.root)
        self.leased.clear()
        self.handed_out_since_failure.clear()

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def counts_add_up(self) -> None:
        if not hasattr(self, "buffer"):
            return
        stats = self.buffer.stats()
        assert stats["pushed"] == stats["accepted"] + sum(stats["rejected"].values())
        held = stats["rows_available"] + stats["rows_leased"]
        assert stats["accepted"] == held + stats["acked"] + sum(stats["evicted"].values())
        assert stats["accepted"] == len(self.accepted)
        assert stats["acked"] == len(self.acked), "an ack was lost or applied twice"
        assert stats["rows_leased"] == len(self.leased)
        assert stats["groups_available"] + stats["groups_leased"] <= self.config.capacity_groups


BufferMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_buffer_invariants = BufferMachine.TestCase
