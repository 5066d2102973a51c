#!/usr/bin/env python
"""Time one cell of configurations through run_batch and through one process per run.

Both sides use one thread: the engine worker calls torch.set_num_threads(1), and the
single runs (scripts/run_exp.py) get OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1. Each
side runs in its own child process, so its peak memory (ru_maxrss from os.wait4) is
its own.

One process per run is timed on a sample of the cell (--sample runs, spread over the
sweep) and extrapolated to the whole cell by the mean. The cell trains
n_epochs = 5000 * --fraction steps. Both sides are also timed at 1 step, and the line
through the two times projects the full 5000 steps. --engine-only skips the single
runs, for comparing --members values.

Examples (the commands behind docs/benchmarks.md):
    python benchmarks/bench_engine.py --exp fnn --fraction 1.0 --sample 3
    python benchmarks/bench_engine.py --exp tfn --fraction 0.1 --sample 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

FULL_STEPS = 5000
LEARNING_RATES = (1e-2, 1e-3, 1e-4)
WEIGHT_DECAYS = (0, 1e-4, 1e-3, 1e-2)


def cell(args, steps: int) -> list[dict]:
    """Settings of every run of the benchmark cell: seeds x ranks x learning rates x weight decays."""
    if args.exp == "fnn":
        shared = dict(exp="fnn", width=16, target_depth=args.target_depth, frozen_depth=args.frozen_depth,
                      use_bias=1, activation="relu")
    else:
        shared = dict(exp="tfn", width=16, target_depth=args.target_depth, frozen_depth=args.target_depth,
                      n_head=2, seq_length=10)
    shared.update(method="sgd", batch_size=256, n_epochs=steps, n_test=5000, tune_bias=1)
    return [
        dict(shared, rank=rank, lr=lr, weight_decay=weight_decay, seed=seed)
        for seed in range(args.seeds)
        for rank in range(args.min_rank, args.min_rank + args.ranks)
        for lr in LEARNING_RATES
        for weight_decay in WEIGHT_DECAYS
    ]


def run_measured(command: list[str], env: dict | None = None) -> tuple[float, float, int, str]:
    """Run a child process; returns (wall seconds, CPU seconds, peak RSS in bytes, stdout).

    The child is reaped with os.wait4, whose resource usage is that child's alone. CPU
    seconds (user + system) are the figure to compare on a busy machine, where wall
    time also counts the time other processes hold the cores.
    """
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True,
                                   env={**os.environ, **(env or {})}, cwd=ROOT)
        stdout = process.stdout.read()
        process.stdout.close()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - started
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}:\n"
                               f"{errors.read()[-2000:]}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, stdout


def engine_worker(args) -> None:
    """Train the cell with run_batch on one thread (the child side of time_engine)."""
    import torch

    torch.set_num_threads(1)
    from lora_expressivity import stacked
    from lora_expressivity.config import RunConfig
    from lora_expressivity.engine import run_batch

    stacked.USE_CLAMPED_SOFTMAX = not args.plain_softmax

    configs = [RunConfig(**settings) for settings in cell(args, args.steps)]
    run_batch(configs, max_members=args.members)


@dataclass
class Timing:
    """Wall and CPU seconds of one or more child processes, and the largest peak RSS."""

    wall: float
    cpu: float
    peak_bytes: int


def time_engine(args, steps: int) -> Timing:
    """Train the whole cell with run_batch in one child process."""
    command = [sys.executable, __file__, "--worker", "--exp", args.exp, "--steps", str(steps),
               "--ranks", str(args.ranks), "--min-rank", str(args.min_rank), "--seeds", str(args.seeds),
               "--target-depth", str(args.target_depth), "--frozen-depth", str(args.frozen_depth)]
    if args.members:
        command += ["--members", str(args.members)]
    if args.plain_softmax:
        command.append("--plain-softmax")
    wall, cpu, peak, _ = run_measured(command)
    return Timing(wall, cpu, peak)


def time_single_runs(settings: list[dict]) -> Timing:
    """Mean wall and CPU seconds per run of scripts/run_exp.py over settings."""
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    wall = cpu = 0.0
    peak = 0
    for run in settings:
        flags = []
        for name, value in run.items():
            flags += [f"--{name}", str(value)]
        elapsed, used, rss, _ = run_measured([sys.executable, str(ROOT / "scripts" / "run_exp.py"), *flags], env)
        wall += elapsed
        cpu += used
        peak = max(peak, rss)
    return Timing(wall / len(settings), cpu / len(settings), peak)


def sample_of(settings: list[dict], count: int) -> list[dict]:
    """Pick count runs spread evenly over the cell, so that ranks and sweep values vary."""
    step = max(1, len(settings) // count)
    return settings[::step][:count]


def project(at_one: float, at_steps: float, steps: int, target: int) -> float | None:
    """Estimate the seconds at target steps from the line through (1, at_one) and (steps, at_steps).

    Returns None when the timing noise exceeds the cost of the extra steps, so that
    the line does not rise.
    """
    per_step = (at_steps - at_one) / (steps - 1)
    if per_step <= 0:
        return None
    return at_one + per_step * (target - 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", choices=("fnn", "tfn"), default="fnn", help="model of the cell (default: fnn)")
    parser.add_argument("--fraction", type=float, default=0.1,
                        help=f"fraction of the paper's {FULL_STEPS} steps to train (default: 0.1)")
    parser.add_argument("--target-depth", type=int, default=None,
                        help="target depth (default: 2 for fnn, 1 for tfn; the tfn uses it for both models)")
    parser.add_argument("--frozen-depth", type=int, default=None, help="frozen depth of the fnn (default: 4)")
    parser.add_argument("--ranks", type=int, default=16, help="number of ranks in the cell (default: 16)")
    parser.add_argument("--min-rank", type=int, default=1, help="smallest rank of the cell (default: 1)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..SEEDS-1 in the cell (default: 1)")
    parser.add_argument("--members", type=int, default=None,
                        help="members per stacked model (run_batch's max_members; default: engine.member_limit)")
    parser.add_argument("--sample", type=int, default=4, help="single runs to time, spread over the cell (default: 4)")
    parser.add_argument("--engine-only", action="store_true",
                        help="time only the engine (for comparing --members values)")
    parser.add_argument("--plain-softmax", action="store_true",
                        help="train transformers with torch.softmax instead of the clamped softmax "
                             "(same results; for timing the clamping)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.target_depth is None:
        args.target_depth = 2 if args.exp == "fnn" else 1
    if args.frozen_depth is None:
        args.frozen_depth = 4 if args.exp == "fnn" else args.target_depth

    if args.worker:
        engine_worker(args)
        return 0
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")

    steps = max(2, round(FULL_STEPS * args.fraction))
    settings = cell(args, steps)
    sample = sample_of(settings, args.sample)
    runs = len(settings)
    depths = (f"depth {args.target_depth}" if args.exp == "tfn"
              else f"target depth {args.target_depth}, frozen depth {args.frozen_depth}")
    print(f"{args.exp} cell ({depths}): {runs} runs of {steps} steps, members per model: "
          f"{args.members or 'default'}; one thread; load average before: {os.getloadavg()[0]:.2f}")
    if args.exp == "tfn":
        print("engine softmax: " + ("torch.softmax (--plain-softmax)" if args.plain_softmax
                                    else "clamped where exact (StackedTFN.choose_softmax)"))

    engine = time_engine(args, steps)
    engine_one = time_engine(args, 1)
    engine_full = project(engine_one.cpu, engine.cpu, steps, FULL_STEPS)
    print(f"{'':18s}{'wall s':>10s}{'CPU s':>10s}{'runs/CPU-s':>12s}{'peak RSS':>10s}")
    print(f"{'engine, cell':18s}{engine.wall:10.1f}{engine.cpu:10.1f}{runs / engine.cpu:12.3f}"
          f"{engine.peak_bytes / 2**20:8.0f} MiB")
    if args.engine_only:
        if engine_full is None:
            print(f"too few steps to project to {FULL_STEPS}: timing noise exceeds the cost of the steps")
        else:
            print(f"engine projected to {FULL_STEPS} steps: {runs / engine_full:.3f} runs/s "
                  f"({engine_full / runs:.3f} CPU s per run; fixed cost of the cell {engine_one.cpu:.1f} s)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return 0

    single = time_single_runs(sample)
    single_one = time_single_runs([dict(run, n_epochs=1) for run in sample[:2]])
    single_full = project(single_one.cpu, single.cpu, steps, FULL_STEPS)
    print(f"{'one process, run':18s}{single.wall:10.2f}{single.cpu:10.2f}{1 / single.cpu:12.3f}"
          f"{single.peak_bytes / 2**20:8.0f} MiB   (mean of {len(sample)} runs)")
    print(f"ratio at {steps} steps: {runs * single.cpu / engine.cpu:.1f}x by CPU time, "
          f"{runs * single.wall / engine.wall:.1f}x by wall time")
    if steps != FULL_STEPS and (engine_full is None or single_full is None):
        print(f"too few steps to project to {FULL_STEPS}: timing noise exceeds the cost of the steps")
    elif steps != FULL_STEPS:
        print(f"projected to {FULL_STEPS} steps (CPU time, line through 1 and {steps} steps): "
              f"engine {runs / engine_full:.3f} runs/s ({engine_full:.0f} s for the cell), "
              f"one process {1 / single_full:.4f} runs/s ({single_full:.1f} s per run), "
              f"ratio {runs * single_full / engine_full:.1f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
