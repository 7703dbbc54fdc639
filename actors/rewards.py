"""Reward functions and the scorer that runs them without ever hanging or killing the actor.

A reward function maps ``(response, answer) -> float``, where ``response`` is the decoded response
(special tokens skipped) and ``answer`` the dataset's reference. The registry:

* ``exact_match``: 1.0 when :func:`tasks.synthetic.is_correct` holds (today: the
  whitespace-stripped response equals the stripped answer), else 0.0. The same function decides
  held-out accuracy, so the training reward and the evaluation cannot disagree on a response.
* ``partial_match``: dense credit for a tiny policy. With ``r``, ``a`` the normalised strings,
  ``score = #{i < min(|r|, |a|) : r[i] == a[i]} / max(|r|, |a|)`` and ``score = 1`` when both are
  empty. Position-wise, so a right prefix earns credit, and the denominator punishes a response
  that is too short or too long; 1.0 exactly when ``r == a``.
* ``math``: ``math_verify.verify(parse("$" + answer + "$"), parse(response))`` -> 1.0/0.0 (see
  :func:`latex_reference`); parse extracts a boxed or plain answer from the response and verify
  accepts equivalent forms (``1/2``, ``0.5``, ``\\frac{1}{2}``).
* ``python``: a user function named by ``'package.module:function'``.

Why a child process and not a thread: a thread past its deadline cannot be killed, so a reward
that loops forever would keep a core busy (and may hold the GIL) for the rest of the run on a
2-core machine. :class:`RewardScorer` runs the functions in one persistent child process (spawn,
so no vLLM/Ray threads are forked), sends a whole batch at once and waits for each result with its
own deadline; on a timeout it kills that child (our own PID) and starts a fresh one for the rest of
the batch. A function that raises, or a child that dies, scores 0 and is counted. ``math_verify``
uses ``signal.alarm`` for its own timeouts, which works only in a main thread: in the child it is.

Bad values and slow batches: a reward that is NaN or infinite scores 0 and is counted
(``nonfinite``): the row stays usable (the buffer rejects non-finite rewards, and with them the
whole group), and the count says the reward function is broken. A batch gets ``batch_budget_s`` in
all: once spent, the child is killed and every response not yet scored scores 0, counted
(``over_budget``), so 64 responses that each take the per-call ``timeout_s`` cannot hold an actor
for 64 times that.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from actors.config import RewardConfig
from tasks.synthetic import is_correct, normalise_response

RewardFn = Callable[[str, str], float]

# A fresh interpreter importing torch-free driftrl modules (and math_verify/sympy) takes ~1-3 s;
# the per-call deadline starts only once the child says it is ready.
STARTUP_TIMEOUT_S = 60.0


def exact_match(response: str, answer: str) -> float:
    """1.0 when the synthetic task's held-out check accepts the response (same normalisation)."""
    return 1.0 if is_correct(response, answer) else 0.0


def partial_match(response: str, answer: str) -> float:
    """Fraction of positions where the normalised strings agree, over the longer length (see module doc)."""
    r, a = normalise_response(response), normalise_response(answer)
    longest = max(len(r), len(a))
    if longest == 0:
        return 1.0
    # zip stops at the shorter string on purpose: missing positions earn nothing.
    return sum(x == y for x, y in zip(r, a, strict=False)) / longest


def latex_reference(answer: str) -> str:
    """The reference as math-verify should read it: ``$answer$`` unless already delimited or boxed.

    References are mostly bare LaTeX (``5\\sqrt{2}``, ``\\frac{3}{8}``) or integers. Unwrapped, the
    plain-expression parser stops at the first thing it cannot read, so ``5\\sqrt{2}`` becomes ``5`` and
    ``\\boxed{5}`` then "matches" it; inside ``$...$`` the LaTeX parser reads the whole expression, and
    integers, fractions and decimals parse the same either way. ``\\$18.90`` (an escaped dollar) is
    bare LaTeX, not a delimiter.
    """
    text = answer.strip()
    if text.startswith(("$", "\\(", "\\[")) or "\\boxed" in text:
        return text
    return f"${text}$"


def math_equivalent(response: str, answer: str) -> float:
    """1.0 when math-verify finds the response's (boxed or plain) answer equivalent to the reference."""
    from math_verify import parse, verify

    gold = parse(latex_reference(answer))
    pred = parse(response)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred) else 0.0


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "partial_match": partial_match,
    "math": math_equivalent,
}

# One known-good call per registry entry that imports lazily, made in the child before it says
# ready: importing math-verify/sympy and building its LaTeX parser takes ~1-2 s, longer than a
# per-call deadline of 1 s, so without it the first call after every child start would time out.
WARM_UP_CALLS: dict[str, tuple[str, str]] = {"math": (r"\boxed{1}", "1")}


def load_function(import_path: str) -> RewardFn:
    """Import ``'package.module:function'``; a clear ValueError when the path is malformed or missing."""
    module_name, sep, attr = import_path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {import_path!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward function {import_path!r}: cannot import {module_name!r}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {import_path!r}: {module_name} has no callable {attr!r}")
    return fn


def resolve_reward(cfg: RewardConfig) -> RewardFn:
    """The function a reward config names (registry entry or import path)."""
    if cfg.type == "python":
        if not cfg.function:
            raise ValueError("reward.type=python needs reward.function='package.module:function'")
        return load_function(cfg.function)
    return REWARDS[cfg.type]


def _serve(cfg: RewardConfig, conn: Connection) -> None:
    """Child process: say ready, then score batches from ``conn``, one ``(status, value)`` per item."""
    fn = resolve_reward(cfg)
    if cfg.type in WARM_UP_CALLS:
        fn(*WARM_UP_CALLS[cfg.type])
    conn.send(("ready", None))
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        for response, answer in batch:
            try:
                conn.send(("ok", float(fn(response, answer))))
            except Exception as err:  # any user error scores 0; the message goes back to be counted
                conn.send(("error", f"{type(err).__name__}: {err}"[:500]))


@dataclass
class RewardStats:
    """Counters of one scorer (cumulative)."""

    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    nonfinite: int = 0
    over_budget: int = 0
    child_restarts: int = 0
    reward_sum: float = 0.0
    last_error: str | None = None
    errors_by_type: dict[str, int] = field(default_factory=dict)


class RewardScorer:
    """Scores responses with the configured reward in a killable child process.

    Args:
        cfg: which reward and its per-call deadline ``timeout_s``.

    The reward is resolved once in this process too, so a bad import path fails at construction
    (actor start) with a clear message instead of as a stream of counted errors.
    """

    def __init__(self, cfg: RewardConfig) -> None:
        resolve_reward(cfg)
        self.cfg = cfg
        self.stats = RewardStats()
        self._ctx = mp.get_context("spawn")
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None

    def _start(self) -> Connection | None:
        """Spawn the child and wait for it to import the reward; None if it does not come up."""
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_serve, args=(self.cfg, child), daemon=True, name="driftrl-reward")
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        status, value = self._receive(parent, STARTUP_TIMEOUT_S)
        if status != "ready":
            self._kill()
            self.stats.last_error = f"reward process did not start: {value}"
            return None
        return parent

    def _kill(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(timeout=5)
        self._proc, self._conn = None, None

    def score(self, responses: Sequence[str], answers: Sequence[str]) -> list[float]:
        """One finite reward per response; errors, deaths, timeouts, NaN/inf values and the responses
        left when the batch budget runs out score 0.0 and are counted."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        rewards: list[float] = []
        pending = list(zip(responses, answers, strict=True))
        budget_s = self.cfg.batch_budget_s
        budget_end = None if budget_s is None else time.monotonic() + budget_s
        while pending:
            conn = self._conn if self._conn is not None else self._start()
            if conn is None:
                # The child cannot even start (e.g. the module fails in a fresh interpreter): every
                # remaining call is an error, and the next batch tries again.
                self._count(len(pending), "error", self.stats.last_error or "no reward process")
                rewards.extend(0.0 for _ in pending)
                break
            try:
                conn.send(pending)
            except OSError:
                self._kill()
                self.stats.child_restarts += 1
                continue
            while pending:
                # The child starts the next item right after sending a result, so waiting
                # timeout_s from here bounds each call; the budget bounds the batch.
                wait_s = self.cfg.timeout_s
                if budget_end is not None:
                    wait_s = min(wait_s, budget_end - time.monotonic())
                status, value = self._receive(conn, wait_s)
                if status == "timeout" and wait_s < self.cfg.timeout_s:
                    # the budget ran out (before or during this call): the child still owes answers
                    # for the rest of the batch, so it goes, and the rest scores 0
                    self._kill()
                    self.stats.child_restarts += 1
                    self._count(len(pending), "over_budget", f"reward batch budget of {budget_s} s spent")
                    rewards.extend(0.0 for _ in pending)
                    return rewards
                pending.pop(0)
                reward = float(value) if status == "ok" else 0.0  # type: ignore[arg-type]
                if not math.isfinite(reward):
                    status, value, reward = "nonfinite", f"reward function returned {reward}", 0.0
                rewards.append(reward)
                self._count(1, status, value)
                if status in ("timeout", "died"):
                    self._kill()
                    self.stats.child_restarts += 1
                    break  # a fresh child takes the rest of the batch
        return rewards

    def _count(self, calls: int, status: str, value: object) -> None:
        self.stats.calls += calls
        if status == "ok":
            self.stats.reward_sum += float(value)  # type: ignore[arg-type]
        elif status == "timeout":
            self.stats.timeouts += calls
        elif status == "nonfinite":
            self.stats.nonfinite += calls
            self.stats.last_error = str(value)
        elif status == "over_budget":
            self.stats.over_budget += calls
        else:
            self.stats.errors += calls
            self.stats.last_error = str(value)
            kind = str(value).split(":", 1)[0]
            self.stats.errors_by_type[kind] = self.stats.errors_by_type.get(kind, 0) + calls

    def _receive(self, conn: Connection, timeout_s: float) -> tuple[str, object]:
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout", f"reward call exceeded {timeout_s} s"
                # Short polls so a child that died is noticed without waiting out the deadline.
                if conn.poll(min(remaining, 0.5)):
                    status, value = conn.recv()
                    return status, value
                if self._proc is not None and not self._proc.is_alive():
                    return "died", f"ChildDied: reward process exited with code {self._proc.exitcode}"
        except (EOFError, OSError) as err:
            return "died", f"ChildDied: {type(err).__name__}"

    def close(self) -> None:
        """Stop the child process."""
        self._kill()

    def __del__(self) -> None:
        self._kill()
