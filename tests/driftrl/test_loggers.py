"""TensorBoard and offline W&B loggers: what a run logs is read back from the files they write."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from driftrl.config import ConfigError, load_config
from driftrl.loggers import EXTRAS, TENSORBOARD_DIR, check_installed, open_loggers

# three learner steps as the driver appends them; NaN (a step without a probe) must be left out
ROWS = [
    {"step": 1.0, "reward_mean": 0.25, "entropy_mean": 1.5, "probe_entropy": math.nan},
    {"step": 2.0, "reward_mean": 0.5, "entropy_mean": 1.25, "probe_entropy": 0.75},
    {"step": 3.0, "reward_mean": 0.75, "entropy_mean": 1.0, "probe_entropy": math.nan},
]


def _log_all(names: list[str], run_dir: Path) -> None:
    loggers = open_loggers(names, run_dir, "tiny", {"learner": {"lr": 3e-5}}, "driftrl-test")
    for row in ROWS:
        for logger in loggers:
            logger.log(row, int(row["step"]))
    for logger in loggers:
        logger.close()


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    _log_all(["tensorboard"], tmp_path)
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    assert set(events.Tags()["tensors"]) == {"reward_mean", "entropy_mean", "probe_entropy"}

    def read(tag: str) -> list[tuple[int, float]]:
        return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]

    # these values are exact in float32, TensorBoard's scalar type
    assert read("reward_mean") == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert read("probe_entropy") == [(2, 0.75)]


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    LevelDB log blocks of 32 KiB, each record a 7-byte header (crc32, length, type) and its bytes;
    type 1 is a whole record, 2/3/4 its first/middle/last fragment."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def _key(item: object) -> str:
    # wandb-core writes a key either flat or as its nested path
    return item.key or "/".join(item.nested_key)  # type: ignore[attr-defined]


def test_wandb_offline_history_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_all(["wandb"], tmp_path)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for raw in _wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind in ("config", "run"):
            update = record.config.update if kind == "config" else record.run.config.update
            config.update({_key(item): json.loads(item.value_json) for item in update})
    logged = [{k: v for k, v in h.items() if not k.startswith("_")} for h in history]
    assert logged == [
        {"reward_mean": 0.25, "entropy_mean": 1.5},
        {"reward_mean": 0.5, "entropy_mean": 1.25, "probe_entropy": 0.75},
        {"reward_mean": 0.75, "entropy_mean": 1.0},
    ]
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert config["learner"] == {"lr": 3e-5}


def test_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r"pip install 'driftrl\[wandb\]'"):
        check_installed(["wandb"])
    assert set(EXTRAS) == {"tensorboard", "wandb"}


def test_loggers_config() -> None:
    cfg = load_config(None, ["metrics.loggers=[tensorboard, wandb]"])
    assert cfg.metrics.loggers == ("tensorboard", "wandb")
    with pytest.raises(ConfigError, match="metrics.loggers"):
        load_config(None, ["metrics.loggers=[mlflow]"])
    with pytest.raises(ConfigError, match="once"):
        load_config(None, ["metrics.loggers=[wandb, wandb]"])
