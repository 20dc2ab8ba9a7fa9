"""Liu et al. 2022's four learning phases ("Towards Understanding Grokking", the lr x weight-decay phase diagram),
from a run's events: pure Python, no torch, no tracking.

Liu et al. use "train (test) accuracy reaches 90 % within 10^3 steps" on a 10^5-step budget. Here the events of
``detect.py`` (memorization: train accuracy >= 99 %; generalization: test accuracy >= 99 %) and the run's own
budget decide, with one threshold, ``comprehension_delay`` (steps between memorising and generalising; default
max_steps // 10):

- ``comprehension``: memorises and generalises, generalization - memorization <= comprehension_delay;
- ``grokking``: memorises, then generalises more than comprehension_delay steps later;
- ``memorization``: memorises, never generalises within the budget;
- ``confusion``: never memorises within the budget (whether or not test accuracy moved).

A run that generalises without a memorization event (cannot happen with equal thresholds on a split where the
train set is learnt first, but a custom threshold could allow it) counts as comprehension with delay 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .detect import step_of

PHASES = ("comprehension", "grokking", "memorization", "confusion")
# The phase diagram's colours (colour-blind safe, Okabe-Ito): the Goldilocks zone (comprehension, grokking) warm.
PHASE_COLORS = {"comprehension": "#009E73", "grokking": "#E69F00", "memorization": "#0072B2", "confusion": "#999999"}
RULE = ("memorization/generalization = first evaluation with train/test accuracy >= threshold. comprehension: both, "
        "delay (generalization - memorization) <= {delay} steps; grokking: both, delay > {delay}; memorization: "
        "memorized, not generalized within {budget} steps; confusion: not memorized within {budget} steps")


def default_comprehension_delay(max_steps: int) -> int:
    return max_steps // 10


def grokking_delay(events: Iterable[Mapping]) -> int | None:
    """generalization - memorization in steps; None unless the run generalised."""
    events = list(events)
    gen, mem = step_of(events, "generalization"), step_of(events, "memorization")
    if gen is None:
        return None
    return max(0, gen - (mem if mem is not None else gen))


def classify(events: Iterable[Mapping], comprehension_delay: int) -> str:
    """The run's phase from its events (see the module's rules)."""
    events = list(events)
    delay = grokking_delay(events)
    if delay is not None:
        return "comprehension" if delay <= comprehension_delay else "grokking"
    return "memorization" if step_of(events, "memorization") is not None else "confusion"


def rule(comprehension_delay: int, max_steps: int) -> str:
    return RULE.format(delay=comprehension_delay, budget=max_steps)
