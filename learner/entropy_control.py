"""EntroPIC-style proportional-integral control of the advantage-sign weights towards a target entropy.

Positive-advantage tokens sharpen the policy (entropy falls) and negative-advantage tokens flatten
it (Yang et al. 2025, "EntroPIC: Towards Stable Long-Term Training of LLMs via Entropy
Stabilization with Proportional-Integral Control", arXiv 2511.15248). With the error
``e = H_target - H`` of the batch entropy ``H`` (nats) and its clamped running sum ``I``, the
control ``u = k_p e + k_i I`` moves the weights of :func:`learner.losses.policy_loss`:

    w₊ = clip(w₊⁰ - u, w_min, w_max),    w₋ = clip(w₋⁰ + u, w_min, w_max)

so entropy below target lowers w₊ and raises w₋. Plain host arithmetic on floats every rank
computes from the same global entropy, so the ranks agree without a collective.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from learner.config import EntropyControlConfig


@dataclass
class EntropyController:
    """Controller state: the last error, the integral and the number of observations.

    Args:
        config: gains and bounds.
        base_weights: ``(w₊⁰, w₋⁰)``, the loss config's ``pos_adv_weight`` / ``neg_adv_weight``.
    """

    config: EntropyControlConfig
    base_weights: tuple[float, float]
    error: float = 0.0
    integral: float = 0.0
    observations: int = 0

    def observe(self, entropy: float) -> None:
        """Take one batch entropy (nats); the integral is clamped to ``±integral_limit`` (anti-windup)."""
        limit = self.config.integral_limit
        self.error = self.config.target_entropy - entropy
        self.integral = min(limit, max(-limit, self.integral + self.error))
        self.observations += 1

    @property
    def control(self) -> float:
        """``u = k_p e + k_i I``."""
        return self.config.kp * self.error + self.config.ki * self.integral

    def weights(self) -> tuple[float, float]:
        """``(w₊, w₋)`` for the next loss pass (the base weights before any observation)."""
        lo, hi = self.config.weight_min, self.config.weight_max
        u = self.control
        w_pos, w_neg = self.base_weights
        return min(hi, max(lo, w_pos - u)), min(hi, max(lo, w_neg + u))

    def state_dict(self) -> dict[str, Any]:
        """The mutable state as JSON values (``state.json``)."""
        state = asdict(self)
        del state["config"], state["base_weights"]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.error = float(state["error"])
        self.integral = float(state["integral"])
        self.observations = int(state["observations"])
