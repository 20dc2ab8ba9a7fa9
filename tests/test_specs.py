"""Every study spec shipped in studies/ loads and validates (the loader's own checks, including its dry run of
the sampler and pruner), its search space reaches only valid configs, its task trains, and a grid study asks for
exactly as many trials as its grid has points. In-process, no storage: cheap."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from grokking_tracked.study.spec import load_spec, make_pruner, make_sampler  # noqa: E402
from grokking_tracked.study.trial import trial_config  # noqa: E402
from grokking_tracked.train import Trainer, check_runnable  # noqa: E402

STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.toml"))


def test_the_shipped_specs_are_the_ones_documented():
    assert [p.name for p in STUDIES] == ["fastest_grokking.toml", "grokfast_paper.toml", "grokking_delay.toml",
                                         "phase_diagram.toml", "seed_task.toml", "train_fraction_sweep.toml"]


def points(param) -> list:
    """The values a grid reaches, else the corners of the range."""
    if param.type == "categorical":
        return list(param.choices)
    return list(param.values) if param.values is not None else [param.low, param.high]


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_spec_loads_validates_and_its_task_trains(path):
    spec = load_spec(path)  # raises a one-line StudyError on any problem
    assert spec.name == path.stem and spec.n_trials > 0 and spec.params
    make_sampler(spec), make_pruner(spec)
    base = spec.base_config()
    check_runnable(base)  # the device exists and the task fits in memory
    # every corner (every grid point) of the search space is a config the trainer accepts
    for combination in itertools.product(*(points(p) for p in spec.params)):
        config = trial_config(spec, optuna.trial.FixedTrial(dict(zip([p.name for p in spec.params], combination))))
        assert config.validate() == config
        for param, value in zip(spec.params, combination):
            assert getattr(config, param.name) == pytest.approx(value)
    if spec.sampler == "grid":  # a grid study runs each point once: as many trials as points
        assert spec.n_trials == len(list(itertools.product(*(points(p) for p in spec.params))))
    # the task trains: a few steps of its config, finite losses
    result = Trainer(base.replace(max_steps=2, eval_every=1, checkpoint_every=0, device="cpu"), progress=False).train()
    assert [s for s, _ in result.history] == [0, 1, 2]
    assert all(m["train_loss"] == m["train_loss"] and m["train_loss"] < 100 for _, m in result.history)
