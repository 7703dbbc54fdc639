"""Config loading fails early, with the dotted key and what is allowed, in Python and on the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from driftrl.cli import main
from driftrl.config import ConfigError, load_config
from learner.config import LearnerConfig

REPO = Path(__file__).resolve().parents[2]


def _error(path: str | Path | None, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("learner.clip.mu=0", "learner.clip.mu", "greater than 0"),
        ("learner.clip.mu=-1.5", "learner.clip.mu", "greater than 0"),
        ("rollout.temperature=0", "rollout.temperature", "greater than 0"),
        ("learner.max_staleness=-1", "learner.max_staleness", "greater than or equal to 0"),
        ("rollout.group_size=eight", "rollout.group_size", "valid integer"),
        ("run.mode=sometimes", "run.mode", "'async' or 'sync'"),
    ],
)
def test_bad_value_names_the_key_and_the_bound(override: str, key: str, allowed: str) -> None:
    message = _error(None, [override])
    assert f"{key}:" in message
    assert allowed in message


# The learner section is long and grows with the algorithm, so its list comes from the model; the
# small sections below are spelt out by hand.
LEARNER_KEYS = ", ".join(sorted(LearnerConfig.model_fields))


def test_unknown_key_in_a_file_is_named_with_the_allowed_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  lr: 1.0e-4\n  learning_rate: 1.0e-4\n")
    message = _error(path)
    assert f"learner.learning_rate: unknown key; allowed: {LEARNER_KEYS}\n" in message + "\n"


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("learner.lrr=1e-5", f"learner.lrr: unknown key; allowed: {LEARNER_KEYS}"),
        (
            "learner.clip.muu=2",
            "learner.clip.muu: unknown key; allowed: form, importance_weighted, max_frac, method, mu, preset",
        ),
        (
            "lerner.lr=1e-5",
            "lerner: unknown key; allowed: buffer, learner, metrics, model, rollout, run, task",
        ),
        (
            "rollout.reward.kind=math",
            "rollout.reward.kind: unknown key; allowed: batch_budget_s, function, timeout_s, type",
        ),
    ],
)
def test_unknown_key_in_an_override_lists_its_section(override: str, line: str) -> None:
    assert _error(None, [override]).splitlines()[1:] == [f"  {line}"]


def test_every_unknown_key_gets_its_own_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  nmae: x\nmetrics:\n  prot: 1\n")
    lines = _error(path, ["learner.clip.mu=0"]).splitlines()
    assert lines[0] == f"invalid {path} + overrides:"
    assert sorted(lines[1:]) == [
        "  learner.clip.mu: Input should be greater than 0 (got 0)",
        "  metrics.prot: unknown key; allowed: host, loggers, port, probe_prompts, wandb_project",
        "  run.nmae: unknown key; allowed: mode, name, pin_learner_cpus, ray_address, ray_num_cpus, root_dir, rpc_timeout_s, seed",
    ]


def test_wrong_type_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  max_tokens: [16]\n")
    message = _error(path)
    assert "rollout.max_tokens:" in message and "valid integer" in message


def test_bad_yaml_and_non_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  lr: [1e-4\n")
    assert "not valid YAML" in _error(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- learner\n- rollout\n")
    assert "must be a mapping" in _error(listing)


def test_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("learner", "not of the form section.key=value"),
        ("=3", "empty key"),
        ("learner..lr=3", "empty key"),
        ("learner.lr=[1", "not valid YAML"),
        ("learner.lr.value=1", "learner.lr:"),
    ],
)
def test_bad_override(override: str, fragment: str) -> None:
    assert fragment in _error(None, [override])


def test_overrides_apply_on_top_of_the_file() -> None:
    cfg = load_config(REPO / "configs/tiny-cpu.yaml", ["learner.lr=3e-4", "rollout.group_size=4"])
    assert cfg.learner.lr == 3e-4
    assert cfg.rollout.group_size == 4


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "driftrl.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_check_config_exits_2_with_the_message() -> None:
    proc = _cli("check-config", "--config", "configs/tiny-cpu.yaml", "learner.clip.mu=0")
    assert proc.returncode == 2, proc.stderr
    assert "learner.clip.mu: Input should be greater than 0" in proc.stderr
    assert proc.stdout == ""


def test_cli_check_config_unknown_key_exits_2_with_the_allowed_keys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check-config", "--config", str(REPO / "configs/tiny-cpu.yaml"), "learner.lrr=1e-5"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"learner.lrr: unknown key; allowed: {LEARNER_KEYS}" in err


def test_cli_check_config_missing_file_exits_2(tmp_path: Path) -> None:
    proc = _cli("check-config", "--config", str(tmp_path / "none.yaml"))
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


def test_cli_check_config_prints_the_resolved_tiny_default() -> None:
    proc = _cli("check-config", "--config", "configs/tiny-cpu.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "path: runs/tiny-model/warm" in proc.stdout


@pytest.mark.parametrize("name", ["../../x", "/abs", "/", "a/b", ".", "..", "x..y", "a b", "tiny\\x", "é"])
def test_run_name_outside_one_folder_is_refused(name: str) -> None:
    message = _error(None, [f"run.name={name!r}"])
    assert "run.name: Value error, must be one folder name under run.root_dir" in message, message


@pytest.mark.parametrize("name", ["tiny", "tiny-2", "qwen2.5-7b-dapo", "A_b.c", ".hidden"])
def test_run_name_of_one_folder_is_accepted(name: str) -> None:
    assert load_config(None, [f"run.name={name}"]).run.name == name
