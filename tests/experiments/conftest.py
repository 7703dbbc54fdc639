"""The random-init tiny policy the experiment tests run on, built once per module that asks for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.tiny_model import make_tiny_model

ROWS = [{"prompt": p + "=", "answer": p[::-1]} for p in ("abc", "hello", "xy", "qwer")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path: Path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path))
