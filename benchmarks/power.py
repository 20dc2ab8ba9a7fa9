"""Power et al. 2022's headline task on the ``power2022`` preset (x / y mod 97, half of the pairs, batches of 512,
AdamW lr 1e-3, weight decay 1), one seed, within a step budget: when train accuracy reaches 1 (memorisation) and
when validation accuracy does (generalisation), beside the paper's Figure 1. Prints every evaluation.

    python benchmarks/power.py [--max-steps 3000] [--eval-every 100] [--seed 999]

The whole run on a GPU (stops 200 steps after test accuracy 0.99, at most 100,000 steps):
    grokking-tracked run --preset power2022 --device cuda
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from _machine import describe
from grokking_tracked.config import preset
from grokking_tracked.train import Callback, Trainer


class Printer(Callback):
    def __init__(self):
        self.started = time.perf_counter()

    def on_eval(self, run, step, metrics, events):
        print(f"  step {step:>6}: train acc {metrics['train_acc']:.3f}, test acc {metrics['test_acc']:.3f}, "
              f"train loss {metrics['train_loss']:.3g}, test loss {metrics['test_loss']:.3g}, "
              f"{time.perf_counter() - self.started:.0f} s, load avg {os.getloadavg()[0]:.1f}"
              + "".join(f"  <- {e['event']}" for e in events), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=999)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(describe())
    config = preset("power2022", max_steps=args.max_steps, eval_every=args.eval_every, checkpoint_every=0,
                    seed=args.seed, device="cpu")
    result = Trainer(config, callbacks=[Printer()], progress=False).train()
    memorised, generalised = result.step_of("memorization"), result.step_of("generalization")
    print(f"power2022 seed {args.seed}: memorised (train acc >= {config.memorization_threshold}) at "
          f"{memorised if memorised is not None else f'> {result.final_step}'}, generalised (test acc >= "
          f"{config.generalization_threshold}) at {generalised if generalised is not None else f'> {result.final_step}'}; "
          f"{result.final_step} steps in {result.train_seconds:.0f} s")


if __name__ == "__main__":
    main()
