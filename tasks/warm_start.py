"""Warm start of the embedded tiny policy: a short supervised fine-tune on the reversal task.

RL from a random-init policy gets no reward signal (greedy accuracy 0, and sampled responses almost
never match), so the default run starts from a policy that already solves part of the task. The
fine-tune stops on a fixed step budget, not on a time limit, so the starting point is the same on a
fast or a slow machine: short strings mostly solved, long ones mostly not (the measured numbers are
in README.md and in each run's ``warm_start.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.synthetic import DEFAULT_RARE_FRAC, LONG_TAIL_MAX_POSITIONS, SFT_TARGET, load_rows, write_dataset

WARM_START_JSON = "warm_start.json"
# multi_answer's warm start: the default 140 steps at rare_frac 0.35 left the copy nearly untaught
# (greedy 0.125, the copy 1.2 % of held-out samples at temperature 0.7); 400 steps teach both answers
# (greedy 0.695; reversal 41 %, copy 21 % of samples; 12 % of questions solved only by a copy), so
# RL starts with the rarer answer alive and entropy collapse has something to remove
MULTI_ANSWER_WARM_STEPS = 400


@dataclass(frozen=True)
class WarmStartSettings:
    """Budget and optimiser of the supervised warm start.

    Attributes:
        steps: Optimizer steps (the budget; fixed so the result does not depend on machine speed).
        batch_size: Sequences per step.
        lr: AdamW learning rate (constant after ``warmup_steps``).
        warmup_steps: Linear LR warm-up steps.
        seed: Seed of the batch order.
        num_threads: torch intra-op threads; None = all cores this process may use.
        eval_rows: Held-out rows scored before and after (the first N of the split).
        sequence_mean: Average the loss per sequence, then over the batch, instead of over all
            tokens. long_tail needs it: with the token mean a 288-token answer outweighs a
            3-token one 100:1, the model learns to repeat but never where to stop (measured: 0 %
            held-out after 140 steps, every greedy answer ran to the token limit).
    """

    steps: int = 140
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 10
    seed: int = 0
    num_threads: int | None = None
    eval_rows: int = 512
    sequence_mean: bool = False


def sequence_mean_loss(logits: Any, labels: Any) -> Any:
    """Next-token NLL averaged over each sequence's labelled tokens, then over the batch.

    Args:
        logits: ``[B, T, V]`` float, position t predicting token t + 1.
        labels: ``[B, T]`` long, -100 where nothing is scored (the HF convention, unshifted).

    Returns:
        A scalar; a row without labelled tokens contributes 0.
    """
    import torch

    shifted = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), shifted, ignore_index=-100, reduction="none"
    )  # [B, T-1]
    counted = (shifted != -100).sum(dim=1).clamp(min=1)
    return (nll.sum(dim=1) / counted).mean()


def encode_sft_batch(tokenizer: Any, rows: Sequence[dict[str, Any]], prompt_key: str, answer_key: str) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for teacher forcing.

    A sequence is ``BOS prompt answer EOS``; labels are -100 on BOS, the prompt and padding, so the
    loss is the log-likelihood of exactly what a rollout would generate (answer, then EOS).
    """
    import torch

    seqs, label_seqs = [], []
    for r in rows:
        prompt_ids = tokenizer(r[prompt_key])["input_ids"]
        answer_ids = tokenizer(r[answer_key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt_ids + answer_ids)
        label_seqs.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, label_seqs, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        attention_mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def supervised_finetune(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    settings: WarmStartSettings,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    progress: bool = True,
) -> list[float]:
    """Fine-tune ``model`` in place on ``rows`` for ``settings.steps`` steps; returns the step losses.

    Batches are drawn without replacement from a seeded permutation (reshuffled per epoch), so the
    same settings and rows give the same batches.
    """
    import torch
    from tqdm.auto import tqdm

    encoded = encode_sft_batch(tokenizer, rows, prompt_key, answer_key)
    gen = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(settings.warmup_steps, 1))
    )
    model.train()
    order = torch.randperm(len(rows), generator=gen)
    cursor = 0
    losses: list[float] = []
    bar = tqdm(range(settings.steps), desc="warm start (SFT)", unit="step", disable=not progress)
    for _ in bar:
        if cursor + settings.batch_size > len(order):
            order, cursor = torch.randperm(len(rows), generator=gen), 0
        idx = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        batch = {k: v[idx] for k, v in encoded.items()}
        # Trim the padding columns this batch does not use: the longest sequence sets the width.
        width = int(batch["attention_mask"].sum(dim=1).max())
        batch = {k: v[:, :width] for k, v in batch.items()}
        if settings.sequence_mean:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = sequence_mean_loss(logits, batch["labels"])
        else:
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def _settings_record(settings: WarmStartSettings) -> dict[str, Any]:
    # num_threads changes speed, not the result, so a different thread count still hits the cache.
    record = asdict(settings)
    record.pop("num_threads")
    # absent when off, so warm starts cached before the option existed still match
    if not record["sequence_mean"]:
        record.pop("sequence_mean")
    return record


def read_warm_start_record(model_dir: str | Path) -> dict[str, Any] | None:
    """The ``warm_start.json`` of a warm-started model directory, or None if it has none."""
    path = Path(model_dir) / WARM_START_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; a reader sees the old or the new one, never a mix."""
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished the same build first: keep its result, drop ours.
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.exists():
                raise


def warm_start(
    init_dir: str | Path,
    out_dir: str | Path,
    train_path: str | Path,
    heldout_path: str | Path,
    settings: WarmStartSettings | None = None,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the model in ``init_dir`` on the train split and save it to ``out_dir``, once.

    If ``out_dir`` already holds a ``warm_start.json`` written with the same settings, nothing is
    trained and that record is returned (the cache). Otherwise the model is fine-tuned, saved with
    its tokenizer and record into a temporary sibling directory, and renamed to ``out_dir``.

    Returns the record: held-out greedy accuracy before and after (overall and per difficulty),
    steps, seconds, settings and the paths used.
    """
    import torch

    from tasks.heldout import accuracy_by_difficulty, answer_token_budget, greedy_correct, load_policy

    settings = settings or WarmStartSettings()
    out = Path(out_dir)
    cached = read_warm_start_record(out)
    if cached is not None and cached.get("settings") == _settings_record(settings):
        return cached

    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.num_threads or len(os.sched_getaffinity(0)))
    try:
        model, tokenizer = load_policy(init_dir)
        train_rows = load_rows(train_path)
        heldout_rows = load_rows(heldout_path)[: settings.eval_rows]
        max_new_tokens = answer_token_budget(tokenizer, heldout_rows, answer_key)

        def score() -> tuple[float, dict[int, float] | None]:
            correct = greedy_correct(model, tokenizer, heldout_rows, max_new_tokens, 256, prompt_key, answer_key)
            by_difficulty = (
                accuracy_by_difficulty(heldout_rows, correct) if "difficulty" in heldout_rows[0] else None
            )
            return sum(correct) / len(correct), by_difficulty

        accuracy_before, by_difficulty_before = score()
        train_started = time.perf_counter()
        losses = supervised_finetune(model, tokenizer, train_rows, settings, prompt_key, answer_key, progress)
        train_seconds = time.perf_counter() - train_started
        accuracy_after, by_difficulty_after = score()
    finally:
        torch.set_num_threads(previous_threads)

    record = {
        "heldout_accuracy_before": accuracy_before,
        "heldout_accuracy_after": accuracy_after,
        "heldout_accuracy_by_difficulty_before": by_difficulty_before,
        "heldout_accuracy_by_difficulty_after": by_difficulty_after,
        "heldout_rows": len(heldout_rows),
        "final_loss": losses[-1] if losses else None,
        "steps": settings.steps,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "settings": _settings_record(settings),
        "init_dir": str(init_dir),
        "train_path": str(train_path),
        "heldout_path": str(heldout_path),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    # JSON object keys are strings; difficulties come back as "3", "4", ... from a cached record.
    (tmp / WARM_START_JSON).write_text(json.dumps(record, indent=1) + "\n")
    _replace_dir(tmp, out)
    return json.loads((out / WARM_START_JSON).read_text())


class WarmStartMismatchError(ValueError):
    """The cached warm start at a model path was made with other settings than a run asks for."""


def _check_data_variant(train_path: Path, variant: str, rare_frac: float = DEFAULT_RARE_FRAC) -> None:
    """Existing synthetic data must be of the asked variant (and, for multi_answer, rare_frac): reusing
    reversal rows for a multi_answer run (or the reverse) would train and score the wrong task without
    a word."""
    spec = train_path.with_name(train_path.stem + ".spec.json")
    if not spec.is_file():
        return
    meta = json.loads(spec.read_text())
    made = meta.get("task", "reversal")
    if made == variant == "multi_answer" and meta.get("rare_frac", rare_frac) != rare_frac:
        raise WarmStartMismatchError(
            f"task.train_path={train_path} holds multi_answer data made with rare_frac={meta['rare_frac']} "
            f"({spec}); this run asks for task.rare_frac={rare_frac}. Point task.train_path, task.eval_path "
            "and model.path at other directories for it, or delete the old ones"
        )
    if made != variant:
        raise WarmStartMismatchError(
            f"task.train_path={train_path} holds {made!r} data ({spec}); this run asks for "
            f"task.variant={variant!r}. Point task.train_path, task.eval_path and model.path at other "
            f"directories for it (e.g. runs/tiny-{variant}-data/..., runs/tiny-{variant}-model/warm)"
        )


def ensure_tiny_setup(
    *,
    train_path: str | Path,
    eval_path: str | Path,
    model_path: str | Path,
    seed: int,
    synthetic: bool = True,
    build_tiny: bool = True,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    settings: WarmStartSettings | None = None,
    progress: bool = True,
    variant: str = "reversal",
    rare_frac: float = DEFAULT_RARE_FRAC,
) -> dict[str, Any] | None:
    """Build whatever the embedded default run still lacks: data, tiny model, warm start.

    The data files are written only for the synthetic task (``synthetic``) and only when missing.
    When ``build_tiny`` is set and ``model_path`` has no model yet, the factory model goes to
    ``<model_path>/../init`` and the warm-started one to ``model_path``. A model directory without a
    ``warm_start.json`` (a user's model) is left alone. An existing warm start is reused when it was
    made with the same settings (see :func:`warm_start`). Returns the warm-start record, or None
    when there is none.

    Args:
        settings: Warm-start budget; None = the defaults with ``seed``.
        variant: Synthetic task variant (:data:`tasks.synthetic.VARIANTS`). For ``multi_answer`` the
            warm start teaches each train row's ``sft_target`` (mostly the reversal, the copy on a
            ``rare_frac`` share), not the ``answer`` cell that lists every valid answer.
            ``long_tail`` teaches the answer column and builds the tiny model with
            :data:`tasks.synthetic.LONG_TAIL_MAX_POSITIONS` positions.
        rare_frac: multi_answer: share of train rows whose warm-start target is the copy.

    Raises:
        WarmStartMismatchError: ``model_path`` holds a warm start made with other settings.
    """
    from tasks.tiny_model import make_tiny_model

    train_path, heldout_path = Path(train_path), Path(eval_path)
    if synthetic and not (train_path.is_file() and heldout_path.is_file()):
        write_dataset(train_path, heldout_path, seed=seed, variant=variant, rare_frac=rare_frac)
    elif synthetic:
        _check_data_variant(train_path, variant, rare_frac)

    model_dir = Path(model_path)
    record = read_warm_start_record(model_dir)
    if not build_tiny or (model_dir.exists() and record is None):
        return record
    init_dir = model_dir.parent / "init"
    if not (init_dir / "config.json").is_file():
        tmp = init_dir.with_name(f".{init_dir.name}.tmp.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        # long_tail answers run to 288 tokens: positions beyond the default 256 (vLLM checks them)
        positions = LONG_TAIL_MAX_POSITIONS if variant == "long_tail" else None
        make_tiny_model(tmp, seed=seed, max_position_embeddings=positions)
        _replace_dir(tmp, init_dir)
    if settings is None and variant == "long_tail":
        # 128 held-out rows: every greedy answer of an untrained model runs to the 289-token limit
        settings = WarmStartSettings(seed=seed, sequence_mean=True, eval_rows=128)
    if settings is None and variant == "multi_answer":
        settings = WarmStartSettings(seed=seed, steps=MULTI_ANSWER_WARM_STEPS)
    settings = settings or WarmStartSettings(seed=seed)
    if record is not None and record.get("settings") != _settings_record(settings):
        # the cache is shared by every run pointing at model.path: retraining it in place would
        # silently change the starting policy of runs that already used it
        raise WarmStartMismatchError(
            f"model.path={model_dir} holds a warm start made with other settings "
            f"({record.get('settings')}); this run asks for {_settings_record(settings)}. Point "
            f"model.path at another directory for it, e.g. model.path={model_dir.parent}-seed{seed}/warm"
        )
    sft_key = SFT_TARGET if variant == "multi_answer" else answer_key
    return warm_start(init_dir, model_dir, train_path, heldout_path, settings, prompt_key, sft_key, progress)
