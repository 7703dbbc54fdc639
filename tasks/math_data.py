"""Math prompt sets through ``datasets``: DAPO-Math-17k, its DAPO500 held-out split, AIME24/AIME25.

Every loader returns a :class:`datasets.Dataset` with the same normalised columns
(:data:`MATH_COLUMNS`): ``prompt_id`` (str), ``problem`` (the bare problem text), ``answer`` (the
reference answer as a string) and ``data_source``. The prompt a model sees is rendered later, with
the starting model's tokenizer (:func:`render_prompt`), because the chat template belongs to the
model, not to the data.

Source layouts understood (detected from the columns, so a local copy in either layout works):

- **DAPO / verl RL layout** (``BytedTsinghua-SIA/DAPO-Math-17k``, also used by several AIME copies):
  ``prompt`` = list of chat messages ``{"role", "content"}``, ``reward_model`` =
  ``{"ground_truth", "style"}``, ``data_source``, ``ability``, ``extra_info`` = ``{"index"}``. The
  user message wraps the problem in DAPO's own instruction ("Solve the following math problem step
  by step. The last line ... Answer: $Answer ..." and "Remember to put your answer on its own line
  after "Answer:"."); the wrapper is stripped so the paper's ``\\boxed{}`` instruction can replace it.
  The published parquet repeats each of its ~17.9k questions about 100 times; rows are de-duplicated
  by problem text, otherwise a 500-row held-out draw would hold far fewer than 500 questions and
  leak duplicates of them into training.
- **problem/answer layout** (``HuggingFaceH4/aime_2024``, ``yentinglin/aime_2025`` and most AIME
  copies): a ``problem`` (or ``question``) column, an ``answer`` column (str or int) and optionally
  ``id``/``ID``.

Sources are a local ``.parquet``/``.jsonl``/``.json`` file (tests, offline runs) or a hub dataset
name loaded with ``load_dataset(name, split=...)`` (production); :data:`NAMED_SOURCES` maps the
paper's short names to hub datasets.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.data_files import check_utf8

log = logging.getLogger(__name__)

MATH_COLUMNS: tuple[str, ...] = ("prompt_id", "problem", "answer", "data_source")

# The paper's user-turn instruction (Qwen2.5-Math/-Instruct convention, also lighteval's).
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# DAPO-Math-17k's own instruction around each problem (stripped by :func:`strip_dapo_wrapper`).
_DAPO_PREFIX = "Solve the following math problem step by step."
_DAPO_SUFFIX = re.compile(r'\s*Remember to put your answer on its own line after "Answer:".*\Z', re.DOTALL)

# Size and seed of the paper's held-out split of DAPO-Math-17k.
DAPO500_SIZE = 500


@dataclass(frozen=True)
class NamedSource:
    """A prompt set the paper uses, by short name.

    Attributes:
        hub_name: Hugging Face dataset name given to ``load_dataset``.
        split: Split given to ``load_dataset``.
        part: ``all`` rows, or for a train set with a held-out draw: ``train`` (minus the held-out
            questions) or ``heldout`` (the :data:`DAPO500_SIZE` questions).
    """

    hub_name: str
    split: str = "train"
    part: str = "all"


NAMED_SOURCES: dict[str, NamedSource] = {
    "dapo-math-17k": NamedSource("BytedTsinghua-SIA/DAPO-Math-17k", "train", "train"),
    "dapo500": NamedSource("BytedTsinghua-SIA/DAPO-Math-17k", "train", "heldout"),
    "aime24": NamedSource("HuggingFaceH4/aime_2024", "train"),
    "aime25": NamedSource("yentinglin/aime_2025", "train"),
}

_LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def load_raw(source: str | Path, split: str = "train"):  # -> datasets.Dataset
    """Load a source as it is stored: a local parquet/JSONL file, or a hub name (or local dataset dir).

    Local files go through ``load_dataset("parquet"|"json", data_files=...)`` so the column types
    (nested chat lists and structs included) are the same as for the hub copy of that file.
    """
    from datasets import load_dataset

    path = Path(source)
    builder = _LOCAL_FORMATS.get(path.suffix.lower())
    if builder is not None:
        if not path.is_file():
            raise FileNotFoundError(f"math data file {path} does not exist")
        if builder == "json":
            check_utf8(path)
        return load_dataset(builder, data_files=str(path), split="train")
    return load_dataset(str(source), split=split)


def strip_dapo_wrapper(text: str) -> str:
    """The bare problem inside a DAPO-Math-17k user message (unchanged if the wrapper is absent).

    DAPO's message is ``<instruction line>\\n\\n<problem>\\n\\nRemember to put your answer ...``;
    the instruction is one paragraph, so everything up to the first blank line goes.
    """
    body = text.strip()
    if body.startswith(_DAPO_PREFIX):
        _, sep, rest = body.partition("\n\n")
        if sep:
            body = rest
    return _DAPO_SUFFIX.sub("", body).strip()


class BadMathRow(ValueError):
    """A raw row that cannot be normalised; :func:`normalise` skips it and counts ``reason``.

    Attributes:
        reason: a short fixed label: ``no_answer``, ``empty_problem``, ``no_user_message`` or
            ``malformed`` (a field missing or of the wrong type).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _user_text(messages: Any) -> str:
    if isinstance(messages, str):
        return messages
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not users:
        raise BadMathRow("no_user_message", f"chat prompt has no user message: {messages!r:.200}")
    return users[-1]


def _answer_text(value: Any) -> str:
    # AIME copies store answers as int or as zero-padded strings ("033"); math-verify compares
    # values, so only surrounding whitespace is normalised here.
    if value is None or isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadMathRow("no_answer", f"no reference answer (got {value!r:.100})")
    if not str(value).strip():
        raise BadMathRow("no_answer", "the reference answer is blank")
    return str(value).strip()


def detect_layout(columns: list[str]) -> str:
    """``"dapo"`` or ``"problem_answer"`` from a dataset's column names; a clear error otherwise."""
    cols = set(columns)
    if {"prompt", "reward_model"} <= cols:
        return "dapo"
    if cols & {"problem", "question"} and "answer" in cols:
        return "problem_answer"
    raise ValueError(
        f"unrecognised math data layout with columns {sorted(cols)}: expected DAPO/verl "
        "(prompt, reward_model) or problem/question + answer"
    )


def normalise_row(row: Mapping[str, Any], layout: str, index: int, default_source: str) -> dict[str, str]:
    """One raw row in :data:`MATH_COLUMNS` form.

    Raises:
        BadMathRow: the row has no usable problem or answer (the message names the row).
    """
    try:
        if layout == "dapo":
            problem = strip_dapo_wrapper(_user_text(row["prompt"]))
            answer = _answer_text((row.get("reward_model") or {}).get("ground_truth"))
            extra = row.get("extra_info") or {}
            ident = extra.get("index") if isinstance(extra, Mapping) else None
        else:
            problem = row["problem"] if row.get("problem") is not None else row.get("question")
            if problem is None:
                raise BadMathRow("empty_problem", "no problem text")
            problem = problem.strip()
            answer = _answer_text(row["answer"])
            ident = row.get("id", row.get("ID"))
    except BadMathRow as err:
        raise BadMathRow(err.reason, f"row {index}: {err}") from None
    except (KeyError, TypeError, AttributeError) as err:
        raise BadMathRow("malformed", f"row {index}: {type(err).__name__}: {err}") from None
    source = row.get("data_source") or default_source
    if not problem:
        raise BadMathRow("empty_problem", f"row {index} has an empty problem")
    prompt_id = str(ident) if ident not in (None, "") else f"{default_source}-{index:06d}"
    return {"prompt_id": prompt_id, "problem": problem, "answer": answer, "data_source": str(source)}


def normalise(
    raw, default_source: str, dedupe: bool = True, skipped: Counter[str] | None = None
):  # (datasets.Dataset) -> datasets.Dataset
    """Normalise a raw dataset to :data:`MATH_COLUMNS`, de-duplicating by problem text if asked.

    The first occurrence of a problem wins. Prompt ids that still collide after de-duplication
    (two different problems sharing an id) get a ``#n`` suffix so ids stay unique keys. A row that
    cannot be normalised (:class:`BadMathRow`) is skipped: counted by reason into ``skipped`` and in
    one warning, so one bad row of 17k does not cost the whole set.
    """
    from datasets import Dataset

    layout = detect_layout(raw.column_names)
    rows: list[dict[str, str]] = []
    seen_problems: set[str] = set()
    id_counts: dict[str, int] = {}
    bad: Counter[str] = Counter()
    first_bad = ""
    for i, raw_row in enumerate(raw):
        try:
            row = normalise_row(raw_row, layout, i, default_source)
        except BadMathRow as err:
            bad[err.reason] += 1
            first_bad = first_bad or str(err)
            continue
        key = " ".join(row["problem"].split())
        if dedupe and key in seen_problems:
            continue
        seen_problems.add(key)
        n = id_counts.get(row["prompt_id"], 0)
        id_counts[row["prompt_id"]] = n + 1
        if n:
            row["prompt_id"] = f"{row['prompt_id']}#{n}"
        rows.append(row)
    if skipped is not None:
        skipped.update(bad)
    counts = ", ".join(f"{reason} {n}" for reason, n in sorted(bad.items()))
    if not rows:
        raise ValueError(
            f"{default_source}: no usable rows" + (f" (skipped: {counts}; {first_bad})" if bad else "")
        )
    if bad:
        log.warning(
            "%s: skipped %d of %d rows that cannot be used (%s); first: %s",
            default_source,
            bad.total(),
            len(raw),
            counts,
            first_bad,
        )
    return Dataset.from_list(rows)


def heldout_order_key(problem: str, seed: int) -> str:
    """Sort key of the held-out draw: a hash of seed and whitespace-normalised problem text.

    Hashing the content (not a row position) makes the split independent of row order and of how
    many duplicates the source holds, so the same seed gives the same 500 questions from the hub
    copy and from any re-saved local copy.
    """
    text = f"{seed}\x00{' '.join(problem.split())}"
    return hashlib.sha256(text.encode()).hexdigest()


def split_heldout(dataset, n_heldout: int = DAPO500_SIZE, seed: int = 0):  # -> (Dataset, Dataset)
    """Deterministic ``(train, heldout)`` split: the ``n_heldout`` questions with the smallest key.

    Both parts keep the source's row order. Raises if the set has no more than ``n_heldout`` rows
    (nothing would be left to train on).
    """
    if not 0 < n_heldout < len(dataset):
        raise ValueError(f"cannot hold out {n_heldout} of {len(dataset)} questions")
    keys = [heldout_order_key(p, seed) for p in dataset["problem"]]
    chosen = set(sorted(range(len(keys)), key=keys.__getitem__)[:n_heldout])
    heldout_idx = [i for i in range(len(keys)) if i in chosen]
    train_idx = [i for i in range(len(keys)) if i not in chosen]
    return dataset.select(train_idx), dataset.select(heldout_idx)


def parse_source_spec(spec: str) -> tuple[str, str, str]:
    """``(source, split, part)`` from a spec string.

    Forms: a short name from :data:`NAMED_SOURCES` (``dapo500``); or ``SOURCE[@SPLIT][#PART]`` where
    SOURCE is a file or hub name, SPLIT the ``load_dataset`` split (default ``train``) and PART one
    of ``all`` (default), ``train``, ``heldout``.
    """
    if spec in NAMED_SOURCES:
        named = NAMED_SOURCES[spec]
        return named.hub_name, named.split, named.part
    source, _, part = spec.partition("#")
    part = part or "all"
    if part not in ("all", "train", "heldout"):
        raise ValueError(f"source spec {spec!r}: part must be all, train or heldout, got {part!r}")
    split = "train"
    # '@' separates the split only after the last path component: hub names and paths have none.
    if "@" in Path(source).name:
        source, _, split = source.rpartition("@")
    if not source:
        raise ValueError(f"source spec {spec!r} names no source")
    return source, split, part


def load_math_dataset(
    spec: str, n_heldout: int = DAPO500_SIZE, heldout_seed: int = 0, skipped: Counter[str] | None = None
):  # -> Dataset
    """Load and normalise a math prompt set by spec (see :func:`parse_source_spec`).

    ``#train``/``#heldout`` parts apply :func:`split_heldout` with ``n_heldout`` and
    ``heldout_seed`` after de-duplication, so ``dapo-math-17k`` and ``dapo500`` are disjoint and
    together cover every distinct question. Unusable rows are skipped and counted into ``skipped``
    (see :func:`normalise`).
    """
    source, split, part = parse_source_spec(spec)
    default_source = Path(source).stem if Path(source).suffix else source
    dataset = normalise(load_raw(source, split), default_source=default_source, skipped=skipped)
    if part == "all":
        return dataset
    train, heldout = split_heldout(dataset, n_heldout=n_heldout, seed=heldout_seed)
    return train if part == "train" else heldout


def render_prompt(problem: str, tokenizer: Any | None) -> str:
    """The paper's prompt for a problem: one user turn, problem + :data:`BOXED_INSTRUCTION`.

    Rendered with the tokenizer's chat template (generation prompt appended) when it has one, as
    Qwen2.5-Instruct's has; the same text followed by a newline otherwise (base models, the tiny
    test model).
    """
    content = f"{problem}\n{BOXED_INSTRUCTION}"
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    # Without a template the response must start on a new line, as it would after a chat turn.
    return content + "\n"
