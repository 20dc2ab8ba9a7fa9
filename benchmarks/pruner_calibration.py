"""The grokking pruner's thresholds chosen from measurements (issue 29 item 4): train a random sample of a study's
search space to the full budget, untracked and unpruned, then replay the pruner's rules (``pruners.replay``, the
same ``decide`` the pruner calls) on every recorded history for a grid of thresholds.

    python benchmarks/pruner_calibration.py [--spec studies/fastest_grokking.toml] [--n 24] [--seed 100]
                                            [--progress-every 100] [--report-every 50]

Printed: each sampled trial (its params, memorisation / onset / generalisation steps, steps trained, the largest
softmax-collapse fraction read); then, for each threshold setting, the prunes, the **false prunes** (trials that
generalised within the budget but that the rules would have pruned) and the training steps the prunes would have
saved. The sample is drawn with its own sampler seed (``--seed``, default 100), apart from the seeds the benchmark
(``benchmarks/pruner.py``) measures with, so the thresholds are not fitted to the histories they are judged on.
Spans (onset -> generalisation) are those of the trials earlier in the sample, as a study sees them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import optuna
import torch

from _machine import describe

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grokking_tracked.study.pruners import Rules, replay  # noqa: E402
from grokking_tracked.study.spec import load_spec  # noqa: E402
from grokking_tracked.train import Trainer  # noqa: E402


def sample(spec, n: int, seed: int) -> list[dict]:
    """``n`` parameter sets from the spec's search space, drawn by Optuna's RandomSampler."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    draws = []
    for _ in range(n):
        trial = study.ask()
        draws.append({p.name: p.suggest(trial) for p in spec.params})
        study.tell(trial, 0.0)
    return draws


class Recorded:
    """A saved trial, shaped as the TrainResult the sweep reads."""

    def __init__(self, saved: dict):
        self.history = [(step, metrics) for step, metrics in saved["history"]]
        self.events, self.final_step, self.loss = saved["events"], saved["final_step"], saved["loss"]

    def step_of(self, event: str) -> int | None:
        return next((e["step"] for e in self.events if e["event"] == event), None)

    @property
    def grokked(self) -> bool:
        return self.step_of("generalization") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=ROOT / "studies" / "fastest_grokking.toml")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--progress-every", type=int, default=100)
    parser.add_argument("--report-every", type=int, default=50)
    parser.add_argument("--save", type=Path, help="write every trial's params, events and history here (JSON)")
    parser.add_argument("--load", type=Path, help="replay a sample saved with --save instead of training one")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    print("machine:", describe(), flush=True)
    spec = load_spec(args.spec)
    recorded = []
    started = time.perf_counter()
    if args.load:
        recorded = [(t["params"], Recorded(t), t["budget"]) for t in json.loads(args.load.read_text())]
        result_loss = recorded[0][1].loss
    for index, params in enumerate([] if args.load else sample(spec, args.n, args.seed)):
        config = spec.base_config().replace(progress_every=args.progress_every, device="cpu", **params)
        result = Trainer(config, progress=False, threads=1).train()
        collapse = max((m["softmax_collapse"] for _, m in result.history if "softmax_collapse" in m), default=None)
        recorded.append((params, result, config.max_steps))
        result_loss = config.loss  # the sample shares the spec's loss
        shown = ", ".join(f"{k} {v:.4g}" for k, v in params.items())
        print(f"{index:>2} {shown}: memorised {result.step_of('memorization')}, onset {result.step_of('onset')}, "
              f"generalised {result.step_of('generalization')}, {result.final_step} steps, max collapse "
              f"{'n/a' if collapse is None else f'{collapse:.3f}'}", flush=True)
    if not args.load:
        print(f"trained {sum(r.final_step for _, r, _ in recorded)} steps in {time.perf_counter() - started:.0f} s "
              f"(load avg {os.getloadavg()[0]:.2f})")
    if args.save:
        args.save.write_text(json.dumps([{"params": params, "budget": budget, "loss": result_loss,
                                          "events": [{"event": e["event"], "step": e["step"]} for e in result.events],
                                          "history": result.history, "final_step": result.final_step}
                                         for params, result, budget in recorded]))
    grokked = [r for _, r, _ in recorded if r.grokked]
    if grokked:
        fractions = sorted(r.step_of("memorization") / budget for _, r, budget in recorded if r.grokked)
        print(f"{len(grokked)} of {len(recorded)} generalised; their memorisation at {fractions[0]:.3f}.."
              f"{fractions[-1]:.3f} of the budget; onset -> generalisation spans "
              f"{sorted(r.step_of('generalization') - r.step_of('onset') for r in grokked if r.step_of('onset'))}")
    print(f"\n{'memorize_by':>11} {'rising_for':>10} {'span_fraction':>13} {'prunes':>6} {'false':>5} "
          f"{'steps saved':>11} {'of steps':>8}  rules that pruned")
    total = sum(r.final_step for _, r, _ in recorded)
    for memorize_by, rising_for, span_fraction in itertools.product((0.1, 0.3), (0.1, 0.15, 0.2, 0.25, 0.3, 1.0),
                                                                    (0.5, 1.0)):
        rules = Rules(memorize_by=memorize_by, rising_for=rising_for, span_fraction=span_fraction)
        prunes = false = saved = 0
        by_rule: dict[str, int] = {}
        spans: list[int] = []
        for _, result, budget in recorded:
            decisions = replay(result.history, result.events, budget, args.report_every, list(spans), rules,
                               loss=result_loss)
            pruned_at = next((step for step, d in decisions if d.prune), None)
            if pruned_at is not None:
                by_rule[decisions[-1][1].rule] = by_rule.get(decisions[-1][1].rule, 0) + 1
                prunes += 1
                false += result.grokked
                saved += result.final_step - pruned_at
            onset, generalised = result.step_of("onset"), result.step_of("generalization")
            if onset is not None and generalised is not None and generalised >= onset:
                spans.append(generalised - onset)
        print(f"{memorize_by:>11} {rising_for:>10} {span_fraction:>13} {prunes:>6} {false:>5} {saved:>11} "
              f"{saved / total:>8.1%}  {by_rule}")
    print("machine at the end:", describe())


if __name__ == "__main__":
    main()
