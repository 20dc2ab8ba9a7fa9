"""What a run says about itself: context tags, readable names, descriptions and the dataset digest."""

from __future__ import annotations

import sys

from grokking_tracked.config import preset
from grokking_tracked.data import make_dataset
from grokking_tracked.tracking.provenance import (_mlflow_context, dataset_inputs, default_run_name,
                                                  run_description)
from grokking_tracked.train import TrainResult


def test_default_run_names_say_task_preset_and_hyperparameters():
    assert default_run_name(preset("default"), "default") == "add59-default-lr1e-2-wd1"
    assert default_run_name(preset("seed", train_frac=0.5), "seed") == "add113-seed-lr1e-3-wd1-frac0.5"
    assert default_run_name(preset("default", operation="div", p=97, lr=3e-3, weight_decay=0.5), None) == \
        "div97-lr3e-3-wd0.5"


def test_the_description_states_the_delay():
    result = TrainResult(history=[], events=[{"event": "memorization", "step": 50},
                                             {"event": "generalization", "step": 1930}],
                         final_step=2130, train_seconds=27.5, stop_reason="generalized")
    assert run_description(result).startswith("memorised at step 50, generalised at step 1,930 (a grokking delay "
                                              "of 1,880 steps)")
    never = TrainResult(history=[], events=[], final_step=400, train_seconds=1.0, stop_reason="max_steps")
    assert "did not generalise within 400 steps" in run_description(never)


def digests(config):
    return [(i.dataset.name, i.dataset.digest, i.tags[0].value) for i in dataset_inputs(config, make_dataset(config))]


def test_same_split_same_digest_another_split_another():
    config = preset("default", p=23)
    first = digests(config)
    assert first == digests(preset("default", p=23, lr=3e-3))  # the split, not the hyperparameters
    assert [(name, context) for name, _, context in first] == [
        ("add_mod_23/frac0.3/seed598/train", "training"), ("add_mod_23/frac0.3/seed598/test", "evaluation")]
    other = digests(preset("default", p=23, data_seed=1))
    assert all(a[1] != b[1] for a, b in zip(first, other))


def test_source_under_python_m_is_the_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/grokking_tracked/__main__.py", "run"])
    tags = dict(_mlflow_context.__wrapped__())
    assert tags["mlflow.source.name"] == "grokking-tracked" and tags["mlflow.source.type"] == "LOCAL"


def test_a_dataset_row_inserted_by_a_concurrent_writer_is_retried_not_refused():
    from sqlalchemy.exc import IntegrityError

    from grokking_tracked.tracking.delivery.outage import is_transient

    race = IntegrityError("INSERT INTO datasets ...", {}, Exception(
        "UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest"))
    other = IntegrityError("INSERT INTO params ...", {}, Exception("UNIQUE constraint failed: params.key"))
    assert is_transient(race) and not is_transient(other)
