"""Prompt data files and rows: a bad file becomes one line naming it, a bad row a counted reason.

``datasets`` reports a JSON Lines file that is not UTF-8 as a ``UnicodeDecodeError`` deep inside
its builder (or as an Arrow error), with neither the file nor the line: :func:`check_utf8` runs
first. A row with a null or blank prompt or answer is not turned into the string ``"None"``:
:func:`row_text` gives the reason to skip it instead.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

# read in pieces so a multi-GB file is checked in bounded memory
_CHUNK_BYTES = 16 << 20


class DataFileError(ValueError):
    """A data file cannot be read as what it claims to be; the message names the file and the place."""


def check_utf8(path: str | Path) -> None:
    """Raise :class:`DataFileError` when ``path`` is not UTF-8 text, naming the byte offset and line.

    Raises:
        DataFileError: ``<path>: not UTF-8 text at byte offset <n> (line <k>): <why>; ...``.
    """
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes fed to the decoder so far
    newlines = 0  # newlines in what the decoder has consumed before the current chunk
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK_BYTES)
            pending = decoder.getstate()[0]  # an incomplete sequence held from the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                # err.start counts from the held bytes, which begin len(pending) before this chunk
                at = offset - len(pending) + err.start
                line = newlines + (pending + chunk).count(b"\n", 0, err.start) + 1
                raise DataFileError(
                    f"{path}: not UTF-8 text at byte offset {at} (line {line}): {err.reason}; save the file "
                    "as UTF-8"
                ) from None
            if not chunk:
                return
            newlines += chunk.count(b"\n")
            offset += len(chunk)


# Why a row cannot be used (a fixed vocabulary: they are Prometheus labels). A row is never turned
# into the strings "None" or "[...]"; it is skipped, counted by reason, and the cursor moves past it.
NULL_PROMPT = "null_prompt"
NON_TEXT_PROMPT = "non_text_prompt"
BLANK_PROMPT = "blank_prompt"
NULL_ANSWER = "null_answer"
NON_TEXT_ANSWER = "non_text_answer"
BLANK_ANSWER = "blank_answer"
ROW_REJECT_REASONS = (NULL_PROMPT, NON_TEXT_PROMPT, BLANK_PROMPT, NULL_ANSWER, NON_TEXT_ANSWER, BLANK_ANSWER)


def row_text(prompt: Any, answer: Any) -> tuple[str, str, str | None]:
    """``(prompt, answer, reason)`` of a dataset row: the texts, or ``("", "", reason)`` when unusable.

    A prompt must be a non-blank string; an answer a non-blank string or a number (AIME answers are
    integers). Anything else (null, a list of chat messages, whitespace) is a reason, not a string.
    """
    if prompt is None:
        return "", "", NULL_PROMPT
    if not isinstance(prompt, str):
        return "", "", NON_TEXT_PROMPT
    if not prompt.strip():
        return "", "", BLANK_PROMPT
    if answer is None:
        return "", "", NULL_ANSWER
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        return "", "", NON_TEXT_ANSWER
    if not str(answer).strip():
        return "", "", BLANK_ANSWER
    return prompt, str(answer), None
