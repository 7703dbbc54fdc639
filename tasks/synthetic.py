"""The embedded verifiable task: reverse a string of letters.

A prompt is the string followed by ``=`` (``"abc="``); the correct response is the reversed string
followed by EOS (``"cba"``). The difficulty knob is the string length (and the alphabet size): the
tiny policy learns short strings within seconds and long ones only after many more steps, so a
warm start on a step budget leaves short items mostly solved and long ones mostly open — the gap
RL closes. Held-out strings never occur in the train split.

Light on purpose: no torch or transformers at import, so rollout actors and the reward registry
can import :func:`normalise_response` and :func:`is_correct` cheaply.
"""

from __future__ import annotations

import json
import os
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SEPARATOR = "="
COLUMNS: tuple[str, ...] = ("prompt_id", "prompt", "answer", "difficulty")
DEFAULT_TRAIN_ROWS = 20_000
DEFAULT_HELDOUT_ROWS = 512


class TaskSpecError(ValueError):
    """A difficulty knob or split size is out of range; the message names it and the allowed range."""


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
        for name, value in asdict(self).items():
            # bool is an int; a float length would only fail later, inside random.randint
            if not isinstance(value, int) or isinstance(value, bool):
                raise TaskSpecError(f"{name} must be an integer, got {value!r}")
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


def make_prompt(text: str) -> str:
    """The prompt for reversing ``text``: ``"abc"`` -> ``"abc="``."""
    return text + SEPARATOR


def reverse_answer(text: str) -> str:
    """The reference answer for ``text``."""
    return text[::-1]


def normalise_response(text: str) -> str:
    """Canonical form compared by exact match: surrounding whitespace removed.

    The decoded response arrives with special tokens (EOS, padding) already skipped; this is the one
    place that decides what else does not count, shared by evaluation and the ``exact_match`` reward.
    """
    return text.strip()


def is_correct(response_text: str, answer: str) -> bool:
    """Exact match of a decoded response (special tokens skipped) against the reference answer."""
    return normalise_response(response_text) == normalise_response(answer)


def _check_row_counts(n_train: int, n_heldout: int, least: int) -> None:
    for name, n in (("n_train", n_train), ("n_heldout", n_heldout)):
        if not isinstance(n, int) or isinstance(n, bool) or n < least:
            raise TaskSpecError(f"{name} must be an integer >= {least}, got {n!r}")


def _draw_strings(rng: random.Random, spec: ReversalSpec, n: int, exclude: set[str]) -> list[str]:
    if n > spec.capacity() - len(exclude):
        raise TaskSpecError(f"{spec} holds {spec.capacity()} distinct strings, cannot draw {n} new ones")
    drawn: list[str] = []
    seen = set(exclude)
    # Rejection sampling is fine: the defaults hold ~1.5e14 strings and we draw thousands.
    while len(drawn) < n:
        length = rng.randint(spec.min_len, spec.max_len)
        text = "".join(rng.choice(spec.letters) for _ in range(length))
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


def make_rows(
    seed: int, n_train: int, n_heldout: int, train_spec: ReversalSpec, heldout_spec: ReversalSpec
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and held-out rows (dicts with :data:`COLUMNS`), deterministic for a seed.

    Held-out strings are drawn first and excluded from the train draw, so the splits are disjoint
    whatever the two specs are.
    """
    _check_row_counts(n_train, n_heldout, least=0)
    rng = random.Random(seed)
    heldout = _draw_strings(rng, heldout_spec, n_heldout, exclude=set())
    train = _draw_strings(rng, train_spec, n_train, exclude=set(heldout))
    return _rows("train", train), _rows("heldout", heldout)


def make_dataset(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = DEFAULT_TRAIN_ROWS,
    n_heldout: int = DEFAULT_HELDOUT_ROWS,
    train_spec: ReversalSpec | None = None,
    heldout_spec: ReversalSpec | None = None,
) -> tuple[Path, Path]:
    """Write ``train.parquet`` and ``heldout.parquet`` under ``out_dir``; see :func:`write_dataset`."""
    out = Path(out_dir)
    return write_dataset(
        out / "train.parquet", out / "heldout.parquet", seed, n_train, n_heldout, train_spec, heldout_spec
    )


def write_dataset(
    train_path: str | Path,
    heldout_path: str | Path,
    seed: int = 0,
    n_train: int = DEFAULT_TRAIN_ROWS,
    n_heldout: int = DEFAULT_HELDOUT_ROWS,
    train_spec: ReversalSpec | None = None,
    heldout_spec: ReversalSpec | None = None,
) -> tuple[Path, Path]:
    """Write the two splits with ``datasets``, deterministic for a seed; returns their paths.

    Columns: ``prompt_id`` (str), ``prompt`` (str), ``answer`` (str), ``difficulty`` (int, the
    string length). ``heldout_spec`` defaults to ``train_spec``, which defaults to
    :class:`ReversalSpec`. Each file is written to a temporary name and renamed, so a reader never
    sees a half-written split; a ``<name>.spec.json`` beside it records seed and spec.
    """
    from datasets import Dataset

    # parquet of no rows has no columns either, so an empty split would fail only when a run reads it
    _check_row_counts(n_train, n_heldout, least=1)
    train_spec = train_spec or ReversalSpec()
    heldout_spec = heldout_spec or train_spec
    train_rows, heldout_rows = make_rows(seed, n_train, n_heldout, train_spec, heldout_spec)
    written = []
    for path, rows, spec in ((train_path, train_rows, train_spec), (heldout_path, heldout_rows, heldout_spec)):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        Dataset.from_list(rows).to_parquet(str(tmp))
        tmp.replace(path)
        meta = {"task": "reversal", "seed": seed, "rows": len(rows), **asdict(spec)}
        path.with_name(path.stem + ".spec.json").write_text(json.dumps(meta, indent=1) + "\n")
        written.append(path)
    return written[0], written[1]


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a split written by :func:`make_dataset` (any parquet with the same columns) as dicts."""
    import pyarrow.parquet as pq

    return pq.read_table(str(path)).to_pylist()
