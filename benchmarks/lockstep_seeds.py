"""A seeded trial's N seeds (model seed + k, data_seed + k: same shape and task, other split) trained one after
another vs in one LockstepTrainer stack: wall seconds for the same steps of every seed. Bounded: --steps steps
per seed (default 200) after --warmup, evaluations included; prints the load average beside the numbers.

    python benchmarks/lockstep_seeds.py --seeds 3 --steps 200
"""

from __future__ import annotations

import argparse
import os
import time

from grokking_tracked.config import preset
from grokking_tracked.lockstep import LockstepTrainer
from grokking_tracked.train import Callback, Trainer


class Clock(Callback):
    def __init__(self):
        self.at: dict[int, float] = {}

    def on_eval(self, run, step, metrics, events):
        self.at.setdefault(step, time.perf_counter())


def seed_configs(n: int, steps: int, device: str):
    base = preset("default", max_steps=steps, stop_on_grok=False, checkpoint_every=0, device=device, eval_every=10)
    return [base.replace(seed=base.seed + k, data_seed=base.data_seed + k) for k in range(n)]


def one_by_one(configs, warmup: int) -> float:
    total = 0.0
    for config in configs:
        clock = Clock()
        Trainer(config, [clock], progress=False).train()
        total += clock.at[config.max_steps] - clock.at[warmup]
    return total


def lockstep(configs, warmup: int) -> float:
    clock = Clock()
    LockstepTrainer(configs, [clock], progress=False).train()
    return clock.at[configs[0].max_steps] - clock.at[warmup]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    configs = seed_configs(args.seeds, args.warmup + args.steps, args.device)
    print(f"load average before: {os.getloadavg()}", flush=True)
    single = one_by_one(configs, args.warmup)
    stacked = lockstep(configs, args.warmup)
    print(f"{args.seeds} seeds x {args.steps} steps: one by one {single:.1f} s, lockstep {stacked:.1f} s "
          f"-> lockstep is {single / stacked:.2f}x as fast", flush=True)
    print(f"load average after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
