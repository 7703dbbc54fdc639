"""Loud checks for bad entries (NaN, inf, out-of-range ids) in the learner's tensors.

Its own module so that both token-statistics paths (the streamed one in :mod:`learner.entropy`
and the fused kernel in :mod:`learner.fused_stats`, which the former dispatches to) share one
check without importing each other.
"""

from __future__ import annotations

import torch
from torch import Tensor


def raise_on_bad_values(checks: dict[str, Tensor]) -> None:
    """Raise ``ValueError`` naming the first tensor with a bad entry and where it is.

    Args:
        checks: name (with what is wrong, e.g. ``"logits (non-finite)"``) -> bool tensor that is
            True at bad entries. All are reduced in one device sync, so a caller with several
            checks pays one host round-trip, not one per tensor.
    """
    if not checks:
        return
    if not bool(torch.stack([bad.any() for bad in checks.values()]).any()):
        return
    for name, bad in checks.items():
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name}: {int(bad.sum())} bad entries, first at index {where}")
