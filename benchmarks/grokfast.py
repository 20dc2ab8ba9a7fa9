"""Grokfast (Lee et al. 2024) at CPU scale: steps to generalise with and without the EMA gradient filter.

The paper: x·y mod 97, 50 % of pairs for training, a 2-layer transformer; baseline 39,890 steps to 95 %
validation accuracy, EMA filter (α 0.98, λ 2, weight decay 0.005) 910 steps: ×43.8. That needs a GPU
(``studies/grokfast_paper.toml``). Here the same comparison on a task that grokks in minutes on one core
(by default the ``default`` preset's: x + y mod 59, 30 % of pairs, lr 1e-2, weight decay 1):
for each seed (model and data), one run without and one with the filter, alternating, same config otherwise.
Steps are counted to the first evaluation with test accuracy >= 95 % (the paper's criterion); a run that
does not get there within ``--max-steps`` counts as censored (">budget"), and the ratio is then a bound.

    python benchmarks/grokfast.py [--seeds 3] [--p 59] [--operation add] ...
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _machine import describe
from grokking_tracked.config import preset
from grokking_tracked.train import Trainer

PAPER = {"baseline": 39_890, "ema": 910, "ratio": 43.8}


def steps_to_generalise(config) -> tuple[int | None, float]:
    started = time.perf_counter()
    result = Trainer(config, progress=False).train()
    return result.step_of("generalization"), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--p", type=int, default=59)
    parser.add_argument("--operation", default="add")
    parser.add_argument("--train-frac", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.98)
    parser.add_argument("--lamb", type=float, default=2.0)
    parser.add_argument("--max-steps", type=int, default=4000)
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(describe())
    base = preset("default", p=args.p, operation=args.operation, train_frac=args.train_frac, lr=args.lr,
                  weight_decay=args.weight_decay, max_steps=args.max_steps, eval_every=args.eval_every,
                  checkpoint_every=0, stop_margin=0, generalization_threshold=0.95, grokfast_alpha=args.alpha,
                  device="cpu")
    print(f"task: {args.operation} mod {args.p}, train fraction {args.train_frac}, d_model {base.d_model}, "
          f"lr {args.lr}, weight decay {args.weight_decay}, full batch, budget {args.max_steps} steps; "
          f"EMA alpha {args.alpha}, lambda {args.lamb}; generalised = test accuracy >= 0.95")
    steps: dict[str, list[int | None]] = {"baseline": [], "ema": []}
    for seed in range(args.seeds):
        variants = [("baseline", 0.0), ("ema", args.lamb)]
        for name, lamb in variants if seed % 2 == 0 else reversed(variants):
            step, seconds = steps_to_generalise(base.replace(seed=seed, data_seed=598 + seed, grokfast_lambda=lamb))
            steps[name].append(step)
            print(f"  seed {seed} {name:>8}: {step if step is not None else f'>{args.max_steps}':>6} steps "
                  f"({seconds:.0f} s)", flush=True)

    def median(values: list[int | None]) -> float:
        return statistics.median(args.max_steps + 1 if v is None else v for v in values)

    baseline, ema = median(steps["baseline"]), median(steps["ema"])
    censored = any(v is None for v in steps["baseline"]) or any(v is None for v in steps["ema"])
    ratio = baseline / ema
    print(f"median steps: baseline {baseline:g}, EMA {ema:g}: x{ratio:.1f}"
          + (" (some runs hit the budget: the medians count them as budget + 1, the ratio is a bound)"
             if censored else ""))
    print(f"paper (x*y mod 97, GPU, 2 layers): baseline {PAPER['baseline']:,}, EMA {PAPER['ema']:,}: x{PAPER['ratio']}")


if __name__ == "__main__":
    main()
