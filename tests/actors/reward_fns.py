"""Reward functions imported by path ('tests.actors.reward_fns:...') in the reward and rollout tests."""

from __future__ import annotations

import time

from actors.rewards import partial_match


def flaky_reward(response: str, answer: str) -> float:
    """partial_match, except answer 'boom' raises and answer 'hang' never returns."""
    if answer == "boom":
        raise RuntimeError("reward function failed on purpose")
    if answer == "hang":
        while True:  # never returns: only killing the process stops it
            time.sleep(0.01)
    return partial_match(response, answer)


def length_reward(response: str, answer: str) -> float:
    """Length of the response, to check a user function's value passes through unchanged."""
    return float(len(response))


def nonfinite_reward(response: str, answer: str) -> float:
    """float(answer) for the answers 'nan', 'inf' and '-inf' (a broken reward function), else 1.0."""
    return float(answer) if answer in ("nan", "inf", "-inf") else 1.0


def slow_reward(response: str, answer: str) -> float:
    """1.0 after float(answer) seconds: a pathological response that is slow to verify."""
    time.sleep(float(answer))
    return 1.0
