"""AReaL capacity rule, worked by hand."""

from __future__ import annotations

import pytest

from actors.admission import AdmissionRule


def test_capacity_rule() -> None:
    rule = AdmissionRule(max_staleness=2, batch_groups=4)
    # capacity at version 0 = (2 + 0 + 1) * 4 = 12 groups accepted or in flight.
    assert rule.capacity_groups(0) == 12
    assert rule.admits(0, accepted_groups=8, in_flight_groups=3)  # 8 + 3 + 1 = 12 <= 12
    assert not rule.admits(0, accepted_groups=8, in_flight_groups=4)  # 13 > 12
    # one learner version later capacity grows by one batch: (2 + 1 + 1) * 4 = 16.
    assert rule.admits(1, accepted_groups=8, in_flight_groups=4)
    # sync mode (max_staleness 0): one batch ahead only.
    assert AdmissionRule(0, 4).capacity_groups(3) == 16


def test_rejects_bad_constants() -> None:
    with pytest.raises(ValueError):
        AdmissionRule(-1, 4)
    with pytest.raises(ValueError):
        AdmissionRule(0, 0)
