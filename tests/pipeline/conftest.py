"""Shared inputs of the pipeline tests: a tiny model and the synthetic task, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from driftrl.config import DriftConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained tiny model and a small reversal dataset (plumbing tests need no warm start)."""
    from tasks.synthetic import write_dataset
    from tasks.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("pipeline-inputs")
    model = make_tiny_model(root / "model", seed=0)
    train, heldout = root / "train.parquet", root / "heldout.parquet"
    write_dataset(train, heldout, seed=0, n_train=2000, n_heldout=64)
    return {"model": Path(model), "train": train, "heldout": heldout}


def tiny_config(tiny_inputs: dict[str, Path], root: Path, *overrides: str) -> DriftConfig:
    """configs/tiny-cpu.yaml pointed at the session's model/data and a private run root."""
    return load_config(
        REPO_ROOT / "configs" / "tiny-cpu.yaml",
        [
            f"run.root_dir={root}",
            f"model.path={tiny_inputs['model']}",
            "model.tiny=false",
            f"task.train_path={tiny_inputs['train']}",
            f"task.eval_path={tiny_inputs['heldout']}",
            "metrics.port=0",
            # an untrained model answers nothing exactly; partial credit gives the groups a signal
            "rollout.reward.type=partial_match",
            *overrides,
        ],
    )


# the smallest run in which every process is up by step 2 (Ray, buffer, learner, vLLM engine)
THREE_SMALL_STEPS = (
    "learner.total_steps=3",
    "learner.checkpoint_interval=3",
    "learner.groups_per_step=2",
    "rollout.group_size=4",
    "metrics.probe_prompts=4",
)
