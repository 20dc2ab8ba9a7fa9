"""Trials per hour: K models trained in lockstep (grokking_tracked.lockstep) against one-by-one Trainer runs.

    python benchmarks/lockstep.py                          # default preset, K in 1,4,8,16, CPU
    python benchmarks/lockstep.py --preset seed --ks 1,8,64 --device cuda

Each trial differs in lr, weight decay and train fraction (as in a study). Throughput is measured over
--steps steps after a warm-up, evaluations (every eval_every steps) included; trials/hour assumes every trial
runs --trial-steps steps (e.g. a study's max_steps), so the ratio to one-by-one is what carries over.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _machine import describe
from grokking_tracked.config import preset
from grokking_tracked.lockstep import LockstepTrainer
from grokking_tracked.train import Callback, Trainer


def trial_configs(name: str, k: int, total_steps: int, device: str):
    lrs, wds, fracs = (1e-2, 3e-3, 1e-3), (1.0, 0.3, 3.0), (0.3, 0.4, 0.5)
    return [preset(name, lr=lrs[i % 3], weight_decay=wds[(i // 3) % 3], train_frac=fracs[(i // 9) % 3],
                   seed=i, max_steps=total_steps, stop_on_grok=False, checkpoint_every=0, device=device)
            for i in range(k)]


class Clock(Callback):
    """Wall time of the first evaluation at each step (a lockstep member or a Trainer alike)."""

    def __init__(self):
        self.at: dict[int, float] = {}

    def on_eval(self, run, step, metrics, events):
        self.at.setdefault(step, time.perf_counter())


def measure(name: str, k: int | None, warmup: int, steps: int, device: str) -> float:
    """Steps/s of one Trainer (k None) or of K models in lockstep."""
    configs = trial_configs(name, k or 1, warmup + steps, device)
    clock = Clock()
    if k is None:
        Trainer(configs[0], [clock], progress=False).train()
    else:
        LockstepTrainer(configs, [clock], progress=False).train()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps / (clock.at[warmup + steps] - clock.at[warmup])


def run(name: str, ks: list[int], warmup: int, steps: int, trial_steps: int, device: str, rounds: int = 1,
        print_fn=print) -> list[tuple[str, float, float, float]]:
    """Rows (label, steps/s, trials/hour, ratio to one-by-one)."""
    single = statistics.median(measure(name, None, warmup, steps, device) for _ in range(rounds))
    base = 3600 * single / trial_steps
    rows = [("one-by-one Trainer", single, base, 1.0)]
    print_fn(f"  one-by-one: {single:.2f} steps/s -> {base:.1f} trials/hour", flush=True)
    for k in ks:
        rate = statistics.median(measure(name, k, warmup, steps, device) for _ in range(rounds))
        per_hour = 3600 * rate * k / trial_steps
        rows.append((f"lockstep K={k}", rate, per_hour, per_hour / base))
        print_fn(f"  lockstep K={k}: {rate:.2f} steps/s -> {per_hour:.1f} trials/hour ({per_hour / base:.2f}x)",
                 flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--ks", default="1,4,8,16")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--trial-steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("machine:", describe(args.device))
    rows = run(args.preset, [int(k) for k in args.ks.split(",")], args.warmup, args.steps, args.trial_steps,
               args.device, args.rounds)
    print(f"\npreset {args.preset}, eval every {preset(args.preset).eval_every} steps, "
          f"trials of {args.trial_steps} steps, device {args.device}")
    print(f"{'':22s} {'steps/s':>9s} {'trials/hour':>12s} {'vs one-by-one':>14s}")
    for label, rate, per_hour, ratio in rows:
        print(f"{label:22s} {rate:9.2f} {per_hour:12.1f} {ratio:13.2f}x")
    print("machine at the end:", describe(args.device))


if __name__ == "__main__":
    main()
