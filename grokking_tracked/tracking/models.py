"""Checkpoints as MLflow 3 LoggedModels: the event checkpoints and the final one, each linked to its run and step,
carrying that step's metrics (so ``mlflow.search_logged_models`` ranks them), naming its event(s).

Format: a LoggedModel's artifacts are exactly ``model.safetensors`` (the model's weights; safetensors is a header
and raw tensor bytes, nothing to unpickle) and ``config.json`` (our Config). MLflow's flavours' loaders unpickle,
so loading stays ours: ``load_model`` refuses any other file, and a weights file that is not safetensors.

Creation is one outbox operation (kind ``model``), delivered in order after the metrics of its step, retried through
outages like every other write. Re-sending it is safe: it finds the model it created before by run and name.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from ..config import Config, ConfigError, UserError, config_file
from ..detect import model_events
from ..messages import short_error

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
MODEL_FILES = {MODEL_FILE, CONFIG_FILE}
MODEL_TYPE = "grokking-transformer"
EVENT_TAG, STEP_TAG = "grokking_tracked.event", "grokking_tracked.step"
FORMAT = "grokking_tracked.safetensors/1"
# The checkpoints that become LoggedModels: the events registered with logged_model (detect.EVENTS) and the end
# (periodic ones stay plain artifacts).
FINAL_REASON = "final"


class ModelError(UserError):
    """A LoggedModel that is not ours to load, or not loadable; one line fit for stderr."""


def model_reasons(reasons: list[str]) -> list[str]:
    return [reason for reason in reasons if reason == FINAL_REASON or reason in model_events()]


def model_name(reasons: list[str], step: int) -> str:
    """Unique within a run; MLflow refuses / : . % and quotes in a model name."""
    return f"{'-'.join(reasons)}-step{step}"


def write_model_dir(directory: Path, weights: dict, config: Config) -> Path:
    """The LoggedModel's files, written into ``directory`` (made here); ``weights``: the model's state dict (the
    checkpoint's own, so a lockstep member's is its slice of the stack)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}
    save_file(tensors, directory / MODEL_FILE, metadata={"format": FORMAT})
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    return directory


def deliver_model(client, run_id: str, entry: dict, directory: Path) -> None:
    """Create (or find again, when re-sent) the LoggedModel of ``entry``, upload its files, link it to the run at its
    step, log the step's metrics with its ``model_id``, and mark it READY last (a READY model is complete)."""
    from mlflow.entities import LoggedModelOutput, Metric

    step = int(entry["step"])
    found = client.search_logged_models(
        [entry["experiment_id"]], filter_string=f"source_run_id = '{run_id}' AND name = '{entry['name']}'",
        max_results=1)
    model = found[0] if found else None
    if model is not None and str(model.status) == "READY":
        return
    if model is None:
        model = client.create_logged_model(
            entry["experiment_id"], name=entry["name"], source_run_id=run_id, model_type=MODEL_TYPE,
            tags={EVENT_TAG: ",".join(entry["reasons"]), STEP_TAG: str(step)},
            params={"step": str(step), "format": FORMAT})
    client.log_model_artifacts(model.model_id, str(directory))
    outputs = client.get_run(run_id).outputs
    if not any(o.model_id == model.model_id for o in (outputs.model_outputs if outputs else [])):
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    metrics = [Metric(key, value, timestamp, step, model_id=model.model_id) for key, value, timestamp in entry["metrics"]]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    client.finalize_logged_model(model.model_id, "READY")


def model_id_of(model_uri: str) -> str:
    """``models:/<model_id>`` or a bare model id."""
    parts = urlsplit(model_uri)
    if parts.scheme == "models":
        return (parts.netloc + parts.path).strip("/")
    if parts.scheme:
        raise ModelError(f"{model_uri!r} is not a logged model: give models:/<model_id> or the model id")
    return model_uri


def load_model(model_uri: str, tracking_uri: str | None = None, progress: bool = False):
    """The ``GrokkingTransformer`` of a LoggedModel logged by a run of ours (``models:/m-...`` or ``m-...``), on the
    CPU, in eval mode. Nothing is unpickled: the weights are read with safetensors, the config from JSON (checked
    as a whole before the model is built). ``progress``: show MLflow's download bars (off: a quiet call)."""
    from .artifacts import quiet_mlflow

    with quiet_mlflow(progress):
        return _load_model(model_uri, tracking_uri)


def _load_model(model_uri: str, tracking_uri: str | None):
    from mlflow.exceptions import MlflowException
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..model import GrokkingTransformer
    from .artifacts import checked
    from .store import connect

    client = connect(tracking_uri)
    model_id = model_id_of(model_uri)
    try:
        client.get_logged_model(model_id)  # its existence: a clear line before any transfer
    except MlflowException as exc:
        raise ModelError(f"no logged model {model_id}: {short_error(exc)}") from None
    repository = checked(client).artifact_repository(model_id, "logged_model")  # its location checked as a run's
    names = {info.path.rsplit("/", 1)[-1] for info in repository.list_artifacts()}
    if names != MODEL_FILES:
        raise ModelError(f"logged model {model_id} holds {sorted(names)}, not exactly {sorted(MODEL_FILES)}: "
                         "not a model of ours, refusing to load it")
    with tempfile.TemporaryDirectory(prefix="grokking-model-") as scratch:
        for name in sorted(MODEL_FILES):
            repository.download_artifacts(name, scratch)
        try:  # the config first, as a whole: a model is built only from one that is ours and fits in memory
            config = config_file(Path(scratch) / CONFIG_FILE, f"the {CONFIG_FILE} of logged model {model_id}")
        except ConfigError as exc:
            raise ModelError(f"{exc}; refusing to load it") from None
        try:
            state = load_file(Path(scratch) / MODEL_FILE)
        except (SafetensorError, ValueError, OSError) as exc:
            raise ModelError(f"logged model {model_id}: {MODEL_FILE} is not a safetensors file of ours "
                             f"({' '.join(str(exc).split())[:120]}); refusing to load it") from None
    model = GrokkingTransformer(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"logged model {model_id} does not fit its config: {short_error(exc)}") from None
    return model.eval()
