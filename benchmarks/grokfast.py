"""Grokfast (Lee et al. 2024) on its own task: steps to 95 % validation accuracy with and without the EMA filter.

The ``grokfast2024`` preset is the paper's baseline command (``python main.py`` of ironjr/grokfast: x * y mod 97,
half of the pairs, 2 layers of width 128 with 4 heads, LayerNorm, GELU, Adam lr 1e-3, batches of 512); the EMA run
is its README's ``--filter ema --alpha 0.98 --lamb 2.0 --weight_decay 0.005``. The paper: baseline 39,890 steps,
EMA 910 steps: x43.8. For each seed (model seed s, data seed 598 + s) the EMA run first, then the baseline; a run
that does not reach 95 % within its budget is censored (">budget") and the ratio is a lower bound.

On this 2-core CPU the baseline's ~40k steps take hours; ``--baseline-budget`` bounds it, and the script prints
the command that finishes it on a GPU.

    python benchmarks/grokfast.py [--seeds 2] [--ema-budget 3000] [--baseline-budget 4000] [--eval-every 10]
    python benchmarks/grokfast.py --only baseline --first-seed 1 --seeds 1   # one run, e.g. in parallel
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from _machine import describe
from grokking_tracked.config import preset
from grokking_tracked.train import Trainer

PAPER = {"baseline": 39_890, "ema": 910, "ratio": 43.8}
EMA = dict(grokfast_lambda=2.0, grokfast_alpha=0.98, weight_decay=0.005)  # the paper's README command


def steps_to_generalise(config) -> tuple[int | None, int, float]:
    """(step at which test accuracy first reached the threshold or None, steps trained, wall seconds)."""
    started = time.perf_counter()
    result = Trainer(config, progress=False).train()
    return result.step_of("generalization"), result.final_step, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--ema-budget", type=int, default=3000)
    parser.add_argument("--baseline-budget", type=int, default=4000)
    parser.add_argument("--eval-every", type=int, default=10, help="10 = once per epoch, as the paper's loop")
    parser.add_argument("--only", choices=("ema", "baseline"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(describe())
    base = preset("grokfast2024", eval_every=args.eval_every, checkpoint_every=0, stop_margin=0, device="cpu")
    print(f"preset grokfast2024: {base.operation} mod {base.p}, train fraction {base.train_frac}, batch {base.batch_size},"
          f" {base.n_layers} layers d_model {base.d_model}, {base.optimizer} lr {base.lr}; generalised = test "
          f"accuracy >= {base.generalization_threshold}; EMA: {EMA}")
    steps: dict[str, list[int | None]] = {"ema": [], "baseline": []}
    budgets = {"ema": args.ema_budget, "baseline": args.baseline_budget}
    for name in ("ema", "baseline"):
        if args.only not in (None, name):
            continue
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            overrides = dict(EMA) if name == "ema" else {}
            config = base.replace(seed=seed, data_seed=598 + seed, max_steps=budgets[name], **overrides)
            step, trained, seconds = steps_to_generalise(config)
            steps[name].append(step)
            print(f"  seed {seed} {name:>8}: {step if step is not None else f'>{trained}':>7} steps to 95 % "
                  f"({trained} steps trained in {seconds:.0f} s, {trained / seconds:.1f} steps/s, "
                  f"load avg {os.getloadavg()[0]:.2f})", flush=True)
    done = {k: [v for v in vs if v is not None] for k, vs in steps.items()}
    if steps["ema"] and steps["baseline"]:
        ema = max(steps["ema"], key=lambda v: budgets["ema"] + 1 if v is None else v)
        if done["baseline"] and len(done["baseline"]) == len(steps["baseline"]) and ema is not None:
            print(f"baseline/EMA (worst EMA seed vs best baseline seed): x{min(done['baseline']) / ema:.1f}")
        elif ema is not None:
            print(f"baseline/EMA >= x{args.baseline_budget / ema:.1f} (the baseline did not generalise within "
                  f"{args.baseline_budget} steps; a lower bound)")
    print(f"paper (GPU): baseline {PAPER['baseline']:,}, EMA {PAPER['ema']:,}: x{PAPER['ratio']}")
    print("to finish the baseline on a GPU (about 40k steps; stops at 95 %):\n"
          "  grokking-tracked run --preset grokfast2024 --seed 0 --data-seed 598 --device cuda --no-progress")


if __name__ == "__main__":
    main()
