"""The EntroPIC-style PI controller of the advantage-sign weights, worked by hand."""

from __future__ import annotations

import pytest

from learner.config import EntropyControlConfig
from learner.entropy_control import EntropyController


def test_pi_control_moves_the_weights_with_the_error_and_clamps_them():
    cfg = EntropyControlConfig(
        target_entropy=2.0, kp=0.5, ki=0.25, integral_limit=1.5, weight_min=0.1, weight_max=1.8
    )
    ctl = EntropyController(cfg, (1.0, 1.0))
    assert ctl.weights() == (1.0, 1.0)
    # entropy 1.6 < target: e = 0.4, I = 0.4, u = 0.2 + 0.1 = 0.3 -> w+ 0.7, w- 1.3 (raise entropy)
    ctl.observe(1.6)
    assert ctl.weights() == pytest.approx((0.7, 1.3))
    # e = 1.0, I = 1.4, u = 0.5 + 0.35 = 0.85 -> w+ 0.15, w- 1.85 clamped to 1.8
    ctl.observe(1.0)
    assert ctl.weights() == pytest.approx((0.15, 1.8))
    # e = 1.0 again: I = 2.4 clamped to 1.5 (anti-windup), u = 0.5 + 0.375 = 0.875 -> w+ 0.125
    ctl.observe(1.0)
    assert ctl.integral == pytest.approx(1.5)
    assert ctl.weights() == pytest.approx((0.125, 1.8))
    # entropy above target: e = -1.5, I = 0, u = -0.75 -> w+ 1.75, w- 0.25 (lower entropy)
    ctl.observe(3.5)
    assert ctl.weights() == pytest.approx((1.75, 0.25))


def test_state_round_trips_and_bounds_are_checked():
    cfg = EntropyControlConfig(target_entropy=1.0)
    ctl = EntropyController(cfg, (1.0, 0.5))
    ctl.observe(0.25)
    other = EntropyController(cfg, (1.0, 0.5))
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict() == {"error": 0.75, "integral": 0.75, "observations": 1}
    assert other.weights() == ctl.weights()
    with pytest.raises(ValueError, match="weight_min"):
        EntropyControlConfig(target_entropy=1.0, weight_min=2.0, weight_max=1.0)
