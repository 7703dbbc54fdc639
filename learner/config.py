"""Configuration of the learner: optimisation, loss, entropy clipping, DeepSpeed."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from settings.base import StrictModel


class ClipConfig(StrictModel):
    """Entropy-dynamics token masks (ALGORITHM.md §3)."""

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
        True, description="ClipV off-policy: use r*(S*-E_p[S]) with the detached importance ratio r."
    )


class LossConfig(StrictModel):
    """Policy-gradient surrogate and its baselines (ALGORITHM.md §4)."""

    type: Literal["ppo", "clip_cov", "kl_cov"] = Field("ppo", description="Surrogate family.")
    advantage_std_norm: bool = Field(True, description="GRPO: divide by the group reward std.")
    clip_eps_low: float = Field(0.2, ge=0, lt=1, description="PPO lower clip: ratio >= 1 - eps_low.")
    clip_eps_high: float = Field(0.28, ge=0, description="PPO upper clip (clip-higher).")
    dual_clip_c: float | None = Field(None, gt=1, description="Dual-clip bound for A < 0, None = off.")
    truncate_is_c: float | None = Field(None, gt=0, description="Truncated importance weight min(r, C).")
    aggregation: Literal["token_mean", "seq_mean_token_mean"] = Field("token_mean", description="Loss reduction.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient (baseline).")
    cov_clip_frac: float = Field(2e-4, gt=0, le=1, description="Clip-Cov: fraction of tokens detached.")
    cov_clip_low: float = Field(1.0, description="Clip-Cov: lower bound of the covariance band (paper ω_low).")
    cov_clip_high: float = Field(5.0, description="Clip-Cov: upper bound of the covariance band (paper ω_high).")
    kl_cov_frac: float = Field(2e-3, gt=0, le=1, description="KL-Cov: fraction of tokens KL-penalised.")
    kl_cov_coef: float = Field(1.0, ge=0, description="KL-Cov penalty coefficient.")


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
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up steps.")
    total_steps: int = Field(100, ge=1, description="Optimizer steps of the run.")
    groups_per_step: int = Field(8, ge=1, description="Prompt groups in one optimisation batch.")
    micro_batch_size: int = Field(16, ge=1, description="Responses per micro-batch on one rank.")
    max_staleness: int = Field(2, ge=0, description="Most policy versions a row may lag the learner.")
    sync_interval: int = Field(1, ge=1, description="Optimizer steps between weight publications.")
    checkpoint_interval: int = Field(10, ge=1, description="Optimizer steps between checkpoints (and acks).")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32 on CPU, bf16 on GPUs.")
    data_parallel_size: int = Field(1, ge=1, description="Learner ranks (one Ray actor each).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per learner rank in Ray.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per learner rank in Ray.")
    stats_chunk_size: int = Field(4096, ge=1, description="Vocabulary chunk of the streamed token statistics.")
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

