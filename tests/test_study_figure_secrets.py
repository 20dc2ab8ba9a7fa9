"""A study name carrying a secret is redacted in every text drawn in the study's figures (issue 27): titles,
suptitles, labels, legends, annotations -- as it is in tags and notes. The parent run's figures are made by the real
report code over a real Optuna study; the test reads every text of every figure the report logs."""

from __future__ import annotations

import pytest
from matplotlib.text import Text

optuna = pytest.importorskip("optuna")
from mlflow import MlflowClient  # noqa: E402
from optuna.distributions import FloatDistribution  # noqa: E402

from grokking_tracked.study import report  # noqa: E402
from grokking_tracked.study.spec import load_spec  # noqa: E402

SECRET = "hunter2"
NAME = f"sweep password={SECRET} token={SECRET}x"
SPEC = """
[study]
name = "figures"
[task]
p = 23
max_steps = 100
[search]
lr = { type = "float", low = 1e-3, high = 1e-2, log = true }
weight_decay = { type = "float", low = 0.1, high = 1.0 }
train_frac = { type = "float", low = 0.3, high = 0.8 }
[sampler]
name = "random"
[pruner]
name = "median"
"""


class Parent:
    """What ``report.finalize`` writes to: the parent run's surface, keeping every figure's drawn texts."""

    def __init__(self, client):
        self.client, self.run_id, self.experiment_id = client, "parent", None
        self.texts: dict[str, list[str]] = {}

    def log_figure(self, figure, path):
        figure.canvas.draw()  # texts laid out lazily (tick labels) exist once drawn
        self.texts[path] = [t.get_text() for t in figure.findobj(Text)]

    def log_values(self, *args): pass
    def set_tags(self, *args): pass
    def log_text(self, *args): pass
    def log_dict(self, *args): pass


def test_a_secret_in_the_study_name_is_in_no_text_drawn_in_its_figures(tmp_path):
    spec_path = tmp_path / "figures.toml"
    spec_path.write_text(SPEC)
    spec = load_spec(spec_path)
    study = optuna.create_study(study_name=NAME)
    distributions = {"lr": FloatDistribution(1e-3, 1e-2, log=True), "weight_decay": FloatDistribution(0.1, 1.0),
                     "train_frac": FloatDistribution(0.3, 0.8)}
    for i, (lr, wd, frac) in enumerate([(1e-3, 0.1, 0.3), (3e-3, 0.5, 0.5), (1e-2, 1.0, 0.8)]):
        generalized = i > 0
        events = [{"event": "memorization", "step": 20}] + (
            [{"event": "onset", "step": 40}, {"event": "generalization", "step": 60 + i}] if generalized else [])
        study.add_trial(optuna.create_trial(
            params={"lr": lr, "weight_decay": wd, "train_frac": frac}, distributions=distributions,
            value=60.0 + i if generalized else 200.0, intermediate_values={50: 1.0 - i / 10},
            user_attrs={"phase": "grokking" if generalized else "memorization", "generalized": generalized,
                        "grokking_delay": 40 + i if generalized else None, "memorization_step": 20,
                        "generalization_step": 60 + i if generalized else None, "final_step": 100,
                        "events": events}))
    parent = Parent(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"))
    report.finalize(study, spec, parent, 0, 0)
    assert {"figures/phase_diagram.png", "figures/steps_vs_train_frac.png", "figures/best_vs_baseline.png",
            "detection/onset_quality.png"} <= set(parent.texts)
    drawn = [text for texts in parent.texts.values() for text in texts]
    assert any("password=***" in text for text in drawn)  # the name is drawn, redacted
    leaks = {path: [t for t in texts if SECRET in t] for path, texts in parent.texts.items()}
    assert not any(leaks.values()), leaks
