"""Liu et al.'s learning phases (learning_phases.py) on synthetic histories whose events are known."""

from __future__ import annotations

import pytest

from grokking_tracked.detect import detect_events
from grokking_tracked.learning_phases import PHASES, classify, default_comprehension_delay, grokking_delay, rule


def history(memorize_at: int | None, generalize_at: int | None, end: int = 1000) -> list[tuple[int, dict]]:
    """Evaluations every 10 steps: train accuracy reaches 1 at ``memorize_at``, test accuracy at ``generalize_at``
    (None: never within ``end``)."""
    out = []
    for step in range(0, end + 1, 10):
        fitted = memorize_at is not None and step >= memorize_at
        general = generalize_at is not None and step >= generalize_at
        out.append((step, {"train_acc": 1.0 if fitted else 0.3, "test_acc": 1.0 if general else 0.02,
                           "test_loss": 0.01 if general else 5.0, "train_loss": 0.01 if fitted else 3.0}))
    return out


@pytest.mark.parametrize("memorize_at, generalize_at, phase, delay", [
    (100, 150, "comprehension", 50),
    (100, 200, "comprehension", 100),   # delay == comprehension_delay: still comprehension
    (100, 210, "grokking", 110),        # one evaluation later: grokking
    (100, 900, "grokking", 800),
    (100, None, "memorization", None),
    (None, None, "confusion", None),
    (300, 300, "comprehension", 0),     # fits and generalises at once
])
def test_each_phase_from_its_events(memorize_at, generalize_at, phase, delay):
    events = detect_events(history(memorize_at, generalize_at))
    assert classify(events, comprehension_delay=100) == phase
    assert grokking_delay(events) == delay


def test_the_rule_is_stated_with_its_numbers_and_the_default_is_a_tenth_of_the_budget():
    assert default_comprehension_delay(1200) == 120
    text = rule(120, 1200)
    assert "<= 120 steps" in text and "within 1200 steps" in text
    assert set(PHASES) == {"comprehension", "grokking", "memorization", "confusion"}
