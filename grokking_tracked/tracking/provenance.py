"""What a run says about itself: where it came from, what it trained on, and a readable name and description.

- Context tags resolved the way MLflow's fluent API resolves them (``mlflow.user``, ``mlflow.source.name``,
  ``mlflow.source.type``, ``mlflow.source.git.commit`` when run from a checkout, ...): ``MlflowClient.create_run``
  adds none of them by itself.
- Versions of the packages that decide the numbers, the device, torch's threads and the command line (its
  secrets redacted element by element, ``redact.redact_argv``).
- The dataset as MLflow inputs (the UI's Dataset column): the split's name and a digest of the actual train and
  test examples, with the contexts ``training`` and ``evaluation``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shlex
import sys
from importlib import metadata

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from ..config import Config
from ..train import TrainResult
from .redact import redact_argv

VERSION_PACKAGES = ("grokking-tracked", "torch", "transformer-lens", "mlflow", "optuna", "optuna-dashboard")
VERSION_TAG = "grokking_tracked.versions"
COMMAND_TAG = "grokking_tracked.command"
DEVICE_TAG = "grokking_tracked.device"
THREADS_TAG = "grokking_tracked.torch_threads"
DESCRIPTION_TAG = "mlflow.note.content"  # the run description in the MLflow UI


@functools.lru_cache(maxsize=1)  # the same for every run a process writes; metadata lookups cost ~15 ms
def versions() -> dict[str, str]:
    found = {}
    for package in VERSION_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, each element's secrets redacted before it is quoted (quoting first would split a
    password holding a ``'`` into pieces no redaction recognises)."""
    argv = sys.argv if argv is None else argv
    return " ".join(shlex.quote(part) for part in ["grokking-tracked", *redact_argv(argv[1:])]) if argv else ""


def context_tags(argv: list[str] | None = None) -> dict[str, str]:
    """MLflow's own context tags plus the versions and the command line."""
    tags = dict(_mlflow_context())
    tags[VERSION_TAG] = json.dumps(versions(), sort_keys=True)
    command = command_line(argv)
    if command:
        tags[COMMAND_TAG] = command[:5000]
    return tags


@functools.lru_cache(maxsize=1)  # git and user look-ups: ~0.1-0.2 s, the same for every run of a process
def _mlflow_context() -> tuple[tuple[str, str], ...]:
    from mlflow.tracking.context.registry import resolve_tags

    tags = {key: str(value) for key, value in resolve_tags().items()}
    # MLflow names the source after sys.argv[0]: under `python -m grokking_tracked` that is our __main__.py,
    # which tells a reader nothing; name the command instead, as the console script's path does.
    source = tags.get("mlflow.source.name", "")
    if source.replace("\\", "/").endswith("grokking_tracked/__main__.py"):
        tags["mlflow.source.name"] = "grokking-tracked"
    return tuple(tags.items())


def runtime_tags(device, threads: int | None) -> dict[str, str]:
    import torch

    return {DEVICE_TAG: str(device), THREADS_TAG: str(threads or torch.get_num_threads())}


def _short(value: float) -> str:
    """1e-2 rather than 0.01 or 1e-02; 0.5 and 1 as they are (one significant digit: names, not values)."""
    text = f"{value:.0e}" if 0 < value < 0.1 or value >= 1000 else f"{value:g}"
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", text).replace("e+", "e")


def default_run_name(config: Config, preset: str | None) -> str:
    """``add59-default-lr1e-2-wd1``: the task, the preset and the hyperparameters that decide grokking."""
    parts = [f"{config.operation}{config.p}", preset, f"lr{_short(config.lr)}", f"wd{_short(config.weight_decay)}"]
    if config.train_frac != 0.3:
        parts.append(f"frac{config.train_frac:g}")
    return "-".join(part for part in parts if part)


def run_description(result: TrainResult) -> str:
    memorized, generalized = result.step_of("memorization"), result.step_of("generalization")
    parts = [f"memorised at step {memorized:,}" if memorized is not None else "did not memorise"]
    if generalized is not None:
        delay = f" (a grokking delay of {generalized - memorized:,} steps)" if memorized is not None else ""
        parts.append(f"generalised at step {generalized:,}{delay}")
    else:
        parts.append(f"did not generalise within {result.final_step:,} steps")
    return f"{', '.join(parts)}; {result.final_step:,} steps in {result.train_seconds:.1f} s of training."


def split_name(config: Config) -> str:
    return f"{config.operation}_mod_{config.p}/frac{config.train_frac:g}/seed{config.data_seed}"


def _digest(*tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def dataset_inputs(config: Config, data) -> list[DatasetInput]:
    """The train and test split as MLflow dataset inputs (same split -> same digests)."""
    source = json.dumps({"generator": "grokking_tracked.data.make_dataset", "p": config.p,
                         "operation": config.operation, "train_frac": config.train_frac, "data_seed": config.data_seed})
    schema = json.dumps({"mlflow_colspec": [{"name": "tokens", "type": "long", "shape": [3]},
                                            {"name": "label", "type": "long"}]})
    inputs = []
    for part, context, tokens, labels in (("train", "training", data.train_tokens, data.train_labels),
                                          ("test", "evaluation", data.test_tokens, data.test_labels)):
        dataset = Dataset(name=f"{split_name(config)}/{part}", digest=_digest(tokens, labels), source_type="code",
                          source=source, schema=schema, profile=json.dumps({"num_rows": int(len(labels))}))
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs
