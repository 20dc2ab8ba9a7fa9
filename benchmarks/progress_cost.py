"""Cost of the live progress measures (measures.py) during training, per preset, side by side.

Two trainers of the same config, one with ``progress_every`` = 0 and one with the chosen value, advance in
alternating rounds of ``progress_every`` steps (evaluating every ``eval_every`` as the loop does), so machine
load hits both alike; the steps/s of each and the overhead are printed, plus the time of one reading and
the overhead that implies for other ``progress_every`` values.

    python benchmarks/progress_cost.py [--rounds 3] [--presets default nanda2023]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _machine import describe
from grokking_tracked.config import preset
from grokking_tracked.train import Trainer


def advance(trainer: Trainer, steps: int) -> float:
    """Train ``steps`` steps, evaluating (and reading the measures, when on) as ``Trainer.train`` does; seconds."""
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
        if trainer.step % trainer.config.eval_every == 0:
            trainer._evaluate_and_emit()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["default", "nanda2023"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(describe())
    for name in args.presets:
        chosen = preset(name).progress_every or preset(name).eval_every * 10
        base = preset(name, progress_every=0, stop_after="generalization", device="cpu")
        trainers = {"off": Trainer(base, progress=False),
                    f"every {chosen}": Trainer(base.replace(progress_every=chosen), progress=False)}
        for trainer in trainers.values():  # warm-up: past memorisation's first steps, allocator settled
            advance(trainer, base.eval_every)
        seconds = {label: [] for label in trainers}
        readings = []
        measures = trainers[f"every {chosen}"].progress_measures
        for round_ in range(args.rounds):
            order = list(trainers) if round_ % 2 == 0 else list(reversed(trainers))
            for label in order:
                seconds[label].append(advance(trainers[label], chosen))
            started = time.perf_counter()
            measures(trainers["off"].model)
            readings.append(time.perf_counter() - started)
        print(f"\n{name}: p={base.p}, d_model={base.d_model}, eval_every={base.eval_every}, "
              f"{args.rounds} alternating rounds of {chosen} steps (min = least disturbed round, and median)")
        for label, values in seconds.items():
            print(f"  {label:>11}: {chosen / min(values):7.2f} steps/s (median {chosen / statistics.median(values):.2f})")
        for stat in (min, statistics.median):
            off, on = stat(seconds["off"]), stat(seconds[f"every {chosen}"])
            step, reading = off / chosen, stat(readings)
            print(f"  {stat.__name__:>6}: progress_every={chosen} costs {(on / off - 1) * 100:+.1f} % time side by side; "
                  f"one reading {reading * 1000:.0f} ms = {reading / step:.1f} steps, implied: " +
                  ", ".join(f"every {k} {reading / (k * step) * 100:.1f} %"
                            for k in sorted({base.eval_every, 5 * base.eval_every, 10 * base.eval_every, chosen})))


if __name__ == "__main__":
    main()
