"""Grokking events from a metric history: pure Python, no torch, no tracking.

Every event is one ``Event`` entry in the registry ``EVENTS`` (name, rule, figure style, whether its checkpoint
becomes a logged model, whether it can stop a run, whether it is a phase boundary); figures, logged models,
``stop_after``, the analysis' phases and the event tables read it from there. Adding an event is one
``register(Event(...))`` plus its rule (``docs/extending.md``). ``step_of(events, name)`` is the one "step of an
event"; ``detector_for(config)`` the one config -> detector mapping.

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
  (``n_key_frequencies`` >= 1, ``fourier.KEY_RULE``) in ``phase_confirm`` consecutive readings: weight
  decay has removed enough of the other frequencies for the circuit's to stand 3x above the floor. It fires
  at the confirming reading (``from_step``: the first).
- ``cleanup_end``: after clean-up and generalisation, the Gini coefficients of W_E and W_L (the sparsity of
  the Fourier representation, which rises sharply during clean-up) changed by less than ``plateau_delta``
  since the reading nearest to ``plateau_window`` x the current step: a plateau on a logarithmic time axis,
  so one rule serves a 2,000-step and a 40,000-step run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields

PHASE_RULE = ("readings = evaluations with progress measures, after memorization. circuit_formation: total weight "
              "norm <= (1 - {norm_drop:g}) x its maximum since memorization and test loss < its maximum since "
              "memorization. cleanup: after circuit_formation, key frequencies stand out of W_E's spectrum "
              "(n_key_frequencies >= 1) in {confirm} consecutive readings (fires at the last; from_step = the "
              "first). cleanup_end: after cleanup and generalization, |Gini(t) - Gini(t')| < {delta:g} for both W_E "
              "and W_L, t' = the reading nearest {window:g} x t")

# A rule: called at each evaluation until its event fires, with the detector (thresholds, the events so far, and
# ``rule_state[name]``, a dict of plain values saved in checkpoints), the step and the evaluation's metrics; returns
# the event's details (name -> number) when it fires now, else None.
Rule = Callable[["GrokDetector", int, Mapping[str, float]], "Mapping[str, float] | None"]


@dataclass(frozen=True)
class Event:
    """One detection event: its rule and everything the rest of the package reads about it.

    ``color``/``linestyle``: how figures mark it; ``logged_model``: its checkpoint becomes an MLflow LoggedModel;
    ``can_stop``: ``stop_after`` may name it (training ends ``stop_margin`` steps after it); ``phase``: a phase
    boundary of Nanda et al. 2023, reported in ``analyze``'s summary ``phases``; ``needs_progress``: its rule reads
    the live progress measures (``progress_every > 0``); without them it never fires."""

    name: str
    rule: Rule
    color: str
    linestyle: str | tuple = "--"
    logged_model: bool = True
    can_stop: bool = False
    phase: bool = False
    needs_progress: bool = False
    doc: str = ""


EVENTS: dict[str, Event] = {}  # in the order rules run at each evaluation


def register(event: Event) -> Event:
    """Add an event (its name must be new); figures, logged models, stop_after and phases read it from here."""
    if event.name in EVENTS or event.name in ("final", "periodic", "initial"):
        raise ValueError(f"event {event.name!r} exists already")
    EVENTS[event.name] = event
    return event


def event_names() -> tuple[str, ...]:
    return tuple(EVENTS)


def stop_events() -> tuple[str, ...]:
    return tuple(name for name, event in EVENTS.items() if event.can_stop)


def model_events() -> tuple[str, ...]:
    return tuple(name for name, event in EVENTS.items() if event.logged_model)


def phase_events() -> tuple[str, ...]:
    return tuple(name for name, event in EVENTS.items() if event.phase)


def main_events() -> tuple[str, ...]:
    """Events every run can reach (their rules need no progress measures): always a row in event tables."""
    return tuple(name for name, event in EVENTS.items() if not event.needs_progress)


def step_of(events: Iterable[Mapping] | None, name: str) -> int | None:
    """The step of the first ``name`` event in an events list (``events.json``'s dicts), None if it never fired.
    Entries that are not ``{"event": name, "step": number}`` are skipped (an events.json may come from anyone)."""
    for event in events or ():
        if isinstance(event, Mapping) and event.get("event") == name:
            step = event.get("step")
            if isinstance(step, (int, float)) and not isinstance(step, bool):
                return int(step)
    return None


def detector_for(config) -> "GrokDetector":
    """The one config -> detector mapping: every detector threshold that the config has a field of the same name
    for (``memorization_threshold``, ``generalization_threshold``, ``onset_loss_drop``, ...)."""
    tunable = [f.name for f in fields(GrokDetector) if not f.name.startswith("_") and f.name not in _DETECTOR_STATE]
    return GrokDetector(**{name: getattr(config, name) for name in tunable if hasattr(config, name)})


_DETECTOR_STATE = ("events", "rule_state")


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
    rule_state: dict[str, dict] = field(default_factory=dict)  # per event, for rules registered beyond the built-ins
    _peak_test_loss: float | None = None
    _evals_below: int = 0
    _peaks: dict[str, float] = field(default_factory=dict)  # weight norm and test loss maxima since memorisation
    _readings_with_keys: list[int] = field(default_factory=list)  # steps of the current run of readings with keys
    _gini: list[tuple[int, float, float]] = field(default_factory=list)  # (step, W_E, W_L) since clean-up

    def fired(self, name: str) -> dict | None:
        return next((e for e in self.events if e["event"] == name), None)

    def step_of(self, name: str) -> int | None:
        return step_of(self.events, name)

    def update(self, step: int, metrics: Mapping[str, float]) -> list[dict]:
        """Feed one evaluation; returns the events that fired at it (possibly none), in the registry's order."""
        new: list[dict] = []
        for name, event in list(EVENTS.items()):
            if self.fired(name):
                continue
            details = event.rule(self, int(step), metrics)
            if details is not None:
                fired = {"event": name, "step": int(step), **{k: float(v) for k, v in details.items()}}
                self.events.append(fired)
                new.append(fired)
        return new

    @property
    def rule(self) -> str:
        return PHASE_RULE.format(norm_drop=self.circuit_norm_drop, confirm=self.phase_confirm,
                                 delta=self.plateau_delta, window=self.plateau_window)

    def fired_before(self, name: str, step: int) -> bool:
        event = self.fired(name)
        return event is not None and event["step"] < step

    def state(self) -> dict:
        """What a checkpoint needs to continue detection exactly where it stopped."""
        return {"events": [dict(e) for e in self.events], "peak_test_loss": self._peak_test_loss,
                "evals_below": self._evals_below, "phase_peaks": dict(self._peaks),
                "readings_with_keys": list(self._readings_with_keys), "gini": [list(g) for g in self._gini],
                "rule_state": {name: dict(values) for name, values in self.rule_state.items()}}

    def load_state(self, state: Mapping) -> None:
        self.events = [dict(e) for e in state["events"]]
        self._peak_test_loss = state["peak_test_loss"]
        self._evals_below = int(state["evals_below"])
        # checkpoints written before the phases existed have none of their state: start it empty
        self._peaks = {k: float(v) for k, v in state.get("phase_peaks", {}).items()}
        self._readings_with_keys = [int(s) for s in state.get("readings_with_keys", [])]
        self._gini = [(int(s), float(e), float(w)) for s, e, w in state.get("gini", [])]
        self.rule_state = {name: dict(values) for name, values in state.get("rule_state", {}).items()}


# ---------------------------------------------------------------------------------------------- the rules
def _snapshot(metrics: Mapping[str, float]) -> dict:
    return {k: metrics[k] for k in ("train_acc", "test_acc", "test_loss")}


def _memorization(d: GrokDetector, step: int, m: Mapping[str, float]):
    return _snapshot(m) if m["train_acc"] >= d.memorization_threshold else None


def _onset(d: GrokDetector, step: int, m: Mapping[str, float]):
    if not d.fired("memorization") or d.fired("generalization"):
        return None
    test_loss = m["test_loss"]
    d._peak_test_loss = max(d._peak_test_loss or test_loss, test_loss)
    d._evals_below = d._evals_below + 1 if test_loss <= d.onset_loss_drop * d._peak_test_loss else 0
    if d._evals_below >= d.onset_confirm and not m["test_acc"] >= d.generalization_threshold:
        return dict(peak_test_loss=d._peak_test_loss, **_snapshot(m))
    return None


def _generalization(d: GrokDetector, step: int, m: Mapping[str, float]):
    return _snapshot(m) if m["test_acc"] >= d.generalization_threshold else None


def _reading(d: GrokDetector, m: Mapping[str, float]) -> bool:
    """An evaluation that carries the progress measures, after memorisation: the phases' rules read only these."""
    return "n_key_frequencies" in m and d.fired("memorization") is not None


def _circuit_formation(d: GrokDetector, step: int, m: Mapping[str, float]):
    if not _reading(d, m):
        return None
    norm, test_loss = m["total_weight_norm"], m["test_loss"]
    for key, value in (("weight_norm", norm), ("test_loss", test_loss)):
        d._peaks[key] = max(d._peaks.get(key, value), value)
    if norm <= (1 - d.circuit_norm_drop) * d._peaks["weight_norm"] and test_loss < d._peaks["test_loss"]:
        return dict(peak_weight_norm=d._peaks["weight_norm"], total_weight_norm=norm,
                    peak_test_loss=d._peaks["test_loss"], test_loss=test_loss)
    return None


def _cleanup(d: GrokDetector, step: int, m: Mapping[str, float]):
    if not _reading(d, m) or not d.fired_before("circuit_formation", step):
        return None
    d._readings_with_keys = d._readings_with_keys + [step] if m["n_key_frequencies"] else []
    if len(d._readings_with_keys) >= d.phase_confirm:
        return dict(from_step=d._readings_with_keys[0], n_key_frequencies=m["n_key_frequencies"],
                    test_loss=m["test_loss"])
    return None


def _cleanup_end(d: GrokDetector, step: int, m: Mapping[str, float]):
    if not _reading(d, m) or not d.fired("cleanup"):  # from the reading at which clean-up fired
        return None
    d._gini.append((step, m["gini_embedding"], m["gini_neuron_logit"]))
    if not d.fired("generalization"):
        return None
    earlier = min(d._gini[:-1], key=lambda g: abs(g[0] - d.plateau_window * step), default=None)
    if earlier is not None and all(abs(now - then) < d.plateau_delta
                                   for now, then in zip(d._gini[-1][1:], earlier[1:])):
        return dict(compared_with_step=earlier[0], gini_embedding=m["gini_embedding"],
                    gini_neuron_logit=m["gini_neuron_logit"], test_loss=m["test_loss"])
    return None


for _event in (
    Event("memorization", _memorization, "#E69F00", "--", phase=True, doc="train accuracy >= memorization_threshold"),
    Event("onset", _onset, "#CC79A7", ":", doc="test loss <= onset_loss_drop x its post-memorisation peak for "
                                              "onset_confirm evaluations, before generalisation"),
    Event("generalization", _generalization, "#009E73", "-.", can_stop=True, phase=True,
          doc="test accuracy >= generalization_threshold"),
    Event("circuit_formation", _circuit_formation, "#56B4E9", (0, (5, 2, 1, 2)), phase=True, needs_progress=True,
          doc="weight norm fell circuit_norm_drop below its peak since memorisation, test loss below its peak"),
    Event("cleanup", _cleanup, "#D55E00", (0, (1, 1)), phase=True, needs_progress=True,
          doc="key frequencies stand out of W_E in phase_confirm consecutive readings"),
    Event("cleanup_end", _cleanup_end, "#7f7f7f", (0, (3, 1, 1, 1, 1, 1)), can_stop=True, phase=True,
          needs_progress=True, doc="Gini of W_E and W_L on a plateau (log time axis), after generalisation"),
):
    register(_event)
EVENT_NAMES = event_names()  # the built-in events, for reading; the registry (EVENTS) is the source


def detect_events(history: Iterable[tuple[int, Mapping[str, float]]], config=None, **thresholds: float) -> list[dict]:
    """Events of a whole history of (step, metrics) evaluations, in step order; thresholds from ``config`` (by
    ``detector_for``) or given by name."""
    detector = detector_for(config) if config is not None else GrokDetector(**thresholds)
    for step, metrics in sorted(history, key=lambda item: item[0]):
        detector.update(step, metrics)
    return detector.events
