"""PPO's critic: a value model, its clipped value loss, and its own DeepSpeed engine (ALGORITHM.md §4).

The value model is the policy's architecture with the LM head replaced by a scalar head: the
Hugging Face backbone (``AutoModelForCausalLM.model``) of the policy's directory or of
``critic.model_path``, then ``Linear(hidden, 1)``. It lives on the learner's ranks, beside the
policy: the same process, the same data-parallel group, the micro-batches the learner already
built; only the optimizer and the engine are its own (README.md, "PPO with a value model").

:func:`value_loss` is a pure function over flat ``[N]`` tokens like :func:`learner.losses.policy_loss`.
:class:`Critic` is the engine wrapper the learner calls: :meth:`Critic.values` (no grad, before the
step's updates, for GAE), :meth:`Critic.loss_pass` per micro-batch, :meth:`Critic.step`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import deepspeed
import torch
from torch import Tensor, nn

from learner.config import CriticConfig
from learner.losses import Reduction, masked_mean

CRITIC_ENGINE_TAG = "critic"
# the metrics :func:`value_loss` returns (NaN on a skipped step, which has no loss pass)
VALUE_LOSS_METRICS: tuple[str, ...] = (
    "driftrl_learner_value_loss",
    "driftrl_learner_value_clipped_frac",
    "driftrl_learner_value_mean",
    "driftrl_learner_return_mean",
)

# cross-rank reductions of the critic's metrics (STYLE rule 7); "mean" is token-weighted by the
# learner; advantage moments and explained variance are already global (every rank has them)
CRITIC_METRIC_REDUCTIONS: dict[str, Reduction] = {
    "driftrl_learner_value_loss": "sum",
    "driftrl_learner_value_clipped_frac": "mean",
    "driftrl_learner_value_mean": "mean",
    "driftrl_learner_return_mean": "mean",
    "driftrl_learner_explained_variance": "max",
    "driftrl_learner_advantage_mean": "max",
    "driftrl_learner_advantage_std": "max",
}


class ValueModel(nn.Module):
    """Backbone + scalar head: ``V`` of the state before each selected token.

    Args:
        backbone: a Hugging Face decoder returning ``last_hidden_state`` (``AutoModelForCausalLM.model``).
        hidden_size: its hidden width.
        head_init_std: normal init std of the head weight (0 = zeros); the bias starts at 0.
        generator: random source of the head init (seeded, so every rank builds the same head).
    """

    def __init__(
        self, backbone: nn.Module, hidden_size: int, head_init_std: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.backbone = backbone
        param = next(backbone.parameters())
        self.value_head = nn.Linear(hidden_size, 1, dtype=param.dtype)
        with torch.no_grad():
            weight = torch.randn(self.value_head.weight.shape, generator=generator, dtype=torch.float64)
            self.value_head.weight.copy_(weight * head_init_std)
            self.value_head.bias.zero_()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, select: Tensor) -> tuple[Tensor, Tensor]:
        """Values of the selected positions.

        Args:
            input_ids, attention_mask: ``[B, L]``.
            select: ``[B, L]`` bool, True at the position before each response token (the state in
                which that token was chosen), as in :class:`learner.engine.PolicyWithStats`.

        Returns:
            ``(values [N] float32, nonfinite 0-d)``: non-finite hidden rows are zeroed (the learner
            skips the step on a non-zero count).
        """
        # positions count real tokens only, as in the policy's forward
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state[select]
        finite = torch.isfinite(hidden).all(dim=-1)
        hidden = torch.where(finite[:, None], hidden, 0.0)
        values = self.value_head(hidden).squeeze(-1).float()
        return values, (~finite).sum()


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    value_clip: float | None,
    denominator: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss of one micro-batch, token mean (Schulman et al. 2017, PPO2 baselines).

    ``ℓ = ½ max((V - G)², (V_clip - G)²)`` with ``V_clip = V_old + clip(V - V_old, -c, c)``;
    ``value_clip = None`` gives ``½ (V - G)²``.

    Args:
        values: ``[N]`` current values, with gradient.
        old_values: ``[N]`` the values the advantages were computed with (detached).
        returns: ``[N]`` GAE λ-returns ``G`` (the targets).
        mask: ``[N]`` bool valid tokens.
        value_clip: ``c``.
        denominator: the mini-batch's valid-token count over all micro-batches and ranks
            (``None`` = this call's own count).

    Returns:
        ``(loss 0-d, metrics)`` named as in :data:`CRITIC_METRIC_REDUCTIONS`; ``value_clipped_frac``
        is the fraction of tokens whose clipped term was the larger (the gradient-free ones).
    """
    if not values.shape == old_values.shape == returns.shape == mask.shape:
        raise ValueError(
            f"values, old_values, returns and mask must be [N]: {list(values.shape)}, {list(old_values.shape)}, "
            f"{list(returns.shape)}, {list(mask.shape)}"
        )
    old_values = torch.where(mask, old_values.detach(), 0.0)
    returns = torch.where(mask, returns.detach(), 0.0)
    values_m = torch.where(mask, values, 0.0)
    unclipped = (values_m - returns) ** 2
    if value_clip is None:
        per_token = unclipped
        clipped = torch.zeros_like(mask)
    else:
        v_clip = old_values + (values_m - old_values).clamp(-value_clip, value_clip)
        clipped_sq = (v_clip - returns) ** 2
        per_token = torch.maximum(unclipped, clipped_sq)
        clipped = (clipped_sq > unclipped).detach()
    # an empty micro-batch still reaches the values' graph (0 / 1 = 0), so backward runs and every
    # data-parallel rank joins the critic's gradient all-reduce (STYLE rule 8)
    loss = 0.5 * masked_mean(per_token, mask, denominator)
    metrics = {
        "driftrl_learner_value_loss": loss.detach(),
        "driftrl_learner_value_clipped_frac": masked_mean(clipped.float(), mask),
        "driftrl_learner_value_mean": masked_mean(values.detach(), mask),
        "driftrl_learner_return_mean": masked_mean(returns, mask),
    }
    return loss, metrics


class Critic:
    """The value model under its own DeepSpeed engine, on a learner rank.

    Args:
        cfg: the critic settings.
        model_path: the backbone's Hugging Face directory (the learner passes ``cfg.model_path`` or
            the policy's path).
        deepspeed_config: the engine's DeepSpeed config (the learner's, with the critic's optimizer).
        dtype: parameter dtype.
        seed: seeds the head init.
    """

    def __init__(
        self,
        cfg: CriticConfig,
        model_path: str | os.PathLike[str],
        deepspeed_config: Mapping[str, Any],
        dtype: torch.dtype,
        seed: int,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        causal_lm = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
        generator = torch.Generator().manual_seed(seed * 7_919 + 17)
        self.module = ValueModel(causal_lm.model, causal_lm.config.hidden_size, cfg.head_init_std, generator)
        del causal_lm
        self.engine, *_ = deepspeed.initialize(
            model=self.module,
            model_parameters=[p for p in self.module.parameters() if p.requires_grad],
            config=dict(deepspeed_config),
        )

    @torch.no_grad()
    def values(self, input_ids: Tensor, attention_mask: Tensor, select: Tensor) -> tuple[Tensor, Tensor]:
        """``(values [N], nonfinite 0-d)`` without gradient (see :meth:`ValueModel.forward`)."""
        return self.engine(input_ids, attention_mask, select)

    def loss_pass(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        select: Tensor,
        old_values: Tensor,
        returns: Tensor,
        denominator: Tensor,
        world_size: int,
    ) -> dict[str, Tensor]:
        """Forward with gradient, :func:`value_loss` over the global denominator, backward."""
        values, _ = self.engine(input_ids, attention_mask, select)
        mask = torch.ones_like(values, dtype=torch.bool)
        loss, metrics = value_loss(values, old_values, returns, mask, self.cfg.value_clip, denominator)
        # the denominator counts every rank's tokens: the ranks' gradients sum to the batch
        # gradient, and DeepSpeed averages over the data-parallel group, hence × world size
        self.engine.backward(loss * world_size)
        return metrics

    def step(self, skip: bool) -> tuple[bool, float | None]:
        """``engine.step()`` unless the learner skips the step; ``(applied, grad_norm)``.

        DeepSpeed skips a non-finite update itself under ZeRO 1-3 and reports the norm.
        """
        if skip:
            self.engine.zero_grad()
            return False, None
        self.engine.step()
        if not bool(self.engine.was_step_applied()):
            return False, None
        norm = self.engine.get_global_grad_norm()
        return True, None if norm is None else float(norm)

    @staticmethod
    def merge_micro_batch_metrics(
        per_micro: list[dict[str, Tensor]], tokens: list[Tensor]
    ) -> dict[str, Tensor]:
        """One dict per rank: the loss adds (global denominator), the rest are token-weighted means;
        NaN on a skipped step (no loss pass)."""
        if not per_micro:
            return {name: torch.tensor(math.nan) for name in VALUE_LOSS_METRICS}
        weight = torch.stack(tokens).float()
        merged = {}
        for name in per_micro[0]:
            values = torch.stack([m[name].float() for m in per_micro])
            if CRITIC_METRIC_REDUCTIONS[name] == "sum":
                merged[name] = values.sum()
            else:
                merged[name] = (values * weight).sum() / weight.sum().clamp_min(1)
        return merged

    def save(self, directory: str | os.PathLike[str]) -> None:
        """The engine state under ``directory/critic/`` (all ranks call)."""
        self.engine.save_checkpoint(str(directory), tag=CRITIC_ENGINE_TAG, save_latest=False)

    def load(self, directory: str | os.PathLike[str]) -> None:
        """Restore what :meth:`save` wrote (model and optimizer)."""
        load_path, _ = self.engine.load_checkpoint(
            str(directory), tag=CRITIC_ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise FileNotFoundError(
                f"{os.fspath(directory)}/{CRITIC_ENGINE_TAG}: no critic checkpoint to load"
            )
