"""Weight transports on CPU: ``collective`` (gloo) vs ``ray_bytes`` vs an in-process memcpy of the same bytes.

What one sync costs from the learner's tensors to the bytes lying in the receiving process (a Ray
actor standing in for the vLLM worker; the engine's own load, the same for both transports, is
left out: ``benchmarks/rollout.py`` measures it):

* ``ray_bytes``: ``BytesWeightPublisher.publish`` (one ``ray.put`` per bucket) and, in the actor,
  ``BytesWeightReceiver.receive`` (``ray.get`` of each bucket, a copy into the shared region);
* ``collective``: the actor waits in ``CollectivePeer.receive`` while
  ``CollectiveWeightPublisher.publish`` packs each bucket and broadcasts it over the pair group;
* ``memcpy``: ``dst.copy_(src)`` of the same bytes in one process, the floor.

Sizes 5, 68 and 271 MB of float32 tensors of at most 4 MiB each (a 7B layer's parts are 4-260 MB;
small tensors are the harder case for per-call overheads), 64 MiB buckets (the default). Each
figure is the median of ``--repeats`` syncs after one warm-up. The final line is the ratio
ray_bytes / collective seconds at 271 MB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SIZES_MB = (5, 68, 271)
TENSOR_FLOATS = 1 << 20  # 4 MiB per tensor
BUCKET_BYTES = 64 << 20
VERSIONS = [0]


def model_tensors(megabytes: float, seed: int) -> list[tuple[str, torch.Tensor]]:
    """float32 tensors totalling ``megabytes`` MB (10**6 bytes), at most 4 MiB each."""
    floats = int(megabytes * 1e6) // 4
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    while floats > 0:
        n = min(TENSOR_FLOATS, floats)
        tensors.append((f"layers.{len(tensors)}.weight", torch.randn(n, generator=gen)))
        floats -= n
    return tensors


class Sink:
    """The receiving process: both transports' receiving ends, the engine replaced by nothing."""

    def __init__(self) -> None:
        from transports.ray_bytes import BytesWeightReceiver

        self.bytes_receiver = BytesWeightReceiver("sink")
        self.peer: Any = None

    async def _layout_engine(self, method: str, args: tuple, timeout_s: float) -> list[Any]:
        from actors.vllm_extension import sequential_layout

        if method == "driftrl_begin_sync":
            offsets, region_bytes = sequential_layout(args[0])
            return [{"mode": "sink", "reason": None, "offsets": offsets, "region_bytes": region_bytes}]
        if method == "driftrl_load_shared":
            return [len(self._specs[args[1]])]
        return [{}]

    async def receive_bytes(self, manifest: Any) -> int:
        # an async method makes this an async Ray actor: the blocking ones below run on its loop, alone
        self._specs = [b.names for b in manifest.buckets]
        return await self.bytes_receiver.receive(self._layout_engine, manifest, timeout_s=120)

    def join(self, endpoint: tuple[str, int]) -> None:
        from transports.collective import CollectivePeer

        self.peer = CollectivePeer(endpoint, 1)
        self.peer.join(60)

    def receive_collective(self, version: int) -> tuple[int, int]:
        return self.peer.receive(
            version, 120, load=lambda weights: None, begin=lambda: None, finish=lambda: None
        )


def median_seconds(run: Any, repeats: int) -> float:
    run()  # warm-up: first-touch pages, connections, the store's first segment
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_size(megabytes: float, sink: Any, collective: Any, repeats: int) -> dict[str, float]:
    import ray

    from transports.ray_bytes import BytesWeightPublisher

    tensors = model_tensors(megabytes, seed=int(megabytes))
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    source = torch.cat([t for _, t in tensors])
    destination = torch.empty_like(source)
    destination.copy_(source)  # first touch outside the timing
    memcpy_s = median_seconds(lambda: destination.copy_(source), repeats)

    bytes_publisher = BytesWeightPublisher(BUCKET_BYTES, use_object_store=True)
    # one counter over every size: the collective publisher sends only versions newer than a peer has
    version = VERSIONS

    def ray_bytes_sync() -> None:
        version[0] += 1
        manifest = bytes_publisher.publish(version[0], tensors)
        assert ray.get(sink.receive_bytes.remote(manifest), timeout=300) == len(tensors)

    def collective_sync() -> None:
        version[0] += 1
        waiting = sink.receive_collective.remote(version[0])
        manifest = collective.publish(version[0], tensors)
        assert manifest.failed_peers == (), manifest.failed_peers
        assert ray.get(waiting, timeout=300) == (version[0], len(tensors))

    ray_bytes_s = median_seconds(ray_bytes_sync, repeats)
    collective_s = median_seconds(collective_sync, repeats)
    return {
        "megabytes": total / 1e6,
        "memcpy_s": memcpy_s,
        "ray_bytes_s": ray_bytes_s,
        "collective_s": collective_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 MB and 3 MB, one repeat (CI)")
    parser.add_argument("--repeats", type=int, default=5, help="timed syncs per figure (median)")
    args = parser.parse_args()
    sizes = (2, 3) if args.quick else SIZES_MB  # two sizes: the version counter spans sizes
    repeats = 1 if args.quick else args.repeats

    import ray

    from transports.collective import CollectiveWeightPublisher

    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=2 << 30)
    collective = CollectiveWeightPublisher(BUCKET_BYTES, "127.0.0.1", {1: "sink"}, timeout_s=120)
    try:
        sink = ray.remote(num_cpus=1)(Sink).remote()
        ray.get(sink.join.remote(collective.endpoint), timeout=120)
        rows = [bench_size(mb, sink, collective, repeats) for mb in sizes]
    finally:
        collective.close()
        ray.shutdown()

    print(
        f"{'MB':>7} {'memcpy s':>9} {'ray_bytes s':>12} {'collective s':>13} {'ray_bytes/coll':>15} "
        f"{'memcpy/coll':>12} {'memcpy/ray':>11}"
    )
    for row in rows:
        print(
            f"{row['megabytes']:7.1f} {row['memcpy_s']:9.4f} {row['ray_bytes_s']:12.4f} {row['collective_s']:13.4f} "
            f"{row['ray_bytes_s'] / row['collective_s']:15.2f} {row['memcpy_s'] / row['collective_s']:12.3f} "
            f"{row['memcpy_s'] / row['ray_bytes_s']:11.3f}"
        )
    last = rows[-1]
    ratio = last["ray_bytes_s"] / last["collective_s"]
    print(
        json.dumps(
            {
                "metric": "collective_vs_ray_bytes_271mb",
                "value": round(ratio, 3),
                "goal": ">= 3",
                "met": ratio >= 3,
                "megabytes": round(last["megabytes"], 1),
                "collective_s": round(last["collective_s"], 4),
                "ray_bytes_s": round(last["ray_bytes_s"], 4),
                "memcpy_s": round(last["memcpy_s"], 4),
                "by_size": [{k: round(v, 4) for k, v in row.items()} for row in rows],
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
