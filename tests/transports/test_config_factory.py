"""The weight-sync config and the one factory for both ends."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from transports.collective import CollectiveWeightPublisher, CollectiveWeightReceiver
from transports.config import WeightSyncConfig
from transports.factory import engine_peers, make_publisher, make_receiver
from transports.ray_bytes import BytesWeightPublisher, BytesWeightReceiver


def test_nccl_is_a_clear_error_naming_collective() -> None:
    with pytest.raises(ValidationError, match="'nccl' is now 'collective'.*transport=collective"):
        WeightSyncConfig(transport="nccl")


def test_engine_peers_number_every_tp_rank_after_rank_zero() -> None:
    # 2 actors x TP 2: actor 0 owns engine ranks 1, 2; actor 1 owns 3, 4 (rank 0 is the learner)
    assert engine_peers(2, 2) == {1: "rollout-0", 2: "rollout-0", 3: "rollout-1", 4: "rollout-1"}


def test_factory_builds_both_ends_of_each_transport() -> None:
    cfg = WeightSyncConfig(bucket_bytes=4096, timeout_s=5)
    publisher = make_publisher(cfg, host="127.0.0.1", num_actors=1)
    assert isinstance(publisher, BytesWeightPublisher) and publisher.announcement() is None
    assert isinstance(make_receiver(cfg, "rollout-0", rank_offset=1), BytesWeightReceiver)

    cfg = cfg.model_copy(update={"transport": "collective"})
    publisher = make_publisher(cfg, host="127.0.0.1", num_actors=2)
    try:
        assert isinstance(publisher, CollectiveWeightPublisher)
        assert publisher.peers == {1: "rollout-0", 2: "rollout-1"}
        announced = publisher.announcement()
        assert announced.transport == "collective" and announced.endpoint == publisher.endpoint
        assert (
            announced.for_version(7).version == 7 and announced.for_version(7).endpoint == publisher.endpoint
        )
        # no peer joined: publishing sends nothing and fails no one (late joiners catch up)
        manifest = publisher.publish(1, [("w", torch.ones(3))])
        assert manifest.num_tensors == 1 and manifest.failed_peers == ()
    finally:
        publisher.close()
    receiver = make_receiver(cfg, "rollout-1", rank_offset=2)
    assert isinstance(receiver, CollectiveWeightReceiver) and receiver.rank_offset == 2
