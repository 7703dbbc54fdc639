"""Configuration of the learner: optimisation, loss, entropy clipping, DeepSpeed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from settings.base import StrictModel

# the paper's masks as presets (ALGORITHM.md §3): ``released`` = the authors' released code (Trinity-RFT
# examples/entropy), ``paper`` = the symmetric forms of the paper's prose, with the released μ (the
# prose gives the form, the released code the values); neither uses r-weighting (driftrl's extension)
CLIP_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "released": {
        "clip_b": {"form": "negative_lower", "mu": 2.5, "max_frac": None, "importance_weighted": False},
        "clip_v": {"form": "negative_lower", "mu": 8.5, "max_frac": 1e-4, "importance_weighted": False},
    },
    "paper": {
        "clip_b": {"form": "symmetric", "mu": 2.5, "max_frac": None, "importance_weighted": False},
        "clip_v": {"form": "symmetric", "mu": 8.5, "max_frac": None, "importance_weighted": False},
    },
}


class ClipConfig(StrictModel):
    """Entropy-dynamics token masks (ALGORITHM.md §3).

    ``preset: released`` or ``paper`` fills ``form``, ``mu``, ``max_frac`` and
    ``importance_weighted`` from :data:`CLIP_PRESETS` for ``method`` (clip_b or clip_v); setting one
    of those to another value as well is an error naming the preset, so a run that says it tests the
    paper cannot silently run something else. ``custom`` takes every field as given.
    """

    preset: Literal["custom", "released", "paper"] = Field(
        "custom",
        description=(
            "released = the authors' released code: ClipB negative_lower mu 2.5; ClipV negative_lower mu 8.5, "
            "max_frac 1e-4; paper = the paper's symmetric forms (same mu, no cap); neither uses r-weighting "
            "(our extension). They fill form/mu/max_frac/importance_weighted for method clip_b|clip_v; "
            "custom = take those fields as given."
        ),
    )
    method: Literal["none", "clip_b", "clip_v", "directional"] = Field(
        "clip_v", description="Which S*-based statistic drops outlier tokens; 'none' = plain GRPO."
    )
    form: Literal["symmetric", "negative_lower"] = Field(
        "symmetric", description="Drop both tails (paper) or only A<0 lower-tail tokens (released code)."
    )
    mu: float = Field(2.5, gt=0, description="Threshold in population standard deviations.")
    max_frac: float | None = Field(
        None, gt=0, le=1, description="Cap on the fraction of tokens dropped (most negative first)."
    )
    importance_weighted: bool = Field(
        True,
        description=(
            "driftrl's extension, not the paper's: ClipV thresholds r*(S*-E_p[S]) with the detached "
            "importance ratio r instead of the paper's S*-E_p[S]; off in the released/paper presets."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or data.get("preset", "custom") == "custom":
            return data
        preset, method = data["preset"], data.get("method", cls.model_fields["method"].default)
        values = CLIP_PRESETS.get(preset, {}).get(method)
        if values is None:
            if method == "directional":
                raise ValueError(f"preset {preset!r} is one of the paper's masks; method 'directional' needs preset custom")
            # method none (nothing to fill) or a bad method/preset, which the field validation names
            return data
        for key, value in values.items():
            if key in data and data[key] != value:
                raise ValueError(
                    f"{key}={data[key]!r} contradicts preset {preset!r} ({key}={value!r} for {method}); "
                    "use preset custom to set it"
                )
        return {**data, **values}


class EntropyControlConfig(StrictModel):
    """EntroPIC-style PI controller of the advantage-sign weights (:mod:`learner.entropy_control`)."""

    target_entropy: float = Field(
        ..., ge=0, le=100, description="Target mean token entropy of the training batch (nats)."
    )
    kp: float = Field(1.0, ge=0, le=1e3, description="Proportional gain on e = target - batch entropy (per nat).")
    ki: float = Field(0.1, ge=0, le=1e3, description="Integral gain on the running sum of e.")
    integral_limit: float = Field(
        10.0, gt=0, le=1e6, description="Anti-windup: the running sum of e is clamped to +-this (nat-steps)."
    )
    weight_min: float = Field(0.0, ge=0, le=100, description="Lower bound of w+ and w-.")
    weight_max: float = Field(2.0, ge=0, le=100, description="Upper bound of w+ and w-.")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> EntropyControlConfig:
        if self.weight_min > self.weight_max:
            raise ValueError(f"weight_min={self.weight_min} > weight_max={self.weight_max}")
        return self


class LossConfig(StrictModel):
    """Policy-gradient surrogate and its baselines (ALGORITHM.md §4)."""

    type: Literal["ppo", "clip_cov", "kl_cov"] = Field("ppo", description="Surrogate family.")
    advantage: Literal["grpo", "gae"] = Field(
        "grpo",
        description="Advantage estimator: group-relative (GRPO) or GAE from a value model (PPO; needs learner.critic).",
    )
    advantage_std_norm: bool = Field(
        True, description="GRPO: divide by the group reward std (unused by gae)."
    )
    clip_eps_low: float = Field(0.2, ge=0, lt=1, description="PPO lower clip: ratio >= 1 - eps_low.")
    clip_eps_high: float = Field(0.28, ge=0, description="PPO upper clip (clip-higher).")
    dual_clip_c: float | None = Field(None, gt=1, description="Dual-clip bound for A < 0, None = off.")
    truncate_is_c: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="Truncated importance weight min(r, C): of the ratio pi/behaviour, or with proximal=learner "
        "of the detached weight exp(proximal - behaviour).",
    )
    entropy_control: EntropyControlConfig | None = Field(
        None,
        description="PI control of w+/w- towards a target batch entropy (EntroPIC); each optimizer step "
        "observes its mini-batch's global entropy before its loss pass; the state is checkpointed. None = off.",
    )
    is_mask: Literal["none", "token", "sequence"] = Field(
        "none",
        description="Masked importance sampling (beside truncate_is_c): drop tokens (token) or whole responses "
        "(sequence, geometric-mean ratio) whose ratio learner/behaviour leaves [is_mask_low, is_mask_high] "
        "(with proximal=learner: proximal/behaviour); dropped tokens leave the loss and its denominator.",
    )
    is_mask_low: float = Field(0.5, gt=0, le=1, description="Masked IS: smallest accepted ratio.")
    is_mask_high: float = Field(2.0, ge=1, le=1e6, description="Masked IS: largest accepted ratio.")
    proximal: Literal["behaviour", "learner"] = Field(
        "behaviour",
        description="PPO ratio reference. behaviour = pi/behaviour (plain PPO); learner = decoupled PPO "
        "(Hilton et al. 2022; AReaL): the proximal log-probs are the learner's own at the start of the "
        "learner step (one no-grad forward, reused across its mini-batches and epochs), the ratio "
        "pi/proximal is clipped and exp(proximal - behaviour) is a detached importance weight "
        "(truncated by truncate_is_c). Equals behaviour on fresh rows with one update per batch.",
    )
    aggregation: Literal["token_mean", "seq_mean_token_mean"] = Field(
        "token_mean", description="Loss reduction."
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient (baseline).")
    pos_adv_weight: float = Field(
        1.0,
        ge=0,
        le=100,
        description="w+: weight of the surrogate of tokens with A > 0 (after clipping; 1 = GRPO/PPO). "
        "The entropy controller, when on, moves it from this value.",
    )
    neg_adv_weight: float = Field(
        1.0,
        ge=0,
        le=100,
        description="w-: weight of the surrogate of tokens with A < 0 (after clipping; 1 = GRPO/PPO).",
    )
    cov_clip_frac: float = Field(2e-4, gt=0, le=1, description="Clip-Cov: fraction of tokens detached.")
    cov_clip_low: float = Field(
        1.0, description="Clip-Cov: lower bound of the covariance band (paper ω_low)."
    )
    cov_clip_high: float = Field(
        5.0, description="Clip-Cov: upper bound of the covariance band (paper ω_high)."
    )
    kl_cov_frac: float = Field(2e-3, gt=0, le=1, description="KL-Cov: fraction of tokens KL-penalised.")
    kl_cov_coef: float = Field(1.0, ge=0, description="KL-Cov penalty coefficient.")


class CriticConfig(StrictModel):
    """PPO's value model and GAE (``loss.advantage = "gae"``): its own DeepSpeed engine and optimizer."""

    model_path: str | None = Field(
        None,
        description="Hugging Face directory of the value model's backbone; None = the policy's model.path.",
    )
    lr: float = Field(1e-5, gt=0, description="Critic AdamW learning rate (constant).")
    weight_decay: float = Field(0.0, ge=0, description="Critic AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Critic gradient-norm clip.")
    value_clip: float | None = Field(
        0.2,
        gt=0,
        description="PPO value clipping: V within ±value_clip of the values the advantages used; None = off.",
    )
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount γ over response tokens.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ (1 = Monte-Carlo returns, 0 = one-step TD).")
    whiten_advantages: bool = Field(
        True,
        description="Whiten the advantages with the global batch mean and std (returns stay unwhitened).",
    )
    head_init_std: float = Field(
        0.0, ge=0, description="Std of the scalar value head's normal init (0 = zero head: V starts at 0)."
    )


class LearnerConfig(StrictModel):
    """DeepSpeed learner and the step schedule."""

    lr: float = Field(1e-6, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW (beta1, beta2), each in [0, 1)."
    )
    adam_eps: float = Field(
        1e-8, gt=0, description="AdamW epsilon; the first update of a gradient entry g is lr·g/(|g| + eps)."
    )
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up, in optimizer steps.")
    total_steps: int = Field(
        100, ge=1, description="Learner steps (sampled batches) of the run; each makes mini_batches x epochs updates."
    )
    groups_per_step: int = Field(8, ge=1, description="Prompt groups in one optimisation batch.")
    micro_batch_size: int = Field(
        16,
        ge=1,
        description="Responses per micro-batch on one rank (unused with max_tokens_per_micro_batch).",
    )
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="Token budget of one micro-batch (real tokens when packed, rows x longest when padded); "
        "rows are balanced across ranks by length; None = micro_batch_size rows per micro-batch.",
    )
    packing: bool = Field(
        False,
        description="Concatenate each micro-batch's sequences into one row (restarted positions; attention "
        "confined to each sequence: sdpa per sequence on sdpa models, varlen with flash-attention).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute decoder-layer activations in backward (long sequences, less memory)."
    )
    reuse_statistics_forward: bool = Field(
        True,
        description="When an update has one micro-batch on a rank, its statistics forward (clip thresholds, "
        "entropy) keeps the graph and the loss pass backpropagates through it: one forward a step instead "
        "of two, same numbers. With several micro-batches each is forwarded twice (no graph is held "
        "across the thresholds' all-reduce).",
    )
    mini_batches: int = Field(
        1,
        ge=1,
        le=1024,
        description="Optimizer steps per pass over a sampled batch (verl ppo_mini_batch_size = groups_per_step / "
        "mini_batches groups; OpenRLHF mini-batches): the groups are split into this many contiguous "
        "mini-batches of whole groups, each with its own ClipB/ClipV thresholds and loss denominator "
        "(global over its micro-batches and ranks); must divide groups_per_step. 1 = one update per batch.",
    )
    epochs: int = Field(
        1,
        ge=1,
        le=64,
        description="Passes over each sampled batch (verl ppo_epochs, OpenRLHF max_epochs), in the same "
        "mini-batch order each time: mini_batches x epochs optimizer steps per learner step.",
    )
    max_staleness: int = Field(
        2,
        ge=0,
        description="Most policy versions a row may lag the learner. A version is one weight publication, at "
        "most one per learner step (sampled batch), however many optimizer steps that batch made.",
    )
    sync_interval: int = Field(
        1, ge=1, description="Learner steps (sampled batches, not optimizer steps) between weight publications."
    )
    checkpoint_interval: int = Field(
        10, ge=1, description="Learner steps (sampled batches) between checkpoints (and acks)."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32 on CPU, bf16 on GPUs.")
    data_parallel_size: int = Field(1, ge=1, description="Learner ranks (one Ray actor each).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per learner rank in Ray.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per learner rank in Ray.")
    stats_chunk_size: int = Field(4096, ge=1, description="Vocabulary chunk of the streamed token statistics.")
    realised_entropy_interval: int = Field(
        10,
        ge=0,
        description=(
            "Every K optimizer steps (optimizer_step % K == 0; 0 = never) re-run a no-grad forward on the step's own "
            "micro-batches right after the optimizer step (same tokens, same temperature): "
            "realised_entropy_change = mean token entropy after - before, beside predicted_entropy_change = "
            "eta_eff * predicted_entropy_change_per_unit_step, where the per-unit prediction is "
            "-mean over kept tokens of r*A*Sc and eta_eff = |theta_after - theta_before| / |pre-clip gradient| "
            "is the step taken (exact lr * clip factor for SGD; approximate for Adam, whose step is not "
            "parallel to the gradient). Costs one forward and one copy of the trainable parameters "
            "(ZeRO-3: of this rank's shard) on those steps; other steps report both as NaN."
        ),
    )
    max_nan_steps: int = Field(5, ge=1, description="Consecutive non-finite steps before the run stops.")
    sample_timeout_s: float = Field(300.0, gt=0, description="Longest the learner waits for a batch.")
    step_timeout_s: float = Field(
        1800.0,
        gt=0,
        le=86400,
        description="Deadline of one learner call on every rank (a train step, a probe, a weight publication, "
        "a checkpoint save or load, the final export), counted from when the driver queued it. A rank that has "
        "not answered by then hangs: the run ends with an error naming the rank and the step (resume with "
        "--resume).",
    )
    clip: ClipConfig = ClipConfig()
    loss: LossConfig = LossConfig()
    critic: CriticConfig | None = Field(
        None, description="Value model and GAE settings: required when loss.advantage=gae, refused otherwise."
    )

    @model_validator(mode="after")
    def _mini_batches_divide_the_batch(self) -> LearnerConfig:
        if self.groups_per_step % self.mini_batches:
            raise ValueError(
                f"learner.mini_batches={self.mini_batches} must divide learner.groups_per_step={self.groups_per_step} "
                "(every mini-batch holds the same number of whole groups)"
            )
        return self

    @model_validator(mode="after")
    def _critic_matches_advantage(self) -> LearnerConfig:
        if self.loss.advantage == "gae" and self.critic is None:
            raise ValueError("loss.advantage=gae needs learner.critic (the value model's settings)")
        if self.loss.advantage != "gae" and self.critic is not None:
            raise ValueError(
                f"learner.critic is set but loss.advantage={self.loss.advantage}: only gae uses a value model"
            )
        return self
