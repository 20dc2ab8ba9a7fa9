"""Grokking events from a metric history: pure Python, no torch, no tracking.

Three events, each at most once per run, each at an evaluation step:

- ``memorization``: first evaluation with train accuracy >= ``memorization_threshold`` (0.99).
- ``generalization``: first evaluation with test accuracy >= ``generalization_threshold`` (0.99).
- ``onset``: the early estimate. After memorisation the test loss of a grokking run climbs to a peak,
  then falls steadily while the generalising circuit forms (Nanda et al. 2023's "circuit formation"),
  long before test accuracy jumps. ``onset`` fires when the test loss has stayed at or below
  ``onset_loss_drop`` × its post-memorisation peak for ``onset_confirm`` consecutive evaluations while
  test accuracy is still under the generalisation threshold. A run that only memorises (weight decay 0)
  keeps a flat or rising test loss and never fires it. Unlike a score with no unit, each event is a
  statement a researcher can check against the curves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

EVENT_NAMES = ("memorization", "onset", "generalization")


@dataclass
class GrokDetector:
    memorization_threshold: float = 0.99
    generalization_threshold: float = 0.99
    onset_loss_drop: float = 0.5
    onset_confirm: int = 3
    events: list[dict] = field(default_factory=list)
    _peak_test_loss: float | None = None
    _evals_below: int = 0

    def fired(self, name: str) -> dict | None:
        return next((e for e in self.events if e["event"] == name), None)

    def step_of(self, name: str) -> int | None:
        event = self.fired(name)
        return None if event is None else event["step"]

    def update(self, step: int, metrics: Mapping[str, float]) -> list[dict]:
        """Feed one evaluation; returns the events that fired at it (possibly none)."""
        new: list[dict] = []

        def fire(name: str, **details: float) -> None:
            event = {"event": name, "step": int(step), **{k: float(v) for k, v in details.items()}}
            self.events.append(event)
            new.append(event)

        train_acc, test_acc, test_loss = metrics["train_acc"], metrics["test_acc"], metrics["test_loss"]
        snapshot = dict(train_acc=train_acc, test_acc=test_acc, test_loss=test_loss)
        if not self.fired("memorization") and train_acc >= self.memorization_threshold:
            fire("memorization", **snapshot)
        generalized_now = not self.fired("generalization") and test_acc >= self.generalization_threshold
        if self.fired("memorization") and not self.fired("generalization") and not self.fired("onset"):
            self._peak_test_loss = max(self._peak_test_loss or test_loss, test_loss)
            below = test_loss <= self.onset_loss_drop * self._peak_test_loss
            self._evals_below = self._evals_below + 1 if below else 0
            if self._evals_below >= self.onset_confirm and not generalized_now:
                fire("onset", peak_test_loss=self._peak_test_loss, **snapshot)
        if generalized_now:
            fire("generalization", **snapshot)
        return new

    def state(self) -> dict:
        """What a checkpoint needs to continue detection exactly where it stopped."""
        return {"events": [dict(e) for e in self.events], "peak_test_loss": self._peak_test_loss,
                "evals_below": self._evals_below}

    def load_state(self, state: Mapping) -> None:
        self.events = [dict(e) for e in state["events"]]
        self._peak_test_loss = state["peak_test_loss"]
        self._evals_below = int(state["evals_below"])


def detect_events(history: Iterable[tuple[int, Mapping[str, float]]], **thresholds: float) -> list[dict]:
    """Events of a whole history of (step, metrics) evaluations, in step order."""
    detector = GrokDetector(**thresholds)
    for step, metrics in sorted(history, key=lambda item: item[0]):
        detector.update(step, metrics)
    return detector.events
