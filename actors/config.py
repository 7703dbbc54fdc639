"""Configuration of the rollout actors."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from settings.base import StrictModel
from transports.config import WeightSyncConfig

__all__ = ["RewardConfig", "RolloutConfig", "WeightSyncConfig"]


class RewardConfig(StrictModel):
    """Which reward function scores responses, and how long it may take."""

    type: Literal["exact_match", "partial_match", "math", "python"] = Field(
        "exact_match", description="Registered reward, or 'python' for a user function by import path."
    )
    function: str | None = Field(
        None, description="For type=python: 'package.module:function' taking (response, answer) -> float."
    )
    timeout_s: float = Field(
        5.0, gt=0, le=3600, description="A reward call slower than this scores 0 and is counted."
    )
    batch_budget_s: float | None = Field(
        60.0,
        gt=0,
        le=86_400,
        description="Seconds one batch of responses may spend in the reward function: once spent, the rest "
        "of the batch scores 0 and is counted (reward_over_budget), so pathological responses cannot stall "
        "an actor for timeout_s each. None = no budget.",
    )


class RolloutConfig(StrictModel):
    """vLLM rollout actors: sampling, rewards, weight updates."""

    num_actors: int = Field(1, ge=1, description="Rollout actors (one vLLM engine each).")
    group_size: int = Field(8, ge=2, description="Responses sampled per prompt (G).")
    prompts_per_request: int = Field(
        8,
        ge=1,
        description="Most prompt groups an actor keeps in flight in its engine (continuous batching; "
        "each finished group is replaced at once, within the admission rule).",
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the behaviour policy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(16, ge=1, description="Most response tokens.")
    max_model_len: int = Field(128, ge=8, description="Prompt + response limit of the engine.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("float32", description="Engine dtype.")
    kv_cache_memory_bytes: int = Field(64 << 20, ge=1 << 20, description="KV cache size per engine.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (vLLM TP).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per actor in Ray.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor in Ray.")
    max_restarts: int = Field(3, ge=0, description="Ray restarts of a dead actor.")
    seed: int = Field(0, description="Engine seed (each actor adds its index).")
    step_timeout_s: float = Field(
        300.0, gt=0, description="Longest generate_step waits for one in-flight group before returning 0."
    )
    push_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Longest one push to a Ray buffer may take; a failed push is retried (push_retry_*).",
    )
    push_retry_initial_s: float = Field(
        0.5,
        gt=0,
        le=600,
        description="Wait before retrying a push that failed or that the buffer refused as full; doubled "
        "after each further failure up to push_retry_max_s. The groups wait in the actor meanwhile (they "
        "count as in flight for admission, and the prompt cursor stays behind them).",
    )
    push_retry_max_s: float = Field(
        30.0, gt=0, le=3600, description="Longest wait between push retries (the backoff's cap)."
    )
    reward: RewardConfig = RewardConfig()
    weight_sync: WeightSyncConfig = WeightSyncConfig()
