"""One factory for both ends of the configured weight transport."""

from __future__ import annotations

from transports.base import WeightPublisher, WeightReceiver
from transports.config import WeightSyncConfig


def engine_peers(num_actors: int, tensor_parallel_size: int) -> dict[int, str]:
    """Engine rank (1, 2, ...) -> rollout actor id: actor ``i``'s TP rank ``t`` is ``1 + i * tp + t``."""
    return {
        1 + actor * tensor_parallel_size + tp_rank: f"rollout-{actor}"
        for actor in range(num_actors)
        for tp_rank in range(tensor_parallel_size)
    }


def make_publisher(
    cfg: WeightSyncConfig, *, host: str, num_actors: int, tensor_parallel_size: int = 1
) -> WeightPublisher:
    """The learner rank 0 end.

    Args:
        cfg: the weight-sync config.
        host: address of this process that the rollout engines reach (collective: the store and
            the group bind there only; ray_bytes ignores it).
        num_actors: rollout actors.
        tensor_parallel_size: engine ranks per actor.
    """
    if cfg.transport == "collective":
        from transports.collective import CollectiveWeightPublisher

        return CollectiveWeightPublisher(
            cfg.bucket_bytes, host, engine_peers(num_actors, tensor_parallel_size), cfg.timeout_s
        )
    from transports.ray_bytes import BytesWeightPublisher

    return BytesWeightPublisher(cfg.bucket_bytes)


def make_receiver(cfg: WeightSyncConfig, actor_id: str, rank_offset: int) -> WeightReceiver:
    """The rollout actor end (``rank_offset``: engine rank of the actor's TP rank 0, see :func:`engine_peers`)."""
    if cfg.transport == "collective":
        from transports.collective import CollectiveWeightReceiver

        return CollectiveWeightReceiver(actor_id, rank_offset)
    from transports.ray_bytes import BytesWeightReceiver

    return BytesWeightReceiver(actor_id)
