"""Grokfast (Lee et al. 2024) on its own task: steps to 95 % validation accuracy with and without the EMA filter.

The ``grokfast2024`` preset is the paper's baseline command (``python main.py`` of ironjr/grokfast: x * y mod 97,
half of the pairs, 2 layers of width 128 with 4 heads, LayerNorm, GELU, Adam lr 1e-3, batches of 512); the EMA run
is its README's ``--filter ema --alpha 0.98 --lamb 2.0 --weight_decay 0.005``. The paper: baseline 39,890 steps,
EMA 910 steps: x43.8. For each seed (model seed s, data seed 598 + s) three rows: the baseline, the EMA run and the
confound (the EMA run's weight decay 0.005 without the filter: ironjr/grokfast issue #12 reports that the weight
decay alone groks). A run that does not reach 95 % within its budget is censored (">budget") and its ratio is a
bound. It ends with the 3-row table (steps to 95 % per seed, wall time per run, baseline / row per seed).

On this 2-core CPU the baseline's ~40k steps take hours; ``--baseline-budget`` bounds it, and the script prints
the command that finishes it on a GPU.

    python benchmarks/grokfast.py [--seeds 2] [--ema-budget 3000] [--baseline-budget 60000] [--confound-budget 60000]
                                  [--threads 1]
    python benchmarks/grokfast.py --only baseline --first-seed 1 --seeds 1   # one run
    python benchmarks/grokfast.py --seeds 1 --ema-budget 3 --baseline-budget 3 --confound-budget 3   # smoke
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


def steps_to_generalise(config) -> tuple[int | None, int, float, float]:
    """(step at which test accuracy first reached the threshold or None, steps trained, wall seconds, held-out
    accuracy at the last evaluation: where a censored run stands)."""
    started = time.perf_counter()
    result = Trainer(config, progress=False, threads=torch.get_num_threads()).train()
    last_test_acc = next((m["test_acc"] for _, m in reversed(result.history) if "test_acc" in m), float("nan"))
    return result.step_of("generalization"), result.final_step, time.perf_counter() - started, last_test_acc


ROWS = {  # what each row changes on the preset (the paper's baseline command)
    "baseline": {},
    "ema": dict(EMA),
    # the confound (ironjr/grokfast issue #12): the EMA run's weight decay without the filter
    "confound": dict(weight_decay=EMA["weight_decay"]),
}


def cell(step: int | None, budget: int) -> str:
    return f"{step:,}" if step is not None else f">{budget:,}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--ema-budget", type=int, default=3000)
    parser.add_argument("--baseline-budget", type=int, default=60_000)
    parser.add_argument("--confound-budget", type=int, default=60_000)
    parser.add_argument("--eval-every", type=int, default=10, help="10 = once per epoch, as the paper's loop")
    parser.add_argument("--only", choices=tuple(ROWS), action="append", help="rows to run (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 for one run alone on 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    base = preset("grokfast2024", eval_every=args.eval_every, checkpoint_every=0, stop_margin=0, device="cpu")
    print(f"preset grokfast2024: {base.operation} mod {base.p}, train fraction {base.train_frac}, batch {base.batch_size},"
          f" {base.n_layers} layers d_model {base.d_model}, {base.optimizer} lr {base.lr}; generalised = test "
          f"accuracy >= {base.generalization_threshold}; rows: {ROWS}")
    budgets = {"ema": args.ema_budget, "baseline": args.baseline_budget, "confound": args.confound_budget}
    results: dict[str, list[tuple[int | None, int, float, float]]] = {}
    for name, overrides in ROWS.items():
        if args.only and name not in args.only:
            continue
        results[name] = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            config = base.replace(seed=seed, data_seed=598 + seed, max_steps=budgets[name], **overrides)
            step, trained, seconds, last_test_acc = steps_to_generalise(config)
            results[name].append((step, trained, seconds, last_test_acc))
            print(f"  seed {seed} {name:>8}: {cell(step, trained):>7} steps to 95 % ({trained} steps trained in "
                  f"{seconds:.0f} s, {trained / seconds:.1f} steps/s, held-out accuracy {last_test_acc:.3f} at the "
                  f"last evaluation, load avg {os.getloadavg()[0]:.2f})", flush=True)
    print(f"\n| row | seeds {args.first_seed}..{args.first_seed + args.seeds - 1}: steps to 95 % | wall per run | "
          f"baseline / row, per seed |")
    print("|---|---|---|---|")
    baseline = results.get("baseline")
    for name, runs in results.items():
        ratios = ""
        if baseline and name != "baseline":
            parts = []
            for (step, trained, *_), (b_step, b_trained, *_) in zip(runs, baseline):
                if step is None:
                    parts.append("n/a")
                elif b_step is None:  # censored baseline: the ratio is a lower bound
                    parts.append(f">= x{b_trained / step:.1f}")
                else:
                    parts.append(f"x{b_step / step:.1f}")
            ratios = ", ".join(parts)
        print(f"| {name} | {', '.join(cell(s, t) for s, t, *_ in runs)} | "
              f"{', '.join(f'{w:.0f} s' for _, _, w, _ in runs)} | {ratios} |")
    print(f"paper (GPU): baseline {PAPER['baseline']:,}, EMA {PAPER['ema']:,}: x{PAPER['ratio']}")
    print("to finish the baseline on a GPU (about 40k steps; stops at 95 %):\n"
          "  grokking-tracked run --preset grokfast2024 --seed 0 --data-seed 598 --device cuda --no-progress")


if __name__ == "__main__":
    main()
