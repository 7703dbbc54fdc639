"""The collective transport over real gloo groups between processes: exact bytes, a dead or silent
peer on either side is an error naming the actor within the deadline (never a hang), and a
restarted peer re-joins and catches up with the newest version."""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
import signal
import time
from typing import Any

import pytest
import torch

from transports.base import WeightManifest, WeightSyncError, WeightSyncTimeoutError
from transports.collective import CollectivePeer, CollectiveWeightPublisher, CollectiveWeightReceiver

SPAWN = multiprocessing.get_context("spawn")


def weights(version: int) -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes and sizes: with 1 KiB buckets, a (1024 B) / b, c / d (1200 B, alone) / e."""
    gen = torch.Generator().manual_seed(version)
    return [
        ("a.weight", torch.randn(16, 16, generator=gen)),
        ("b.bias", torch.randn(40, generator=gen).to(torch.bfloat16)),
        ("c.steps", torch.arange(30, dtype=torch.int64) * version),
        ("d.weight", torch.randn(300, generator=gen)),
        ("e.norm", torch.randn(9, generator=gen).to(torch.float16)),
    ]


def peer_main(endpoint: tuple[str, int], rank: int, min_versions: list[int], out: Any) -> None:
    """An engine rank in its own process: join, then receive each version and report its bytes."""
    peer = CollectivePeer(endpoint, rank)
    peer.join(30)
    out.put(("joined", os.getpid()))
    for min_version in min_versions:
        got: dict[str, torch.Tensor] = {}
        calls: list[str] = []
        version, tensors = peer.receive(
            min_version,
            30,
            load=lambda ws, got=got: got.update({name: w.clone() for name, w in ws}),
            begin=lambda calls=calls: calls.append("begin"),
            finish=lambda calls=calls: calls.append("finish"),
        )
        out.put((version, tensors, calls, as_bytes(got)))


def as_bytes(got: dict[str, torch.Tensor]) -> bytes:
    """Tensors put on a multiprocessing queue travel as shared-memory handles that the reader must fetch
    from the writer's process; a peer that has exited by then (its last version sent) leaves
    FileNotFoundError. Serialised bytes carry the values themselves."""
    buffer = io.BytesIO()
    torch.save(got, buffer)
    return buffer.getvalue()


def expect(out: Any, kind: str, timeout_s: float = 60) -> Any:
    item = out.get(timeout=timeout_s)
    if kind == "joined":
        assert item[0] == "joined"
        return item[1]
    if kind == "stream":
        version, tensors, calls, payload = item
        return version, tensors, calls, torch.load(io.BytesIO(payload), weights_only=True)
    return item


def test_streams_exact_bytes_drops_a_killed_peer_and_catches_up_a_restarted_one() -> None:
    publisher = CollectiveWeightPublisher(1024, "127.0.0.1", {1: "rollout-0"}, timeout_s=20)
    out = SPAWN.Queue()
    try:
        first = SPAWN.Process(target=peer_main, args=(publisher.endpoint, 1, [1, 2, 3], out), daemon=True)
        first.start()
        pid = expect(out, "joined")
        deadline = time.monotonic() + 20
        while publisher.linked_peers() != {1: 0}:  # the watcher links it
            assert time.monotonic() < deadline, "the join watcher never linked the peer"
            time.sleep(0.05)
        for version in (1, 2):
            manifest = publisher.publish(version, iter(weights(version)))
            assert manifest.failed_peers == () and manifest.num_tensors == 5 and len(manifest.buckets) == 4
            got_version, tensors, calls, got = expect(out, "stream")
            assert (got_version, tensors, calls) == (version, 5, ["begin", "finish"])
            for name, tensor in weights(version):
                assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
        assert publisher.linked_peers() == {1: 2}

        # the peer dies while it waits for version 3: rank 0 drops it at once, naming the actor
        os.kill(pid, signal.SIGKILL)
        first.join(10)
        started = time.monotonic()
        manifest = publisher.publish(3, iter(weights(3)))
        assert time.monotonic() - started < 10  # a closed connection, not the 20 s deadline
        assert manifest.failed_peers == ("rollout-0",)
        assert "rollout-0 (collective engine rank 1)" in publisher.failures["rollout-0"]
        assert publisher.linked_peers() == {}

        # its restart joins afresh; the watcher sends the newest version without a publish
        second = SPAWN.Process(target=peer_main, args=(publisher.endpoint, 1, [3], out), daemon=True)
        second.start()
        expect(out, "joined")
        got_version, tensors, _, got = expect(out, "stream")
        assert got_version == 3 and tensors == 5
        for name, tensor in weights(3):
            assert torch.equal(got[name], tensor), name
        second.join(10)
    finally:
        publisher.close()


def silent_publisher_main(out: Any) -> None:
    """Learner rank 0 in its own process that links peers but never publishes (the test kills it)."""
    publisher = CollectiveWeightPublisher(1024, "127.0.0.1", {1: "rollout-3"}, timeout_s=30)
    out.put(publisher.endpoint)
    time.sleep(120)


class PeerEngine:
    """The worker-extension RPCs of one engine rank, in this process (the real ones need a vLLM model)."""

    def __init__(self) -> None:
        self.peer: CollectivePeer | None = None

    async def __call__(self, method: str, args: tuple, timeout_s: float) -> list[Any]:
        endpoint, rank_offset = args[0], args[1]
        if self.peer is None:
            self.peer = CollectivePeer((endpoint[0], endpoint[1]), rank_offset)
        if method == "driftrl_collective_join":
            await asyncio.to_thread(self.peer.join, args[2])
            return [rank_offset]
        assert method == "driftrl_collective_receive"
        min_version, receive_timeout_s = args[2], args[3]
        version, tensors = await asyncio.to_thread(
            self.peer.receive, min_version, receive_timeout_s, lambda ws: None, lambda: None, lambda: None
        )
        return [[version, tensors]]


def test_a_silent_or_dead_learner_is_an_error_naming_the_actor_within_the_deadline() -> None:
    out = SPAWN.Queue()
    learner = SPAWN.Process(target=silent_publisher_main, args=(out,), daemon=True)
    learner.start()
    try:
        endpoint = out.get(timeout=60)
        receiver = CollectiveWeightReceiver("rollout-3", rank_offset=1)
        engine = PeerEngine()
        manifest = WeightManifest(5, "collective", (), 0, 0, time.time(), endpoint=endpoint)
        asyncio.run(receiver.attach(engine, manifest, timeout_s=20))
        assert engine.peer is not None and engine.peer.joined

        # alive but never sending: the deadline, named
        started = time.monotonic()
        with pytest.raises(
            WeightSyncTimeoutError, match=r"rollout actor rollout-3: weight sync to version 5"
        ):
            asyncio.run(receiver.receive(engine, manifest, timeout_s=1.5))
        assert time.monotonic() - started < 6

        # re-joined (the group was dropped), then the learner dies: a clear error, well before 30 s
        asyncio.run(receiver.attach(engine, manifest, timeout_s=20))
        os.kill(learner.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WeightSyncError, match=r"rollout-3: .*collective receive from learner rank 0"):
            asyncio.run(receiver.receive(engine, manifest, timeout_s=30))
        assert time.monotonic() - started < 10
    finally:
        if learner.is_alive():
            learner.kill()
        learner.join(10)


def late_peer_main(endpoint: tuple[str, int], rank: int, min_version: int, delay_s: float, out: Any) -> None:
    """A restarted engine rank: joins, stays silent ``delay_s`` (its engine still starting), then receives."""
    peer = CollectivePeer(endpoint, rank)
    peer.join(30)
    out.put(("joined", os.getpid()))
    time.sleep(delay_s)
    got: dict[str, torch.Tensor] = {}
    version, tensors = peer.receive(
        min_version,
        30,
        load=lambda ws: got.update({n: w.clone() for n, w in ws}),
        begin=lambda: None,
        finish=lambda: None,
    )
    out.put((version, tensors, [], as_bytes(got)))


def test_a_dead_or_slow_joiner_never_stalls_publication_to_a_healthy_peer() -> None:
    """The e2e failure: rank 0 re-tried the dead peer's old rendezvous and held the publish lock through
    a joiner's catch-up, so the healthy peer waited a whole deadline per sync."""
    publisher = CollectiveWeightPublisher(1024, "127.0.0.1", {1: "rollout-0", 2: "rollout-1"}, timeout_s=15)
    healthy_out, late_out = SPAWN.Queue(), SPAWN.Queue()
    try:
        healthy = SPAWN.Process(
            target=peer_main, args=(publisher.endpoint, 1, [1, 2, 3, 4, 5], healthy_out), daemon=True
        )
        doomed = SPAWN.Process(target=peer_main, args=(publisher.endpoint, 2, [1, 2], late_out), daemon=True)
        healthy.start()
        doomed.start()
        expect(healthy_out, "joined")
        doomed_pid = expect(late_out, "joined")
        deadline = time.monotonic() + 20
        while publisher.linked_peers() != {1: 0, 2: 0}:
            assert time.monotonic() < deadline, "the join watcher never linked both peers"
            time.sleep(0.05)
        publisher.publish(1, iter(weights(1)))
        assert expect(healthy_out, "stream")[0] == 1 and expect(late_out, "stream")[0] == 1

        os.kill(doomed_pid, signal.SIGKILL)
        doomed.join(10)
        for version in (2, 3):  # 2 finds the peer dead; 3 must not rendezvous with its old key again
            started = time.monotonic()
            manifest = publisher.publish(version, iter(weights(version)))
            assert time.monotonic() - started < 5, (version, manifest.failed_peers)
            assert expect(healthy_out, "stream")[0] == version
        assert publisher.linked_peers() == {1: 3}

        # its restart joins but receives only 12 s later (engine start-up): rank 0's catch-up waits
        # for it outside the lock, so versions 4 and 5 reach the healthy peer at once meanwhile
        late = SPAWN.Process(
            target=late_peer_main, args=(publisher.endpoint, 2, 5, 12.0, late_out), daemon=True
        )
        late.start()
        expect(late_out, "joined")
        time.sleep(1.0)  # the watcher has started the catch-up of version 3
        for version in (4, 5):
            started = time.monotonic()
            publisher.publish(version, iter(weights(version)))
            assert time.monotonic() - started < 5
            got_version, _, _, got = expect(healthy_out, "stream")
            assert got_version == version and torch.equal(got["a.weight"], weights(version)[0][1])
        # the joiner gets 3 (staged when it joined), then 5 (staged meanwhile), exact
        got_version, tensors, _, got = expect(late_out, "stream", timeout_s=40)
        assert (got_version, tensors) == (5, 5)
        for name, tensor in weights(5):
            assert torch.equal(got[name], tensor), name
        deadline = time.monotonic() + 10
        while publisher.linked_peers() != {1: 5, 2: 5}:
            assert time.monotonic() < deadline, publisher.linked_peers()
            time.sleep(0.05)
        late.join(10)
        healthy.join(10)
    finally:
        publisher.close()
