"""The embedded verifiable task: reverse a string of letters.

A prompt is the string followed by ``=`` (``"abc="``); the correct response is the reversed string
followed by EOS (``"cba"``). The difficulty knob is the string length (and the alphabet size): the
tiny policy learns short strings within seconds and long ones only after many more steps, so a
warm start on a step budget leaves short items mostly solved and long ones mostly open — the gap
RL closes. Held-out strings never occur in the train split.

Variant ``multi_answer`` (:data:`VARIANTS`): the same prompts, but a string has two valid answers,
its reversal and the string itself (a copy), stored together in the ``answer`` column joined by
:data:`ANSWER_SEPARATOR` (reversal first); a response is right when it equals any of them. The
train split also carries ``sft_target``, the one answer the supervised warm start teaches for that
row: the copy on a ``rare_frac`` share of rows, the reversal on the rest, so after the warm start the
copy is a valid but lower-probability continuation. Why it can show entropy collapse in Pass@K:
whether a response is a reversal or a copy is decided mostly by its first token, a choice the tiny
policy makes almost independently of the prompt. RL reinforces the answer it samples most and gets
right most often (the reversal, on the short strings), so as entropy collapses the copy's share
shrinks on every prompt, including the long strings whose reversal the policy still gets wrong but
whose copy it can produce: those drop out of Pass@K while Pass@1 may still rise. A method that keeps
entropy up should keep the copy alive and Pass@K higher. Held-out rows' ``sft_target`` equals their
``answer`` (all valid answers), so a warm start's accuracy counts any of them. Palindromes (one
answer, twice) are never drawn in this variant.

Variant ``long_tail``: a repeat rule whose answer length varies per prompt over a heavy-tailed
range. A prompt is a short base string, ``*``, a count and ``=`` (``"ab*3="``); the answer is the
base repeated that many times (``"ababab"``), one token per letter. The answer length ``L`` is
drawn log-uniformly in ``[min_answer, max_answer]`` (:class:`LongTailSpec`, default 2..288:
median ~24 tokens, ~28 % at most 8, ~2.4 % at least 256), the base length uniformly in 1..3 and
the count is ``L`` over the base length. Why it exposes a synchronous loop: such a loop generates a
batch, waits for its longest response, then trains; with 8 prompts a batch, ~80 % of batches hold
an answer of >= 128 tokens, so nearly every step pays for ~the longest response while most
responses ended after a few tokens (and the padded training batch is as wide as the longest).
Continuous batching refills the finished sequences' slots at once and async training overlaps the
learner with generation, so their time follows the mean length, not the per-batch maximum. The
``difficulty`` column is the answer length; the reward is the same exact match (answers are plain
strings).

Light on purpose: no torch or transformers at import, so rollout actors and the reward registry
can import :func:`normalise_response` and :func:`is_correct` cheaply.
"""

from __future__ import annotations

import json
import math
import os
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SEPARATOR = "="
# joins the valid answers of one prompt (multi_answer); never a letter of any answer
ANSWER_SEPARATOR = "|"
COLUMNS: tuple[str, ...] = ("prompt_id", "prompt", "answer", "difficulty")
VARIANTS: tuple[str, ...] = ("reversal", "multi_answer", "long_tail")
REPEAT = "*"
SFT_TARGET = "sft_target"
# share of multi_answer train rows whose warm-start target is the copy. At 0.15 the copy did not survive
# the warm start (0.1 % of held-out samples, no question solved only by it): nothing for RL to collapse
DEFAULT_RARE_FRAC = 0.35
DEFAULT_TRAIN_ROWS = 20_000
DEFAULT_HELDOUT_ROWS = 512


class TaskSpecError(ValueError):
    """A difficulty knob or split size is out of range; the message names it and the allowed range."""


def _check_integers(spec: Any) -> None:
    """Every field of a task spec is an int: bool is an int, and a float length would only fail
    later, inside random.randint."""
    for name, value in asdict(spec).items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TaskSpecError(f"{name} must be an integer, got {value!r}")


@dataclass(frozen=True)
class ReversalSpec:
    """Which strings a split holds.

    Attributes:
        min_len: Shortest string, in letters (>= 1).
        max_len: Longest string, in letters (>= min_len). Lengths are drawn uniformly.
        alphabet_size: How many of ``a..z`` the letters come from (2..26); more letters, fewer
            repeated characters for the model to lean on.
    """

    min_len: int = 3
    max_len: int = 10
    alphabet_size: int = 26

    def __post_init__(self) -> None:
        _check_integers(self)
        if not 1 <= self.min_len <= self.max_len:
            raise TaskSpecError(
                f"need 1 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}"
            )
        if not 2 <= self.alphabet_size <= 26:
            raise TaskSpecError(f"alphabet_size must be in 2..26, got {self.alphabet_size}")

    @property
    def letters(self) -> str:
        """The letters strings are drawn from."""
        return string.ascii_lowercase[: self.alphabet_size]

    @property
    def max_answer_chars(self) -> int:
        """Longest correct answer; a response needs at most this + 1 tokens (EOS)."""
        return self.max_len

    def capacity(self) -> int:
        """Number of distinct strings the spec can produce."""
        return sum(self.alphabet_size**n for n in range(self.min_len, self.max_len + 1))


@dataclass(frozen=True)
class LongTailSpec:
    """Which prompts the ``long_tail`` variant draws (see the module doc).

    Attributes:
        min_answer: Shortest answer, in letters (>= 1); the log-uniform draw's lower end.
        max_answer: Longest answer, in letters (>= min_answer); no answer exceeds it.
        max_base: Longest base string, in letters (1..9); base lengths are uniform in 1..max_base.
        alphabet_size: How many of ``a..z`` the base letters come from (2..26).
    """

    min_answer: int = 2
    max_answer: int = 288
    max_base: int = 3
    alphabet_size: int = 26

    def __post_init__(self) -> None:
        _check_integers(self)
        if not 1 <= self.min_answer <= self.max_answer:
            raise TaskSpecError(
                f"need 1 <= min_answer <= max_answer, got {self.min_answer}, {self.max_answer}"
            )
        if not 1 <= self.max_base <= 9:
            raise TaskSpecError(f"max_base must be in 1..9, got {self.max_base}")
        if not 2 <= self.alphabet_size <= 26:
            raise TaskSpecError(f"alphabet_size must be in 2..26, got {self.alphabet_size}")

    @property
    def letters(self) -> str:
        """The letters base strings are drawn from."""
        return string.ascii_lowercase[: self.alphabet_size]

    @property
    def max_answer_chars(self) -> int:
        """Longest correct answer; a response needs at most this + 1 tokens (EOS)."""
        return self.max_answer

    @property
    def max_prompt_chars(self) -> int:
        """Longest prompt: base, ``*``, the count's digits, ``=``."""
        return self.max_base + 1 + len(str(self.max_answer)) + 1


# Positions the tiny model needs for long_tail: BOS + the longest prompt (9) + max_tokens 290
# (configs/tiny-longtail-cpu.yaml) = 300, rounded up; vLLM refuses a max_model_len above it.
LONG_TAIL_MAX_POSITIONS = 320


def make_repeat_prompt(base: str, count: int) -> str:
    """The long_tail prompt: ``("ab", 3)`` -> ``"ab*3="``."""
    return f"{base}{REPEAT}{count}{SEPARATOR}"


def repeat_answer(base: str, count: int) -> str:
    """The long_tail answer: ``base`` repeated ``count`` times."""
    return base * count


def _draw_repeats(
    rng: random.Random, spec: LongTailSpec, n: int, exclude: set[tuple[str, int]], distinct: bool
) -> list[tuple[str, int]]:
    """``n`` ``(base, count)`` pairs not in ``exclude``, answer lengths log-uniform.

    ``distinct``: no pair twice. The held-out split is drawn so; the train split is not, because
    the shortest lengths hold only a few hundred pairs and refusing repeats there would push the
    train lengths off the log-uniform shape (median 40 instead of 24 for 20k rows).
    """
    drawn: list[tuple[str, int]] = []
    seen: set[tuple[str, int]] = set()
    log_lo, log_hi = math.log(spec.min_answer), math.log(spec.max_answer + 1)
    misses = 0
    while len(drawn) < n:
        # floor of a log-uniform real on [min, max + 1): every integer length in range is reachable
        length = min(spec.max_answer, int(math.exp(rng.uniform(log_lo, log_hi))))
        base_len = rng.randint(1, min(spec.max_base, length))
        count = max(1, min(spec.max_answer // base_len, round(length / base_len)))
        base = "".join(rng.choice(spec.letters) for _ in range(base_len))
        if (base, count) in exclude or (distinct and (base, count) in seen):
            misses += 1
            # the short lengths hold few pairs: a spec too small for n must fail, not spin
            if misses > 100 * n + 10_000:
                raise TaskSpecError(f"{spec} cannot produce {n} new distinct prompts")
            continue
        seen.add((base, count))
        drawn.append((base, count))
    return drawn


def _repeat_rows(split: str, pairs: list[tuple[str, int]]) -> list[dict[str, Any]]:
    return [
        {
            "prompt_id": f"{split}-{i:06d}",
            "prompt": make_repeat_prompt(b, k),
            "answer": repeat_answer(b, k),
            "difficulty": len(b) * k,
        }
        for i, (b, k) in enumerate(pairs)
    ]


def make_prompt(text: str) -> str:
    """The prompt for reversing ``text``: ``"abc"`` -> ``"abc="``."""
    return text + SEPARATOR


def reverse_answer(text: str) -> str:
    """The reference answer for ``text``."""
    return text[::-1]


def multi_answers(text: str) -> list[str]:
    """The valid answers of ``text`` in the multi_answer variant: reversal first, then the copy."""
    return [reverse_answer(text), text]


def valid_answers(answer: str) -> list[str]:
    """The answers an ``answer`` cell accepts: one for reversal, every alternative for multi_answer."""
    return answer.split(ANSWER_SEPARATOR)


def normalise_response(text: str) -> str:
    """Canonical form compared by exact match: surrounding whitespace removed.

    The decoded response arrives with special tokens (EOS, padding) already skipped; this is the one
    place that decides what else does not count, shared by evaluation and the ``exact_match`` reward.
    """
    return text.strip()


def is_correct(response_text: str, answer: str) -> bool:
    """Exact match of a decoded response (special tokens skipped) against any valid answer.

    A reversal answer has one alternative; a multi_answer cell several (:func:`valid_answers`).
    """
    response = normalise_response(response_text)
    return any(response == normalise_response(a) for a in valid_answers(answer))


def _check_row_counts(n_train: int, n_heldout: int, least: int) -> None:
    for name, n in (("n_train", n_train), ("n_heldout", n_heldout)):
        if not isinstance(n, int) or isinstance(n, bool) or n < least:
            raise TaskSpecError(f"{name} must be an integer >= {least}, got {n!r}")


def _draw_strings(
    rng: random.Random, spec: ReversalSpec, n: int, exclude: set[str], palindromes: bool = True
) -> list[str]:
    capacity = spec.capacity()
    if not palindromes:
        # a palindrome of length m is fixed by its first ceil(m/2) letters
        capacity -= sum(spec.alphabet_size ** ((m + 1) // 2) for m in range(spec.min_len, spec.max_len + 1))
    if n > capacity - len(exclude):
        kind = "distinct strings" if palindromes else "distinct non-palindromes"
        raise TaskSpecError(f"{spec} holds {capacity} {kind}, cannot draw {n} new ones")
    drawn: list[str] = []
    seen = set(exclude)
    # Rejection sampling is fine: the defaults hold ~1.5e14 strings and we draw thousands.
    while len(drawn) < n:
        length = rng.randint(spec.min_len, spec.max_len)
        text = "".join(rng.choice(spec.letters) for _ in range(length))
        if not palindromes and text == text[::-1]:
            continue
        if text not in seen:
            seen.add(text)
            drawn.append(text)
    return drawn


def _rows(split: str, texts: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "prompt_id": f"{split}-{i:06d}",
            "prompt": make_prompt(t),
            "answer": reverse_answer(t),
            "difficulty": len(t),
        }
        for i, t in enumerate(texts)
    ]


def _multi_rows(split: str, texts: list[str], rare: list[bool] | None) -> list[dict[str, Any]]:
    """multi_answer rows; ``rare[i]`` makes row i's warm-start target the copy (None: held-out)."""
    rows = _rows(split, texts)
    for i, (row, t) in enumerate(zip(rows, texts, strict=True)):
        row["answer"] = ANSWER_SEPARATOR.join(multi_answers(t))
        row[SFT_TARGET] = row["answer"] if rare is None else (t if rare[i] else reverse_answer(t))
    return rows


def _check_variant(variant: str, rare_frac: float) -> None:
    if variant not in VARIANTS:
        raise TaskSpecError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not 0.0 <= rare_frac < 1.0:
        raise TaskSpecError(f"rare_frac must be in [0, 1), got {rare_frac!r}")


def make_rows(
    seed: int,
    n_train: int,
    n_heldout: int,
    train_spec: ReversalSpec | LongTailSpec,
    heldout_spec: ReversalSpec | LongTailSpec,
    variant: str = "reversal",
    rare_frac: float = DEFAULT_RARE_FRAC,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and held-out rows (dicts with :data:`COLUMNS`, + ``sft_target`` for multi_answer),
    deterministic for a seed.

    Held-out strings are drawn first and excluded from the train draw, so the splits are disjoint
    whatever the two specs are. For multi_answer exactly ``round(rare_frac * n_train)`` train rows,
    chosen by the seed, teach the copy.
    """
    _check_row_counts(n_train, n_heldout, least=0)
    _check_variant(variant, rare_frac)
    rng = random.Random(seed)
    if variant == "long_tail":
        if not (isinstance(train_spec, LongTailSpec) and isinstance(heldout_spec, LongTailSpec)):
            raise TaskSpecError("variant long_tail takes LongTailSpec train and held-out specs")
        held = _draw_repeats(rng, heldout_spec, n_heldout, exclude=set(), distinct=True)
        train_pairs = _draw_repeats(rng, train_spec, n_train, exclude=set(held), distinct=False)
        return _repeat_rows("train", train_pairs), _repeat_rows("heldout", held)
    multi = variant == "multi_answer"
    heldout = _draw_strings(rng, heldout_spec, n_heldout, exclude=set(), palindromes=not multi)
    train = _draw_strings(rng, train_spec, n_train, exclude=set(heldout), palindromes=not multi)
    if not multi:
        return _rows("train", train), _rows("heldout", heldout)
    rare_rows = set(rng.sample(range(n_train), round(rare_frac * n_train)))
    return (
        _multi_rows("train", train, [i in rare_rows for i in range(n_train)]),
        _multi_rows("heldout", heldout, None),
    )


def make_dataset(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = DEFAULT_TRAIN_ROWS,
    n_heldout: int = DEFAULT_HELDOUT_ROWS,
    train_spec: ReversalSpec | LongTailSpec | None = None,
    heldout_spec: ReversalSpec | LongTailSpec | None = None,
    variant: str = "reversal",
    rare_frac: float = DEFAULT_RARE_FRAC,
) -> tuple[Path, Path]:
    """Write ``train.parquet`` and ``heldout.parquet`` under ``out_dir``; see :func:`write_dataset`."""
    out = Path(out_dir)
    return write_dataset(
        out / "train.parquet",
        out / "heldout.parquet",
        seed,
        n_train,
        n_heldout,
        train_spec,
        heldout_spec,
        variant,
        rare_frac,
    )


def write_dataset(
    train_path: str | Path,
    heldout_path: str | Path,
    seed: int = 0,
    n_train: int = DEFAULT_TRAIN_ROWS,
    n_heldout: int = DEFAULT_HELDOUT_ROWS,
    train_spec: ReversalSpec | LongTailSpec | None = None,
    heldout_spec: ReversalSpec | LongTailSpec | None = None,
    variant: str = "reversal",
    rare_frac: float = DEFAULT_RARE_FRAC,
) -> tuple[Path, Path]:
    """Write the two splits with ``datasets``, deterministic for a seed; returns their paths.

    Columns: ``prompt_id`` (str), ``prompt`` (str), ``answer`` (str), ``difficulty`` (int, the
    string length; long_tail: the answer length). ``heldout_spec`` defaults to ``train_spec``,
    which defaults to :class:`ReversalSpec` (long_tail: :class:`LongTailSpec`). ``variant`` (:data:`VARIANTS`) and ``rare_frac`` (multi_answer only):
    see the module doc. Each file is written to a temporary name and renamed, so a reader never
    sees a half-written split; a ``<name>.spec.json`` beside it records seed and spec.
    """
    from datasets import Dataset

    # parquet of no rows has no columns either, so an empty split would fail only when a run reads it
    _check_row_counts(n_train, n_heldout, least=1)
    train_spec = train_spec or (LongTailSpec() if variant == "long_tail" else ReversalSpec())
    heldout_spec = heldout_spec or train_spec
    train_rows, heldout_rows = make_rows(seed, n_train, n_heldout, train_spec, heldout_spec, variant, rare_frac)
    written = []
    for path, rows, spec in ((train_path, train_rows, train_spec), (heldout_path, heldout_rows, heldout_spec)):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        Dataset.from_list(rows).to_parquet(str(tmp))
        tmp.replace(path)
        meta = {"task": variant, "seed": seed, "rows": len(rows), **asdict(spec)}
        if variant == "multi_answer":
            meta["rare_frac"] = rare_frac
        path.with_name(path.stem + ".spec.json").write_text(json.dumps(meta, indent=1) + "\n")
        written.append(path)
    return written[0], written[1]


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a split written by :func:`make_dataset` (any parquet with the same columns) as dicts."""
    import pyarrow.parquet as pq

    return pq.read_table(str(path)).to_pylist()
