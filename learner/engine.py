"""The DeepSpeed learner: optimisation steps over a sampled table of whole groups (DESIGN.md).

:class:`Learner` is a plain class (tests build it directly, one per process); ``launch_learners`` in
:mod:`learner.actor` puts one per Ray actor. Per :meth:`Learner.train_updates` (one learner step):

1. the Arrow table becomes padded tensors (:func:`learner.batch.table_to_batch`); GRPO advantages
   are computed over every complete group of the table; the groups are split into
   ``mini_batches`` mini-batches (verl's ``ppo_mini_batch_size``, OpenRLHF's mini-batches), and
   in each rank ``r`` takes its contiguous slice of the groups and splits it into micro-batches
   (every rank runs the same number of them, padding with empty ones, because ZeRO's reductions
   are collectives);
2. per mini-batch, ``epochs`` times over the table: a no-grad pass gives per-token statistics and
   importance ratios; their clip moments, the loss denominator and the count of non-finite
   tokens are reduced across the mini-batch's micro-batches and ranks, so the ClipB/ClipV
   thresholds and the token-mean denominator are those of the global mini-batch;
3. a loss pass per micro-batch with the keep-masks, backward, one ``engine.step()``;
4. metrics of that optimizer step as one dict of tensors, reduced across ranks with their stated
   reduction, one host sync.

A step whose forward or gradients are non-finite is skipped (no update, counted); more than
``max_nan_steps`` in a row raises :class:`NonFiniteStepError`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch import Tensor, nn

from learner.batch import RolloutBatch, table_to_batch
from learner.clipping import (
    ClipMoments,
    ClipThresholds,
    cap_thresholds,
    clip_mask_with_thresholds,
    clip_statistic,
    thresholds_from_moments,
)
from learner.config import LearnerConfig
from learner.critic import CRITIC_METRIC_REDUCTIONS, Critic
from learner.entropy import TokenStats, entropy_step_scale, token_stats_from_hidden
from learner.entropy_control import EntropyController
from learner.gae import advantage_moments, gae_advantages_flat, summarise_moments, whiten
from learner.losses import (
    METRIC_REDUCTIONS,
    LossInputs,
    Reduction,
    entropy_metrics,
    grpo_advantages,
    importance_keep_mask,
    loss_denominator,
    masked_mean,
    mismatch_kl,
    policy_loss,
)
from learner.micro_batches import plan_micro_batches
from learner.packing import PackedLayout, packed_attention_mask, packed_position_ids, use_segment_attention

CHECKPOINT_STATE_FILE = "state.json"
CHECKPOINT_ENGINE_TAG = "deepspeed"

# metrics this module adds, with their cross-rank reduction (STYLE rule 7); values that every rank
# computes from the whole table are identical, so "max" just returns them
LEARNER_METRIC_REDUCTIONS: dict[str, Reduction] = {
    "driftrl_learner_train_tokens": "sum",
    "driftrl_learner_nonfinite_tokens": "max",
    "driftrl_learner_staleness_mean": "max",
    "driftrl_learner_staleness_max": "max",
    "driftrl_learner_reward_mean": "max",
    "driftrl_learner_response_length_mean": "max",
    "driftrl_learner_groups": "max",
    "driftrl_learner_responses": "max",
    # same-batch entropy change (every realised_entropy_interval steps, NaN otherwise): the rank's
    # token mean weighted by its tokens is the global mean; the rest is identical on every rank
    "driftrl_learner_realised_entropy_change": "mean",
    "driftrl_learner_entropy_mean_after_step": "mean",
    "driftrl_learner_update_norm": "max",
    "driftrl_learner_entropy_step_scale": "max",
    "driftrl_learner_predicted_entropy_change": "max",
    "driftrl_learner_entropy_change_seconds": "max",
}


# policy_loss metrics present for every loss type: a skipped step reports them as NaN
ALWAYS_LOSS_METRICS: tuple[str, ...] = (
    "driftrl_learner_loss",
    "driftrl_learner_pg_loss",
    "driftrl_learner_loss_tokens",
    "driftrl_learner_ratio_mean",
    "driftrl_learner_ratio_max",
    "driftrl_learner_clipped_frac",
    "driftrl_learner_truncated_frac",
)


class NonFiniteStepError(RuntimeError):
    """Too many consecutive steps had a non-finite forward pass or gradient norm."""


@dataclass
class LinearWarmup:
    """LR factor ``min(1, (s + 1) / (warmup_steps + 1))`` for optimizer step ``s`` (0-based).

    A callable object rather than a lambda so ``LambdaLR.state_dict()`` stores it in checkpoints;
    ``warmup_steps = 0`` gives a constant LR from the first step.
    """

    warmup_steps: int

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / (self.warmup_steps + 1))


class _StatsHead(nn.Module):
    """Owns the LM-head weight and computes streamed token statistics instead of logits.

    It replaces ``lm_head`` of the Hugging Face model so the weight is used inside the forward of
    the module that owns it: ZeRO-3 gathers a parameter only around its owner's forward (and the
    matching backward), and the streamed statistics never form ``[N, V]`` logits. The parameter
    keeps its name, ``lm_head.weight``.
    """

    def __init__(self, weight: nn.Parameter, chunk_size: int) -> None:
        super().__init__()
        self.weight = weight
        self.chunk_size = chunk_size

    def forward(self, hidden: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(logp, entropy, s_star, s_expect)``, each ``[N]`` float32, at temperature 1.

        ``hidden`` arrives already divided by each token's temperature:
        ``(h / T) Wᵀ = (h Wᵀ) / T``, so one call serves rows sampled at different temperatures.
        """
        stats = token_stats_from_hidden(hidden, self.weight, tokens, 1.0, self.chunk_size)
        return stats.logp, stats.entropy, stats.s_star, stats.s_expect


class PolicyWithStats(nn.Module):
    """What the DeepSpeed engine wraps: the HF causal LM with its head swapped for :class:`_StatsHead`.

    Going through the engine's forward (rather than calling submodules) keeps ZeRO-3's parameter
    fetching in its normal per-iteration order.
    """

    def __init__(self, model: nn.Module, chunk_size: int) -> None:
        super().__init__()
        model.lm_head = _StatsHead(model.lm_head.weight, chunk_size)
        self.model = model

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        select: Tensor,
        targets: Tensor,
        inv_temperature: Tensor,
        sequence_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Statistics of the selected next-token predictions.

        Args:
            input_ids: ``[B, L]`` token ids; attention_mask: ``[B, L]`` (1 = real token).
            select: ``[B, L]`` bool, True where the hidden state at that position predicts a
                response token (the position before it).
            targets: ``[N]`` the predicted tokens, ``N = select.sum()``, in row-major order.
            inv_temperature: ``[N]`` float32, ``1 / T`` of each token's row.
            sequence_ids: ``[B, L]`` int64 for packed rows (:mod:`learner.packing`): the sequence of
                each token; positions restart and attention stays inside each sequence.

        Returns:
            ``(logp, entropy, s_star, s_expect, nonfinite)``: four ``[N]`` float32 tensors and the
            0-d count of selected positions whose hidden state was not finite. Those rows are
            zeroed before the head so the statistics stay defined; the learner skips the step.
        """
        if sequence_ids is None:
            # positions count real tokens only, correct for left and right padding alike
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            mask = attention_mask
        else:
            position_ids = packed_position_ids(sequence_ids)
            mask = packed_attention_mask(
                sequence_ids, self.model.config._attn_implementation, self.model.dtype
            )
        hidden = self.model.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        hidden = hidden[select]
        finite = torch.isfinite(hidden).all(dim=-1)
        hidden = torch.where(finite[:, None], hidden, 0.0)
        scaled = hidden * inv_temperature.to(hidden.dtype)[:, None]
        logp, entropy, s_star, s_expect = self.model.lm_head(scaled, targets)
        return logp, entropy, s_star, s_expect, (~finite).sum()


@dataclass
class MicroBatch:
    """One micro-batch of one rank, response tokens flattened to ``[N]``.

    Attributes:
        input_ids, attention_mask, select: ``[b, L]`` model inputs and the predicting positions.
        targets: ``[N]`` response tokens; inv_temperature: ``[N]`` float32.
        behaviour_logprobs, advantages: ``[N]`` float32.
        seq_index: ``[N]`` int64, the response of each token, compacted to ``< N``.
        rewards: ``[N]`` float32, each token's response reward (GAE puts it at the last token).
        sequence_ids: ``[1, T]`` int64 sequence of each token when the rows are packed, else None.
        proximal_logprobs: ``[N]`` float32, decoupled PPO's proximal policy (the learner's own
            log-probs at the start of the learner step), else None.
    """

    input_ids: Tensor
    attention_mask: Tensor
    select: Tensor
    targets: Tensor
    inv_temperature: Tensor
    behaviour_logprobs: Tensor
    advantages: Tensor
    seq_index: Tensor
    rewards: Tensor
    sequence_ids: Tensor | None = None
    proximal_logprobs: Tensor | None = None

    @property
    def valid(self) -> Tensor:
        """``[N]`` bool: every flattened token is a response token."""
        return torch.ones_like(self.targets, dtype=torch.bool)


@dataclass
class TokenPass:
    """No-grad statistics of one micro-batch, ``[N]`` float32 each (``x`` = clip statistic or None)."""

    logprobs: Tensor
    entropy: Tensor
    s_star: Tensor
    s_expect: Tensor
    ratio: Tensor
    nonfinite: Tensor
    x: Tensor | None = None
    # (logprobs, entropy) still attached to the forward's graph when the pass kept it for the loss
    graph: tuple[Tensor, Tensor] | None = None


@dataclass
class GlobalStats:
    """What every rank agrees on before the loss pass.

    Per micro-batch: ``keep_masks`` of the entropy clip, ``importance_masks`` of masked importance
    sampling, ``loss_masks`` = both (None = keep every token).
    """

    thresholds: ClipThresholds | None
    keep_masks: list[Tensor | None]
    importance_masks: list[Tensor | None]
    loss_masks: list[Tensor | None]
    denominator: Tensor
    train_tokens: Tensor
    nonfinite_tokens: Tensor
    skip: bool
    entropy_mean: Tensor


@dataclass
class ValueTargets:
    """What GAE hands the critic's update: per micro-batch ``[N]`` float32 each, and the metrics."""

    old_values: list[Tensor]
    returns: list[Tensor]
    metrics: dict[str, Tensor]
    nonfinite: Tensor


@dataclass
class LearnerState:
    """Host-side counters, saved in ``state.json``.

    ``step`` counts learner steps (sampled tables, what ``total_steps``, ``sync_interval`` and
    ``checkpoint_interval`` count); ``optimizer_step`` counts updates (``mini_batches × epochs``
    per table; what ``warmup_steps`` and ``realised_entropy_interval`` count); ``skipped_steps``
    and ``consecutive_skipped`` count optimizer steps.
    """

    step: int = 0
    optimizer_step: int = 0
    policy_version: int = 0
    skipped_steps: int = 0
    consecutive_skipped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def process_group_backend(cfg: LearnerConfig) -> str:
    """The torch.distributed backend of the learner ranks: NCCL on GPUs, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() and cfg.num_gpus > 0 else "gloo"


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _sum_over_ranks(x: Tensor) -> Tensor:
    """SUM all-reduce of ``x`` in place over the learner ranks (identity without torch.distributed)."""
    if _is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _deepspeed_config(cfg: LearnerConfig, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """DeepSpeed config for one optimizer step per :meth:`Learner.train_step`.

    ``managed_gradient_accumulation = False`` makes ``engine.step()`` the accumulation boundary:
    the number of micro-batches may change from step to step (group sizes vary) and the loss
    scale is ours (global token-mean denominator), not ``1 / gradient_accumulation_steps``.
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: DeepSpeed's fused Adam is a JIT-built op unavailable with DS_BUILD_OPS=0
            "params": {
                "lr": cfg.lr,
                "betas": list(cfg.adam_betas),
                "eps": cfg.adam_eps,
                "weight_decay": cfg.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": cfg.zero_stage},
        # bf16 ZeRO-1/2 checks gradients for inf/NaN only when asked; fp32 and ZeRO-3 always do
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def _encode_rng_state() -> dict[str, Any]:
    """This process's python/numpy/torch RNG states as plain JSON values.

    No pickle: ``state.json`` is data, and unpickling a file from a run directory would run
    whatever code it names. Python's state is ``(version, 625 ints, gauss_next)``, numpy's legacy
    one ``("MT19937", 624 uint32 keys, pos, has_gauss, cached_gaussian)``, torch's a uint8 tensor
    (base64 of its bytes). JSON floats round-trip exactly (``repr``), so a resume is bit-identical.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


@dataclass(frozen=True)
class _RngState:
    python: tuple[int, tuple[int, ...], float | None]
    numpy: tuple[str, np.ndarray, int, int, float]
    torch: Tensor


def _json_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _json_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _decode_rng_state(state: Any, where: str) -> _RngState:
    """Check and convert one rank's ``rng`` entry of ``state.json`` (before anything is restored).

    Raises:
        ValueError: naming ``where``, when the entry is not the JSON form :func:`_encode_rng_state`
            writes, such as the base64 pickles of older checkpoints, which are refused unread.
    """
    try:
        py, npy = state["python"], state["numpy"]
        gauss_next = py["gauss_next"]
        python_state = (
            _json_int(py["version"]),
            tuple(_json_int(v) for v in py["state"]),
            None if gauss_next is None else _json_float(gauss_next),
        )
        if not isinstance(npy["kind"], str):
            raise TypeError("numpy.kind is not a string")
        keys = np.array([_json_int(v) for v in npy["keys"]], dtype=np.int64)
        if keys.shape != (624,) or keys.min() < 0 or keys.max() >= 2**32:
            raise ValueError("numpy.keys is not 624 uint32 values")
        numpy_state = (
            npy["kind"],
            keys.astype(np.uint32),
            _json_int(npy["pos"]),
            _json_int(npy["has_gauss"]),
            _json_float(npy["cached_gaussian"]),
        )
        torch_bytes = base64.b64decode(state["torch"], validate=True)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{where}: the RNG state is not the JSON form this driftrl writes ({type(err).__name__}: {err}). "
            "Checkpoints with pickled RNG states (older driftrl) are refused: unpickling a file can run code"
        ) from None
    torch_state = torch.from_numpy(np.frombuffer(torch_bytes, dtype=np.uint8).copy())
    return _RngState(python=python_state, numpy=numpy_state, torch=torch_state)


def _restore_rng_state(state: _RngState) -> None:
    random.setstate(state.python)
    np.random.set_state(state.numpy)
    torch.set_rng_state(state.torch)


def _skip_cpu_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op.

    DeepSpeed's torch backend builds it whenever a process group comes up on CPU: ~90 s of both cores
    on this machine type the first time, and again whenever the venv's path changes (the include
    paths are part of the build's hash). The op serves only ``inference_all_reduce``; ZeRO training
    reduces through torch.distributed, so the learner never calls it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class Learner:
    """One data-parallel rank of the DeepSpeed learner over a Hugging Face causal LM.

    ``torch.distributed`` must be reachable through the usual env (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``); the constructor initialises it (gloo on
    CPU, NCCL on GPUs) unless it already is. Every rank calls every method except
    :meth:`publish_weights`'s publishing, which rank 0 does.

    Args:
        cfg: the learner sub-config.
        model_path: a Hugging Face model directory (or hub name).
        rank, world_size: this rank and the number of data-parallel ranks.
        seed: seeds torch/numpy/python and the Clip-Cov token selection.
        deepspeed_overrides: merged into the DeepSpeed config (tests set ZeRO-3 knobs here).
    """

    def __init__(
        self,
        cfg: LearnerConfig,
        model_path: str | os.PathLike[str],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        deepspeed_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.state = LearnerState()
        self._set_seeds(seed + rank)
        _skip_cpu_shm_comm_build()
        if not _is_distributed():
            deepspeed.init_distributed(dist_backend=process_group_backend(cfg))
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise ValueError(
                f"torch.distributed is rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"the learner was built as rank {rank} of {world_size}"
            )
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        hf_model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
        if cfg.packing:
            use_segment_attention(hf_model)
        if cfg.gradient_checkpointing:
            # transformers checkpoints only in training mode; the model has no dropout to switch on
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf_model.train()
        self.pad_id = hf_model.config.pad_token_id if hf_model.config.pad_token_id is not None else 0
        self.module = PolicyWithStats(hf_model, cfg.stats_chunk_size)
        self.engine, *_ = deepspeed.initialize(
            model=self.module,
            model_parameters=[p for p in self.module.parameters() if p.requires_grad],
            config=_deepspeed_config(cfg, deepspeed_overrides),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, LinearWarmup(cfg.warmup_steps)),
        )
        self.device = self.engine.device
        control = cfg.loss.entropy_control
        self.controller = (
            None
            if control is None
            else EntropyController(control, (cfg.loss.pos_adv_weight, cfg.loss.neg_adv_weight))
        )
        self.critic: Critic | None = None
        if cfg.critic is not None:
            critic_optim = {
                "lr": cfg.critic.lr,
                "weight_decay": cfg.critic.weight_decay,
                "grad_clip": cfg.critic.grad_clip,
            }
            self.critic = Critic(
                cfg.critic,
                cfg.critic.model_path or model_path,
                _deepspeed_config(cfg.model_copy(update=critic_optim), deepspeed_overrides),
                dtype,
                seed,
            )

    @property
    def hf_model(self) -> nn.Module:
        """The wrapped Hugging Face model (parameters under their HF names)."""
        return self.module.model

    @property
    def policy_version(self) -> int:
        """Version of the weights last published (0 = initial weights)."""
        return self.state.policy_version

    @staticmethod
    def _set_seeds(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ---- step ---------------------------------------------------------------------------------

    def train_step(self, table: pa.Table) -> dict[str, float]:
        """One learner step on a table of whole groups: the metrics of its last optimizer step.

        :meth:`train_updates` does the work and returns every optimizer step's metrics; with
        ``mini_batches = epochs = 1`` (the default) there is exactly one.
        """
        return self.train_updates(table)[-1]

    def train_updates(self, table: pa.Table) -> list[dict[str, float]]:
        """One learner step (one sampled batch): ``epochs`` passes over ``mini_batches`` mini-batches,
        one optimizer step per mini-batch; every rank passes the same table.

        Advantages (GRPO over the whole table, or GAE from the critic before any update) and, for
        decoupled PPO, the proximal log-probs are computed once per table. Each optimizer step
        then runs its own statistics pass, so its ClipB/ClipV thresholds and loss denominator are
        the global statistics of its own mini-batch under the current weights. The policy version
        counts sampled batches, not optimizer steps: every update of a table sees the same
        staleness, and the driver publishes at most once per table.

        Returns:
            One dict per optimizer step, in order, of ``driftrl_learner_*`` metrics as floats,
            identical on every rank except the clip thresholds (rank-local copies, equal by
            construction): the :func:`policy_loss` and :func:`entropy_metrics` names of
            :data:`learner.losses.METRIC_REDUCTIONS`, those of :data:`LEARNER_METRIC_REDUCTIONS`,
            ``staleness_count_<k>`` (k = 0..max_staleness) and ``staleness_count_over``,
            ``clip_center``/``clip_bound``/``clip_cutoff`` (with a clip method), and
            ``grad_norm``, ``lr``, ``step_skipped``, ``skipped_steps_total``, ``step`` (learner
            steps = tables), ``optimizer_step``, ``epoch``, ``mini_batch``, ``policy_version``,
            ``step_seconds``, ``train_tokens_per_s``.

        Raises:
            NonFiniteStepError: ``max_nan_steps`` consecutive optimizer steps were skipped.
        """
        start = time.perf_counter()
        batch = table_to_batch(table, pad_id=self.pad_id)
        advantages, zero_variance_frac = grpo_advantages(
            batch.rewards, batch.group_index, std_norm=self.cfg.loss.advantage_std_norm
        )
        minis = [self._micro_batches(batch, advantages, rows) for rows in self._mini_batch_rows(batch)]
        flat = [mb for mbs in minis for mb in mbs]
        # PPO: GAE replaces the group-relative advantages before any pass reads them
        targets = None if self.critic is None else self._gae_advantages(flat)
        start_passes = self._proximal_passes(minis) if self.cfg.loss.proximal == "learner" else None
        self.state.step += 1
        updates: list[dict[str, float]] = []
        for epoch in range(self.cfg.epochs):
            for index, mbs in enumerate(minis):
                mini_targets = None
                if targets is not None:
                    n = len(mbs)
                    offset = sum(len(m) for m in minis[:index])
                    mini_targets = ValueTargets(
                        targets.old_values[offset : offset + n],
                        targets.returns[offset : offset + n],
                        targets.metrics,
                        targets.nonfinite,
                    )
                # the first update runs on the start weights: the proximal pass is its statistics pass
                passes = start_passes[0] if start_passes is not None and epoch == index == 0 else None
                floats = self._update(batch, mbs, mini_targets, zero_variance_frac, start, passes)
                floats["driftrl_learner_epoch"] = float(epoch)
                floats["driftrl_learner_mini_batch"] = float(index)
                updates.append(floats)
                start = time.perf_counter()
        return updates

    def _update(
        self,
        batch: RolloutBatch,
        micro_batches: list[MicroBatch],
        targets: ValueTargets | None,
        zero_variance_frac: Tensor,
        start: float,
        passes: list[TokenPass] | None = None,
    ) -> dict[str, float]:
        """One optimizer step on one mini-batch (this rank's micro-batches of it); ``passes`` = its
        statistics passes when already run on the current weights."""
        if passes is None:
            # one micro-batch on this rank: its activations are held through the loss pass anyway,
            # so the statistics forward keeps its graph and the loss pass reuses it
            keep_graph = len(micro_batches) == 1 and self.cfg.reuse_statistics_forward
            passes = [self._statistics_pass(mb, keep_graph) for mb in micro_batches]
        if targets is not None:
            passes[0].nonfinite = passes[0].nonfinite + targets.nonfinite
        for mb in micro_batches:
            if mb.proximal_logprobs is not None:
                # a non-finite proximal log-prob would reach the loss: skip like a non-finite forward
                passes[0].nonfinite = passes[0].nonfinite + (~torch.isfinite(mb.proximal_logprobs)).sum()
        agreed = self._agree(micro_batches, passes)
        if self.controller is not None and not agreed.skip:
            # the step's own global entropy, before its loss pass: the same float on every rank
            self.controller.observe(float(agreed.entropy_mean))
        sign_weights = None if self.controller is None else self.controller.weights()
        loss_metrics: list[dict[str, Tensor]] = []
        if not agreed.skip:
            loss_metrics = [
                self._loss_pass(mb, keep, agreed.denominator, sign_weights, tp.graph)
                for mb, keep, tp in zip(micro_batches, agreed.loss_masks, passes, strict=True)
            ]
        for tp in passes:
            tp.graph = None  # a skipped step's graph (or a used one) is not kept past the step
        lr = float(self.engine.get_lr()[0])
        measure = self._measures_entropy_change(agreed.skip)
        before = self._trainable_copy() if measure else None
        applied, grad_norm = self._optimizer_step(skip=agreed.skip)
        metrics = self._step_metrics(batch, micro_batches, passes, agreed, loss_metrics, zero_variance_frac)
        metrics.update(
            self._entropy_change_metrics(
                micro_batches,
                passes,
                before if applied else None,
                grad_norm,
                metrics["driftrl_learner_predicted_entropy_change_per_unit_step"],
            )
        )
        critic_grad_norm = None
        if targets is not None:
            critic_metrics, critic_grad_norm = self._critic_update(micro_batches, targets, agreed)
            metrics.update(critic_metrics)
        floats = self._reduce_metrics(metrics, agreed.thresholds)
        self._count_step(applied)
        seconds = time.perf_counter() - start
        floats.update(
            self._host_metrics(applied, grad_norm, lr, seconds, floats["driftrl_learner_train_tokens"])
        )
        if targets is not None:
            floats["driftrl_learner_value_grad_norm"] = (
                math.nan if critic_grad_norm is None else critic_grad_norm
            )
        loss_cfg = self.cfg.loss
        w_pos, w_neg = (
            (loss_cfg.pos_adv_weight, loss_cfg.neg_adv_weight) if sign_weights is None else sign_weights
        )
        floats["driftrl_learner_pos_adv_weight"] = w_pos
        floats["driftrl_learner_neg_adv_weight"] = w_neg
        if self.controller is not None:
            floats["driftrl_learner_entropy_control_error"] = self.controller.error
            floats["driftrl_learner_entropy_control_integral"] = self.controller.integral
        if self.state.consecutive_skipped >= self.cfg.max_nan_steps:
            raise NonFiniteStepError(
                f"{self.state.consecutive_skipped} consecutive optimizer steps had a non-finite forward pass or "
                f"gradient (max_nan_steps={self.cfg.max_nan_steps}); last learner step {self.state.step} "
                f"(optimizer step {self.state.optimizer_step}), "
                f"{floats['driftrl_learner_nonfinite_tokens']:.0f} non-finite tokens, grad norm "
                f"{floats['driftrl_learner_grad_norm']}. Lower the learning rate or inspect the data."
            )
        return floats

    def _proximal_passes(self, minis: list[list[MicroBatch]]) -> list[list[TokenPass]]:
        """Decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization"; AReaL):
        one no-grad pass over the whole table on the start weights sets every micro-batch's
        ``proximal_logprobs``, reused by every mini-batch and epoch of this learner step."""
        passes = [[self._statistics_pass(mb) for mb in mbs] for mbs in minis]
        for mbs, tps in zip(minis, passes, strict=True):
            for mb, tp in zip(mbs, tps, strict=True):
                mb.proximal_logprobs = tp.logprobs
        return passes

    def _mini_batch_rows(self, batch: RolloutBatch) -> list[np.ndarray]:
        """Rows of each mini-batch: ``mini_batches`` contiguous slices of whole groups (fixed order),
        so GRPO's group statistics never straddle two optimizer steps."""
        n_groups = batch.n_groups
        count = self.cfg.mini_batches
        if n_groups < count:
            raise ValueError(f"the table has {n_groups} groups, fewer than learner.mini_batches={count}")
        group_index = batch.group_index.numpy()
        return [
            np.flatnonzero(np.isin(group_index, groups)).astype(np.int64)
            for groups in np.array_split(np.arange(n_groups), count)
        ]

    def _micro_batches(self, batch: RolloutBatch, advantages: Tensor, rows: np.ndarray) -> list[MicroBatch]:
        """This rank's micro-batches of the mini-batch ``rows``
        (:func:`learner.micro_batches.plan_micro_batches`); every rank gets the same number, empty
        ones padding the short."""
        # the planner wants groups numbered 0 .. G-1 by first appearance, and batch group ids are
        # numbered that way, so their ascending order is that order
        _, groups = np.unique(batch.group_index.numpy()[rows], return_inverse=True)
        plan = plan_micro_batches(
            groups.astype(np.int64),
            (batch.prompt_lengths + batch.response_lengths).numpy()[rows],
            self.world_size,
            self.cfg.micro_batch_size,
            self.cfg.max_tokens_per_micro_batch,
            packed=self.cfg.packing,
        )
        return [
            self._make_micro_batch(batch, advantages, torch.from_numpy(rows[local]))
            for local in plan[self.rank]
        ]

    def _make_micro_batch(self, batch: RolloutBatch, advantages: Tensor, rows: Tensor) -> MicroBatch:
        """Slice rows, trim the padded length, flatten the response tokens."""
        if rows.numel() == 0:
            # one real pad token and nothing selected: the forward and backward still run, so the
            # ranks join every ZeRO collective (STYLE rule 8)
            one = torch.full((1, 1), self.pad_id, dtype=torch.long)
            input_ids, attention_mask = one, torch.ones_like(one)
            response_mask = torch.zeros_like(one, dtype=torch.bool)
            behaviour = torch.zeros((1, 1))
            temperature, row_adv, row_reward = torch.ones(1), torch.zeros(1), torch.zeros(1)
        else:
            attention_mask = batch.attention_mask[rows]
            used = attention_mask.bool().any(0).nonzero()
            length = int(used.max()) + 1
            input_ids = batch.input_ids[rows, :length]
            attention_mask = attention_mask[:, :length]
            response_mask = batch.response_mask[rows, :length].bool()
            behaviour = batch.behaviour_logprobs[rows, :length]
            temperature, row_adv = batch.temperature[rows].float(), advantages[rows]
            row_reward = batch.rewards[rows].float()
        row_of_position = torch.arange(input_ids.shape[0])[:, None].expand_as(response_mask)
        sequence_ids = None
        if self.cfg.packing:
            layout = PackedLayout.from_attention_mask(attention_mask)
            input_ids, response_mask, behaviour, row_of_position = (
                layout.pack(t) for t in (input_ids, response_mask, behaviour, row_of_position)
            )
            attention_mask, sequence_ids = torch.ones_like(input_ids), layout.sequence_ids
        # the hidden state at position t - 1 predicts the token at t (a packed row's next sequence
        # starts with a prompt token, so no prediction crosses sequences)
        select = torch.zeros_like(response_mask)
        select[:, :-1] = response_mask[:, 1:]
        row_of_token = row_of_position[response_mask]
        _, seq_index = torch.unique(row_of_token, return_inverse=True)
        dev = self.device
        return MicroBatch(
            input_ids=input_ids.long().to(dev),
            attention_mask=attention_mask.long().to(dev),
            select=select.to(dev),
            targets=input_ids[response_mask].long().to(dev),
            inv_temperature=(1.0 / temperature[row_of_token]).float().to(dev),
            behaviour_logprobs=behaviour[response_mask].float().to(dev),
            advantages=row_adv[row_of_token].float().to(dev),
            seq_index=seq_index.to(dev),
            rewards=row_reward[row_of_token].float().to(dev),
            sequence_ids=None if sequence_ids is None else sequence_ids.to(dev),
        )

    def _forward(self, mb: MicroBatch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.engine(
            mb.input_ids,
            mb.attention_mask,
            mb.select,
            mb.targets,
            mb.inv_temperature,
            sequence_ids=mb.sequence_ids,
        )

    def _statistics_pass(self, mb: MicroBatch, keep_graph: bool = False) -> TokenPass:
        """Token statistics, ratios and the clip statistic of one micro-batch.

        ``keep_graph``: run the forward with gradient and keep its graph in ``graph``, so the loss
        pass backpropagates through this forward instead of running its own (one forward a step
        instead of two; the statistics are the same numbers, detached).
        """
        with torch.set_grad_enabled(keep_graph):
            logp_g, entropy_g, s_star, s_expect, nonfinite = self._forward(mb)
        with torch.no_grad():
            tp = self._token_pass(
                mb, logp_g.detach(), entropy_g.detach(), s_star.detach(), s_expect.detach(), nonfinite
            )
        if keep_graph:
            tp.graph = (logp_g, entropy_g)
        return tp

    def _token_pass(
        self,
        mb: MicroBatch,
        logp: Tensor,
        entropy: Tensor,
        s_star: Tensor,
        s_expect: Tensor,
        nonfinite: Tensor,
    ) -> TokenPass:
        log_ratio = logp - mb.behaviour_logprobs
        ratio = log_ratio.exp()
        nonfinite = nonfinite + (~torch.isfinite(ratio)).sum()
        clip = self.cfg.clip
        x = None
        if clip.method != "none":
            # a non-finite ratio would poison the global moments; the step is skipped anyway
            safe_ratio = torch.where(torch.isfinite(ratio), ratio, 0.0)
            weighted = clip.importance_weighted and clip.method != "clip_b"
            x = clip_statistic(clip.method, s_star, s_expect, mb.advantages, safe_ratio if weighted else None)
        return TokenPass(logp, entropy, s_star, s_expect, ratio, nonfinite, x)

    def _agree(self, mbs: list[MicroBatch], passes: list[TokenPass]) -> GlobalStats:
        """Global clip thresholds, keep-masks, loss denominator and the skip decision.

        Collectives (in this order on every rank): the clip moments' all-gather, the cap's
        all-gather (with ``max_frac``), one SUM all-reduce of ``[denominator, tokens, nonfinite, entropy sum]``.
        """
        clip = self.cfg.clip
        thresholds = None
        keeps: list[Tensor | None] = [None] * len(mbs)
        if clip.method != "none":
            moments = ClipMoments.from_values(passes[0].x, mbs[0].valid)
            for mb, tp in zip(mbs[1:], passes[1:], strict=True):
                moments = moments + ClipMoments.from_values(tp.x, mb.valid)
            thresholds = thresholds_from_moments(clip.method, clip.form, clip.mu, moments.all_reduce())
            if clip.max_frac is not None:
                thresholds = cap_thresholds(
                    thresholds,
                    torch.cat([tp.x for tp in passes]),
                    torch.cat([mb.advantages for mb in mbs]),
                    torch.cat([mb.valid for mb in mbs]),
                    clip.max_frac,
                )
            keeps = [
                clip_mask_with_thresholds(thresholds, tp.x, mb.advantages, mb.valid)
                for mb, tp in zip(mbs, passes, strict=True)
            ]
        loss_cfg = self.cfg.loss
        importance: list[Tensor | None] = [None] * len(mbs)
        if loss_cfg.is_mask != "none":
            importance = [
                importance_keep_mask(
                    (tp.logprobs if mb.proximal_logprobs is None else mb.proximal_logprobs)
                    - mb.behaviour_logprobs,
                    mb.valid,
                    mb.seq_index,
                    loss_cfg.is_mask,
                    loss_cfg.is_mask_low,
                    loss_cfg.is_mask_high,
                )
                for mb, tp in zip(mbs, passes, strict=True)
            ]
        loss_masks = [
            k if i is None else i if k is None else k & i for k, i in zip(keeps, importance, strict=True)
        ]
        aggregation = loss_cfg.aggregation
        parts = [
            torch.stack(
                [
                    loss_denominator(
                        self._loss_inputs(mb, tp.logprobs, keep, tp.entropy), aggregation
                    ).double(),
                    mb.targets.new_tensor(mb.targets.numel(), dtype=torch.float64),
                    tp.nonfinite.double(),
                    torch.where(torch.isfinite(tp.entropy), tp.entropy, 0.0).double().sum(),
                ]
            )
            for mb, tp, keep in zip(mbs, passes, loss_masks, strict=True)
        ]
        totals = torch.stack(parts).sum(0)
        if _is_distributed():
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        # the one host sync before the loss pass: every rank must take the same branch
        skip = bool(totals[2] > 0)
        return GlobalStats(
            thresholds,
            keeps,
            importance,
            loss_masks,
            totals[0].float(),
            totals[1],
            totals[2],
            skip,
            totals[3] / totals[1].clamp_min(1),
        )

    @staticmethod
    def _loss_inputs(mb: MicroBatch, logprobs: Tensor, keep: Tensor | None, entropy: Tensor) -> LossInputs:
        return LossInputs(
            logprobs=logprobs,
            behaviour_logprobs=mb.behaviour_logprobs,
            advantages=mb.advantages,
            loss_mask=mb.valid,
            keep_mask=keep,
            seq_index=mb.seq_index,
            proximal_logprobs=mb.proximal_logprobs,
            entropy=entropy,
        )

    def _loss_pass(
        self,
        mb: MicroBatch,
        keep: Tensor | None,
        denominator: Tensor,
        sign_weights: tuple[float, float] | None = None,
        graph: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Forward with gradient (or the statistics pass's kept one), the policy loss over the
        global denominator, backward."""
        logp, entropy = graph if graph is not None else self._forward(mb)[:2]
        generator = torch.Generator(device=logp.device).manual_seed(
            self.seed * 1_000_003 + self.state.optimizer_step * 1_009 + self.rank
        )
        loss, metrics = policy_loss(
            self._loss_inputs(mb, logp, keep, entropy), self.cfg.loss, denominator, generator, sign_weights
        )
        # the denominator counts the tokens of all ranks, so the ranks' gradients *sum* to the
        # batch gradient; DeepSpeed averages them over the data-parallel group, hence × world size
        self.engine.backward(loss * self.world_size)
        return metrics

    # ---- critic (loss.advantage = gae) --------------------------------------------------------

    def _gae_advantages(self, mbs: list[MicroBatch]) -> ValueTargets:
        """Critic values of the batch before any update, GAE per micro-batch, global whitening.

        Sets ``mb.advantages`` in place; one SUM all-reduce of the advantage moments (every rank).
        """
        critic, ccfg = self.critic, self.cfg.critic
        assert critic is not None and ccfg is not None
        old_values, returns, moments, nonfinite = [], [], [], []
        for mb in mbs:
            values, bad = critic.values(mb.input_ids, mb.attention_mask, mb.select)
            adv, ret = gae_advantages_flat(mb.rewards, values, mb.seq_index, ccfg.gamma, ccfg.lam)
            mb.advantages = adv
            old_values.append(values)
            returns.append(ret)
            moments.append(advantage_moments(adv, ret, values))
            nonfinite.append(bad + (~torch.isfinite(values)).sum())
        totals = torch.stack(moments).sum(0)
        if _is_distributed():
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        summary = summarise_moments(totals)
        if ccfg.whiten_advantages:
            for mb in mbs:
                mb.advantages = whiten(mb.advantages, summary)
        metrics = {
            "driftrl_learner_advantage_mean": summary.mean,
            "driftrl_learner_advantage_std": summary.std,
            "driftrl_learner_explained_variance": summary.explained_variance,
        }
        return ValueTargets(old_values, returns, metrics, torch.stack(nonfinite).sum())

    def _critic_update(
        self, mbs: list[MicroBatch], targets: ValueTargets, agreed: GlobalStats
    ) -> tuple[dict[str, Tensor], float | None]:
        """The critic's loss pass per micro-batch over the global token count, then its step;
        skipped with the policy's step (same decision on every rank)."""
        critic = self.critic
        assert critic is not None
        per_micro: list[dict[str, Tensor]] = []
        if not agreed.skip:
            per_micro = [
                critic.loss_pass(
                    mb.input_ids,
                    mb.attention_mask,
                    mb.select,
                    old,
                    ret,
                    agreed.train_tokens.float(),
                    self.world_size,
                )
                for mb, old, ret in zip(mbs, targets.old_values, targets.returns, strict=True)
            ]
        _, grad_norm = critic.step(skip=agreed.skip)
        tokens = [mb.targets.new_tensor(mb.targets.numel(), dtype=torch.float32) for mb in mbs]
        metrics = Critic.merge_micro_batch_metrics(per_micro, tokens)
        metrics.update(targets.metrics)
        return metrics, grad_norm

    def _optimizer_step(self, skip: bool) -> tuple[bool, float | None]:
        """``engine.step()`` unless the forward was non-finite.

        DeepSpeed skips the update itself when the gradient norm is not finite (ZeRO-1/2/3,
        including bf16 with ``check_grad_overflow``) and reports the pre-clip norm; without ZeRO
        it does neither, so stage 0 checks the (not yet reduced) local gradients on every rank
        first and reports their norm, which is the global one only for a single rank.

        Returns:
            ``(applied, grad_norm)``: whether the parameters changed, the gradient norm (None if
            unknown).
        """
        if skip:
            self.engine.zero_grad()
            return False, None
        local_norm = None
        if self.cfg.zero_stage == 0:
            grads = [p.grad.detach().float() for p in self.module.parameters() if p.grad is not None]
            local_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            bad = (~torch.isfinite(local_norm)).double()
            if _is_distributed():
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bool(bad):
                self.engine.zero_grad()
                return False, None
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        if not applied:
            return False, None
        if local_norm is not None:
            return True, float(local_norm) if self.world_size == 1 else None
        norm = self.engine.get_global_grad_norm()
        return True, None if norm is None else float(norm)

    # ---- same-batch entropy change (ALGORITHM.md §5) --------------------------------------------

    def _measures_entropy_change(self, skip: bool) -> bool:
        """Whether this step measures the realised entropy change (same decision on every rank)."""
        interval = self.cfg.realised_entropy_interval
        return not skip and interval > 0 and self.state.optimizer_step % interval == 0

    def _trainable_tensors(self) -> list[Tensor]:
        """This rank's storage of every trainable parameter: ZeRO-3 keeps only its shard
        (``ds_tensor``), the other stages a full replica."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.cfg.zero_stage == 3:
            return [p.ds_tensor for p in params]
        return params

    @torch.no_grad()
    def _trainable_copy(self) -> list[Tensor]:
        return [t.detach().clone() for t in self._trainable_tensors()]

    @torch.no_grad()
    def _entropy_change_metrics(
        self,
        mbs: list[MicroBatch],
        passes: list[TokenPass],
        before: list[Tensor] | None,
        grad_norm: float | None,
        predicted_per_unit_step: Tensor,
    ) -> dict[str, Tensor]:
        """Realised and predicted entropy change of this step on its own tokens (NaN when not measured).

        ``before`` is the parameter copy taken before ``engine.step()`` (None: not measured, or the
        step was not applied). The post-step forward is the statistics pass's forward (same
        micro-batches, tokens and temperatures), so ``entropy after - entropy before`` differs only
        by the update. ``η_eff`` is :func:`learner.entropy.entropy_step_scale` of the update norm
        (ZeRO-3: shards summed over ranks) and the pre-clip gradient norm.
        """
        names = (
            "realised_entropy_change",
            "entropy_mean_after_step",
            "update_norm",
            "entropy_step_scale",
            "predicted_entropy_change",
            "entropy_change_seconds",
        )
        if before is None:
            return {f"driftrl_learner_{n}": torch.tensor(math.nan, dtype=torch.float64) for n in names}
        start = time.perf_counter()
        entropy_after = torch.cat([self._forward(mb)[1] for mb in mbs])
        entropy_before = torch.cat([p.entropy for p in passes])
        valid = torch.cat([mb.valid for mb in mbs])
        now = self._trainable_tensors()
        squares = torch.stack(
            [(t.detach().double() - old.double()).square().sum() for t, old in zip(now, before, strict=True)]
        ).sum()
        if self.cfg.zero_stage == 3:
            squares = _sum_over_ranks(squares)
        update_norm = squares.sqrt()
        scale = entropy_step_scale(update_norm, math.nan if grad_norm is None else grad_norm)
        values = (
            masked_mean(entropy_after.double() - entropy_before.double(), valid),
            masked_mean(entropy_after.double(), valid),
            update_norm,
            scale,
            # a batch whose kept tokens all have A = 0 has no gradient (η_eff undefined): the law's
            # prediction for it is exactly 0, not unknown
            torch.where(
                predicted_per_unit_step.double() == 0,
                torch.zeros((), dtype=torch.float64),
                scale * predicted_per_unit_step.double(),
            ),
            torch.tensor(time.perf_counter() - start, dtype=torch.float64),
        )
        return {f"driftrl_learner_{n}": v for n, v in zip(names, values, strict=True)}

    def _count_step(self, applied: bool) -> None:
        self.state.optimizer_step += 1
        if applied:
            self.state.consecutive_skipped = 0
        else:
            self.state.skipped_steps += 1
            self.state.consecutive_skipped += 1

    # ---- metrics ------------------------------------------------------------------------------

    def _step_metrics(
        self,
        batch: RolloutBatch,
        mbs: list[MicroBatch],
        passes: list[TokenPass],
        agreed: GlobalStats,
        loss_metrics: list[dict[str, Tensor]],
        zero_variance_frac: Tensor,
    ) -> dict[str, Tensor]:
        """Rank-local metrics of the step (0-d tensors), before the cross-rank reduction."""
        valid = torch.cat([mb.valid for mb in mbs])
        keep = None if agreed.thresholds is None else torch.cat(agreed.keep_masks)
        stats = TokenStats(
            *(
                torch.cat([getattr(p, f) for p in passes])
                for f in ("logprobs", "entropy", "s_star", "s_expect")
            )
        )
        ratio = torch.cat([p.ratio for p in passes])
        ratio = torch.where(torch.isfinite(ratio), ratio, 0.0)
        metrics = entropy_metrics(
            stats,
            torch.cat([mb.advantages for mb in mbs]),
            valid,
            ratio,
            keep,
            sum_all_reduce=_sum_over_ranks,
            trained_mask=None if agreed.importance_masks[0] is None else torch.cat(agreed.loss_masks),
        )
        metrics.update(self._merge_micro_batch_metrics(loss_metrics))
        metrics["driftrl_learner_grpo_zero_variance_frac"] = zero_variance_frac
        logprobs = torch.cat([p.logprobs for p in passes])
        metrics["driftrl_learner_mismatch_kl"] = mismatch_kl(
            torch.where(valid, logprobs, 0.0),
            torch.cat([mb.behaviour_logprobs for mb in mbs]),
            valid & torch.isfinite(logprobs),
        )
        masked = torch.zeros_like(valid)
        if agreed.importance_masks[0] is not None:
            masked = valid & ~torch.cat(agreed.importance_masks)
        metrics["driftrl_learner_is_masked_frac"] = masked_mean(masked.float(), valid)
        metrics["driftrl_learner_train_tokens"] = valid.sum().float()
        metrics["driftrl_learner_nonfinite_tokens"] = agreed.nonfinite_tokens
        metrics.update(self._table_metrics(batch))
        return metrics

    @staticmethod
    def _merge_micro_batch_metrics(per_micro: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Combine :func:`policy_loss` metrics of the micro-batches into one per rank.

        "sum" metrics add (the loss already has the global denominator), "max" take the max,
        "mean" metrics are weighted by each micro-batch's loss tokens, i.e. the token mean over
        the rank. A skipped step has no loss pass: its loss metrics are NaN.
        """
        if not per_micro:
            return {name: torch.tensor(math.nan) for name in ALWAYS_LOSS_METRICS}
        tokens = torch.stack([m["driftrl_learner_loss_tokens"] for m in per_micro])
        merged = {}
        for name in per_micro[0]:
            values = torch.stack([m[name].float() for m in per_micro])
            how = METRIC_REDUCTIONS.get(name, "mean")
            if how == "sum":
                merged[name] = values.sum()
            elif how == "max":
                merged[name] = values.max()
            else:
                merged[name] = (values * tokens).sum() / tokens.sum().clamp_min(1)
        return merged

    def _table_metrics(self, batch: RolloutBatch) -> dict[str, Tensor]:
        """Metrics of the whole table (identical on every rank): staleness, reward, length."""
        staleness = (self.state.policy_version - batch.version_start).float()
        lengths = batch.response_mask.sum(1).float()
        hist_top = self.cfg.max_staleness + 1
        # bins 0 .. max_staleness, and one for anything older (the buffer should have dropped it)
        counts = torch.bincount(staleness.long().clamp(0, hist_top), minlength=hist_top + 1)
        metrics = {
            "driftrl_learner_staleness_mean": staleness.mean(),
            "driftrl_learner_staleness_max": staleness.max(),
            "driftrl_learner_reward_mean": batch.rewards.float().mean(),
            "driftrl_learner_response_length_mean": lengths.mean(),
            "driftrl_learner_groups": torch.tensor(float(torch.unique(batch.group_index).numel())),
            "driftrl_learner_responses": torch.tensor(float(batch.rewards.numel())),
        }
        for k in range(hist_top):
            metrics[f"driftrl_learner_staleness_count_{k}"] = counts[k].float()
        metrics["driftrl_learner_staleness_count_over"] = counts[hist_top].float()
        return metrics

    def _reduce_metrics(
        self, metrics: dict[str, Tensor], thresholds: ClipThresholds | None
    ) -> dict[str, float]:
        """Cross-rank reduction with each metric's stated reduction, then one host sync.

        "sum" and token-weighted "mean" metrics share one SUM all-reduce, "max" metrics one MAX
        all-reduce. The clip thresholds are appended unreduced: they are each rank's own copy.
        """
        reductions = {**METRIC_REDUCTIONS, **LEARNER_METRIC_REDUCTIONS, **CRITIC_METRIC_REDUCTIONS}
        names = sorted(metrics)
        how = {
            n: reductions.get(n, "max" if n.startswith("driftrl_learner_staleness_count") else "mean")
            for n in names
        }
        weight = metrics["driftrl_learner_train_tokens"].double()
        sum_names = [n for n in names if how[n] in ("sum", "mean")]
        max_names = [n for n in names if how[n] == "max"]
        sums = torch.stack(
            [metrics[n].double() * (weight if how[n] == "mean" else 1.0) for n in sum_names] + [weight]
        )
        maxes = torch.stack([metrics[n].double() for n in max_names])
        if _is_distributed():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        total_weight = sums[-1].clamp_min(1)
        values = [sums[i] / total_weight if how[n] == "mean" else sums[i] for i, n in enumerate(sum_names)]
        values += list(maxes.unbind(0))
        out_names = sum_names + max_names
        if thresholds is not None:
            values += [thresholds.center, thresholds.bound]
            out_names += ["driftrl_learner_clip_center", "driftrl_learner_clip_bound"]
            if thresholds.cutoff is not None:
                values.append(thresholds.cutoff)
                out_names.append("driftrl_learner_clip_cutoff")
        flat = torch.stack([v.double().reshape(()) for v in values]).tolist()
        return dict(zip(out_names, flat, strict=True))

    def _host_metrics(
        self, applied: bool, grad_norm: float | None, lr: float, seconds: float, train_tokens: float
    ) -> dict[str, float]:
        """Metrics DeepSpeed and the clock already hold on the host (grad norm NaN when skipped)."""
        return {
            "driftrl_learner_grad_norm": math.nan if grad_norm is None else grad_norm,
            "driftrl_learner_lr": lr,
            "driftrl_learner_step_skipped": 0.0 if applied else 1.0,
            "driftrl_learner_skipped_steps_total": float(self.state.skipped_steps),
            "driftrl_learner_step": float(self.state.step),
            "driftrl_learner_optimizer_step": float(self.state.optimizer_step),
            "driftrl_learner_policy_version": float(self.state.policy_version),
            "driftrl_learner_step_seconds": seconds,
            "driftrl_learner_train_tokens_per_s": train_tokens / seconds,
        }

    # ---- probe --------------------------------------------------------------------------------

    @torch.no_grad()
    def probe_entropy(
        self, probe_input_ids: Tensor, probe_attention_mask: Tensor | None = None, temperature: float = 1.0
    ) -> float:
        """Mean next-token entropy of the current policy over every real position of fixed sequences.

        Realised ΔH between syncs = difference of two calls (ALGORITHM.md §5). Every rank calls it
        under ZeRO-3 (the forward gathers parameters collectively).

        Args:
            probe_input_ids: ``[P, L]`` token ids.
            probe_attention_mask: ``[P, L]``, 1 = real token; None = all real.
            temperature: the distribution is ``softmax(z / T)``.
        """
        ids = probe_input_ids.long().to(self.device)
        mask = (
            torch.ones_like(ids)
            if probe_attention_mask is None
            else probe_attention_mask.long().to(self.device)
        )
        select = mask.bool()
        n = int(select.sum())
        _, entropy, _, _, _ = self.engine(
            ids,
            mask,
            select,
            torch.zeros(n, dtype=torch.long, device=self.device),
            torch.full((n,), 1.0 / temperature, device=self.device),
        )
        return float(entropy.mean())

    # ---- weights ------------------------------------------------------------------------------

    def named_parameters_for_sync(self) -> Iterator[tuple[str, Tensor]]:
        """Full parameters under their Hugging Face names, one module at a time, on the CPU.

        Under ZeRO-3 each module's parameters are gathered (every rank must iterate in step) and
        copied before the next module is gathered, so at most one layer is whole at a time.
        """
        zero3 = self.cfg.zero_stage == 3
        for module_name, module in self.hf_model.named_modules():
            params = list(module.named_parameters(recurse=False))
            if not params:
                continue
            prefix = f"{module_name}." if module_name else ""
            if zero3:
                with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                    copies = [(prefix + n, p.detach().to("cpu", copy=True)) for n, p in params]
            else:
                copies = [(prefix + n, p.detach().to("cpu", copy=True)) for n, p in params]
            yield from copies

    def state_dict_for_sync(self) -> dict[str, Tensor]:
        """:meth:`named_parameters_for_sync` collected into a dict (whole model on the CPU)."""
        return dict(self.named_parameters_for_sync())

    def publish_weights(self, publisher: Any, version: int | None = None) -> Any:
        """Hand the full weights to ``publisher.publish(version, named_tensors)`` (rank 0 only).

        Every rank must call it (ZeRO-3 gathers collectively); the learner's policy version becomes
        ``version`` (default: the current one + 1) on every rank.

        Returns:
            What the publisher returned on rank 0 (its manifest/object refs), None elsewhere.
        """
        version = self.state.policy_version + 1 if version is None else version
        # rank 0's publisher consumes the per-module gathers as they come (a push transport streams
        # each bucket while later layers are still gathered); the rest is drained whatever the
        # publisher did, so an error on rank 0 cannot leave the other ranks blocked in a ZeRO-3 gather
        named = self.named_parameters_for_sync()
        try:
            result = publisher.publish(version, named) if self.rank == 0 else None
        finally:
            for _ in named:
                pass
        self.state.policy_version = version
        return result

    def export_pretrained(
        self, directory: str | os.PathLike[str], tokenizer_source: str | None = None
    ) -> Path | None:
        """Write the current weights as a Hugging Face model directory (rank 0 writes; all ranks call).

        Args:
            directory: output folder, replaced atomically (written to ``<directory>.tmp`` first).
            tokenizer_source: a model directory whose tokenizer files are copied alongside, so
                ``transformers`` and vLLM can load the export on its own.

        Returns:
            The directory on rank 0, None elsewhere.
        """
        # ZeRO-3 gathers collectively, so every rank iterates even though only rank 0 writes
        state = dict(self.named_parameters_for_sync())
        if self.rank != 0:
            return None
        final = Path(directory)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.hf_model.save_pretrained(str(tmp), state_dict=state)
        if tokenizer_source is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(str(tmp))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    # ---- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``directory/`` = DeepSpeed engine state (``deepspeed/``, the critic's in ``critic/``) +
        ``state.json``, atomically.

        Everything is written under ``<directory>.tmp`` and renamed at the end, so a crash leaves
        either the previous checkpoint or none, never a partial one. All ranks call it and must
        share the file system (each writes its own optimizer shard).
        """
        final = Path(directory)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        self.engine.save_checkpoint(str(tmp), tag=CHECKPOINT_ENGINE_TAG, save_latest=False)
        if self.critic is not None:
            self.critic.save(tmp)
        rng = [None] * self.world_size
        if _is_distributed():
            dist.all_gather_object(rng, _encode_rng_state())
        else:
            rng = [_encode_rng_state()]
        if self.rank == 0:
            state = {
                "step": self.state.step,
                "optimizer_step": self.state.optimizer_step,
                "policy_version": self.state.policy_version,
                "skipped_steps": self.state.skipped_steps,
                "consecutive_skipped": self.state.consecutive_skipped,
                "world_size": self.world_size,
                "zero_stage": self.cfg.zero_stage,
                "critic": self.critic is not None,
                "extra": self.state.extra,
                "entropy_controller": None if self.controller is None else self.controller.state_dict(),
                "rng": rng,
            }
            (tmp / CHECKPOINT_STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            if final.exists():
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
        self._barrier()
        return final

    def load_checkpoint(self, directory: str | os.PathLike[str]) -> LearnerState:
        """Restore model, optimizer, LR schedule, counters and (same world size) RNG states."""
        path = Path(directory)
        state_file = path / CHECKPOINT_STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} is not a learner checkpoint (no {CHECKPOINT_STATE_FILE})")
        saved = json.loads(state_file.read_text())
        # checked before DeepSpeed loads anything, so a bad state.json fails the resume at once
        has_critic = bool(saved.get("critic", False))
        if has_critic != (self.critic is not None):
            raise ValueError(
                f"{path}: the checkpoint {'has' if has_critic else 'has no'} critic but this learner "
                f"runs loss.advantage={self.cfg.loss.advantage}; resume with the advantage it was trained with"
            )
        rng = None
        if saved["world_size"] == self.world_size:
            rng = _decode_rng_state(saved["rng"][self.rank], f"{state_file} rng[{self.rank}]")
        load_path, _ = self.engine.load_checkpoint(
            str(path), tag=CHECKPOINT_ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise FileNotFoundError(f"{path / CHECKPOINT_ENGINE_TAG}: DeepSpeed found no checkpoint to load")
        if self.critic is not None:
            self.critic.load(path)
        self.state = LearnerState(
            step=saved["step"],
            # checkpoints from before mini-batches made one optimizer step per learner step
            optimizer_step=saved.get("optimizer_step", saved["step"]),
            policy_version=saved["policy_version"],
            skipped_steps=saved["skipped_steps"],
            consecutive_skipped=saved["consecutive_skipped"],
            extra=saved.get("extra", {}),
        )
        controller_state = saved.get("entropy_controller")
        if self.controller is not None and controller_state is not None:
            self.controller.load_state_dict(controller_state)
        if rng is not None:
            _restore_rng_state(rng)
        return self.state

    def _barrier(self) -> None:
        if _is_distributed():
            dist.barrier()
