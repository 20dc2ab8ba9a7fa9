"""Bad input is refused up front: exactly one non-empty line on stderr, a non-zero exit, and nothing created --
no MLflow run, no Optuna study. In-process through the real entry point (``grokking_tracked.cli.main``) for speed;
the subprocess path is covered by tests/test_tracked_run.py."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import optuna
import pytest

from grokking_tracked.cli import main

GOOD_SPEC = """
[study]
name = "{name}"
n_trials = 2
heartbeat_interval = 1
grace_period = 3

[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 40

[search]
lr = {{ type = "float", low = 3e-3, high = 3e-2, log = true }}
train_frac = {{ type = "float", low = 0.4, high = 0.8 }}

[sampler]
name = "random"
seed = 1

[pruner]
name = "none"
"""


@pytest.fixture(autouse=True)
def process_state():
    """The CLI sets process-wide state (environment, Optuna's verbosity) as an entry point should: restore it."""
    environment = dict(os.environ)
    verbosity = optuna.logging.get_verbosity()
    mlflow_level = logging.getLogger("mlflow").level
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.clear()
    os.environ.update(environment)
    optuna.logging.set_verbosity(verbosity)
    logging.getLogger("mlflow").setLevel(mlflow_level)


def invoke(argv: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def count_runs(database: Path) -> int:
    if not database.exists():
        return 0
    with sqlite3.connect(database) as connection:
        return connection.execute("select count(*) from runs").fetchone()[0]


def count_studies(database: Path) -> int:
    if not database.exists():
        return 0
    with sqlite3.connect(database) as connection:
        return connection.execute("select count(*) from studies").fetchone()[0]


RUN_CASES = [
    (["--p", "2"], "p must be an integer in [3, 5,000], got 2"),
    (["--train-frac", "1.5"], "train_frac must be a finite number in (0, 1)"),
    (["--train-frac", "0"], "train_frac must be a finite number in (0, 1)"),
    (["--lr", "0"], "lr must be a finite number in (0, 10]"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "0.5", "--weight-decay", "3"], "lr x weight_decay must be < 1"),
    (["--eval-every", "0"], "eval_every must be an integer"),
    (["--max-steps", "-5"], "max_steps must be an integer"),
    (["--d-model", "65"], "must be a positive multiple of n_heads"),
    (["--set", "grokfast_alpha=1.5"], "grokfast_alpha must be a finite number in [0, 1)"),
    (["--set", "warmup_steps=0"], "warmup_steps must be an integer"),
    (["--set", "plateau_factor=1"], "plateau_factor must be a finite number in (0, 1)"),
    (["--set", "stop_margin=-1"], "stop_margin must be an integer"),
    (["--set", "onset_loss_drop=nan"], "onset_loss_drop must be a finite number"),
    (["--set", "seed=-3"], "seed must be an integer"),
    (["--batch-size", "-1"], "batch_size must be an integer in [0, "),
    (["--curriculum", "--batch-size", "64"], "curriculum and batch_size > 0 cannot be combined"),
    (["--set", "activation=tanh"], "unknown activation 'tanh'"),
    (["--set", "optimizer=lion"], "unknown optimizer 'lion'"),
    (["--set", "nonsense=1"], "unknown config field"),
    (["--set", "lr"], "--set expects FIELD=VALUE"),
    (["--set", "p=abc"], "p expects a int"),
    # numbers are ASCII and plain, as names are: int() reads '٢٣' as 23 and '2_0' as 20
    (["--set", "p=\u0662\u0663"], "p expects a int written with ASCII digits 0-9 and no '_'"),
    (["--set", "max_steps=2_0"], "max_steps expects a int written with ASCII digits 0-9 and no '_'"),
    (["--set", "lr=\uff11e-3"], "lr expects a float written with ASCII digits"),
    (["--p", "\u0662\u0663"], "'--p': '\u0662\u0663' is not an integer written with ASCII digits"),
    (["--max-steps", "2_0"], "'--max-steps': '2_0' is not an integer written with ASCII digits"),
    (["--set", "device=cuda:99999999999999999999"], "unknown device 'cuda:99999999999999999999'"),
    (["--set", "device=cuda:\u0663"], "unknown device 'cuda:\u0663'"),
    (["--operation", "pow"], "Invalid value for '--operation'"),
    (["--preset", "nope"], "Invalid value for '--preset'"),
    (["--operation", "div", "--p", "60"], "needs a prime p"),
    (["--device", "cuda"], "sees no CUDA GPU"),
    (["--p", "1500"], "GiB while training"),
    # parameters x (weights, gradients, AdamW's two moments): ~64 GiB; the old estimate (activations only) let it run
    (["--d-model", "16384", "--d-mlp", "65536"], "GiB while training"),
    (["--p", "3", "--train-frac", "0.99"], "leaves no test pair"),
    (["--run-name", "run-\u0663"], "--run-name contains the non-ASCII digit"),
    (["--experiment", "grok\x07king"], "--experiment contains the control character"),
    (["--run-name", " "], "--run-name must be a non-empty string"),
    (["--resume", "0123456789abcdef0123456789abcdef"], "no MLflow run with id"),
    (["--resume", "0123456789abcdef0123456789abcdef", "--lr", "0.1"], "only --max-steps may be given"),
]


@pytest.mark.parametrize("args, message", RUN_CASES, ids=[" ".join(a) for a, _ in RUN_CASES])
def test_bad_run_input_is_one_line_and_creates_nothing(tmp_path, capsys, args, message):
    code, lines = invoke(["run", *args, "--no-progress", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], capsys)
    assert code != 0
    assert len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith("grokking-tracked: error:")
    assert count_runs(tmp_path / "mlflow.db") == 0


def spec_with(tmp_path: Path, replace: dict[str, str] | None = None) -> Path:
    text = GOOD_SPEC.format(name="bad")
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


SPEC_CASES = {
    "lockstep with minibatches": ({"n_trials = 2": "n_trials = 2\nlockstep = 2", "max_steps = 40": "batch_size = 16"},
                                  "lockstep training supports the plain full-batch AdamW loop only; set batch_size"),
    "unknown task field": ({"max_steps = 40": "learning_rate = 0.1"}, "unknown config field(s) in [task]: learning_rate"),
    "unknown search field": ({"train_frac = {": "trainfrac = {"}, "unknown config field(s) in [search]"),
    "inverted range": ({"low = 0.4, high = 0.8": "low = 0.8, high = 0.4"}, "empty or inverted range"),
    "bound outside the domain": ({"low = 0.4, high = 0.8": "low = 0.4, high = 1.0"},
                                 "train_frac must be a finite number in (0, 1)"),
    "corner combination invalid": ({"[search]\n": "[search]\nweight_decay = { low = 0.1, high = 3.0 }\n",
                                    "high = 3e-2, log": "high = 0.5, log"}, "the search space reaches invalid configs"),
    "log not boolean": ({"log = true": 'log = "yes"'}, "`log` must be true or false"),
    "values without grid": ({"low = 0.4, high = 0.8": "values = [0.4, 0.8]"}, "`values` is the grid sampler's"),
    "n_trials boolean": ({"n_trials = 2": "n_trials = true"}, "[study] n_trials must be a non-negative integer"),
    "grace below heartbeat": ({"grace_period = 3": "grace_period = 1"}, "grace_period (1 s) must exceed"),
    "name with both quotes": ({'name = "bad"': 'name = "it\'s \\"bad\\""'}, "contains both quote characters"),
    "unknown sampler": ({'name = "random"': 'name = "annealing"'}, "unknown sampler 'annealing'"),
    "sampler argument of the wrong type": ({'name = "random"': 'name = "tpe"', "seed = 1": 'seed = 1\nn_startup_trials = "five"'},
                                           "arguments do not work"),
    "unknown sampler argument": ({"seed = 1": "seed = 1\nbogus = 2"}, "sampler random"),
    "unknown pruner": ({'name = "none"': 'name = "early"'}, "unknown pruner 'early'"),
    "pruner argument of the wrong type": ({'name = "none"': 'name = "median"\nn_warmup_steps = "ten"'},
                                          "pruner median: '<' not supported"),
    "malformed": ({"[search]": "[search"}, "malformed TOML"),
    "max_steps boolean": ({"max_steps = 40": "max_steps = true"}, "max_steps expects a int, got True"),
    "boolean among int choices": ({"[search]\n": "[search]\nd_mlp = { choices = [64, true] }\n"},
                                  "d_mlp expects a int, got True"),
    "name with a non-ASCII digit": ({'name = "bad"': 'name = "bad-\u0663"'}, "[study] name contains the non-ASCII digit"),
    "experiment with a control character": ({'name = "bad"': 'name = "bad"\nexperiment = "a\\u001bb"'},
                                            "[study] experiment contains the control character"),
    "grid that explodes": ({'name = "random"': 'name = "grid"', "low = 3e-3, high = 3e-2, log = true": "values = [3e-3, 3e-2]",
                            "low = 0.4, high = 0.8": "low = 0.4, high = 0.8, step = 1e-7"},
                           "the grid sampler's space has 8,000,002 points"),
    "lockstep beyond sense": ({"grace_period = 3": "grace_period = 3\nlockstep = 1000"}, "lockstep must be at most 64"),
}


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_bad_study_spec_is_one_line_and_creates_nothing(tmp_path, capsys, monkeypatch, case):
    replace, message = SPEC_CASES[case]
    spec = spec_with(tmp_path, replace)
    monkeypatch.chdir(tmp_path)
    code, lines = invoke(["study", str(spec), "--no-progress"], capsys)
    assert code != 0
    assert len(lines) == 1 and message in lines[0], lines
    assert count_runs(tmp_path / "mlruns" / "mlflow.db") == 0
    assert count_studies(tmp_path / "mlruns" / "optuna.db") == 0


@pytest.mark.parametrize("args, message", [
    (["--n-trials", "-1"], "--n-trials must be >= 0"),
    (["--workers", "0"], "--workers expects 'auto' or an integer from 1 to"),
    (["--workers", "many"], "--workers expects 'auto' or an integer from 1 to"),
    (["--workers", "100000"], "--workers expects 'auto' or an integer from 1 to"),
    (["--workers", "\u0663"], "--workers expects 'auto' or an integer from 1 to"),
    (["--timeout", "0"], "--timeout must be a positive number"),
    (["--lockstep", "0"], "--lockstep expects 1 to 64"),
    (["--lockstep", "1000"], "--lockstep expects 1 to 64"),
    (["--experiment", "x\x1by"], "--experiment contains the control character"),
    (["--study-name", "s\u0663"], "--study-name contains the non-ASCII digit"),
])
def test_bad_study_options_are_one_line_and_create_nothing(tmp_path, capsys, monkeypatch, args, message):
    spec = spec_with(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, lines = invoke(["study", str(spec), *args, "--no-progress"], capsys)
    assert code != 0
    assert len(lines) == 1 and message in lines[0], lines
    assert count_runs(tmp_path / "mlruns" / "mlflow.db") == 0
    assert count_studies(tmp_path / "mlruns" / "optuna.db") == 0
