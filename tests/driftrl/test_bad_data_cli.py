"""A prompt file that is not UTF-8 stops ``driftrl train`` at once with one line naming file and byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_train_on_a_non_utf8_prompt_file_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_bytes(b'{"prompt": "abc=", "answer": "cba"}\n{"prompt": "\xff=", "answer": "x"}\n')
    result = subprocess.run(
        [
            sys.executable, "-m", "driftrl.cli", "train", "--no-progress",
            f"run.root_dir={tmp_path / 'runs'}", f"task.train_path={train}", "model.tiny=false",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        f"driftrl: {train}: not UTF-8 text at byte offset 48 (line 2): invalid start byte; save the file as UTF-8"
    ]
