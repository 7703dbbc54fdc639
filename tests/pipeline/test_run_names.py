"""`driftrl run` twice: the second run goes beside the first instead of refusing or overwriting."""

from __future__ import annotations

from pathlib import Path

from driftrl.config import load_config
from driftrl.pipeline import next_free_run

REPO_ROOT = Path(__file__).resolve().parents[2]


def _with_checkpoint(root: Path, name: str) -> None:
    step = root / name / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")


def test_second_run_gets_the_next_free_name(tmp_path):
    cfg = load_config(REPO_ROOT / "configs" / "tiny-cpu.yaml", [f"run.root_dir={tmp_path}"])
    assert next_free_run(cfg) is cfg  # nothing there yet
    _with_checkpoint(tmp_path, "tiny")
    assert next_free_run(cfg).run.name == "tiny-2"
    _with_checkpoint(tmp_path, "tiny-2")
    (tmp_path / "tiny-3").mkdir()  # a directory without a checkpoint holds no run: reused
    assert next_free_run(cfg).run.name == "tiny-3"


def test_a_run_in_progress_is_skipped_before_its_first_checkpoint(tmp_path):
    from driftrl.run_dir import DirLock

    cfg = load_config(REPO_ROOT / "configs" / "tiny-cpu.yaml", [f"run.root_dir={tmp_path}"])
    with DirLock(tmp_path / "tiny"):
        assert next_free_run(cfg).run.name == "tiny-2"
    assert next_free_run(cfg) is cfg
