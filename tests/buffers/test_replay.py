"""ReplayBuffer without Ray: leasing, acks, staleness, capacity, recovery from its files."""

from __future__ import annotations

import logging
import pickle
import shutil
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from buffers.config import BufferConfig
from buffers.replay import ReplayBuffer
from buffers.schema import SCHEMA_VERSION_KEY, SchemaMismatchError
from buffers.storage import BufferStorageError


def config(**overrides) -> BufferConfig:
    return BufferConfig(**{"fsync": False, **overrides})


def ids_of(table: pa.Table) -> list[str]:
    return table.column("traj_id").to_pylist()


def groups_of(table: pa.Table) -> list[str]:
    """Group ids in row order, one entry per run of equal ids (so a split group shows twice)."""
    runs: list[str] = []
    for g in table.column("group_id").to_pylist():
        if not runs or runs[-1] != g:
            runs.append(g)
    return runs


def assert_counts_add_up(stats: dict) -> None:
    assert stats["pushed"] == stats["accepted"] + sum(stats["rejected"].values())
    held = stats["rows_available"] + stats["rows_leased"]
    assert stats["accepted"] == held + stats["acked"] + sum(stats["evicted"].values())


def test_fifo_leases_whole_groups_and_acks_are_idempotent(tmp_path, make_groups):
    buffer = ReplayBuffer(config(), str(tmp_path))
    for k in range(5):
        assert buffer.push(make_groups([f"g{k}"], seed=k)).accepted == 4
    first = buffer.sample(2, learner_version=0)
    assert groups_of(first) == ["g0", "g1"]
    assert groups_of(buffer.sample(2, learner_version=0)) == ["g2", "g3"]
    stats = buffer.stats()
    assert (stats["rows_available"], stats["rows_leased"], stats["sampled"]) == (4, 16, 16)

    assert buffer.ack(first.column("traj_id")).acked == 8
    assert buffer.ack([]).acked == 0
    again = buffer.ack(ids_of(first) + ["never-pushed"])
    assert (again.acked, again.already_retired, again.unknown) == (0, 8, 1)
    stats = buffer.stats()
    assert stats["acked"] == 8 and stats["rows_leased"] == 8
    assert_counts_add_up(stats)
    # acknowledged rows never come back, leased ones do not either (no failure happened)
    assert groups_of(buffer.sample(10, learner_version=0)) == ["g4"]


def test_ack_returns_counts(tmp_path, make_groups):
    buffer = ReplayBuffer(config(), str(tmp_path))
    buffer.push(make_groups(["a", "b"]))
    leased = buffer.sample(2, learner_version=0)
    result = buffer.ack(ids_of(leased)[:4])
    assert (result.acked, result.already_retired, result.unknown) == (4, 0, 0)


def test_freshest_order_serves_newest_versions_first(tmp_path, make_groups):
    buffer = ReplayBuffer(config(order="freshest"), str(tmp_path))
    for key, version in (("v0", 0), ("v2", 2), ("v1", 1), ("v2b", 2)):
        buffer.push(make_groups([key], version_start=version))
    # ties (v2, v2b) in arrival order
    assert groups_of(buffer.sample(4, learner_version=2)) == ["v2", "v2b", "v1", "v0"]


def test_over_stale_groups_are_evicted_whole_at_sample_time(tmp_path, make_groups):
    buffer = ReplayBuffer(config(), str(tmp_path))
    for version in range(4):
        buffer.push(make_groups([f"v{version}"], version_start=version))
    mixed = make_groups(["mixed"], version_start=3)
    mixed = mixed.set_column(10, "version_start", pa.array([3, 3, 0, 3], pa.int64()))
    assert buffer.push(mixed).accepted == 4
    # learner at 3, bound 1: staleness 3-0=3 and 3-1=2 are over, 3-2=1 and 0 are fine; "mixed"
    # has one row at version 0 and goes whole
    sampled = buffer.sample(10, learner_version=3, max_staleness=1)
    assert groups_of(sampled) == ["v2", "v3"]
    assert all(3 - v <= 1 for v in sampled.column("version_start").to_pylist())
    stats = buffer.stats()
    assert stats["evicted"] == {"stale": 12}
    assert_counts_add_up(stats)
    # evictions are logged: a restarted buffer neither serves them nor accepts them again
    restarted = ReplayBuffer(config(), str(tmp_path))
    assert restarted.stats()["evicted"] == {"stale": 12}
    assert restarted.push(make_groups(["v0"])).accepted == 0


def test_full_buffer_rejects_or_blocks_until_an_ack_makes_room(tmp_path, make_groups):
    rejecting = ReplayBuffer(config(capacity_groups=2, when_full="reject"), str(tmp_path / "r"))
    result = rejecting.push(make_groups(["a", "b", "c"]))
    assert (result.accepted, result.full) == (8, True)
    assert {(t.split("/")[0], r) for t, r in result.rejected} == {("c", "buffer_full")}

    blocking = ReplayBuffer(config(capacity_groups=1, push_timeout_s=10.0), str(tmp_path / "b"))
    blocking.push(make_groups(["a"]))
    outcome = {}
    pusher = threading.Thread(target=lambda: outcome.update(result=blocking.push(make_groups(["b"]))))
    pusher.start()
    time.sleep(0.2)
    assert pusher.is_alive()  # waiting for room
    leased = blocking.sample(1, learner_version=0)
    assert pusher.is_alive()  # a leased group still takes room until it is acknowledged
    started = time.monotonic()
    blocking.ack(ids_of(leased))
    pusher.join(timeout=5)
    assert not pusher.is_alive() and time.monotonic() - started < 2
    assert outcome["result"].accepted == 4 and not outcome["result"].full

    timing_out = ReplayBuffer(config(capacity_groups=1, push_timeout_s=0.1), str(tmp_path / "t"))
    timing_out.push(make_groups(["a"]))
    assert timing_out.push(make_groups(["b"])).full
    assert timing_out.stats()["rejected"] == {"buffer_full": 4}


def test_sample_waits_for_a_push_and_times_out_empty(tmp_path, make_groups):
    buffer = ReplayBuffer(config(), str(tmp_path))
    empty = buffer.sample(1, learner_version=0, timeout_s=0.05)
    assert empty.num_rows == 0 and empty.schema.names == make_groups(["x"]).schema.names
    outcome = {}
    sampler = threading.Thread(target=lambda: outcome.update(t=buffer.sample(1, 0, timeout_s=10.0)))
    sampler.start()
    time.sleep(0.1)
    buffer.push(make_groups(["late"]))
    sampler.join(timeout=5)
    assert groups_of(outcome["t"]) == ["late"]


def test_requeue_release_and_lease_expiry_return_rows(tmp_path, make_groups):
    buffer = ReplayBuffer(config(), str(tmp_path / "a"))
    buffer.push(make_groups(["a", "b"]))
    leased = buffer.sample(2, learner_version=0)
    assert buffer.sample(1, learner_version=0).num_rows == 0
    assert buffer.release(ids_of(leased)[5:6]) == 4  # one row names its whole group
    assert groups_of(buffer.sample(2, learner_version=0)) == ["b"]
    assert buffer.requeue_leased() == 8
    # after the failure the same rows may be leased again, in their original order
    assert groups_of(buffer.sample(2, learner_version=0)) == ["a", "b"]
    assert buffer.stats()["requeued"] == 12

    expiring = ReplayBuffer(config(lease_timeout_s=0.05), str(tmp_path / "b"))
    expiring.push(make_groups(["a"]))
    assert expiring.sample(1, learner_version=0).num_rows == 4
    time.sleep(0.1)
    assert expiring.sample(1, learner_version=0).num_rows == 4
    assert expiring.stats()["lease_expired"] == 1


def test_partially_acked_group_is_not_served_incomplete(tmp_path, make_groups):
    buffer = ReplayBuffer(config(), str(tmp_path))
    buffer.push(make_groups(["a"]))
    leased = ids_of(buffer.sample(1, learner_version=0))
    assert buffer.ack(leased[:1]).acked == 1
    assert buffer.stats()["rows_leased"] == 3  # the learner may still ack the rest
    buffer.requeue_leased()
    stats = buffer.stats()
    assert stats["evicted"] == {"partial_group": 3} and stats["rows_available"] == 0
    assert_counts_add_up(stats)


def test_restart_on_the_same_uri_recovers_unacked_rows_and_forgets_leases(tmp_path, make_groups):
    uri = str(tmp_path / "buf")
    buffer = ReplayBuffer(config(compact_min_files=3), uri)
    for k in range(6):
        buffer.push(make_groups([f"g{k}"], seed=k))
    leased = buffer.sample(3, learner_version=0)
    buffer.ack([t for t in ids_of(leased) if t.startswith("g0/")])
    before = buffer.stats()
    assert before["compactions"] >= 1

    restarted = ReplayBuffer(config(compact_min_files=3), uri)
    stats = restarted.stats()
    assert (stats["rows_available"], stats["rows_leased"], stats["acked"]) == (20, 0, 4)
    assert stats["accepted"] == before["accepted"] == 24
    assert_counts_add_up(stats)
    # same rows, same order; g0 is gone for good
    again = restarted.sample(10, learner_version=0)
    assert groups_of(again) == [f"g{k}" for k in range(1, 6)]
    assert restarted.push(make_groups(["g0"])).rejected[0][1] == "duplicate_traj_id"
    assert restarted.ack(ids_of(leased)).acked == 8  # g1, g2 from the old lease


def test_file_uri_and_fsspec_memory_uri(tmp_path, make_groups):
    for uri in (f"file://{tmp_path}/buf", f"memory://driftrl-test-{uuid.uuid4().hex}/buf"):
        buffer = ReplayBuffer(config(compact_min_files=2), uri)
        for k in range(3):
            buffer.push(make_groups([f"g{k}"]))
        buffer.ack(ids_of(buffer.sample(1, learner_version=0)))
        restarted = ReplayBuffer(config(), uri)
        assert groups_of(restarted.sample(5, learner_version=0)) == ["g1", "g2"], uri


def test_unopenable_uri_fails_loudly_with_the_uri(tmp_path):
    with pytest.raises(BufferStorageError, match="nosuchscheme://bucket/x"):
        ReplayBuffer(config(), "nosuchscheme://bucket/x")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(BufferStorageError, match=str(blocker)):
        ReplayBuffer(config(), str(blocker / "buffer"))


def test_torn_files_are_skipped_with_a_counted_warning(tmp_path, make_groups, caplog):
    uri = tmp_path / "buf"
    buffer = ReplayBuffer(config(), str(uri))
    for k in range(3):
        buffer.push(make_groups([f"g{k}"]))
    buffer.ack(ids_of(buffer.sample(1, learner_version=0)))
    last_segment = sorted((uri / "segments").iterdir())[-1]
    last_segment.write_bytes(last_segment.read_bytes()[:-100])  # power loss without fsync
    (uri / "retired" / "0000000000000050.arrow").write_bytes(b"ARROW1\0\0half")
    (uri / "segments" / "0000000000000042.push.arrow.tmp").write_bytes(b"interrupted")

    with caplog.at_level(logging.WARNING, logger="buffers.replay"):
        restarted = ReplayBuffer(config(), str(uri))
    stats = restarted.stats()
    assert (stats["torn_files"], stats["tmp_files_removed"]) == (2, 1)
    assert sum(last_segment.name in message for message in caplog.messages) == 1
    assert groups_of(restarted.sample(5, learner_version=0)) == ["g1"]
    assert stats["acked"] == 4
    # new files get sequence numbers after every file seen, torn ones included
    restarted.push(make_groups(["g9"]))
    assert max(p.name for p in (uri / "segments").iterdir()) == "0000000000000051.push.arrow"
    assert not (uri / "segments" / "0000000000000042.push.arrow.tmp").exists()


def test_segment_of_another_schema_version_raises_naming_the_file(tmp_path, make_groups):
    uri = tmp_path / "buf"
    ReplayBuffer(config(), str(uri)).push(make_groups(["g"]))
    table = make_groups(["old"]).replace_schema_metadata({SCHEMA_VERSION_KEY: b"0"})
    alien = uri / "segments" / "0000000000000007.push.arrow"
    with ipc.new_file(str(alien), table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(SchemaMismatchError, match=r"0000000000000007\.push\.arrow.*version 0"):
        ReplayBuffer(config(), str(uri))


def test_compaction_merges_push_files_and_acked_files_are_collected(tmp_path, make_groups):
    uri = tmp_path / "buf"
    buffer = ReplayBuffer(config(compact_min_files=4, segment_rows=8, retire_log_compact_files=3), str(uri))
    for k in range(8):
        buffer.push(make_groups([f"g{k}"]))
    names = sorted(p.name for p in (uri / "segments").iterdir())
    # two compactions of 4 push files, each into two segments of <= 8 rows (2 groups)
    assert len(names) == 4 and all(n.endswith(".segment.arrow") for n in names)
    for _ in range(4):
        buffer.ack(ids_of(buffer.sample(2, learner_version=0)))
    assert list((uri / "segments").iterdir()) == []
    assert len(list((uri / "retired").iterdir())) < 4  # the log was rewritten as one file
    restarted = ReplayBuffer(config(), str(uri))
    stats = restarted.stats()
    assert (stats["acked"], stats["rows_available"], stats["accepted"]) == (32, 0, 32)
    assert restarted.push(make_groups(["g3"])).accepted == 0


def test_rows_in_two_files_after_an_interrupted_compaction_are_restored_once(tmp_path, make_groups):
    uri = tmp_path / "buf"
    buffer = ReplayBuffer(config(compact_min_files=3), str(uri))
    backup = tmp_path / "backup"
    for k in range(3):
        if k == 2:
            shutil.copytree(uri / "segments", backup)
        buffer.push(make_groups([f"g{k}"]))
    # crash between writing the merged segment and deleting its sources: put two sources back
    for source in backup.iterdir():
        shutil.copy(source, uri / "segments" / source.name)
    assert len(list((uri / "segments").iterdir())) == 3
    restarted = ReplayBuffer(config(), str(uri))
    sampled = restarted.sample(10, learner_version=0)
    assert groups_of(sampled) == ["g0", "g1", "g2"] and sampled.num_rows == 12
    restarted.ack(ids_of(sampled))
    assert ReplayBuffer(config(), str(uri)).stats()["rows_available"] == 0
    assert list((uri / "segments").iterdir()) == []


def test_sampled_table_does_not_drag_the_whole_file_along(tmp_path, make_groups):
    buffer = ReplayBuffer(config(), str(tmp_path))
    big = make_groups([f"g{k}" for k in range(256)])
    buffer.push(big)
    one_group = buffer.sample(1, learner_version=0)
    # 1/256 of the rows plus the schema; a slice of the file would pickle all of it
    assert len(pickle.dumps(one_group, protocol=5)) < len(pickle.dumps(big, protocol=5)) / 32


def test_files_are_durable_before_push_returns(tmp_path, make_groups):
    buffer = ReplayBuffer(BufferConfig(fsync=True), str(tmp_path))
    buffer.push(make_groups(["g"]))
    (segment,) = Path(tmp_path, "segments").iterdir()
    assert ipc.open_file(str(segment)).read_all().num_rows == 4


def test_only_small_push_files_are_compacted(tmp_path, make_groups):
    small = make_groups(["s0"])
    uri = tmp_path / "buf"
    # the 32-group push is ~32x a one-group push: above the bar, so never rewritten
    buffer = ReplayBuffer(config(compact_min_files=2, compact_below_bytes=4 * small.nbytes), str(uri))
    buffer.push(make_groups([f"b{k}" for k in range(32)]))
    buffer.push(small)
    assert buffer.stats()["compactions"] == 0  # one small file so far
    buffer.push(make_groups(["s1"], seed=1))
    names = sorted(p.name for p in (uri / "segments").iterdir())
    assert [n.split(".", 1)[1] for n in names] == ["push.arrow", "segment.arrow"]
    assert buffer.stats()["compactions"] == 1
    restarted = ReplayBuffer(config(), str(uri))
    assert groups_of(restarted.sample(40, learner_version=0)) == [f"b{k}" for k in range(32)] + ["s0", "s1"]


def test_groups_whose_rows_interleave_in_a_file_are_served_whole(tmp_path, make_groups):
    uri = tmp_path / "buf"
    (uri / "segments").mkdir(parents=True)
    table = make_groups(["a", "b"])  # rows a/0..a/3, b/0..b/3
    interleaved = table.take([0, 4, 1, 5, 2, 6, 3, 7])
    with ipc.new_file(str(uri / "segments" / "0000000000000000.push.arrow"), table.schema) as writer:
        writer.write_table(interleaved)
    sampled = ReplayBuffer(config(), str(uri)).sample(2, learner_version=0)
    assert ids_of(sampled) == ["a/0", "a/1", "a/2", "a/3", "b/0", "b/1", "b/2", "b/3"]
    assert sampled.equals(table)
