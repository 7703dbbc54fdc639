"""Greedy held-out accuracy of a policy with transformers: the before/after number of a run.

Greedy decoding (not sampling) so the number is deterministic for a model and needs one response
per prompt. Batches are padded on the left: a decoder-only model continues from the last position
of each row, so right padding would make it continue from pad tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.synthetic import is_correct, valid_answers


def load_policy(model_dir: str | Path) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a Hugging Face directory, fp32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model, tokenizer


def generate_greedy(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 256
) -> list[str]:
    """Greedy completions of ``prompts``, decoded with special tokens skipped."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts: list[str] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new_tokens = out[:, batch["input_ids"].shape[1] :]
                texts.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return texts


def greedy_correct(
    model_or_dir: Any,
    tokenizer: Any | None,
    rows: Sequence[dict[str, Any]],
    max_new_tokens: int,
    batch_size: int = 256,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
) -> list[bool]:
    """Per-row exact-match correctness of greedy responses (see :func:`evaluate_accuracy`)."""
    if isinstance(model_or_dir, str | Path):
        model, loaded_tokenizer = load_policy(model_or_dir)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        model = model_or_dir
    if tokenizer is None:
        raise ValueError("a tokenizer is required when a model object is given")
    was_training = model.training
    model.eval()
    try:
        texts = generate_greedy(model, tokenizer, [r[prompt_key] for r in rows], max_new_tokens, batch_size)
    finally:
        model.train(was_training)
    return [is_correct(text, r[answer_key]) for text, r in zip(texts, rows, strict=True)]


def evaluate_accuracy(
    model_or_dir: Any,
    tokenizer: Any | None,
    rows: Sequence[dict[str, Any]],
    max_new_tokens: int,
    batch_size: int = 256,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
) -> float:
    """Fraction of ``rows`` whose greedy response exactly matches the answer.

    Args:
        model_or_dir: A causal LM (left in the train/eval mode it came in) or a model directory.
        tokenizer: Its tokenizer; may be None when a directory is given (loaded from there).
        rows: Dicts with the prompt and answer columns.
        max_new_tokens: Generation limit; the answer length + 1 for EOS is enough.
        batch_size: Prompts per ``generate`` call.
    """
    correct = greedy_correct(model_or_dir, tokenizer, rows, max_new_tokens, batch_size, prompt_key, answer_key)
    return sum(correct) / max(len(correct), 1)


def accuracy_by_difficulty(rows: Sequence[dict[str, Any]], correct: Sequence[bool]) -> dict[int, float]:
    """Accuracy per value of the ``difficulty`` column, keys sorted."""
    totals: dict[int, list[int]] = {}
    for r, ok in zip(rows, correct, strict=True):
        hit_total = totals.setdefault(int(r["difficulty"]), [0, 0])
        hit_total[0] += int(ok)
        hit_total[1] += 1
    return {d: hits / total for d, (hits, total) in sorted(totals.items())}


def answer_token_budget(tokenizer: Any, rows: Sequence[dict[str, Any]], answer_key: str = "answer") -> int:
    """Enough new tokens for the longest valid answer plus EOS (a multi_answer cell holds several)."""
    return 1 + max(
        len(tokenizer(a, add_special_tokens=False)["input_ids"]) for r in rows for a in valid_answers(r[answer_key])
    )
