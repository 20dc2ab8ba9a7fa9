"""Prieto et al. 2025 ("Grokking at the edge of numerical stability") on our transformer: the softmax baseline
without weight decay, their two fixes (⊥AdamW, StableMax) and weight decay as the usual fix (issue 29 item 3).

The ``prieto2025`` preset is their Figure 6 transformer run (run_main_experiments.sh: ``--use_transformer
--train_fraction 0.4 --lr 0.001 --num_epochs 5000 --log_frequency 200``, full batch; x + y mod 113, a 1-layer
transformer d_model 128, 4 heads, feed-forward 2048, AdamW betas (0.9, 0.99), weight decay 0, float32 softmax).
Rows, each a change of that preset:

- ``softmax``: the preset itself (their third Figure 6 command);
- ``orthoadamw``: ``optimizer = "orthoadamw"`` and beta2 0.999 (their first: ``--orthogonal_gradients``; their
  wrapper builds AdamW without the betas, so the run steps with AdamW's default beta2 0.999);
- ``stablemax``: ``loss = "stablemax"`` (their StableMax runs are on the MLP of Figures 1 and 4, lr 0.01, beta2
  0.999; here it is put on the same transformer with the preset's lr and betas: a difference kept);
- ``weight_decay``: ``weight_decay = 1.5`` (their second).

Every run trains untracked, in process, up to the preset's 5,000 steps (or ``--budget``), stopping ``stop_margin``
steps after generalisation (test accuracy >= the preset's threshold). Printed per run: the steps to memorise and to
generalise, the softmax-collapse fraction at the first progress reading at or after memorisation and at the last
reading, test accuracy at the end, the steps trained and the wall time with the load average. Then the table.

    python benchmarks/prieto.py [--seeds 42 43] [--rows softmax orthoadamw stablemax weight_decay] [--budget 5000]
                                [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from _machine import describe
from grokking_tracked.config import preset
from grokking_tracked.train import Trainer

ROWS = {
    "softmax": {},
    # their OrthoGrad wrapper never passes betas to the wrapped AdamW: it steps with AdamW's default (0.9, 0.999)
    "orthoadamw": dict(optimizer="orthoadamw", beta2=0.999),
    "stablemax": dict(loss="stablemax"),
    "weight_decay": dict(weight_decay=1.5),
}


def reading_at_or_after(history: list[tuple[int, dict]], step: int | None, name: str) -> tuple[int, float] | None:
    """The first (step, value) of ``name`` at or after ``step`` (the live measures are read on their own cadence)."""
    if step is None:
        return None
    return next(((s, m[name]) for s, m in history if s >= step and name in m), None)


def last_reading(history: list[tuple[int, dict]], name: str) -> tuple[int, float] | None:
    return next(((s, m[name]) for s, m in reversed(history) if name in m), None)


def show(reading: tuple[int, float] | None) -> str:
    return "n/a" if reading is None else f"{reading[1]:.3f} (step {reading[0]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--budget", type=int, default=None, help="max steps (default: the preset's 5,000)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads each run trains on (default 1: the seed-42 and seed-43 rows' setting)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("machine:", describe(), f"(each run trains on {args.threads} thread(s))", flush=True)
    table = []
    for seed in args.seeds:
        for row in args.rows:
            overrides = dict(ROWS[row], seed=seed, device="cpu", checkpoint_every=0)
            if args.budget is not None:
                overrides["max_steps"] = args.budget
            config = preset("prieto2025", **overrides)
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            result = Trainer(config, progress=False, threads=args.threads).train()
            seconds = time.perf_counter() - started
            memorised, generalised = result.step_of("memorization"), result.step_of("generalization")
            at_memorisation = reading_at_or_after(result.history, memorised, "softmax_collapse")
            at_end = last_reading(result.history, "softmax_collapse")
            end = result.history[-1][1]
            table.append((row, seed, memorised, generalised, at_memorisation, at_end, end["test_acc"],
                          result.final_step))
            print(f"seed {seed} {row:>12}: memorised {memorised}, generalised {generalised}, collapse at "
                  f"memorisation {show(at_memorisation)}, at the end {show(at_end)}, test acc at the end "
                  f"{end['test_acc']:.3f}, {result.final_step} steps in {seconds:.0f} s "
                  f"({result.final_step / seconds:.2f} steps/s; load avg {load_before:.2f} -> "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
    print("\n| row | seed | memorised at | generalised at | collapse at memorisation | collapse at the end | "
          "test acc at the end | steps trained |")
    print("|---|---|---|---|---|---|---|---|")
    for row, seed, memorised, generalised, at_m, at_e, test_acc, steps in table:
        print(f"| {row} | {seed} | {memorised if memorised is not None else 'never'} | "
              f"{generalised if generalised is not None else 'never'} | {show(at_m)} | {show(at_e)} | "
              f"{test_acc:.3f} | {steps} |")
    print("machine at the end:", describe())


if __name__ == "__main__":
    main()
