"""Prompts for the rollout actors: a ``datasets`` table, sharded by index, with a resumable cursor.

Actor ``k`` of ``R`` owns rows ``k, k + R, k + 2R, ...``. It walks its shard epoch by epoch, each
epoch in a fresh order drawn from ``(seed, epoch, shard)``, so the position ``consumed`` (prompts
handed out since the start of the run) alone determines every later prompt: the cursor is that
one integer.

Restart semantics (at-least-once per prompt): with continuous batching, groups finish out of
order, so the worker commits the *low-water mark*, the oldest position handed out whose group has
not been pushed yet (or the next position when none is in flight). A restarted actor resumes there,
so a prompt in flight at a crash is generated again, never skipped. The cursor is a small JSON file
in a directory the driver gives (the run directory), written to a temporary name then renamed, so a
crash mid-write leaves the previous cursor intact.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.data_files import check_utf8, row_text


@dataclass(frozen=True)
class PromptItem:
    """One prompt handed to a rollout worker.

    Attributes:
        prompt_id: the dataset's id (or the row index when the id column is absent).
        prompt: prompt text ("" when ``rejected``).
        answer: reference answer, given to the reward function ("" when ``rejected``).
        position: how many prompts this shard handed out before this one (the cursor value).
        rejected: why the row cannot be used (one of :data:`tasks.data_files.ROW_REJECT_REASONS`), else None.
    """

    prompt_id: str
    prompt: str
    answer: str
    position: int
    rejected: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """Where prompts come from; the picklable description a Ray actor builds its source from.

    Attributes:
        path: local ``.parquet``/``.jsonl``/``.json`` file, a directory saved by ``datasets``, or a hub name.
        prompt_key: column holding the prompt text.
        answer_key: column holding the reference answer.
        id_key: column holding a stable prompt id; optional (row index when absent).
        split: split to read for hub datasets.
        seed: order of each epoch.
    """

    path: str
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    id_key: str = "prompt_id"
    split: str = "train"
    seed: int = 0


def load_prompt_dataset(spec: PromptSpec) -> Any:  # -> datasets.Dataset
    """Load the dataset and check it is usable: a ValueError names the file and the problem
    (a :class:`tasks.data_files.DataFileError` for a JSON file that is not UTF-8).

    Rows with a null or blank prompt or answer load as they are; :meth:`PromptSource.next` rejects
    them one by one (:func:`tasks.data_files.row_text`).
    """
    import datasets

    path = spec.path
    local = Path(path)
    if local.is_dir():
        data = datasets.load_from_disk(str(local))
        if isinstance(data, datasets.DatasetDict):
            data = data[spec.split]
    elif local.suffix in (".parquet", ".jsonl", ".json"):
        if not local.is_file():
            raise ValueError(f"prompt file {path} does not exist")
        # datasets fails on an empty file with an unrelated Arrow message: check emptiness first.
        if local.suffix == ".parquet":
            import pyarrow.parquet as pq

            empty = pq.read_metadata(local).num_rows == 0
        else:
            check_utf8(local)
            empty = not local.read_bytes().strip()
        if empty:
            raise ValueError(f"prompt dataset {path} is empty")
        builder = "parquet" if local.suffix == ".parquet" else "json"
        data = datasets.load_dataset(builder, data_files=str(local), split="train")
    else:
        data = datasets.load_dataset(path, split=spec.split)
    for key in (spec.prompt_key, spec.answer_key):
        if key not in data.column_names:
            raise ValueError(
                f"prompt dataset {path}: column {key!r} is missing; columns are {data.column_names}"
            )
    if len(data) == 0:
        raise ValueError(f"prompt dataset {path} is empty")
    return data


class PromptSource:
    """This actor's shard of the prompts, in a reproducible per-epoch order, with a persisted cursor.

    Args:
        spec: the dataset and its columns.
        shard_index: this actor's index ``k`` in ``0..num_shards-1``.
        num_shards: number of rollout actors ``R``.
        cursor_path: JSON file holding the cursor (None = not persisted).
    """

    def __init__(
        self,
        spec: PromptSpec,
        shard_index: int = 0,
        num_shards: int = 1,
        cursor_path: str | Path | None = None,
    ) -> None:
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} is outside 0..{num_shards - 1}")
        self.spec = spec
        self.shard_index = shard_index
        self.num_shards = num_shards
        self._data = load_prompt_dataset(spec)
        self._rows = list(range(shard_index, len(self._data), num_shards))
        if not self._rows:
            raise ValueError(
                f"prompt dataset {spec.path} has {len(self._data)} rows: too few for shard {shard_index} "
                f"of {num_shards}"
            )
        self._has_id = spec.id_key in self._data.column_names
        self.cursor_path = Path(cursor_path) if cursor_path is not None else None
        self._next_position = self._load_cursor()
        self._order_epoch = -1
        self._order: list[int] = []

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def next_position(self) -> int:
        """The position the next :meth:`next` call hands out."""
        return self._next_position

    @property
    def epoch(self) -> int:
        """Epoch of the next prompt."""
        return self._next_position // len(self._rows)

    def _rows_of_epoch(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            order = list(self._rows)
            random.Random(f"{self.spec.seed}/{epoch}/{self.shard_index}/{self.num_shards}").shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def next(self) -> PromptItem:
        """The next prompt of this shard (cycles through epochs forever); check its ``rejected``."""
        position = self._next_position
        epoch, offset = divmod(position, len(self._rows))
        row_index = self._rows_of_epoch(epoch)[offset]
        row = self._data[row_index]
        self._next_position += 1
        prompt_id = str(row[self.spec.id_key]) if self._has_id else str(row_index)
        prompt, answer, rejected = row_text(row[self.spec.prompt_key], row[self.spec.answer_key])
        return PromptItem(
            prompt_id=prompt_id, prompt=prompt, answer=answer, position=position, rejected=rejected
        )

    def state(self, committed_position: int | None = None) -> dict[str, Any]:
        """The cursor as a JSON-able dict (what :meth:`commit` writes)."""
        position = self._next_position if committed_position is None else committed_position
        return {
            "path": self.spec.path,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "shard_rows": len(self._rows),
            "position": position,
            "epoch": position // len(self._rows),
        }

    def commit(self, committed_position: int) -> None:
        """Persist ``committed_position``: a restarted source starts there (atomic write)."""
        if self.cursor_path is None:
            return
        self.cursor_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cursor_path.with_name(f".{self.cursor_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state(committed_position)) + "\n")
        os.replace(tmp, self.cursor_path)

    def _load_cursor(self) -> int:
        if self.cursor_path is None or not self.cursor_path.is_file():
            return 0
        saved = json.loads(self.cursor_path.read_text())
        layout = (
            saved.get("path"),
            saved.get("shard_index"),
            saved.get("num_shards"),
            saved.get("shard_rows"),
        )
        expected = (self.spec.path, self.shard_index, self.num_shards, len(self._rows))
        if layout != expected:
            # Another dataset or actor count: the saved position would index different rows.
            raise ValueError(
                f"prompt cursor {self.cursor_path} was written for (path, shard, shards, rows) = {layout}, "
                f"this source is {expected}; delete the file to start the prompts over"
            )
        return int(saved["position"])
