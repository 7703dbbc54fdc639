"""Avg@K and Pass@K of a policy, and the pass-rate filter of train prompts (ALGORITHM.md §6).

Two metrics over questions q with n_q sampled responses of which c_q are correct:

- ``Avg@K`` = mean over questions of c_q / K with n_q = K: the expected accuracy of one sample.
- ``Pass@K`` = mean over questions of the unbiased estimator ``1 − C(n−c, K) / C(n, K)``
  (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1): the probability
  that at least one of K responses drawn without replacement from the n is correct.

Sampling is vLLM's (``K`` responses per question at the evaluation temperature, 0.7 in the paper);
correctness is the task's verifier: exact match for the synthetic task, the ``math`` reward
(math-verify) of ``actors/rewards.py`` for math data, a response counting as correct iff it scores 1.
The same machinery estimates each train prompt's pass rate under the starting model for the
paper's (1/16, 15/16) filter.

The metric functions are pure and import nothing heavy; vLLM, transformers and ``datasets`` are
imported by the functions that need them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (responses, reference answers) -> one verdict per response; batched so the math reward can run
# a whole dataset through one killable child process.
Verifier = Callable[[Sequence[str], Sequence[str]], list[bool]]

PAPER_EVAL_TEMPERATURE = 0.7
# The paper keeps train prompts whose pass rate under the starting model is strictly inside
# (1/16, 15/16) at 16 samples: always-solved and never-solved prompts give zero GRPO advantage.
PASS_RATE_LOW = 1 / 16
PASS_RATE_HIGH = 15 / 16


# ---------------------------------------------------------------- metrics (pure)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k of one question from ``n`` samples with ``c`` correct.

    ``1 − C(n−c, k)/C(n, k)`` evaluated as ``1 − Π_{i=n−c+1}^{n} (1 − k/i)``: the ratio of binomials
    telescopes to that product, which never forms the huge binomials (C(1024, 512) overflows a
    float64) and is exact to rounding for any n. If fewer than k samples are wrong (n − c < k), every
    k-subset holds a correct one and the value is exactly 1.

    Raises:
        ValueError: unless ``1 <= k <= n`` and ``0 <= c <= n``.
    """
    if k < 1:
        raise ValueError(f"Pass@k needs k >= 1, got k={k}")
    if n < k:
        raise ValueError(f"Pass@{k} needs at least k={k} samples per question, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"correct count c={c} must be in 0..n={n}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def _check_samples(correct: Sequence[Sequence[bool]]) -> None:
    if len(correct) == 0:
        raise ValueError("no questions to score")
    for q, row in enumerate(correct):
        if len(row) == 0:
            raise ValueError(f"question {q} has no samples")


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Avg@K: per-question accuracy over its samples, averaged over questions.

    ``correct[q]`` holds the verdicts of question q's samples. Every question weighs the same even
    if sample counts differ (an accuracy pooled over all samples would not).
    """
    _check_samples(correct)
    return math.fsum(sum(map(bool, row)) / len(row) for row in correct) / len(correct)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Pass@k averaged over questions; each question needs at least k samples."""
    _check_samples(correct)
    return math.fsum(pass_at_k(len(row), sum(map(bool, row)), k) for row in correct) / len(correct)


def pass_at_k_curve(correct: Sequence[Sequence[bool]]) -> dict[int, float]:
    """Pass@k for k = 1, 2, 4, ... up to the smallest per-question sample count (which is included)."""
    _check_samples(correct)
    n_min = min(len(row) for row in correct)
    ks = sorted({2**j for j in range(n_min.bit_length()) if 2**j <= n_min} | {n_min})
    return {k: mean_pass_at_k(correct, k) for k in ks}


@dataclass(frozen=True)
class DatasetScore:
    """Avg@K and Pass@K of one dataset.

    Attributes:
        name: Dataset label.
        questions: Number of questions.
        k: Samples per question (K).
        avg_at_k: Avg@K.
        pass_at_k: Pass@K (from n = K samples it is the fraction of questions solved at least once).
        pass_at: Pass@k for k = 1, 2, 4, ..., K (Pass@1 equals Avg@K).
        correct_counts: c_q per question, in dataset order (lets others recompute any Pass@k ≤ K).
    """

    name: str
    questions: int
    k: int
    avg_at_k: float
    pass_at_k: float
    pass_at: dict[int, float] = field(default_factory=dict)
    correct_counts: list[int] = field(default_factory=list)


def score_dataset(name: str, correct: Sequence[Sequence[bool]], k: int) -> DatasetScore:
    """Avg@K and Pass@K of verdicts ``correct[q][j]`` (question q, sample j), K samples each."""
    _check_samples(correct)
    counts = {len(row) for row in correct}
    if counts != {k}:
        raise ValueError(f"{name}: every question needs exactly K={k} samples, got counts {sorted(counts)}")
    return DatasetScore(
        name=name,
        questions=len(correct),
        k=k,
        avg_at_k=avg_at_k(correct),
        pass_at_k=mean_pass_at_k(correct, k),
        pass_at=pass_at_k_curve(correct),
        correct_counts=[sum(map(bool, row)) for row in correct],
    )


def format_table(scores: Sequence[DatasetScore]) -> str:
    """A fixed-width text table: dataset, questions, K, Avg@K, Pass@K."""
    header = ("dataset", "questions", "K", "Avg@K", "Pass@K")
    rows = [(s.name, str(s.questions), str(s.k), f"{s.avg_at_k:.4f}", f"{s.pass_at_k:.4f}") for s in scores]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------- verifiers and prompts


@dataclass(frozen=True)
class PromptSet:
    """Prompts to sample, with their reference answers and ids (same order)."""

    name: str
    prompt_ids: list[str]
    prompts: list[str]
    answers: list[str]
    extra: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.prompt_ids) == len(self.prompts) == len(self.answers):
            raise ValueError(f"{self.name}: prompt_ids, prompts and answers differ in length")
        if not self.prompts:
            raise ValueError(f"{self.name}: no prompts")


def load_prompt_set(
    name: str,
    spec: str,
    task_type: str,
    tokenizer: Any | None,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    limit: int | None = None,
    heldout_seed: int = 0,
) -> PromptSet:
    """Load a dataset as a :class:`PromptSet`.

    Math data is normalised by :mod:`tasks.math_data` and rendered with the paper's prompt
    template (``tokenizer``'s chat template if it has one). Synthetic data is used as stored: the
    ``prompt_key`` column is the prompt text, ``answer_key`` the answer. ``limit`` keeps the first
    rows (smoke runs).
    """
    from tasks import math_data

    if task_type == "math":
        ds = math_data.load_math_dataset(spec, heldout_seed=heldout_seed)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        problems = list(ds["problem"])
        return PromptSet(
            name=name,
            prompt_ids=list(ds["prompt_id"]),
            prompts=[math_data.render_prompt(p, tokenizer) for p in problems],
            answers=list(ds["answer"]),
            extra={"problem": problems, "data_source": list(ds["data_source"])},
        )
    ds = math_data.load_raw(spec)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    missing = {prompt_key, answer_key} - set(ds.column_names)
    if missing:
        raise ValueError(f"{spec}: missing column(s) {sorted(missing)}; has {ds.column_names}")
    ids = (
        list(ds["prompt_id"])
        if "prompt_id" in ds.column_names
        else [f"{name}-{i:06d}" for i in range(len(ds))]
    )
    return PromptSet(
        name=name,
        prompt_ids=[str(i) for i in ids],
        prompts=[str(p) for p in ds[prompt_key]],
        answers=[str(a) for a in ds[answer_key]],
    )


def resolve_model_dir(path: str | Path) -> str:
    """A Hugging Face model directory from a model dir, a run checkpoint or a run directory.

    Accepts: a directory with ``config.json``; a directory with exactly one such subdirectory (a
    run checkpoint ``checkpoints/step_<n>/`` holding its exported model); a run directory (its
    newest ``checkpoints/step_<n>/``); any other string is passed on as a hub model name.
    """
    p = Path(path)
    if not p.exists():
        return str(path)
    if (p / "config.json").is_file():
        return str(p)
    steps = sorted(
        (d for d in (p / "checkpoints").glob("step_*") if d.name[5:].isdigit()), key=lambda d: int(d.name[5:])
    )
    if steps:
        return resolve_model_dir(steps[-1])
    found = sorted(c.parent for c in p.glob("*/config.json"))
    if len(found) == 1:
        return str(found[0])
    raise FileNotFoundError(
        f"{p} is neither a model directory (config.json) nor a run checkpoint holding one "
        f"(found {len(found)} candidate subdirectories)"
    )


# ---------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingSetup:
    """How responses are drawn for evaluation.

    Attributes:
        temperature: Sampling temperature (paper: 0.7 for evaluation).
        top_p: Nucleus mass.
        max_tokens: Most response tokens.
        seed: Base seed; question i uses seeds ``seed + i*n .. seed + i*n + n − 1``.
    """

    temperature: float = PAPER_EVAL_TEMPERATURE
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int = 0


class KSampler:
    """K responses per prompt from a vLLM engine (``vllm.LLM``), decoded with special tokens skipped.

    Built from a model directory and the rollout config's engine settings, or around an existing
    ``LLM`` (tests share one engine per module: starting one takes 30–45 s on CPU).
    """

    def __init__(self, llm: Any, tokenizer: Any | None = None) -> None:
        self.llm = llm
        self.tokenizer = tokenizer

    @classmethod
    def from_model(
        cls,
        model_dir: str,
        dtype: str = "float32",
        max_model_len: int = 128,
        kv_cache_memory_bytes: int | None = 64 << 20,
        seed: int = 0,
    ) -> KSampler:
        """Start a vLLM engine on ``model_dir`` (eager mode: no graph capture for a one-off run)."""
        from transformers import AutoTokenizer
        from vllm import LLM

        llm = LLM(
            model=model_dir,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=True,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
        )
        return cls(llm, AutoTokenizer.from_pretrained(model_dir))

    def sample(
        self,
        prompts: Sequence[str],
        n: int,
        setup: SamplingSetup,
        chunk_size: int = 64,
        desc: str | None = None,
    ) -> list[list[str]]:
        """``n`` decoded responses per prompt, in prompt order.

        Each prompt gets its own seed, spaced by ``n``: vLLM seeds the j-th of a request's ``n``
        samples with ``seed + j``, so consecutive per-prompt seeds would make sample j+1 of one
        question reuse the random stream of sample j of the next — correlated questions, biased
        Pass@K. Per-request seeds also make the draw independent of chunking and batching.
        """
        from tqdm.auto import tqdm
        from vllm import SamplingParams

        if n < 1:
            raise ValueError(f"need n >= 1 samples per prompt, got {n}")
        texts: list[list[str]] = []
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=desc is None) as bar:
            for start in range(0, len(prompts), chunk_size):
                chunk = list(prompts[start : start + chunk_size])
                params = [
                    SamplingParams(
                        n=n,
                        temperature=setup.temperature,
                        top_p=setup.top_p,
                        max_tokens=setup.max_tokens,
                        seed=setup.seed + (start + i) * n,
                    )
                    for i in range(len(chunk))
                ]
                outputs = self.llm.generate(chunk, params, use_tqdm=False)
                texts.extend([c.text for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs)
                bar.update(len(chunk))
        return texts


def judge(samples: Sequence[Sequence[str]], answers: Sequence[str], verifier: Verifier) -> list[list[bool]]:
    """Verdicts ``[q][j]`` of response j to question q against ``answers[q]``."""
    if len(samples) != len(answers):
        raise ValueError(f"{len(samples)} sample lists for {len(answers)} answers")
    flat_responses = [text for row in samples for text in row]
    flat_answers = [ans for row, ans in zip(samples, answers, strict=True) for _ in row]
    verdicts = verifier(flat_responses, flat_answers)
    if len(verdicts) != len(flat_responses):
        raise ValueError(f"verifier returned {len(verdicts)} verdicts for {len(flat_responses)} responses")
    it = iter(verdicts)
    return [[bool(next(it)) for _ in row] for row in samples]


def evaluate_prompt_set(
    sampler: KSampler, prompt_set: PromptSet, k: int, setup: SamplingSetup, verifier: Verifier
) -> DatasetScore:
    """Sample K responses per question and score Avg@K and Pass@K."""
    samples = sampler.sample(prompt_set.prompts, k, setup, desc=f"eval {prompt_set.name}")
    return score_dataset(prompt_set.name, judge(samples, prompt_set.answers, verifier), k)


# ---------------------------------------------------------------- pass-rate filter


@dataclass(frozen=True)
class FilterSummary:
    """What the pass-rate filter kept.

    Attributes:
        source: The input spec.
        k: Samples per prompt.
        low: Exclusive lower bound on the pass rate.
        high: Exclusive upper bound on the pass rate.
        prompts: Prompts scored.
        kept: Prompts kept.
        dropped_too_hard: Prompts with pass rate <= low.
        dropped_too_easy: Prompts with pass rate >= high.
        correct_histogram: ``histogram[c]`` = prompts with c of k correct.
    """

    source: str
    k: int
    low: float
    high: float
    prompts: int
    kept: int
    dropped_too_hard: int
    dropped_too_easy: int
    correct_histogram: list[int]


def pass_rate_keep(correct_counts: Sequence[int], k: int, low: float, high: float) -> list[bool]:
    """Keep prompt i iff ``low < c_i / k < high`` (strict: the boundaries carry no GRPO signal)."""
    # Bounds scaled to counts: 1/16 * 16 and 15/16 * 16 are exact, so a prompt sitting exactly on a
    # boundary is dropped whatever rounding c / k would have had.
    return [low * k < c < high * k for c in correct_counts]


def filter_by_pass_rate(
    sampler: KSampler,
    prompt_set: PromptSet,
    k: int,
    setup: SamplingSetup,
    verifier: Verifier,
    low: float = PASS_RATE_LOW,
    high: float = PASS_RATE_HIGH,
    source: str = "",
) -> tuple[list[int], list[int], FilterSummary]:
    """``(kept_indices, correct_counts, summary)``; pass rates estimated from ``k`` samples each."""
    if not 0 <= low < high <= 1:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    samples = sampler.sample(prompt_set.prompts, k, setup, desc=f"pass rate {prompt_set.name}")
    counts = [sum(row) for row in judge(samples, prompt_set.answers, verifier)]
    keep = pass_rate_keep(counts, k, low, high)
    histogram = [0] * (k + 1)
    for c in counts:
        histogram[c] += 1
    summary = FilterSummary(
        source=source or prompt_set.name,
        k=k,
        low=low,
        high=high,
        prompts=len(counts),
        kept=sum(keep),
        dropped_too_hard=sum(c <= low * k for c in counts),
        dropped_too_easy=sum(c >= high * k for c in counts),
        correct_histogram=histogram,
    )
    return [i for i, kept in enumerate(keep) if kept], counts, summary


def write_filtered(
    path: str | Path, prompt_set: PromptSet, kept: Sequence[int], pass_rates: Sequence[float]
) -> Path:
    """Write kept prompts as parquet (``prompt_id, prompt, answer, pass_rate`` + extra columns).

    Written to a temporary name and renamed, so a reader never sees a half-written file.
    """
    from datasets import Dataset

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list[Any]] = {
        "prompt_id": [prompt_set.prompt_ids[i] for i in kept],
        "prompt": [prompt_set.prompts[i] for i in kept],
        "answer": [prompt_set.answers[i] for i in kept],
        "pass_rate": [float(pass_rates[i]) for i in kept],
    }
    for name, values in prompt_set.extra.items():
        columns[name] = [values[i] for i in kept]
    tmp = out.with_name(f".{out.name}.tmp")
    Dataset.from_dict(columns).to_parquet(str(tmp))
    tmp.replace(out)
    return out
