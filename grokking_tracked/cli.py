"""``grokking-tracked``: thin click commands that parse options and call the library.

Heavy modules (torch, mlflow, transformer_lens) are imported inside the commands so that ``--help``
and input errors answer at once. Every error a user can cause ends as one line on stderr.

This is the one place that sets process-wide state (the library leaves the process as it found it): signal
handlers, MLflow's HTTP client settings, the matplotlib backend and Optuna's verbosity (``configure_process``).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from typing import Any

import click

from .config import DEVICES, LR_SCHEDULES, OPERATIONS, PRESETS, STOP_EVENTS, WD_SCHEDULES, ConfigError, UserError
from .messages import short_error

# MLflow's client settings for a command-line process (read from the environment by MLflow; set before it is
# imported). MLflow retries 7 times with exponential back-off by default: minutes before an error, and minutes
# before an outage is noticed; its INFO lines (database migrations) would break our one-line errors.
MLFLOW_CLIENT_ENVIRONMENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # ours shows checkpoint by checkpoint
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # its "🏃 View run" lines when a run ends (we print links)
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}
SYSTEM_METRICS_HELP = ("Also log MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network, "
                       "GPU) every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s (default 10) with MLflow's own "
                       "sampler thread. Off by default; measured cost: ~15 ms of CPU per sample (0.15 % of a core at "
                       "10 s, 1.5 % at 1 s); the default preset's steps/s on and off agreed within noise "
                       "(benchmarks/system_metrics_cost.py).")
TRACKING_URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite + artifacts under ./mlruns/)."


def configure_process(optuna_quiet: bool = False) -> None:
    """Process-wide settings of a command-line process, set once before the work starts."""
    for key, value in MLFLOW_CLIENT_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])  # where mlflow was imported already
    # files, never windows (optuna's figures go through pyplot); the variable, so that matplotlib (~0.4 s) loads
    # only when a figure is drawn, not before the first step
    os.environ["MPLBACKEND"] = "Agg"
    if "matplotlib" in sys.modules:
        sys.modules["matplotlib"].use("Agg")
    if optuna_quiet:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours


def check_spool(tracking_uri: str | None) -> None:
    """The local spool can be made and written, before any run exists (a dangling link there once hung ``run``)."""
    from .tracking.delivery.spool import check_spool as check
    from .tracking.store import resolve_tracking_uri

    check(resolve_tracking_uri(tracking_uri))


def check_names(**names: str | None) -> None:
    """Experiment, run and study names, before anything is created (the rule: config.name_problem)."""
    from .config import name_problem

    for option, name in names.items():
        if name is not None and (problem := name_problem(name)):
            raise UserError(f"--{option.replace('_', '-')} {problem}")


MAX_WORKERS_PER_CORE = 4  # study workers are single-threaded training processes: more than this only thrash


def check_workers(workers: str, lockstep: int | None) -> None:
    """--workers: 'auto' or 1..4 x the CPU cores; --lockstep: 1..MAX_LOCKSTEP (refused before anything loads)."""
    most = MAX_WORKERS_PER_CORE * (os.cpu_count() or 1)
    if workers != "auto" and not (workers.isascii() and workers.isdigit() and 1 <= int(workers) <= most):
        raise UserError(f"--workers expects 'auto' or an integer from 1 to {most} ({MAX_WORKERS_PER_CORE} per CPU "
                        f"core), got {workers!r}")
    from .study.spec import MAX_LOCKSTEP  # (optuna: ~0.3 s, but only after the cheap checks)

    if lockstep is not None and not 1 <= lockstep <= MAX_LOCKSTEP:
        raise UserError(f"--lockstep expects 1 to {MAX_LOCKSTEP} trials trained together, got {lockstep}")


def lone_threads(config=None) -> int:
    """torch threads for a lone `run` or `analyze`: every core this process may use, for a model big enough to gain
    from them (train.default_threads; $GROKKING_TORCH_THREADS wins). A study gives each worker one thread itself."""
    import torch

    from .train import default_threads

    return default_threads(torch.device("cpu"), config, lone=True)


class PlainNumber(click.ParamType):
    """An int or float as typed: ASCII digits, no '_' (click's int and float take '٢٣' and '2_0' as 23 and 20)."""

    def __init__(self, kind: type):
        self.kind, self.name = kind, "integer" if kind is int else "float"  # click's metavars

    def convert(self, value, param, ctx):
        if isinstance(value, str) and (not value.isascii() or "_" in value):
            self.fail(f"{value!r} is not {'an integer' if self.kind is int else 'a number'} written with ASCII "
                      "digits 0-9 and no '_'", param, ctx)
        return (click.INT if self.kind is int else click.FLOAT).convert(value, param, ctx)


INT, FLOAT = PlainNumber(int), PlainNumber(float)


def tracking_uri_option(f):
    return click.option("--tracking-uri", default=None, metavar="URI", help=TRACKING_URI_HELP)(f)


def parse_assignments(pairs: tuple[str, ...]) -> dict[str, str]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects FIELD=VALUE, got {pair!r}")
        values[key.strip().replace("-", "_")] = value.strip()
    return values


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="grokking-tracked")
def cli() -> None:
    """Grokking experiments on modular arithmetic, tracked in MLflow, searched with Optuna."""


@cli.command()
@click.option("--preset", default="default", show_default=True, type=click.Choice(sorted(PRESETS)),
              help="Starting configuration; every option below overrides it.")
@click.option("--p", "p", type=INT, help="Modulus (prime for div).")
@click.option("--operation", type=click.Choice(OPERATIONS))
@click.option("--train-frac", type=FLOAT, help="Fraction of all (a, b) pairs used for training.")
@click.option("--data-seed", type=INT)
@click.option("--lr", type=FLOAT)
@click.option("--weight-decay", type=FLOAT)
@click.option("--seed", type=INT, help="Model initialisation seed.")
@click.option("--d-model", type=INT)
@click.option("--d-mlp", type=INT)
@click.option("--n-heads", type=INT)
@click.option("--n-layers", type=INT)
@click.option("--max-steps", type=INT)
@click.option("--eval-every", type=INT)
@click.option("--batch-size", type=INT, help="Examples per step, reshuffled every epoch (0: full batch).")
@click.option("--checkpoint-every", type=INT, help="Periodic checkpoint interval in steps (0: events and final only).")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES))
@click.option("--wd-schedule", type=click.Choice(WD_SCHEDULES))
@click.option("--curriculum/--no-curriculum", default=None, help="Grow the training set from easy to hard examples.")
@click.option("--grokfast-alpha", type=FLOAT)
@click.option("--grokfast-lambda", type=FLOAT, help="Grokfast EMA gradient filter strength (0: off).")
@click.option("--stop-on-grok/--no-stop-on-grok", default=None,
              help="Stop a short margin after the stop event (default: on).")
@click.option("--stop-after", type=click.Choice(STOP_EVENTS),
              help="The stop event: generalization (default), or cleanup_end (Nanda's clean-up over; needs "
                   "--progress-every).")
@click.option("--progress-every", type=INT,
              help="Steps between live progress measures (restricted/excluded loss, Gini, key frequencies; 0: off).")
@click.option("--device", type=click.Choice(DEVICES), help="auto picks CUDA when available.")
@click.option("--set", "assignments", multiple=True, metavar="FIELD=VALUE", help="Override any config field.")
@click.option("--experiment", default="grokking", show_default=True, help="MLflow experiment name.")
@click.option("--run-name", default=None, help="MLflow run name.")
@click.option("--resume", "resume_run_id", default=None, metavar="RUN_ID",
              help="Continue this run from its last checkpoint (same MLflow run).")
@click.option("--force", is_flag=True, help="With --resume: continue even if the run's lease says another live "
                                            "process is writing it.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--system-metrics", is_flag=True, help=SYSTEM_METRICS_HELP)
@tracking_uri_option
def run(preset: str, assignments: tuple[str, ...], experiment: str, run_name: str | None,
        resume_run_id: str | None, force: bool, progress: bool, system_metrics: bool, tracking_uri: str | None,
        **options: Any) -> None:
    """Train one tracked grokking experiment and print its MLflow run id."""
    overrides = {k: v for k, v in options.items() if v is not None}
    overrides.update(parse_assignments(assignments))
    if resume_run_id:
        unsupported = sorted(set(overrides) - {"max_steps"})
        if unsupported or preset != "default":
            raise UserError("--resume continues a run with its own config; only --max-steps may be given "
                            f"(got {', '.join('--' + k.replace('_', '-') for k in unsupported) or '--preset'})")
        configure_process()
        check_spool(tracking_uri)
        from .tracking import resume_experiment

        outcome = resume_experiment(resume_run_id, tracking_uri, progress=progress,
                                    max_steps=overrides.get("max_steps"), force=force,
                                    log_system_metrics=system_metrics, lone=True)
    else:
        if force:
            raise UserError("--force only applies to --resume")
        from .config import preset as make_preset

        config = make_preset(preset, **overrides)  # validated before anything heavy loads
        check_names(experiment=experiment, run_name=run_name)
        configure_process()
        check_spool(tracking_uri)
        from .tracking.store import prepare

        prepare(tracking_uri)  # an unreachable server fails now; a new store is made beside the imports below
        from .tracking import run_experiment

        outcome = run_experiment(config, tracking_uri, experiment=experiment, run_name=run_name, progress=progress,
                                 tags={"grokking_tracked.preset": preset}, log_system_metrics=system_metrics,
                                 threads=lone_threads(config),
                                 on_run_started=lambda run_id: click.echo(f"started MLflow run {run_id}", err=True))
    click.echo(f"run id: {outcome.run_id}")
    click.echo(outcome.summary())
    local = "" if outcome.tracking_uri.startswith(("http://", "https://")) else " (grokking-tracked ui)"
    click.echo(f"runs: {outcome.runs_url()}{local}")


@cli.command(name="import")
@click.argument("path", type=click.Path(exists=True))
@click.option("--experiment", default="grokking", show_default=True, help="MLflow experiment name.")
@click.option("--run-name", default=None, help="MLflow run name.")
@click.option("--operation", type=click.Choice(OPERATIONS), default="add", show_default=True,
              help="For a bare state dict: the task it was trained on (a run folder's config.json says).")
@click.option("--train-frac", type=FLOAT, default=None, help="For a bare state dict: its training fraction.")
@click.option("--data-seed", type=INT, default=None, help="For a bare state dict: its split's seed.")
@tracking_uri_option
def import_(path: str, experiment: str, run_name: str | None, operation: str, train_frac: float | None,
            data_seed: int | None, tracking_uri: str | None) -> None:
    """Import a run trained elsewhere (the earlier project's run folder, or a TransformerLens HookedTransformer
    state dict of the same 1-layer shape) as an MLflow run that analyze and compare work on."""
    check_names(experiment=experiment, run_name=run_name)
    configure_process()
    check_spool(tracking_uri)
    from .tracking.importing import import_run

    run_id = import_run(path, tracking_uri, experiment=experiment, run_name=run_name, operation=operation,
                        train_frac=train_frac, data_seed=data_seed)
    click.echo(f"run id: {run_id}")


@cli.command()
@click.option("--timeout", type=click.FloatRange(min=0, max=7 * 24 * 3600), default=120.0, show_default=True,
              help="Seconds the whole command may take (connecting, run look-ups, retries of a server that is away, "
                   "uploads); then it stops, says it timed out and exits non-zero. What is not delivered stays in "
                   "the spool.")
@tracking_uri_option
def sync(timeout: float, tracking_uri: str | None) -> None:
    """Deliver what runs left in the local spool while the tracking server was away (or when killed)."""
    configure_process()
    from .tracking.runs import TrackingUndelivered, sync as sync_spools

    report = sync_spools(tracking_uri, timeout, echo=lambda line: click.echo(line, err=True))
    click.echo(f"delivered {report.delivered} operations; {report.pending} pending, {report.set_aside} set aside, "
               f"{len(report.busy)} spools of live processes left alone")
    if not report.complete:
        raise TrackingUndelivered(report.failed[0] if report.failed else
                                  f"{report.pending} operations are still in the spool: the server is away")


@cli.command()
@click.argument("run_id")
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Also keep local copies of the analysis in this directory.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@tracking_uri_option
def analyze(run_id: str, output: str | None, progress: bool, tracking_uri: str | None) -> None:
    """Fetch RUN_ID's checkpoints from the tracking server, analyse them, log the results under analysis/N/."""
    configure_process()
    import torch

    torch.set_num_threads(lone_threads())  # process-wide: this process does nothing else
    from .tracking import analyze_run

    summary = analyze_run(run_id, tracking_uri, output=output, progress=progress)
    fourier, order = summary["fourier"], summary["restricted_loss_falls_before_test_loss"]
    click.echo(f"analysed {summary['n_checkpoints']} checkpoints of run {run_id}: "
               f"key frequencies {fourier['key_frequencies']} ({fourier['basis']} basis), "
               f"restricted loss falls before test loss: {order['answer']}; algorithm: {summary['algorithm']['class']}")


@cli.command()
@click.argument("run_ids", nargs=-1)
@click.option("--experiment", default=None, help="Also every training run of this MLflow experiment.")
@click.option("--group-by", is_flag=False, flag_value="grokking_tracked.config_group", default=None, metavar="KEY",
              help="Group the runs by this tag or param (tags.NAME / params.NAME to say which; given alone: "
                   "grokking_tracked.config_group, the config without its seeds) and draw each group's median with "
                   "a band, plus a table of its event steps (OUTPUT with .csv). Put it after the run ids.")
@click.option("--band", type=click.Choice(["iqr", "minmax"]), default="iqr", show_default=True,
              help="With --group-by: the band around the median (interquartile range, or min-max).")
@click.option("--output", type=click.Path(dir_okay=False), default="comparison.png", show_default=True)
@click.option("--log-to", metavar="RUN_ID", default=None,
              help="Also log the figure (and the table) to this run (comparisons/).")
@tracking_uri_option
def compare(run_ids: tuple[str, ...], experiment: str | None, group_by: str | None, band: str, output: str,
            log_to: str | None, tracking_uri: str | None) -> None:
    """Draw learning curves and progress measures of several runs on shared axes, or (--group-by) each group's
    median curve with a band and its event steps."""
    if not run_ids and experiment is None:
        raise UserError("give run ids, or --experiment NAME")
    configure_process()
    if group_by is None:
        from .tracking import compare_runs

        click.echo(f"wrote {compare_runs(list(run_ids), output, tracking_uri, log_to=log_to, experiment=experiment)}")
        return
    from .tracking.reanalysis import compare_groups

    figure, table_path, table = compare_groups(list(run_ids), output, tracking_uri, experiment=experiment,
                                               group_by=group_by, band=band, log_to=log_to)
    click.echo(table.to_string(index=False, na_rep="-"))
    click.echo(f"wrote {figure} and {table_path}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (127.0.0.1 keeps it private).")
@click.option("--port", default=5000, show_default=True, type=int)
@tracking_uri_option
def ui(host: str, port: int, tracking_uri: str | None) -> None:
    """Serve the MLflow UI over the project's store (and print the links to each experiment's runs)."""
    from .tracking.store import is_remote, local_database, resolve_tracking_uri, runs_view_url

    uri = resolve_tracking_uri(tracking_uri)
    if is_remote(uri):
        from .tracking.redact import without_userinfo

        raise UserError(f"{without_userinfo(uri)} is a tracking server already: open it in a browser")
    database = local_database(uri)
    if database is None or not database.exists():
        raise UserError(f"no MLflow store at {uri} yet: run an experiment first")
    from mlflow import MlflowClient

    base = f"http://{host}:{port}"
    client = MlflowClient(uri)
    for experiment in client.search_experiments():
        if client.search_runs([experiment.experiment_id], max_results=1):
            click.echo(f"{experiment.name}: {runs_view_url(client, experiment.experiment_id, base)}", err=True)
    # The venv's own MLflow (the first `mlflow` on PATH may be another one, or none); one worker and no job
    # runner: a UI for one person (MLflow's defaults start 4 workers and a job queue, ~14 processes).
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
               "--port", str(port), "--default-artifact-root", str(database.parent / "artifacts"), "--workers", "1"]
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                   "MLFLOW_SERVER_JOB_ENABLE_PERIODIC_TASKS": "false"}
    click.echo(f"MLflow UI on {base} over {uri}", err=True)
    os.execve(command[0], command, environment)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--n-trials", type=int, default=None, help="Finished (complete or pruned) trials to reach (default: the spec's).")
@click.option("--timeout", type=float, default=None, help="Stop starting trials after this many seconds (per worker).")
@click.option("--storage", default=None, metavar="URL",
              help="Optuna RDB storage (default: sqlite under ./mlruns/optuna.db); postgresql://... for workers.")
@click.option("--study-name", default=None, help="Study name (default: the spec's); the same name resumes or joins it.")
@click.option("--workers", default="auto", show_default=True, metavar="N|auto",
              help="Worker processes on this machine; auto: one single-threaded worker per CPU core (one per GPU). "
                   "The default SQLite storage serves the workers of one machine; workers on several machines "
                   "need --storage postgresql://...")
@click.option("--lockstep", type=int, default=None, metavar="K",
              help="Train K trials at once in one process (default: the spec's [study] lockstep, else 1).")
@click.option("--dashboard", is_flag=True, help="Serve optuna-dashboard over the storage instead of running trials.")
@click.option("--port", type=int, default=8080, show_default=True, help="Port of --dashboard (bound to 127.0.0.1).")
@click.option("--experiment", default=None, help="MLflow experiment (default: the spec's).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--system-metrics", is_flag=True, help=SYSTEM_METRICS_HELP.replace("Also log", "On every trial's run, log")
              + " Not with --lockstep.")
@tracking_uri_option
def study(spec: str, n_trials: int | None, timeout: float | None, storage: str | None, study_name: str | None,
          workers: str, lockstep: int | None, dashboard: bool, port: int, experiment: str | None, progress: bool,
          system_metrics: bool, tracking_uri: str | None) -> None:
    """Run, resume or join an Optuna study from a TOML spec in studies/; every trial is an MLflow run."""
    check_workers(workers, lockstep)
    check_names(experiment=experiment, study_name=study_name)
    configure_process(optuna_quiet=True)
    from . import study as study_module
    from .tracking.store import prepare

    if dashboard:
        # nothing to close: SIGTERM ends the server at once. Raised as SystemExit (_on_sigterm) while a request
        # is handled, wsgiref's handler catches it (a bare except) and the server kept serving.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        from .study.dashboard import serve_dashboard
        from .study.storage import default_storage
        from .tracking.store import resolve_tracking_uri

        serve_dashboard(storage or default_storage(resolve_tracking_uri(tracking_uri)), port,
                        echo=lambda line: click.echo(line, err=True))
        return
    study_module.load_spec(spec)  # a bad spec is one line before anything is created
    check_spool(tracking_uri)
    prepare(tracking_uri)  # an unreachable server fails now; a new store is made while run_study's modules load
    summary = study_module.run_study(spec, n_trials=n_trials, timeout=timeout, storage=storage,
                                     study_name=study_name, tracking_uri=tracking_uri,
                                     workers=workers if workers == "auto" else int(workers),
                                     experiment=experiment, progress=progress, lockstep=lockstep,
                                     system_metrics=system_metrics,
                                     echo=lambda message: click.echo(message, err=True))
    counts = summary["counts"]
    click.echo(f"parent run id: {summary['parent_run_id']}")
    click.echo(", ".join(f"{k} {v}" for k, v in counts.items()))
    if "best_value" in summary:
        click.echo(f"best trial {summary['best_trial']}: value {summary['best_value']:g}, params {summary['best_params']}")
    if summary.get("runs_url"):
        click.echo(f"runs: {summary['runs_url']}")


def _on_sigterm(signum, frame):
    # Turn SIGTERM into an exception so the open MLflow run ends KILLED instead of staying RUNNING.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    from .messages import configure_logging
    from .tracking.redact import password_of, redact, remember, remember_argv  # (standard library: --help stays light)

    configure_logging(redact)

    # every line we print is redacted of these literally too (a storage's error may quote its URL in any form)
    remember_argv(list(sys.argv[1:] if argv is None else argv))
    remember(password_of(os.environ.get("MLFLOW_TRACKING_URI", "")))
    try:
        _dispatch(argv)
    finally:
        skip_final_collection()


def skip_final_collection() -> None:
    """Called when the command is done: the interpreter's final garbage collections then skip every object
    alive now (torch, mlflow, TransformerLens: millions of them). They took 1-3 s after every command here, with
    nothing left to free that the process's exit does not free; atexit handlers, flushes and the exit code are
    unchanged."""
    gc.freeze()


def _dispatch(argv: list[str] | None) -> None:
    from .tracking.redact import redact

    try:
        cli.main(args=argv, prog_name="grokking-tracked", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("grokking-tracked: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"grokking-tracked: error: {redact(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("grokking-tracked: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        user_error = isinstance(exc, UserError)
        if not user_error and os.environ.get("GROKKING_TRACKED_DEBUG"):
            raise
        message = short_error(exc)
        prefix = "" if user_error else f"{type(exc).__name__}: "
        click.echo(f"grokking-tracked: error: {prefix}{redact(message)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
