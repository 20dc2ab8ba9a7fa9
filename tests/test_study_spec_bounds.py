"""Spec values are bounded and a spec whose trials can only fail is refused up front, in one line (issue 27): the
seeds count, the seeds past the largest seed, repeated grid values, the grid sampler's own ``search_space`` (checked
as [search] is), every point of a grid. A stored search space that conflicts with the spec is one line too, and an
invocation whose every trial failed is an error. In-process, real Optuna storages (SQLite), no training."""

from __future__ import annotations

import itertools
import time

import pytest

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from grokking_tracked.config import preset  # noqa: E402
from grokking_tracked.study.spec import StudyError, load_spec  # noqa: E402
from grokking_tracked.study.storage import create_or_load_study  # noqa: E402
from grokking_tracked.study.trial import seed_configs  # noqa: E402
from grokking_tracked.study.workers import check_some_trial_trained  # noqa: E402

SPEC = """
[study]
name = "bounds"
n_trials = 2
{study}

[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 40
{task}

[search]
{search}

[sampler]
{sampler}

[pruner]
name = "none"
"""
RANGE = 'lr = { type = "float", low = 3e-3, high = 3e-2, log = true }\ntrain_frac = { low = 0.4, high = 0.8 }'
GRID = 'lr = { values = [3e-3, 3e-2] }\ntrain_frac = { values = [0.4, 0.8] }'


def write(tmp_path, study="", task="", search=RANGE, sampler='name = "random"\nseed = 1'):
    path = tmp_path / "bounds.toml"
    path.write_text(SPEC.format(study=study, task=task, search=search, sampler=sampler))
    return path


BAD = {
    "seeds beyond the bound": (dict(study="seeds = 1000000000"), "[study] seeds must be at most 100"),
    "seed + k overflows": (dict(study="seeds = 2", task="seed = 9223372036854775807"),
                           "[study] seeds = 2 trains seeds up to seed=9223372036854775808"),
    "data seed + k overflows": (dict(study="seeds = 3", task="data_seed = 9223372036854775806"),
                                "data_seed=9223372036854775808"),
    "repeated grid value": (dict(search='lr = { values = [3e-3, 1e-2, 3e-3] }', sampler='name = "grid"'),
                            "search parameter lr: the grid repeats the value 0.003"),
    "repeated grid choice": (dict(search='d_mlp = { choices = [64, 64] }', sampler='name = "grid"'),
                             "search parameter d_mlp: the grid repeats the value 64"),
    "sampler grid outside the domain": (
        dict(search=RANGE, sampler='name = "grid"\nsearch_space = { lr = [0.01], train_frac = [0.5, 1.5] }'),
        "[sampler] search_space: search parameter train_frac: value 1.5 is not a valid config"),
    "sampler grid repeats": (
        dict(search=RANGE, sampler='name = "grid"\nsearch_space = { lr = [0.01, 0.01], train_frac = [0.5] }'),
        "search parameter lr: the grid repeats the value 0.01"),
    "sampler grid of other parameters": (
        dict(search=RANGE, sampler='name = "grid"\nsearch_space = { lr = [0.01] }'),
        "[sampler] search_space must name exactly the [search] parameters"),
    "sampler grid with strings": (
        dict(search=RANGE, sampler='name = "grid"\nsearch_space = { lr = ["fast"], train_frac = [0.5] }'),
        "[sampler] search_space: search parameter lr: needs numeric `low` and `high`"),
    "sampler grid without the grid sampler": (
        dict(search=RANGE, sampler='name = "random"\nsearch_space = { lr = [0.01], train_frac = [0.5] }'),
        "[sampler] search_space is the grid sampler's"),
    "int grid with a fraction": (dict(search='d_mlp = { type = "int", values = [64, 96.5, 128] }',
                                      sampler='name = "grid"'), "an int parameter's `values` must be integers"),
    "grid point inside the grid invalid": (  # each value alone and the corners (32|40, 1|4) are valid; (34, 4) not
        dict(task="n_heads = 1", search='d_model = { type = "int", values = [32, 34, 40] }\n'
                                        'n_heads = { type = "int", values = [1, 2, 4] }',
             sampler='name = "grid"'), "the search space reaches invalid configs (d_model=34, n_heads=4)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_spec_that_can_only_fail_is_refused_in_one_line(tmp_path, case):
    kwargs, message = BAD[case]
    with pytest.raises(StudyError) as caught:
        load_spec(write(tmp_path, **kwargs))
    text = str(caught.value)
    assert message in text and "\n" not in text, text


def test_the_grid_samplers_own_grid_replaces_the_search_grid_once_checked(tmp_path):
    spec = load_spec(write(tmp_path, sampler='name = "grid"\nsearch_space = { lr = [0.01, 0.02], train_frac = [0.5] }'))
    assert {p.name: p.grid() for p in spec.params} == {"lr": [0.01, 0.02], "train_frac": [0.5]}
    assert "search_space" not in spec.sampler_args
    assert load_spec(write(tmp_path, study="seeds = 100")).seeds == 100  # the bound itself is allowed


def test_a_trials_seeds_are_made_as_they_start_not_all_up_front():
    config = preset("default", p=23)
    started = time.perf_counter()
    first = list(itertools.islice(seed_configs(config, 10 ** 6), 2))  # a list of them: ~30 s here
    assert time.perf_counter() - started < 5
    assert [(c.seed, c.data_seed) for c in first] == [(config.seed, config.data_seed),
                                                      (config.seed + 1, config.data_seed + 1)]


def test_a_stored_search_space_that_conflicts_is_one_line(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    first = load_spec(write(tmp_path))
    study, created = create_or_load_study(first, storage, "conflict")
    trial = study.ask()
    for param in first.params:
        param.suggest(trial)
    study.tell(trial, 1.0)
    assert created
    # the same ranges resume; a changed range of the same kind too (Optuna's dynamic search spaces)
    create_or_load_study(first, storage, "conflict")
    create_or_load_study(load_spec(write(tmp_path, search=RANGE.replace("0.4", "0.3"))), storage, "conflict")
    other = load_spec(write(tmp_path, search='lr = { choices = [0.001, 0.01] }\ntrain_frac = { low = 0.4, high = 0.8 }'))
    with pytest.raises(StudyError) as caught:
        create_or_load_study(other, storage, "conflict")
    text = str(caught.value)
    assert "study 'conflict' exists with another search space for lr" in text and "--study-name" in text
    assert "\n" not in text


def test_an_invocation_whose_every_trial_failed_is_an_error(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="failing")
    study.tell(study.ask(), 1.0)  # an earlier invocation's trial: not this one's
    before = {t.number: t.state for t in study.get_trials()}
    surplus = study.ask()
    surplus.set_user_attr("fail_reason", "surplus: 2 trials already finished or running")
    study.tell(surplus, state=TrialState.FAIL)
    check_some_trial_trained(study, before)  # only a surplus trial ended: nothing failed
    for reason in ("ConfigError: lr must be positive", "ConfigError: lr must be positive, again"):
        trial = study.ask()
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=TrialState.FAIL)
    with pytest.raises(StudyError, match=r"every trial failed \(2 of 2\); trial 3: ConfigError: lr must be positive, "
                                         r"again"):
        check_some_trial_trained(study, before)
    study.tell(study.ask(), 2.0)  # one trial of this invocation completed: not an error
    check_some_trial_trained(study, before)
