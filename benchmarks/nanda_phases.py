"""The nanda2023 preset end to end with Trainer (no tracking): its phase boundaries beside the paper's, and the
wall time. Hours on one CPU core (p = 113, d_model 128, up to 40,000 full-batch steps); minutes on a GPU.

    python benchmarks/nanda_phases.py [--out /tmp/nanda] [--device auto]

Writes ``history.json`` (metrics every evaluation, progress measures every ``progress_every`` steps) and
model weights every ``checkpoint_every`` steps into ``--out``, so the run can be analysed afterwards.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from _machine import describe
from grokking_tracked.analysis.report import PAPER_PHASES
from grokking_tracked.config import preset
from grokking_tracked.train import Callback, Trainer


class SaveWeights(Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_checkpoint(self, trainer, step, reasons):
        torch.save(trainer.model.state_dict(), self.out / f"step_{step:06d}.pt")

    def on_eval(self, trainer, step, metrics, events):
        for event in events:
            print(f"  step {step:>6,}: {event['event']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/nanda")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = preset("nanda2023", device=args.device)
    print(describe(args.device))
    started = time.perf_counter()
    result = Trainer(config, [SaveWeights(out)], progress=False).train()
    seconds = time.perf_counter() - started
    (out / "history.json").write_text(json.dumps({"history": result.history, "events": result.events,
                                                  "seconds": seconds}))
    steps = {e["event"]: e["step"] for e in result.events}
    print(f"trained {result.final_step:,} steps in {seconds / 60:.1f} min ({result.final_step / seconds:.1f} steps/s)")
    rows = [("memorization", "memorization_end"), ("circuit_formation", "memorization_end"),
            ("cleanup", "circuit_formation_end"), ("generalization", None), ("cleanup_end", "cleanup_end")]
    for event, paper in rows:
        ours = steps.get(event)
        print(f"  {event:>18}: {'-' if ours is None else f'{ours:,}':>7}   paper: "
              f"{'-' if paper is None else f'{PAPER_PHASES[paper]:,} ({paper})'}")


if __name__ == "__main__":
    main()
