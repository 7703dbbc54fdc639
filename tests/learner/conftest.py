"""Fixtures shared by the learner's in-process DeepSpeed tests (test_engine.py, test_critic.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tasks.tiny_model import make_tiny_model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="package")
def distributed_env():
    """A single-rank torch.distributed env for the learner tests; env and process group undone after
    them, so later test packages (vLLM, Ray) do not inherit a rank.

    One per package, not per module: DeepSpeed caches the world group, and a second group made in
    the same process after the first was destroyed is "not registered" to it.
    """
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as env:
        env.setenv("DS_ACCELERATOR", "cpu")
        for key, value in {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
        }.items():
            env.setenv(key, value)
        env.setenv("MASTER_PORT", str(_free_port()))
        yield
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
