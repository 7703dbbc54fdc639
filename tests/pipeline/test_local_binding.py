"""Local mode listens on loopback only: Ray, the learner rendezvous, vLLM and the metrics server."""

from __future__ import annotations

import ipaddress

import psutil
import pytest

from driftrl.pipeline import train
from tests.pipeline.conftest import THREE_SMALL_STEPS, tiny_config

pytestmark = pytest.mark.slow


def listening_sockets() -> dict[tuple[str, int], str]:
    """``(address, port) -> process`` for every TCP listener of this process and its descendants
    (local Ray's GCS and raylet are children of the driver, its workers children of the raylet)."""
    me = psutil.Process()
    found = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    # the process name and the executable's base name: a long install path must not
                    # cut "gcs_server" off a truncated command line
                    argv = proc.cmdline()
                    found[(conn.laddr.ip, conn.laddr.port)] = " ".join(
                        [proc.name(), *(part.rsplit("/", 1)[-1] for part in argv[:2])]
                    )
        except psutil.Error:
            pass  # ended meanwhile
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_nothing_of_a_local_run_listens_beyond_loopback(tiny_inputs, tmp_path):
    cfg = tiny_config(tiny_inputs, tmp_path / "runs", *THREE_SMALL_STEPS)
    # listeners this test process already had (a gloo store or server left by an earlier test in the
    # same session) are not the run's: only sockets opened during the run are judged
    before = set(listening_sockets())
    seen: dict[tuple[str, int], str] = {}

    def on_step(driver, row) -> None:
        if int(row["step"]) == 2:  # every process up: Ray, buffer, learner, vLLM engine, metrics
            seen.update(listening_sockets())

    train(cfg, progress=False, on_step=on_step)
    names = " ".join(seen.values())
    # the census saw the parts it is about (it can fail): Ray's GCS and raylet, the learner, vLLM
    assert "gcs_server" in names and "raylet" in names and "LearnerActor" in names, seen
    exposed = {
        where: proc for where, proc in seen.items() if not is_loopback(where[0]) and where not in before
    }
    assert exposed == {}
