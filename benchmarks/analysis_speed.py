"""Analysis seconds per checkpoint for the `default` and `nanda2023` presets, for 2, 4 and 8 checkpoints.

Checkpoints are real Trainer states one optimizer step apart (from random init): the analysis cost does not
depend on how far training went, only on the model and p. Time per checkpoint should stay flat as the
number of checkpoints grows (the sweep is one pass; nothing is compared all-vs-all).

    python benchmarks/analysis_speed.py [--counts 2 4 8] [--presets default nanda2023]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from grokking_tracked.analysis import analyze_checkpoints
from grokking_tracked.config import preset
from grokking_tracked.train import Trainer


def make_checkpoints(name: str, count: int, directory: Path) -> list[tuple[int, Path]]:
    trainer = Trainer(preset(name, device="cpu"), progress=False)
    checkpoints = []
    for _ in range(count):
        trainer.train_step()
        path = directory / f"step_{trainer.step:06d}.pt"
        torch.save(trainer.state_dict(), path)
        checkpoints.append((trainer.step, path))
    return checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--presets", nargs="+", default=["default", "nanda2023"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'preset':<10} {'p':>4} {'d_model':>7} {'ckpts':>5} {'total s':>8} {'s/ckpt':>7}")
    for name in args.presets:
        config = preset(name)
        with tempfile.TemporaryDirectory() as tmp:
            all_checkpoints = make_checkpoints(name, max(args.counts), Path(tmp))
            totals = {}
            for count in args.counts:
                started = time.perf_counter()
                analyze_checkpoints(all_checkpoints[:count], Path(tmp) / f"out_{count}", progress=False)
                totals[count] = time.perf_counter() - started
                print(f"{name:<10} {config.p:>4} {config.d_model:>7} {count:>5} {totals[count]:>8.2f} "
                      f"{totals[count] / count:>7.2f}", flush=True)
            lo, hi = min(args.counts), max(args.counts)
            if hi > lo:
                print(f"{name:<10} marginal cost per extra checkpoint ({lo}->{hi}): "
                      f"{(totals[hi] - totals[lo]) / (hi - lo):.2f} s", flush=True)


if __name__ == "__main__":
    main()
