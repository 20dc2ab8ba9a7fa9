"""A grokking-aware Optuna pruner (``[pruner] name = "grokking"``).

Optuna's median pruner compares the reported value (test loss) of trials at equal steps; in a grokking study test
accuracy sits near chance for every trial until its jump, so it prunes late or prunes the late grokkers. This pruner
reads what predicts the jump instead, from the trial's live signals (``Signals``, written by
``trial.PruningCallback`` as the trial's ``grokking_signals`` user attr before each ``should_prune``) and from the
study's finished trials (their ``events`` user attr), and prunes when one rule says the trial cannot generalise
within its step budget:

- ``not_memorized``: no memorisation by ``memorize_by`` x the budget (it has not even fit the training set);
- ``collapse``: memorised, no onset, the softmax-collapse fraction >= ``collapse_at`` and the weight norm still
  rising, ``collapse_patience`` x the budget after memorisation (Prieto et al. 2025: the logits grow along the
  weights until float32 softmax rounds the gradients away; without a force that shrinks the weights the delay does
  not end). Needs the live measures (``progress_every`` > 0) and a float32 softmax loss (``loss = "softmax32"``,
  ``COLLAPSE_STALLS_LOSSES``): the float64 losses keep learning past a float32 collapse, so for them, as without a
  collapse reading, the rule never fires;
- ``test_loss_rising``: memorised, no onset, and the test loss has risen for ``rising_for`` x the budget: it is
  at its highest since its lowest point after memorisation, which lies that many steps back (``RisingTestLoss``).
  The memorising solution is still being amplified (confident wrong answers on the held-out pairs) rather than
  replaced. Measured (``benchmarks/pruner_calibration.py``, 24 random trials of ``studies/fastest_grokking.toml``
  trained unpruned to their 3,000-step budget): the 10 trials that never generalised had rising test losses for
  1,000-1,800 steps; of the 14 that generalised, the longest rise before onset was 460 steps (0.15 of the
  budget). At 0.25 the rule prunes 9 of the 10 (0 of the 14) and saves 47 % of the sample's training steps;
- ``no_time``: no onset yet, and the steps left in the budget are fewer than ``span_fraction`` x the quickest
  onset -> generalisation span this study has seen (at least ``min_spans`` finished trials with both events): even
  an onset now would finish past the budget.

A trial with an onset (or a generalisation) is never pruned. Every decision carries its rule and a one-line reason
(``Decision``); the callback records each change of rule in the trial's user attrs and the prune's reason on its
run. ``decide`` is a pure function: the rules are tested on recorded histories (tests/test_pruner.py).

The other thresholds were checked on the same sample: ``memorize_by`` 0.3 is far from the latest memorisation of a
trial that generalised (0.05 of the budget), yet under TPE, which goes where weight decay is large, the benchmark
saw a trial with train accuracy 0.73 at 0.3 of the budget generalise at 0.91 (its one false prune,
docs/results.md); ``collapse`` does not apply to that study's float64 loss; ``no_time`` saves ~1 % there. ``benchmarks/pruner.py`` measures the pruner against no pruner and the median pruner
on studies the thresholds were not chosen on (other sampler seeds): steps and wall time to the best value, false
prunes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

SIGNALS_ATTR = "grokking_signals"  # the trial's latest Signals (a dict), written before each should_prune
DECISIONS_ATTR = "pruner_decisions"  # each change of rule: [{"step", "prune", "rule", "reason"}, ...]
KEEP_RULES = ("generalized", "onset", "waiting")
# The training losses whose gradients the float32 collapse zeroes (Prieto et al. 2025: the collapsed pairs' loss is
# exactly 0 in float32). ``softmax`` (float64 cross-entropy) and ``stablemax`` (float64) keep learning from pairs
# whose float32 softmax reads 1.0: measured (benchmarks/pruner_calibration.py), a default-preset trial that grokked
# had read a collapse fraction of 0.99 first. So the collapse rule reads the fraction for these losses only.
COLLAPSE_STALLS_LOSSES = ("softmax32",)
PRUNE_RULES = ("not_memorized", "collapse", "test_loss_rising", "no_time")


@dataclass(frozen=True)
class Signals:
    """What the pruner reads of one trial at one report."""

    step: int
    budget: int  # the trial's max_steps
    train_acc: float
    test_acc: float
    weight_norm: float
    previous_weight_norm: float | None = None  # at the previous report
    memorization_step: int | None = None
    onset_step: int | None = None
    generalization_step: int | None = None
    collapse: float | None = None  # the latest softmax-collapse fraction read (progress cadence), if any
    test_loss: float | None = None
    rising_since: int | None = None  # RisingTestLoss: where the test loss's current rise began, if it is rising

    @classmethod
    def at(cls, step: int, budget: int, metrics: dict[str, float], events: list[dict],
           previous_weight_norm: float | None, collapse: float | None,
           rising_since: int | None = None) -> "Signals":
        """The signals of one evaluation: its metrics, the detection events fired so far (``{"event", "step"}``),
        the weight norm at the previous report, the latest collapse fraction read and the test loss's rise."""
        fired = {name: event_step([e for e in events if e["step"] <= step], name)
                 for name in ("memorization", "onset", "generalization")}
        return cls(step=step, budget=budget, train_acc=metrics["train_acc"], test_acc=metrics["test_acc"],
                   weight_norm=metrics["weight_norm"], previous_weight_norm=previous_weight_norm,
                   memorization_step=fired["memorization"], onset_step=fired["onset"],
                   generalization_step=fired["generalization"], collapse=collapse,
                   test_loss=metrics.get("test_loss"), rising_since=rising_since)

    @classmethod
    def from_attr(cls, value: Any) -> "Signals | None":
        if not isinstance(value, dict):
            return None
        try:
            return cls(**value)
        except TypeError:
            return None


class RisingTestLoss:
    """Where the test loss's current rise began, updated at every evaluation: the step of its lowest value since
    memorisation, while the latest value is the highest since that step (None otherwise, and before memorisation)."""

    def __init__(self) -> None:
        self.low: float | None = None
        self.low_step: int | None = None
        self.high: float | None = None

    def update(self, step: int, test_loss: float | None, memorization_step: int | None) -> int | None:
        if memorization_step is None or step < memorization_step or test_loss is None or test_loss != test_loss:
            return None
        if self.low is None or test_loss < self.low:
            self.low, self.low_step, self.high = test_loss, step, test_loss
        rising = test_loss >= self.high
        self.high = max(self.high, test_loss)
        return self.low_step if rising else None


@dataclass(frozen=True)
class Decision:
    prune: bool
    rule: str  # KEEP_RULES or PRUNE_RULES
    reason: str

    def record(self, step: int) -> dict[str, Any]:
        return {"step": step, **asdict(self)}


@dataclass(frozen=True)
class Rules:
    memorize_by: float = 0.3
    collapse_at: float = 0.9
    collapse_patience: float = 0.3
    rising_for: float = 0.25
    span_fraction: float = 0.5
    min_spans: int = 3

    def __post_init__(self) -> None:
        for name in ("memorize_by", "collapse_at", "collapse_patience", "rising_for", "span_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
        if isinstance(self.min_spans, bool) or not isinstance(self.min_spans, int) or self.min_spans < 1:
            raise ValueError(f"min_spans must be a positive integer, got {self.min_spans!r}")


def decide(signals: Signals, spans: list[int], rules: Rules = Rules()) -> Decision:
    """Prune or keep a trial given its signals and the onset -> generalisation spans of the study's finished
    trials; the first rule that fires names the decision."""
    s = signals
    if s.generalization_step is not None:
        return Decision(False, "generalized", f"generalized at step {s.generalization_step}")
    if s.onset_step is not None:
        return Decision(False, "onset", f"onset at step {s.onset_step}: generalisation under way")
    if s.memorization_step is None and s.step >= rules.memorize_by * s.budget:
        return Decision(True, "not_memorized",
                        f"not memorised by step {s.step} ({rules.memorize_by:g} of the {s.budget}-step budget; "
                        f"train accuracy {s.train_acc:.3f})")
    rising = s.previous_weight_norm is not None and s.weight_norm > s.previous_weight_norm
    if (s.memorization_step is not None and s.collapse is not None and s.collapse >= rules.collapse_at and rising
            and s.step - s.memorization_step >= rules.collapse_patience * s.budget):
        return Decision(True, "collapse",
                        f"softmax collapse {s.collapse:.2f} >= {rules.collapse_at:g} with the weight norm still rising "
                        f"({s.previous_weight_norm:.4g} -> {s.weight_norm:.4g}), {s.step - s.memorization_step} steps "
                        f"after memorisation at {s.memorization_step}, no onset")
    if (s.memorization_step is not None and s.rising_since is not None
            and s.step - s.rising_since >= rules.rising_for * s.budget):
        return Decision(True, "test_loss_rising",
                        f"test loss rising since step {s.rising_since} ({s.step - s.rising_since} steps >= "
                        f"{rules.rising_for:g} of the {s.budget}-step budget; now {s.test_loss:.4g}), memorised at "
                        f"{s.memorization_step}, no onset: the memorising solution is still growing")
    if len(spans) >= rules.min_spans:
        needed = rules.span_fraction * min(spans)
        left = s.budget - s.step
        if left < needed:
            return Decision(True, "no_time",
                            f"no onset by step {s.step}: {left} steps left < {rules.span_fraction:g} x {min(spans)}, "
                            f"the quickest onset -> generalisation span of {len(spans)} finished trials")
    memorized = "not memorised yet" if s.memorization_step is None else f"memorised at {s.memorization_step}"
    return Decision(False, "waiting", f"{memorized}, no onset yet")


def collapse_signal(loss: str, collapse: float | None) -> float | None:
    """The collapse fraction the pruner reads for a trial trained with ``loss``: None where it does not stall."""
    return collapse if loss in COLLAPSE_STALLS_LOSSES else None


def replay(history: list[tuple[int, dict[str, float]]], events: list[dict], budget: int, report_every: int,
           spans: list[int], rules: Rules = Rules(), *, loss: str) -> list[tuple[int, Decision]]:
    """The decisions the pruner would have taken on a recorded training (its evaluations and detection events),
    reporting as ``trial.PruningCallback`` does: every ``report_every`` steps until generalisation, stopping at the
    first prune."""
    decisions, previous, collapse, rise = [], None, None, RisingTestLoss()
    memorized = event_step(events, "memorization")
    for step, metrics in history:
        collapse = metrics.get("softmax_collapse", collapse)
        rising_since = rise.update(step, metrics.get("test_loss"), memorized)
        if step == 0 or step % report_every:
            continue
        signals = Signals.at(step, budget, metrics, events, previous, collapse_signal(loss, collapse), rising_since)
        if signals.generalization_step is not None:
            break
        previous = metrics["weight_norm"]
        decisions.append((step, decide(signals, spans, rules)))
        if decisions[-1][1].prune:
            break
    return decisions


def event_step(events: Any, name: str) -> int | None:
    if not isinstance(events, list):
        return None
    return next((e.get("step") for e in events if isinstance(e, dict) and e.get("event") == name), None)


def onset_spans(trials: list[optuna.trial.FrozenTrial]) -> list[int]:
    """The onset -> generalisation spans (in steps) of finished trials that had both events (every seed of a
    seeded trial counts)."""
    spans = []
    for trial in trials:
        attrs = trial.user_attrs
        for events in [attrs.get("events"), *(attrs.get("seed_events") or [])]:
            onset, generalized = event_step(events, "onset"), event_step(events, "generalization")
            if isinstance(onset, int) and isinstance(generalized, int) and generalized >= onset:
                spans.append(generalized - onset)
    return spans


@dataclass
class GrokkingPruner(optuna.pruners.BasePruner):
    """``decide`` as an Optuna pruner. ``decisions`` holds the last decision per trial number in this process
    (the callback reads it right after ``should_prune``); a trial without signals is never pruned."""

    memorize_by: float = 0.3
    collapse_at: float = 0.9
    collapse_patience: float = 0.3
    rising_for: float = 0.25
    span_fraction: float = 0.5
    min_spans: int = 3
    decisions: dict[int, Decision] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.rules = Rules(self.memorize_by, self.collapse_at, self.collapse_patience, self.rising_for,
                           self.span_fraction, self.min_spans)

    def prune(self, study: optuna.study.Study, trial: optuna.trial.FrozenTrial) -> bool:
        signals = Signals.from_attr(trial.user_attrs.get(SIGNALS_ATTR))
        if signals is None:
            decision = Decision(False, "waiting", "no signals reported")
        else:
            finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            decision = decide(signals, onset_spans(finished), self.rules)
        self.decisions[trial.number] = decision
        return decision.prune
