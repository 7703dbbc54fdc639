"""Staleness-aware admission of new rollouts (AReaL's capacity rule).

A rollout actor starts a new group only while

    (max_staleness + learner_version + 1) * batch_groups >= accepted_groups + in_flight_groups + 1

i.e. the invariant ``accepted + in_flight <= capacity`` holds after the submission. ``capacity``
is everything the learner can consume before the oldest of it becomes too stale: at learner version
``v`` the learner has taken ``v * batch_groups`` groups (one batch per version with
``sync_interval = 1``) and may still use ``max_staleness + 1`` batches' worth. Work beyond that
would only be dropped at sample time (AReaL, arXiv:2505.24298, Sec. 5.1).

Who knows what: the learner version and the buffer's accepted count live in the driver; it passes
them to :meth:`actors.rollout.RolloutWorker.generate_step` (or ``set_learner_version``). Between
two updates the worker adds its own pushes to ``accepted_groups``, so it errs on the side of
producing less. With R actors each one only sees its own in-flight groups, so the fleet may
overshoot capacity by at most ``(R - 1) * max_in_flight_groups`` groups.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionRule:
    """The capacity rule's two constants.

    Attributes:
        max_staleness: most policy versions a row may lag the learner (learner config).
        batch_groups: groups the learner consumes per policy version
            (``groups_per_step * sync_interval``).
    """

    max_staleness: int
    batch_groups: int

    def __post_init__(self) -> None:
        if self.max_staleness < 0 or self.batch_groups < 1:
            raise ValueError(f"need max_staleness >= 0 and batch_groups >= 1, got {self}")

    def capacity_groups(self, learner_version: int) -> int:
        """Groups that may be accepted or in flight in total at ``learner_version``."""
        return (self.max_staleness + learner_version + 1) * self.batch_groups

    def admits(self, learner_version: int, accepted_groups: int, in_flight_groups: int) -> bool:
        """Whether one more group may start now."""
        return accepted_groups + in_flight_groups + 1 <= self.capacity_groups(learner_version)
