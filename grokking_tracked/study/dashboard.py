"""optuna-dashboard over a study's storage, on loopback; and what the dashboard shows of a study: the objective's
name, what the intermediate values are, a note linking the MLflow parent run, a link to each trial's run."""

from __future__ import annotations

import functools
import warnings

import optuna

from .spec import StudyError, StudySpec
from ..tracking.redact import redact
from ..messages import short_error

# Study user attrs (shown by optuna-dashboard, read by anyone with the storage).
PARENT_RUN_URL_ATTR = "mlflow_parent_run_url"
INTERMEDIATE_VALUES_ATTR = "intermediate_values"
# A trial user attr: the trial's run page in the MLflow UI.
RUN_URL_ATTR = "mlflow_run_url"

PRUNE_METRIC_MEANING = {"test_loss": "test loss", "test_error": "test error (1 - test accuracy)"}


def metric_names(spec: StudySpec) -> list[str]:
    """The objective values' names, in the order of ``spec.directions``."""
    return list(spec.target.metric_names)


def run_page_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI of this store (model-training view)."""
    from ..tracking.store import ui_base, ui_link

    return ui_link(ui_base(tracking_uri), experiment_id, run_id=run_id)


def link_trial_run(trial: optuna.Trial, tracking_uri: str, experiment_id: str, run_id: str, notes=None) -> None:
    """The trial's user attr with its run's page, and its dashboard note with the same link (clickable there).
    ``notes``: a ``DashboardNotes`` that writes the note elsewhere; default: here."""
    url = run_page_url(tracking_uri, experiment_id, run_id)
    trial.set_user_attr(RUN_URL_ATTR, url)
    (notes or DashboardNotes.here(trial.study)).save(trial._trial_id, f"[MLflow run {run_id}]({url})")


class DashboardNotes:
    """Writes optuna-dashboard's notes of one study (the study's, a trial's). ``side``: a ``FigureDrawer`` whose
    process writes them, because importing optuna-dashboard takes 1-2 s (it imports scikit-learn) and would hold up
    the study's start and every worker's first trial; without one, they are written here."""

    def __init__(self, storage: str | optuna.storages.BaseStorage, study_name: str, side=None):
        self.storage, self.study_name, self.side = storage, study_name, side

    @classmethod
    def here(cls, study: optuna.Study) -> "DashboardNotes":
        return cls(study._storage, study.study_name)

    def save(self, trial_id: int | None, body: str) -> None:
        """The note of the study (``trial_id`` None) or of one of its trials (Markdown), secrets redacted."""
        body = redact(body)
        if self.side is None:
            save_note(self.storage, self.study_name, trial_id, body)
        else:  # a note that failed to save is no reason to stop: the user attrs hold the same links
            self.side.call(save_note, self.storage, self.study_name, trial_id, body)


def save_note(storage: str | optuna.storages.BaseStorage, study_name: str, trial_id: int | None, body: str) -> None:
    """optuna-dashboard's note of the study (``trial_id`` None) or of one of its trials, unless it says so already."""
    try:
        from optuna_dashboard import get_note, save_note as save_dashboard_note
    except ImportError:  # the dashboard is an optional viewer; the user attrs say the same
        return
    # a RandomSampler: making a Trial object asks the sampler for relative params, which TPE would compute
    study = optuna.load_study(study_name=study_name, storage=_storage(storage), sampler=optuna.samplers.RandomSampler())
    target = study if trial_id is None else optuna.Trial(study, trial_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if get_note(target) != body:
            save_dashboard_note(target, body)


@functools.lru_cache(maxsize=4)
def _storage(storage):
    """One storage per URL in a side process (an engine and its schema check per note would cost ~0.1 s)."""
    return optuna.storages.RDBStorage(storage) if isinstance(storage, str) else storage


def intermediate_values_meaning(spec: StudySpec) -> str:
    """What a trial reports as its intermediate values (Optuna has no API naming them: a study user attr)."""
    if spec.pruner == "none":
        return "none reported (no pruner)"
    return f"{spec.prune_metric}: {PRUNE_METRIC_MEANING[spec.prune_metric]}, every {spec.report_every} steps"


def annotate_study(study: optuna.Study, spec: StudySpec, parent_run_id: str, parent_url: str | None,
                   runs_url: str | None = None, notes: DashboardNotes | None = None) -> None:
    """Name the objectives and the intermediate values, and link the MLflow parent run (a user attr and the
    study's dashboard note, written by ``notes``, default: here). Idempotent: every invocation joining the study
    may call it (Optuna's RDB storage ignores the duplicate insert of invocations starting together: they write the
    same values)."""
    if study.metric_names != metric_names(spec):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metric_names(spec))
    attrs = {INTERMEDIATE_VALUES_ATTR: intermediate_values_meaning(spec)}
    if parent_url:
        attrs[PARENT_RUN_URL_ATTR] = parent_url
    for key, value in attrs.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    (notes or DashboardNotes.here(study)).save(None, study_note(study.study_name, spec, parent_run_id, parent_url,
                                                                 runs_url))


def study_note(study_name: str, spec: StudySpec, parent_run_id: str, parent_url: str | None,
               runs_url: str | None) -> str:
    """The study's note in optuna-dashboard (Markdown)."""
    parent = f"[{parent_run_id}]({parent_url})" if parent_url else f"`{parent_run_id}`"
    lines = [f"## {study_name}", "",
             f"Every trial is an MLflow run nested under the study's parent run {parent} "
             f"(trial user attr `{RUN_URL_ATTR}` links each).", "",
             f"- objective: {', '.join(metric_names(spec))} (minimised)",
             f"- intermediate values: {intermediate_values_meaning(spec)}",
             f"- preset `{spec.preset}`, sampler {spec.sampler}, pruner {spec.pruner}"]
    if runs_url:
        lines.append(f"- all runs: [{runs_url}]({runs_url})")
    return "\n".join(lines)


def serve_dashboard(storage_url: str, port: int, echo=print) -> None:
    """Serve optuna-dashboard over the study storage, bound to 127.0.0.1 (blocks until interrupted)."""
    import optuna_dashboard

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rdb = optuna.storages.RDBStorage(storage_url)
    except Exception as exc:  # noqa: BLE001 - driver errors of every kind become one line
        raise StudyError(f"cannot open the Optuna storage {redact(storage_url)}: {short_error(exc)}") from None
    echo(f"optuna-dashboard on http://127.0.0.1:{port} over {redact(storage_url)}")
    optuna_dashboard.run_server(rdb, host="127.0.0.1", port=port)
