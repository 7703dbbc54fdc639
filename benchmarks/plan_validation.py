"""Does ``driftrl plan`` predict the async pipeline from a sync run's rates? (issue 19, part 3)

Runs the async_vs_sync benchmark's two runs (same tiny default, same pinning: rollout + driver +
Ray + buffer on one core, the learner on the other, steps 2..N timed), then:

1. reads the *sync* run's rates from its run directory (:func:`driftrl.plan.rates_from_run_dir`:
   engine tokens/s while busy, learner tokens/s in ``train_step``, sync and weight-load seconds,
   response lengths);
2. simulates the *async* run's config with them (:func:`driftrl.plan.simulate`, same steps);
3. compares with what the async run measured: steps/s, and the async/sync speed-up.

The sync run over-generates (the driver's admission figure lags the buffer, so a batch more is
admitted before the sample lands and then evicted as stale); the simulation reproduces that from
the same rule instead of folding it into a rate, and the engine rate is tokens over the engine's
busy seconds, not trained tokens over wall time.

Last line: ``{"metric": "plan_async_steps_per_s_error", "value": |predicted - measured| / measured,
"goal": "<= 0.15"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

GOAL = 0.15
QUICK_STEPS = 4


def predict(root: Path, steps: int) -> dict[str, object]:
    """Rates from ``root/sync``, the async run ``root/async`` simulated with them, and the errors."""
    from driftrl.plan import rates_from_run_dir, simulate

    sync = rates_from_run_dir(root / "sync")
    asyn = rates_from_run_dir(root / "async")
    predicted_async = simulate(sync.rates, asyn.shape, sync.rollout_actors, sync.learner_ranks, steps=steps)
    # the sync run re-simulated from its own rates: how far the model is off where it was measured
    predicted_sync = simulate(sync.rates, sync.shape, sync.rollout_actors, sync.learner_ranks, steps=steps)
    measured_ratio = asyn.steps_per_s / sync.steps_per_s
    predicted_ratio = predicted_async.steps_per_s / sync.steps_per_s
    rates = sync.rates
    return {
        "sync_rates": {
            "generation_tokens_per_s": round(rates.generation_tokens_per_s, 1),
            "learner_tokens_per_s": round(rates.learner_tokens_per_s, 1),
            "learner_post_step_s": round(rates.learner_post_step_s, 4),
            "weight_load_s": round(rates.weight_load_s, 4),
            "response_length_mean": round(rates.response_length_mean, 2),
            "generated_per_trained": round(sync.generated_per_trained, 3),
        },
        "measured_sync_steps_per_s": round(sync.steps_per_s, 4),
        "simulated_sync_steps_per_s": round(predicted_sync.steps_per_s, 4),
        "simulated_sync_generated_per_trained": round(predicted_sync.generated_per_trained, 3),
        "measured_async_steps_per_s": round(asyn.steps_per_s, 4),
        "predicted_async_steps_per_s": round(predicted_async.steps_per_s, 4),
        "measured_async_staleness": round(asyn.staleness_mean, 3),
        "predicted_async_staleness": round(predicted_async.staleness_mean, 3),
        "measured_async_generated_per_trained": round(asyn.generated_per_trained, 3),
        "predicted_async_generated_per_trained": round(predicted_async.generated_per_trained, 3),
        "predicted_async_rollout_idle": round(predicted_async.rollout_idle_frac, 3),
        "predicted_async_learner_idle": round(predicted_async.learner_idle_frac, 3),
        "measured_speedup": round(measured_ratio, 3),
        "predicted_speedup": round(predicted_ratio, 3),
        "speedup_error": round(abs(predicted_ratio - measured_ratio) / measured_ratio, 4),
        "error": abs(predicted_async.steps_per_s - asyn.steps_per_s) / asyn.steps_per_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="Learner steps per mode (first one untimed).")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_STEPS} steps per mode of an untrained tiny model (the numbers mean nothing)",
    )
    parser.add_argument(
        "--keep", default=None, help="Keep the two run directories here (default: a temp dir)."
    )
    parser.add_argument(
        "--from-runs", default=None, help="Skip the runs: predict from DIR/sync and DIR/async made earlier."
    )
    parser.add_argument("override", nargs="*", help="Dotted config overrides for both modes.")
    args = parser.parse_args(argv)

    from async_vs_sync import quick_inputs, run_mode

    from driftrl.config import load_config
    from driftrl.pipeline import ensure_tiny_default

    if args.from_runs:
        out = predict(Path(args.from_runs), args.steps)
    else:
        with tempfile.TemporaryDirectory(prefix="driftrl-plan-validation-") as tmp:
            root = Path(args.keep) if args.keep else Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            overrides = list(args.override)
            if args.quick:
                import ray

                from driftrl.pipeline import start_local_ray

                args.steps = QUICK_STEPS
                overrides = quick_inputs(Path(tmp)) + overrides
                start_local_ray(2, log_to_driver=False)
            else:
                ensure_tiny_default(
                    load_config(REPO_ROOT / "configs" / "tiny-cpu.yaml", overrides), progress=True
                )
            try:
                for mode in ("sync", "async"):
                    run_mode(mode, args.steps, root, overrides)
            finally:
                if args.quick:
                    ray.shutdown()
            out = predict(root, args.steps)
    print(json.dumps(out))
    print(
        f"async steps/s: measured {out['measured_async_steps_per_s']:.3f}, predicted from the sync run's rates "
        f"{out['predicted_async_steps_per_s']:.3f} (error {out['error']:.1%}); async/sync speed-up measured "
        f"{out['measured_speedup']:.2f}x, predicted {out['predicted_speedup']:.2f}x; the sync run itself "
        f"re-simulated: {out['simulated_sync_steps_per_s']:.3f} vs {out['measured_sync_steps_per_s']:.3f} steps/s"
    )
    print(
        json.dumps(
            {
                "metric": "plan_async_steps_per_s_error",
                "value": round(out["error"], 4),
                "goal": f"<= {GOAL}",
                "met": out["error"] <= GOAL,
                "predicted": out["predicted_async_steps_per_s"],
                "measured": out["measured_async_steps_per_s"],
                "speedup_predicted": out["predicted_speedup"],
                "speedup_measured": out["measured_speedup"],
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
