"""Ray shell of the learner: one actor per data-parallel rank (STYLE rule 3: Ray at the edge).

:func:`launch_learners` reserves a placement group of ``data_parallel_size`` bundles, starts one
:class:`LearnerActor` per bundle, lets rank 0 pick the rendezvous address (its node IP and a free
port there), then builds every rank's :class:`learner.engine.Learner` at once (the DeepSpeed
initialisation is a collective). Every call that reaches the engine must go to all ranks:
:func:`call_all` does that and returns the per-rank results.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner.config import LearnerConfig
from learner.cpu_pinning import cores_per_rank, pin_process, process_cores, rank_cores
from transports.config import WeightSyncConfig


def _free_port(host: str) -> int:
    """A TCP port free on ``host`` now (bound to 0, then released for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name: a cluster's
        return address == "localhost"


def _init_loopback_process_group(
    cfg: LearnerConfig, host: str, port: int, rank: int, world_size: int
) -> None:
    """torch.distributed on loopback only (local Ray), before the Learner would start it on every interface.

    torch's ``TCPStore`` server listens on every interface unless it is handed a listening socket,
    and gloo/NCCL pick their interface from the host name: rank 0 hands the store a socket bound to
    ``host`` and the collectives are pinned to ``lo``. The Learner then finds the process group
    initialised and leaves it as it is.
    """
    import datetime

    import torch.distributed as dist

    from learner.engine import process_group_backend

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    listen_fd = None
    if rank == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        listen_fd = sock.detach()  # the store owns it from here
    store = dist.TCPStore(
        host, port, world_size, rank == 0, datetime.timedelta(seconds=600), master_listen_fd=listen_fd
    )
    dist.init_process_group(process_group_backend(cfg), store=store, rank=rank, world_size=world_size)


class LearnerActor:
    """Holds one :class:`learner.engine.Learner`; built in two phases because rank 0 picks the address."""

    def __init__(
        self,
        cfg: LearnerConfig,
        model_path: str,
        rank: int,
        world_size: int,
        seed: int = 0,
        deepspeed_overrides: Mapping[str, Any] | None = None,
        cpus: list[int] | None = None,
    ) -> None:
        self.args = (cfg, model_path, rank, world_size, seed, deepspeed_overrides)
        self.cpus = cpus
        self.learner = None
        self.publisher: Any = None  # rank 0's weight publisher (transports.factory)

    def pid(self) -> int:
        """This rank's process id (fault tests kill it; operators attach profilers)."""
        return os.getpid()

    def cores(self) -> dict[int, list[int]]:
        """Each thread's CPU affinity in this rank's process (``run.pin_learner_cpus`` checks)."""
        return process_cores()

    def rendezvous_address(self) -> tuple[str, int]:
        """``(node IP, free port)`` of this actor's node; asked of rank 0 only.

        On local Ray the node IP is 127.0.0.1 (driftrl.pipeline starts it on loopback), so the
        rendezvous stays on loopback too; on a cluster it is the node's address the others reach.
        """
        host = ray.util.get_node_ip_address()
        return host, _free_port(host)

    def setup(self, master_addr: str, master_port: int) -> None:
        """Set the torch.distributed env and build the learner (all ranks concurrently)."""
        from learner.engine import Learner

        cfg, model_path, rank, world_size, seed, overrides = self.args
        if self.cpus:
            # before the engine exists: the threads gloo, DeepSpeed and torch start inherit the cores
            pin_process(self.cpus)
        gpu_ids = ray.get_gpu_ids()
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            # Ray exposes exactly the bundle's GPU(s) to the actor, so the local device is 0
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        if not gpu_ids:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if _is_loopback(master_addr):
            _init_loopback_process_group(cfg, master_addr, master_port, rank, world_size)
        self.learner = Learner(cfg, model_path, rank, world_size, seed=seed, deepspeed_overrides=overrides)

    def open_weight_publisher(self, cfg: WeightSyncConfig, num_actors: int, tensor_parallel_size: int) -> Any:
        """Build the weight publisher here (rank 0 only) and return its announcement (None: pull transport).

        It lives in this process for the run: a push transport holds its groups and its store here.
        """
        from transports.factory import make_publisher

        host = ray.util.get_node_ip_address()
        self.publisher = make_publisher(
            cfg, host=host, num_actors=num_actors, tensor_parallel_size=tensor_parallel_size
        )
        return self.publisher.announcement()

    def publish_weights(self, version: int) -> Any:
        """``Learner.publish_weights`` through this rank's publisher (all ranks call; rank 0 publishes)."""
        if self.learner is None:
            raise RuntimeError("LearnerActor.setup() has not run")
        return self.learner.publish_weights(self.publisher, version)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``Learner.<method>(*args, **kwargs)`` (train_step, publish_weights, save_checkpoint, ...)."""
        if self.learner is None:
            raise RuntimeError("LearnerActor.setup() has not run")
        return getattr(self.learner, method)(*args, **kwargs)


@dataclass
class LearnerGroup:
    """The launched ranks and their placement group (rank ``i`` is ``actors[i]``)."""

    actors: list[Any]
    placement_group: PlacementGroup

    def shutdown(self) -> None:
        """Kill this group's actors (by handle) and release the placement group."""
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.placement_group)


def launch_learners(
    cfg: LearnerConfig,
    model_path: str,
    seed: int = 0,
    deepspeed_overrides: Mapping[str, Any] | None = None,
    placement_strategy: str = "PACK",
    ready_timeout_s: float = 600.0,
    cpus: list[int] | None = None,
) -> LearnerGroup:
    """Start ``cfg.data_parallel_size`` learner ranks, one Ray actor each, ready to train.

    Args:
        cfg: the learner sub-config (``num_cpus``/``num_gpus`` size each bundle).
        model_path: Hugging Face model directory, readable from every node.
        seed: base seed (rank ``r`` seeds with ``seed + r``).
        deepspeed_overrides: merged into every rank's DeepSpeed config.
        placement_strategy: Ray placement strategy of the bundles; on GPU clusters use
            ``STRICT_PACK`` per node (DESIGN.md) or ``PACK``.
        ready_timeout_s: deadline for the placement group and the engines to come up.
        cpus: local cores for the ranks to pin themselves to, ``ceil(cfg.num_cpus)`` each in rank order
            (``run.pin_learner_cpus``, :mod:`learner.cpu_pinning`); None leaves affinity alone.

    Raises:
        TimeoutError: the placement group could not be reserved in time (names the bundles).
    """
    world_size = cfg.data_parallel_size
    bundle = {"CPU": cfg.num_cpus, **({"GPU": cfg.num_gpus} if cfg.num_gpus > 0 else {})}
    group = placement_group([dict(bundle) for _ in range(world_size)], strategy=placement_strategy)
    ready, _ = ray.wait([group.ready()], timeout=ready_timeout_s)
    if not ready:
        remove_placement_group(group)
        raise TimeoutError(
            f"placement group of {world_size} learner bundles {bundle} ({placement_strategy}) not ready "
            f"after {ready_timeout_s:.0f} s: the cluster lacks the resources"
        )
    remote_cls = ray.remote(LearnerActor)
    env = {"DS_ACCELERATOR": "cpu"} if cfg.num_gpus == 0 else {}
    actors = [
        remote_cls.options(
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
            runtime_env={"env_vars": env},
        ).remote(
            cfg,
            model_path,
            rank,
            world_size,
            seed,
            deepspeed_overrides,
            None if cpus is None else rank_cores(cpus, rank, cores_per_rank(cfg.num_cpus)),
        )
        for rank in range(world_size)
    ]
    launched = LearnerGroup(actors=actors, placement_group=group)
    try:
        master_addr, master_port = ray.get(actors[0].rendezvous_address.remote(), timeout=ready_timeout_s)
        ray.get([a.setup.remote(master_addr, master_port) for a in actors], timeout=ready_timeout_s)
    except BaseException:
        launched.shutdown()
        raise
    return launched


def call_all(
    group: LearnerGroup, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any
) -> list[Any]:
    """Call ``Learner.<method>`` on every rank with the same arguments; per-rank results in rank order.

    Large arguments (a table) are put in the object store once, not once per rank.
    """
    refs = [ray.put(a) for a in args]
    return ray.get([actor.call.remote(method, *refs, **kwargs) for actor in group.actors], timeout=timeout_s)
