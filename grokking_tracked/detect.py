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

Nanda et al. 2023's phases, from the live progress measures (``measures.py``; evaluations that carry them are
"readings"), each at most once and only after ``memorization`` (``PHASE_RULE``):

- ``circuit_formation`` (the end of memorisation): the total weight norm has fallen ``circuit_norm_drop`` below
  its maximum since memorisation and the test loss is below its own maximum: weight decay now shrinks the
  memorising solution and test loss has turned (both peak together in the paper's run, at ~1.4k).
- ``cleanup``: after circuit formation, key frequencies stand out of the embedding's Fourier spectrum
  (``n_key_frequencies`` >= 1, ``analysis.fourier.KEY_RULE``) in ``phase_confirm`` consecutive readings: weight
  decay has removed enough of the other frequencies for the circuit's to stand 3x above the floor. It fires
  at the confirming reading (``from_step``: the first).
- ``cleanup_end``: after clean-up and generalisation, the Gini coefficients of W_E and W_L (the sparsity of
  the Fourier representation, which rises sharply during clean-up) changed by less than ``plateau_delta``
  since the reading nearest to ``plateau_window`` x the current step: a plateau on a logarithmic time axis,
  so one rule serves a 2,000-step and a 40,000-step run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

EVENT_NAMES = ("memorization", "onset", "generalization", "circuit_formation", "cleanup", "cleanup_end")
PHASE_RULE = ("readings = evaluations with progress measures, after memorization. circuit_formation: total weight "
              "norm <= (1 - {norm_drop:g}) x its maximum since memorization and test loss < its maximum since "
              "memorization. cleanup: after circuit_formation, key frequencies stand out of W_E's spectrum "
              "(n_key_frequencies >= 1) in {confirm} consecutive readings (fires at the last; from_step = the "
              "first). cleanup_end: after cleanup and generalization, |Gini(t) - Gini(t')| < {delta:g} for both W_E "
              "and W_L, t' = the reading nearest {window:g} x t")


@dataclass
class GrokDetector:
    memorization_threshold: float = 0.99
    generalization_threshold: float = 0.99
    onset_loss_drop: float = 0.5
    onset_confirm: int = 3
    phase_confirm: int = 2
    circuit_norm_drop: float = 0.02
    plateau_delta: float = 0.02
    plateau_window: float = 0.8
    events: list[dict] = field(default_factory=list)
    _peak_test_loss: float | None = None
    _evals_below: int = 0
    _peaks: dict[str, float] = field(default_factory=dict)  # weight norm and test loss maxima since memorisation
    _readings_with_keys: list[int] = field(default_factory=list)  # steps of the current run of readings with keys
    _gini: list[tuple[int, float, float]] = field(default_factory=list)  # (step, W_E, W_L) since clean-up

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
        if "n_key_frequencies" in metrics and self.fired("memorization"):
            self._phases(step, metrics, fire)
        return new

    @property
    def rule(self) -> str:
        return PHASE_RULE.format(norm_drop=self.circuit_norm_drop, confirm=self.phase_confirm,
                                 delta=self.plateau_delta, window=self.plateau_window)

    def _phases(self, step: int, metrics: Mapping[str, float], fire) -> None:
        norm, test_loss = metrics["total_weight_norm"], metrics["test_loss"]
        if not self.fired("circuit_formation"):
            for key, value in (("weight_norm", norm), ("test_loss", test_loss)):
                self._peaks[key] = max(self._peaks.get(key, value), value)
            if norm <= (1 - self.circuit_norm_drop) * self._peaks["weight_norm"] and test_loss < self._peaks["test_loss"]:
                fire("circuit_formation", peak_weight_norm=self._peaks["weight_norm"], total_weight_norm=norm,
                     peak_test_loss=self._peaks["test_loss"], test_loss=test_loss)
            return
        if not self.fired("cleanup"):
            self._readings_with_keys = self._readings_with_keys + [int(step)] if metrics["n_key_frequencies"] else []
            if len(self._readings_with_keys) >= self.phase_confirm:
                fire("cleanup", from_step=self._readings_with_keys[0], n_key_frequencies=metrics["n_key_frequencies"],
                     test_loss=test_loss)
            else:
                return
        self._gini.append((int(step), metrics["gini_embedding"], metrics["gini_neuron_logit"]))
        if self.fired("cleanup_end") or not self.fired("generalization"):
            return
        earlier = min(self._gini[:-1], key=lambda g: abs(g[0] - self.plateau_window * step), default=None)
        if earlier is not None and all(abs(now - then) < self.plateau_delta
                                       for now, then in zip(self._gini[-1][1:], earlier[1:])):
            fire("cleanup_end", compared_with_step=earlier[0], gini_embedding=metrics["gini_embedding"],
                 gini_neuron_logit=metrics["gini_neuron_logit"], test_loss=test_loss)

    def state(self) -> dict:
        """What a checkpoint needs to continue detection exactly where it stopped."""
        return {"events": [dict(e) for e in self.events], "peak_test_loss": self._peak_test_loss,
                "evals_below": self._evals_below, "phase_peaks": dict(self._peaks),
                "readings_with_keys": list(self._readings_with_keys), "gini": [list(g) for g in self._gini]}

    def load_state(self, state: Mapping) -> None:
        self.events = [dict(e) for e in state["events"]]
        self._peak_test_loss = state["peak_test_loss"]
        self._evals_below = int(state["evals_below"])
        # checkpoints written before the phases existed have none of their state: start it empty
        self._peaks = {k: float(v) for k, v in state.get("phase_peaks", {}).items()}
        self._readings_with_keys = [int(s) for s in state.get("readings_with_keys", [])]
        self._gini = [(int(s), float(e), float(w)) for s, e, w in state.get("gini", [])]


def detect_events(history: Iterable[tuple[int, Mapping[str, float]]], **thresholds: float) -> list[dict]:
    """Events of a whole history of (step, metrics) evaluations, in step order."""
    detector = GrokDetector(**thresholds)
    for step, metrics in sorted(history, key=lambda item: item[0]):
        detector.update(step, metrics)
    return detector.events
