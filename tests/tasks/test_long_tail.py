"""The synthetic task's long_tail variant: length distribution, scorer, tokens, config and model positions."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from actors.rewards import exact_match
from driftrl.config import load_config
from tasks.synthetic import (
    LONG_TAIL_MAX_POSITIONS,
    REPEAT,
    LongTailSpec,
    ReversalSpec,
    TaskSpecError,
    is_correct,
    load_rows,
    make_rows,
    write_dataset,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny-longtail-cpu.yaml"


def _parse(prompt: str) -> tuple[str, int]:
    base, count = prompt[:-1].split(REPEAT)
    return base, int(count)


@pytest.fixture(scope="module")
def rows() -> tuple[list[dict], list[dict]]:
    return make_rows(0, 20_000, 512, LongTailSpec(), LongTailSpec(), variant="long_tail")


def test_answer_is_the_base_repeated_count_times(rows) -> None:
    train, held = rows
    for row in train[:2000] + held:
        base, count = _parse(row["prompt"])
        assert 1 <= len(base) <= 3 and base.isalpha() and count >= 1
        assert row["answer"] == base * count
        assert row["difficulty"] == len(row["answer"]) <= 288
    # held-out prompts are distinct and never in train
    held_prompts = {r["prompt"] for r in held}
    assert len(held_prompts) == len(held)
    assert not held_prompts & {r["prompt"] for r in train}


def test_lengths_are_heavy_tailed_from_a_few_tokens_to_at_least_256(rows) -> None:
    for split in rows:
        lengths = [r["difficulty"] for r in split]
        assert min(lengths) <= 3
        assert max(lengths) >= 256
        # log-uniform on 2..288: median sqrt(2 * 289) ~ 24, a quarter of answers <= 8 tokens
        assert 15 <= statistics.median(lengths) <= 40
        assert 0.15 <= sum(n <= 8 for n in lengths) / len(lengths) <= 0.35
        assert 0.01 <= sum(n >= 256 for n in lengths) / len(lengths) <= 0.06
    train_lengths = [r["difficulty"] for r in rows[0]]
    # the mean sits far above the median: a batch's longest response is many times its typical one
    assert statistics.mean(train_lengths) > 2 * statistics.median(train_lengths)
    batch_max = [max(train_lengths[i : i + 8]) for i in range(0, len(train_lengths), 8)]
    assert sum(m >= 128 for m in batch_max) / len(batch_max) > 0.6


def test_deterministic_for_a_seed() -> None:
    spec = LongTailSpec()
    first = make_rows(5, 300, 30, spec, spec, variant="long_tail")
    assert make_rows(5, 300, 30, spec, spec, variant="long_tail") == first
    assert make_rows(6, 300, 30, spec, spec, variant="long_tail") != first


@pytest.mark.parametrize("score", [is_correct, lambda r, a: exact_match(r, a) == 1.0])
def test_exact_match_of_the_whole_repeat(score) -> None:
    answer = "ab" * 130
    assert score(answer, answer) and score(answer + "\n", answer)
    for wrong in ("ab" * 129, "ab" * 131, "ab" * 129 + "a", "", "ba" * 130):
        assert not score(wrong, answer)


def test_bad_specs_are_refused() -> None:
    with pytest.raises(TaskSpecError, match="min_answer"):
        LongTailSpec(min_answer=10, max_answer=5)
    with pytest.raises(TaskSpecError, match="max_base"):
        LongTailSpec(max_base=0)
    with pytest.raises(TaskSpecError, match="LongTailSpec"):
        make_rows(0, 5, 5, ReversalSpec(), ReversalSpec(), variant="long_tail")
    # 2 letters, base length 1, answers of 1..2 letters: 4 distinct prompts, so 5 must fail, not spin
    tiny = LongTailSpec(min_answer=1, max_answer=2, max_base=1, alphabet_size=2)
    assert len(make_rows(0, 0, 4, tiny, tiny, variant="long_tail")[1]) == 4
    with pytest.raises(TaskSpecError, match="cannot produce 5"):
        make_rows(0, 0, 5, tiny, tiny, variant="long_tail")


def test_written_split_uses_the_long_tail_spec(tmp_path: Path) -> None:
    train, _ = write_dataset(tmp_path / "t.parquet", tmp_path / "h.parquet", n_train=50, n_heldout=10, variant="long_tail")
    assert all(REPEAT in r["prompt"] for r in load_rows(train))
    meta = json.loads((tmp_path / "t.spec.json").read_text())
    assert meta["task"] == "long_tail" and meta["max_answer"] == 288


def test_config_loads_validates_and_fits_the_longest_answer() -> None:
    from tasks.tiny_model import build_tokenizer

    cfg = load_config(CONFIG)
    assert cfg.task.variant == "long_tail"
    assert cfg.task.train_path.startswith("runs/tiny-longtail-data/")
    assert cfg.model.path.startswith("runs/tiny-longtail-model/")
    spec = LongTailSpec()
    tok = build_tokenizer()
    longest_prompt = "abc" + REPEAT + "288="
    assert len(longest_prompt) == spec.max_prompt_chars
    # the longest answer and its EOS fit, with the spare token an over-long response needs
    assert cfg.rollout.max_tokens >= spec.max_answer_chars + 2
    prompt_tokens = len(tok(longest_prompt)["input_ids"])
    assert prompt_tokens + cfg.rollout.max_tokens <= cfg.rollout.max_model_len <= LONG_TAIL_MAX_POSITIONS
    # the buffer holds a checkpoint interval of leased groups (the validator would have refused)
    needed = (cfg.learner.checkpoint_interval + cfg.learner.max_staleness + 1) * cfg.learner.groups_per_step
    assert cfg.buffer.capacity_groups >= needed


def test_check_config_cli_accepts_it() -> None:
    from driftrl.cli import main

    assert main(["check-config", "--config", str(CONFIG)]) in (0, None)


def test_tiny_model_positions_change_the_config_not_the_weights(tmp_path: Path) -> None:
    from tasks.tiny_model import make_tiny_model

    default = make_tiny_model(tmp_path / "default", seed=0)
    longer = make_tiny_model(tmp_path / "longer", seed=0, max_position_embeddings=LONG_TAIL_MAX_POSITIONS)
    assert json.loads((longer / "config.json").read_text())["max_position_embeddings"] == LONG_TAIL_MAX_POSITIONS
    assert json.loads((default / "config.json").read_text())["max_position_embeddings"] == 256
    assert (longer / "model.safetensors").read_bytes() == (default / "model.safetensors").read_bytes()


# ~35 s on a shared 2-core machine: 20k rows written, two greedy evaluations of 289 new tokens
@pytest.mark.slow
def test_setup_builds_long_tail_data_and_a_model_with_its_positions(tmp_path: Path) -> None:
    from tasks.warm_start import WarmStartSettings, ensure_tiny_setup

    settings = WarmStartSettings(steps=1, batch_size=8, eval_rows=4, warmup_steps=0)
    record = ensure_tiny_setup(
        train_path=tmp_path / "data/train.parquet",
        eval_path=tmp_path / "data/heldout.parquet",
        model_path=tmp_path / "model/warm",
        seed=0,
        settings=settings,
        progress=False,
        variant="long_tail",
    )
    assert record is not None and record["steps"] == 1 and record["heldout_rows"] == 4
    assert all(REPEAT in r["prompt"] for r in load_rows(tmp_path / "data/train.parquet"))
    for d in ("init", "warm"):
        config = json.loads((tmp_path / "model" / d / "config.json").read_text())
        assert config["max_position_embeddings"] == LONG_TAIL_MAX_POSITIONS


def test_sequence_mean_loss_matches_a_float64_per_row_reference() -> None:
    import torch

    from tasks.warm_start import WarmStartSettings, _settings_record, sequence_mean_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    labels[0, :5] = -100  # 1 scored token
    labels[1, :1] = -100  # 6 scored tokens
    labels[2, :] = -100  # none
    expected = []
    for row in range(3):
        logp = torch.log_softmax(logits[row].double(), dim=-1)
        terms = [-logp[t, labels[row, t + 1]] for t in range(6) if labels[row, t + 1] != -100]
        expected.append(sum(terms) / len(terms) if terms else torch.tensor(0.0, dtype=torch.float64))
    reference = torch.stack([torch.as_tensor(e) for e in expected]).mean()
    assert torch.allclose(sequence_mean_loss(logits, labels).double(), reference, atol=1e-6)
    # a short sequence weighs as much as a long one, unlike the token mean
    token_mean = torch.nn.functional.cross_entropy(logits[:2, :-1].reshape(-1, 11), labels[:2, 1:].reshape(-1))
    assert not torch.allclose(sequence_mean_loss(logits[:2], labels[:2]), token_mean)
    # off by default and then absent from the cache key, so earlier warm starts still match
    assert "sequence_mean" not in _settings_record(WarmStartSettings())
    assert _settings_record(WarmStartSettings(sequence_mean=True))["sequence_mean"] is True
