"""A ``Learner.train_step`` result built by the learner's own code, without a model or DeepSpeed.

``train_step`` ends with ``_table_metrics`` (staleness, reward, lengths of the table),
``_reduce_metrics`` (the cross-rank reduction that also appends the clip thresholds) and
``_host_metrics`` (grad norm, lr, step counters). This module runs those three real methods on a
real rollout table, with the per-token loss and entropy metrics (every name of
``learner.losses.METRIC_REDUCTIONS`` and ``learner.engine.LEARNER_METRIC_REDUCTIONS``) set to
seeded random values, so the driver's tests see exactly the keys the learner emits.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import torch

from buffers.schema import records_to_table
from learner.batch import table_to_batch
from learner.clipping import ClipThresholds
from learner.config import LearnerConfig
from learner.critic import CRITIC_METRIC_REDUCTIONS
from learner.engine import LEARNER_METRIC_REDUCTIONS, Learner, LearnerState
from learner.losses import METRIC_REDUCTIONS
from tests.buffers.conftest import group_records


def rollout_table(rng: np.random.Generator, version_starts: list[int], group_size: int = 2) -> pa.Table:
    """One valid group of ``group_size`` rows per entry of ``version_starts`` (its behaviour version)."""
    records = [r for g, v in enumerate(version_starts) for r in group_records(f"g{g}", group_size, v, rng)]
    return records_to_table(records)


def train_step_metrics(
    seed: int,
    policy_version: int,
    version_starts: list[int],
    max_staleness: int = 2,
    clip: bool = True,
    grad_norm: float | None = 0.5,
    critic: bool = False,
) -> dict[str, float]:
    """The dict ``Learner.train_step`` would return (``driftrl_learner_*`` keys, floats).

    Args:
        seed: seeds the table and the random per-token metric values.
        policy_version: the learner's version; staleness of a row is this minus its version.
        version_starts: behaviour version of each group (two rows per group).
        max_staleness: the learner's ``max_staleness`` (number of staleness bins).
        clip: include the clip thresholds (a run with an entropy clip method).
        grad_norm: ``None`` = a skipped step (the learner reports NaN).
        critic: include the critic's metrics (``loss.advantage = gae``: every name of
            ``learner.critic.CRITIC_METRIC_REDUCTIONS`` and ``value_grad_norm``).
    """
    rng = np.random.default_rng(seed)
    learner = SimpleNamespace(
        state=LearnerState(step=seed + 10, policy_version=policy_version, skipped_steps=seed % 3),
        cfg=LearnerConfig(max_staleness=max_staleness),
    )
    batch = table_to_batch(rollout_table(rng, version_starts))
    # distinct values per key so that a key exported under another key's name is caught
    tensors = {
        name: torch.tensor(float(rng.uniform(0.01, 0.99)))
        for name in [
            *METRIC_REDUCTIONS,
            *LEARNER_METRIC_REDUCTIONS,
            *(CRITIC_METRIC_REDUCTIONS if critic else ()),
        ]
    }
    tensors["driftrl_learner_train_tokens"] = batch.response_mask.sum().float()
    tensors.update(Learner._table_metrics(learner, batch))
    thresholds = None
    if clip:
        center, bound, cutoff = (torch.tensor(v, dtype=torch.float64) for v in rng.uniform(0.1, 5.0, 3))
        thresholds = ClipThresholds("clip_v", "negative_lower", center, bound, torch.tensor(40.0), cutoff)
    floats = Learner._reduce_metrics(learner, tensors, thresholds)
    seconds = float(rng.uniform(0.5, 2.0))
    floats.update(
        Learner._host_metrics(
            learner,
            applied=grad_norm is not None,
            grad_norm=grad_norm,
            lr=float(rng.uniform(1e-7, 1e-5)),
            seconds=seconds,
            train_tokens=floats["driftrl_learner_train_tokens"],
        )
    )
    if critic:
        # train_step adds the critic's grad norm after the host metrics (NaN when skipped)
        floats["driftrl_learner_value_grad_norm"] = (
            float(rng.uniform(1.01, 1.99)) if grad_norm is not None else math.nan
        )
    nan_when_skipped = ("driftrl_learner_grad_norm", "driftrl_learner_value_grad_norm")
    assert all(math.isfinite(v) for k, v in floats.items() if k not in nan_when_skipped)
    return floats
