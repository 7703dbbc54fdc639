"""Learner config: the clip presets fill the paper's mask forms and refuse contradicting fields."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from learner.config import ClipConfig


@pytest.mark.parametrize(
    ("preset", "method", "expected"),
    [
        # the authors' released code (ALGORITHM.md §3): lower tail of A < 0 tokens only
        ("released", "clip_b", ("negative_lower", 2.5, None, False)),
        ("released", "clip_v", ("negative_lower", 8.5, 1e-4, False)),
        # the paper's prose: both tails, no cap
        ("paper", "clip_b", ("symmetric", 2.5, None, False)),
        ("paper", "clip_v", ("symmetric", 8.5, None, False)),
    ],
)
def test_presets_fill_the_mask_fields(preset, method, expected):
    cfg = ClipConfig(preset=preset, method=method)
    assert (cfg.form, cfg.mu, cfg.max_frac, cfg.importance_weighted) == expected


def test_a_preset_round_trips_through_its_dump():
    # the run directory's resolved config.yaml holds the filled fields beside the preset
    cfg = ClipConfig(preset="released")
    assert ClipConfig(**cfg.model_dump()) == cfg


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"preset": "released", "mu": 2.5}, "mu=2.5 contradicts preset 'released' (mu=8.5 for clip_v)"),
        ({"preset": "paper", "importance_weighted": True}, "importance_weighted=True contradicts preset 'paper'"),
        ({"preset": "released", "method": "directional"}, "method 'directional' needs preset custom"),
    ],
)
def test_a_preset_refuses_what_contradicts_it(fields, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ClipConfig(**fields)


def test_custom_takes_the_fields_as_given():
    cfg = ClipConfig(method="clip_v", form="negative_lower", mu=3.0, importance_weighted=True)
    assert (cfg.preset, cfg.form, cfg.mu, cfg.importance_weighted) == ("custom", "negative_lower", 3.0, True)
    assert ClipConfig(preset="paper", method="none").method == "none"
