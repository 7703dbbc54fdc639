"""Fused token-statistics kernel (learner/fused_stats.py) against a float64 reference, on CPU.

The Triton kernels run under the CPU interpreter, which triton reads from ``TRITON_INTERPRET``
when a kernel is decorated, i.e. when ``learner.fused_stats`` is imported. Setting it in this
pytest process would leak into every other test module, so the kernels run once in a child
process (this file run as a script) that saves inputs, outputs and gradients; the tests below
compare them with a float64 reference computed here. Shapes are deliberately not multiples of
the interpreter's blocks (BLOCK_N 16, BLOCK_V 32, BLOCK_D 16, vocabulary split 64).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
N_TOKENS, HIDDEN_DIM, VOCAB_SIZE = 37, 40, 200
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURES = (0.7, 1.0, 1.3)
LOGIT_SCALES = (1.0, 50.0)  # largest |logit| before the temperature, roughly
# 4 slab chunks of the backward (64, 64, 64, 8 columns) for every dtype
SMALL_BUDGET_COLUMNS = 64
CASES = [
    f"{dt}-T{t}-s{int(s)}" for dt, t, s in itertools.product(DTYPES, TEMPERATURES, LOGIT_SCALES)
] + ["fp32-T1.0-s10-strided", "mixed-T1.0-s10"]


def _make_inputs(case: str, seed: int) -> dict[str, torch.Tensor | float]:
    """Seeded inputs; half the tokens are the argmax (peaked S*), half uniform (tiny p_k)."""
    dtype_name, temp, scale = case.split("-")[:3]
    temperature, logit_scale = float(temp[1:]), float(scale[1:])
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N_TOKENS, HIDDEN_DIM, generator=gen, dtype=torch.float64)
    # logits h·W have std logit_scale / 3, so |z| reaches about logit_scale
    weight = torch.randn(VOCAB_SIZE, HIDDEN_DIM, generator=gen, dtype=torch.float64)
    weight *= logit_scale / 3 / HIDDEN_DIM**0.5
    tokens = torch.randint(0, VOCAB_SIZE, (N_TOKENS,), generator=gen)
    tokens[::2] = (hidden @ weight.T).argmax(1)[::2]
    grad_logp = torch.randn(N_TOKENS, generator=gen)
    grad_logp[3] = 0.0  # a masked token
    hidden_dtype = weight_dtype = DTYPES.get(dtype_name, torch.float32)
    if dtype_name == "mixed":
        weight_dtype = torch.bfloat16
    return {
        "hidden": hidden.to(hidden_dtype),
        "weight": weight.to(weight_dtype),
        "tokens": tokens,
        "grad_logp": grad_logp,
        "temperature": temperature,
    }


def _run_fused(inputs: dict, strided: bool) -> dict[str, torch.Tensor]:
    """Forward + backward of Σ g·logp through the kernels (child process only)."""
    from learner.fused_stats import fused_token_stats

    hidden = inputs["hidden"].clone().requires_grad_()
    weight = inputs["weight"].clone().requires_grad_()
    # a column-major view exercises the stride arguments
    hidden_in = hidden.T.contiguous().T if strided else hidden
    budget = N_TOKENS * SMALL_BUDGET_COLUMNS * torch.promote_types(hidden.dtype, weight.dtype).itemsize
    logp, entropy, s_star, s_expect, lse = fused_token_stats(
        hidden_in, weight, inputs["tokens"], inputs["temperature"], dlogits_budget_bytes=budget, return_lse=True
    )
    (logp * inputs["grad_logp"]).sum().backward()
    return {
        "logp": logp.detach(),
        "entropy": entropy,
        "s_star": s_star,
        "s_expect": s_expect,
        "lse": lse,
        "grad_hidden": hidden.grad,
        "grad_weight": weight.grad,
        "no_grad_stats": torch.tensor([t.requires_grad for t in (entropy, s_star, s_expect, lse)]),
    }


def _error_messages() -> dict[str, str]:
    """``str(ValueError)`` of each bad call, or ``"no error"`` (child process only)."""
    from learner.fused_stats import fused_token_stats

    hidden, weight = torch.randn(5, 16), torch.randn(40, 16)
    bad_calls = {
        "token_too_large": (hidden, weight, torch.tensor([0, 1, 40, 2, 3]), 1.0),
        "token_negative": (hidden, weight, torch.tensor([0, -1, 2, 2, 3]), 1.0),
        "tokens_float": (hidden, weight, torch.zeros(5), 1.0),
        "tokens_length": (hidden, weight, torch.zeros(4, dtype=torch.long), 1.0),
        "weight_dim": (hidden, torch.randn(40, 15), torch.zeros(5, dtype=torch.long), 1.0),
        "hidden_dtype": (hidden.double(), weight, torch.zeros(5, dtype=torch.long), 1.0),
        "temperature": (hidden, weight, torch.zeros(5, dtype=torch.long), 0.0),
    }
    messages = {}
    for name, args in bad_calls.items():
        try:
            fused_token_stats(*args)
            messages[name] = "no error"
        except ValueError as err:
            messages[name] = str(err)
    return messages


def _child_main(out_path: str) -> None:
    results: dict[str, object] = {}
    for seed, case in enumerate(CASES):
        inputs = _make_inputs(case, seed)
        results[case] = {"inputs": inputs, "outputs": _run_fused(inputs, strided=case.endswith("strided"))}
    # determinism: a second run of one case must match bit for bit (no atomics anywhere)
    results["repeat"] = _run_fused(_make_inputs(CASES[1], 1), strided=False)
    results["errors"] = _error_messages()
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out_path = tmp_path_factory.mktemp("fused_stats") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, str(out_path)], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out_path, weights_only=True)


def _reference(inputs: dict) -> dict[str, torch.Tensor]:
    """Float64 statistics and gradients of Σ g·logp from the same (rounded) inputs."""
    hidden = inputs["hidden"].double().requires_grad_()
    weight = inputs["weight"].double().requires_grad_()
    tokens = inputs["tokens"]
    log_probs = torch.log_softmax(hidden @ weight.T / inputs["temperature"], dim=-1)
    logp = log_probs.gather(1, tokens[:, None]).squeeze(1)
    (logp * inputs["grad_logp"].double()).sum().backward()
    log_probs = log_probs.detach()
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(1)
    p_k = probs.gather(1, tokens[:, None]).squeeze(1)
    return {
        "logp": logp.detach(),
        "entropy": entropy,
        "s_star": p_k * (entropy + p_k.log()),
        "s_expect": (probs**2 * (entropy[:, None] + log_probs)).sum(1),
        "lse": torch.logsumexp((hidden @ weight.T).detach() / inputs["temperature"], dim=-1),
        "grad_hidden": hidden.grad,
        "grad_weight": weight.grad,
    }


def _logit_error(expected: dict[str, torch.Tensor], scale: float = 1.0) -> float:
    """Absolute tolerance for float32 results: a few ulps of the largest logit, times ``scale``.

    A float32 logit (and lse, logp = z_k - lse) is off by a few ulps of |z|, i.e. |z|·2^-22,
    and every statistic inherits that absolutely; p = exp(z - lse) inherits it relatively, so
    gradients get it relative to their own size. |z| reaches ~190 at scale 50, T 0.7, which is
    why the default 1e-5 is not enough there.
    """
    max_abs_logit = (expected["lse"] - expected["logp"]).abs().max().item()
    return max(1e-5, 2**-22 * max_abs_logit * scale)


@pytest.mark.parametrize("case", CASES)
def test_statistics_match_float64_reference(kernel_results: dict, case: str) -> None:
    inputs, outputs = kernel_results[case]["inputs"], kernel_results[case]["outputs"]
    expected = _reference(inputs)
    for name in ("logp", "entropy", "s_star", "s_expect", "lse"):
        assert outputs[name].dtype == torch.float32 and outputs[name].shape == (N_TOKENS,)
        torch.testing.assert_close(
            outputs[name].double(), expected[name], rtol=1e-5, atol=_logit_error(expected), msg=name
        )
    assert not outputs["no_grad_stats"].any(), "only logp may carry gradient"


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_float64_reference(kernel_results: dict, case: str) -> None:
    inputs, outputs = kernel_results[case]["inputs"], kernel_results[case]["outputs"]
    expected = _reference(inputs)
    for name, source in (("grad_hidden", "hidden"), ("grad_weight", "weight")):
        actual = outputs[name]
        assert actual.dtype == inputs[source].dtype and actual.shape == inputs[source].shape
        scale = expected[name].abs().max().item()
        if actual.dtype == torch.float32:
            atol = _logit_error(expected, scale)
            torch.testing.assert_close(actual.double(), expected[name], rtol=1e-5, atol=atol, msg=name)
        else:
            # the dlogits slab is bf16 (relative rounding 2^-9 per entry), each chunk's grad_hidden
            # GEMM output is bf16 and the gradients are returned in bf16, as with torch's own bf16
            # matmuls; dz sums to zero over the vocabulary, so the error is relative to the size
            # of the partial sums, not of each entry: the bound is 1% of the largest entry
            torch.testing.assert_close(actual.double(), expected[name], rtol=0.0, atol=1e-2 * scale, msg=name)


def test_results_are_bitwise_deterministic(kernel_results: dict) -> None:
    first, second = kernel_results[CASES[1]]["outputs"], kernel_results["repeat"]
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        ("token_too_large", "tokens (outside [0, 40))"),
        ("token_negative", "tokens (outside [0, 40))"),
        ("tokens_float", "tokens: expected an integer dtype"),
        ("tokens_length", "tokens: expected shape [5]"),
        ("weight_dim", "weight: expected [V, 16]"),
        ("hidden_dtype", "hidden: expected one of"),
        ("temperature", "temperature: expected a finite value > 0"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_tensor(kernel_results: dict, call: str, needle: str) -> None:
    assert needle in kernel_results["errors"][call]


def test_token_out_of_range_reports_first_index(kernel_results: dict) -> None:
    # tokens [0, 1, 40, 2, 3] with V = 40: one bad entry, at index 2
    assert "1 bad entries, first at index (2,)" in kernel_results["errors"]["token_too_large"]


def test_import_without_triton_then_clear_error() -> None:
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from learner.fused_stats import fused_token_stats\n"
        "try:\n"
        "    fused_token_stats(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))\n"
        "except RuntimeError as err:\n"
        "    print('RuntimeError:', err)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RuntimeError: fused_token_stats needs triton" in proc.stdout


if __name__ == "__main__":
    _child_main(sys.argv[1])
