"""Trust: a tracking server cannot make us write on this machine, and no secret lands in what we write.

A real ``mlflow server`` behind ``faultproxy.FaultProxy``, which rewrites the server's ``runs/get`` answers after a
run was created truthfully (``artifact_uri`` -> a local folder, ``runs:/``, ``models:/``); a real PostgreSQL
storage reached with a URL that carries a password (the role has that password; loopback trust auth accepts it).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow import MlflowClient

from conftest import PG_DSN, run_cli
from faultproxy import FaultProxy

CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
TASK = ["--p", "23", "--d-model", "32", "--d-mlp", "64", "--max-steps", "40", "--eval-every", "10",
        "--checkpoint-every", "20", "--no-progress"]
REFUSAL = "refusing to read or write there"


@pytest.fixture
def proxy(mlflow_server):
    with FaultProxy(mlflow_server) as fault_proxy:
        yield fault_proxy


def lie_about_artifacts(location: str):
    """A ``runs/get`` answer rewritten to name ``location`` as the run's artifact location."""
    def lie(body: bytes) -> bytes:
        answer = json.loads(body)
        if "run" in answer:
            answer["run"]["info"]["artifact_uri"] = location
        return json.dumps(answer).encode()
    return lie


def files_in(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def new_experiment(client: MlflowClient, prefix: str) -> tuple[str, str]:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    return name, client.create_experiment(name)


# ---------------------------------------------------------------------------------------------- one checked path
@pytest.mark.parametrize("kind", ["file", "bare", "runs", "models"])
def test_every_transfer_refuses_a_location_the_server_names_after_creating_the_run(mlflow_server, proxy, tmp_path,
                                                                                   kind, monkeypatch):
    from grokking_tracked.tracking.fetch import RunArtifacts
    from grokking_tracked.tracking.runs import TrackedRun
    from grokking_tracked.tracking.store import TrackingError, connect

    server = MlflowClient(mlflow_server)
    _, experiment_id = new_experiment(server, "liar")
    run_id = server.create_run(experiment_id).info.run_id  # created truthfully
    victim = tmp_path / "victim"
    victim.mkdir()
    location = {"file": victim.as_uri(), "bare": str(victim), "runs": f"runs:/{run_id}/x",
                "models": "models:/victim/1"}[kind]
    proxy.rewrite_responses("/runs/get", lie_about_artifacts(location))
    payload = tmp_path / "payload.txt"
    payload.write_text("payload")
    client = connect(proxy.url)
    transfers = {  # what the outbox, analyze's images and uploads, fetch and --resume use
        "log_artifact": lambda: client.log_artifact(run_id, str(payload), "a"),
        "log_text": lambda: client.log_text(run_id, "text", "b/text.txt"),
        "log_image": lambda: client.log_image(run_id, __import__("numpy").zeros((4, 4, 3), "uint8"), key="k", step=1,
                                              synchronous=True),
        "list_artifacts": lambda: client.list_artifacts(run_id),
        "download_artifacts": lambda: client.download_artifacts(run_id, "a/payload.txt", str(tmp_path)),
        "RunArtifacts": lambda: RunArtifacts(MlflowClient(proxy.url), run_id),  # a plain client is checked too
        "reopen": lambda: TrackedRun.reopen(MlflowClient(proxy.url), run_id),
    }
    for name, transfer in transfers.items():
        with pytest.raises(TrackingError, match=REFUSAL):
            transfer()
            pytest.fail(f"{name} was not refused")
    assert proxy.stats["rewritten"] >= len(transfers)
    assert files_in(victim) == []
    assert server.get_run(run_id).info.status == "RUNNING"  # the refused reopen changed nothing
    assert server.list_artifacts(run_id) == []

    if kind == "file":  # the documented opt-in accepts it: the lie was a real way to write here
        monkeypatch.setenv("GROKKING_TRACKED_TRUST_LOCAL_ARTIFACTS", "1")
        connect(proxy.url).log_artifact(run_id, str(payload), "a")
        assert files_in(victim) == ["a", "a/payload.txt"]


def test_run_refuses_a_server_that_names_a_local_folder_after_creating_the_run(mlflow_server, proxy, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    proxy.rewrite_responses("/runs/get", lie_about_artifacts(victim.as_uri()))
    experiment = f"liar-run-{uuid.uuid4().hex[:8]}"
    result = run_cli("run", *TASK, "--tracking-uri", proxy.url, "--experiment", experiment, cwd=tmp_path,
                     env=CLIENT_ENV)
    assert result.returncode != 0
    lines = stderr_lines(result)
    assert len(lines) == 1 and REFUSAL in lines[0], lines
    assert files_in(victim) == []
    server = MlflowClient(mlflow_server)
    runs = server.search_runs([server.get_experiment_by_name(experiment).experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]  # created, refused, ended: never left RUNNING
    assert server.list_artifacts(runs[0].info.run_id) == []


def test_sync_refuses_a_server_that_names_a_local_folder_and_keeps_the_spool(mlflow_server, proxy, tmp_path,
                                                                             monkeypatch):
    from grokking_tracked.tracking.runs import DELIVERY_WAIT_ENV, TrackedRun, TrackingUndelivered

    for key, value in CLIENT_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(DELIVERY_WAIT_ENV, "1")
    experiment = f"liar-sync-{uuid.uuid4().hex[:8]}"
    run = TrackedRun.create(MlflowClient(proxy.url), experiment)
    proxy.blackout("reset")  # the server goes away: what follows stays in the run's spool
    run.log_values({"x": 1.0}, step=0)
    run.log_text("hello", "notes/hello.txt")
    with pytest.raises(TrackingUndelivered):
        run.end("FINISHED")
    proxy.restore()
    victim = tmp_path / "victim"
    victim.mkdir()
    proxy.rewrite_responses("/runs/get", lie_about_artifacts(victim.as_uri()))

    refused = run_cli("sync", "--timeout", "10", "--tracking-uri", proxy.url, cwd=tmp_path, env=CLIENT_ENV)
    assert refused.returncode != 0
    lines = stderr_lines(refused)
    assert len(lines) == 1 and REFUSAL in lines[0] and run.run_id in lines[0], lines
    assert files_in(victim) == []
    server = MlflowClient(mlflow_server)
    assert server.get_run(run.run_id).info.status == "FAILED"  # not left RUNNING
    assert server.list_artifacts(run.run_id) == [] and not server.get_run(run.run_id).data.metrics

    proxy.rewrite_responses("/runs/get", lambda body: body)  # the server tells the truth again: nothing was lost
    synced = run_cli("sync", "--timeout", "30", "--tracking-uri", proxy.url, cwd=tmp_path, env=CLIENT_ENV)
    assert synced.returncode == 0, synced.stderr
    after = server.get_run(run.run_id)
    assert after.info.status == "FINISHED" and after.data.metrics == {"x": 1.0}
    assert [info.path for info in server.list_artifacts(run.run_id, "notes")] == ["notes/hello.txt"]


# ---------------------------------------------------------------------------------------------- no secrets
def with_password(url: str, user: str, password: str) -> str:
    """``url`` with ``user:password`` in it, the password percent-encoded only where a URL must (``'``, ``:`` and
    the sub-delimiters stay raw, as a user types them): what MLflow and SQLAlchemy both decode back."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{quote(password, safe=URL_RAW)}@{rest.split('@', 1)[-1]}"


URL_RAW = "'!$&()*+,;=:~"


def hard_password() -> tuple[str, tuple[str, str]]:
    """A password holding every character that splits a naive redaction (quotes, ``@``, ``:``, ``/``, ...) between
    two random markers; a byte that carries either marker carries (part of) the password."""
    head, tail = uuid.uuid4().hex[:16], uuid.uuid4().hex[:16]
    return f"P{head}'\"@:/!$&()*+,;=?#% \\{tail}", (head, tail)


def files_holding(markers, *roots: Path) -> list[str]:
    """Every file under ``roots`` whose bytes hold one of ``markers``."""
    return [str(path) for root in roots for path in Path(root).rglob("*") if path.is_file()
            and any(marker.encode() in path.read_bytes() for marker in markers)]


def server_root(tmp_path_factory) -> Path:
    """The session MLflow server's folder: its SQLite store and its artifacts (conftest.mlflow_server)."""
    return next(Path(tmp_path_factory.getbasetemp()).glob("mlflow-server*"))


def spool_root() -> Path:
    return Path(os.environ["GROKKING_TRACKED_SPOOL"])


def everything_written(client: MlflowClient, run_id: str, scratch: Path) -> str:
    """All text of a run: its name, tags, params and every artifact (downloaded)."""
    run = client.get_run(run_id)
    parts = [run.info.run_name or "", json.dumps(run.data.tags), json.dumps(run.data.params)]
    if client.list_artifacts(run_id):
        (scratch / run_id).mkdir(parents=True)
        local = Path(client.download_artifacts(run_id, "", str(scratch / run_id)))
        parts += [p.read_bytes().decode("utf-8", "replace") for p in local.rglob("*") if p.is_file()]
    return "\n".join(parts)


def test_redact_hides_passwords_in_uris_secret_options_and_assignments():
    from grokking_tracked.tracking.redact import redact

    line = ("grokking-tracked study s.toml --tracking-uri http://me:pa@ss@host:5000 --storage "
            "postgresql://me:pw1@db:5432/optuna?sslmode=require --set note=https://h/x?token=tk2 "
            "--password pw3 --api-key=pw4 --remote https://ghp_tok5@github.com/x.git --p 97")
    redacted = redact(line)
    for secret in ("pa@ss", "pw1", "tk2", "pw3", "pw4", "ghp_tok5"):
        assert secret not in redacted
    assert "http://me:***@host:5000" in redacted and "postgresql://me:***@db:5432/optuna?sslmode=require" in redacted
    assert "https://***@github.com/x.git" in redacted and redacted.endswith("--p 97")
    harmless = "sqlite:////tmp/x/mlflow.db mlflow-artifacts:/1/2/artifacts postgresql://postgres@127.0.0.1:5432/db"
    assert redact(harmless) == harmless


def test_structural_redaction_keeps_what_is_not_a_secret():
    from grokking_tracked.tracking.redact import redact, redact_argv, without_userinfo

    for harmless in ("sqlite:////tmp/a:b@c/mlflow.db", "file:///x:y@z", "postgresql://postgres@127.0.0.1:5432/db",
                     "http://127.0.0.1:5000", "mlflow-artifacts:/1/2/artifacts"):
        assert redact(harmless) == harmless and redact_argv([harmless]) == [harmless]
    assert redact("postgresql://u:p'w@h:5432/db?sslmode=require&password=x'y") == \
        "postgresql://u:***@h:5432/db?sslmode=require&password=***"
    assert without_userinfo("http://u:p'w@h:5000/x?token=abc") == "http://h:5000/x?token=***"


@pytest.mark.parametrize("encoded", [True, False], ids=["percent-encoded", "raw"])
def test_the_command_tag_holds_no_piece_of_a_password_with_quotes(encoded):
    """Each argv element is redacted before it is shell-quoted: quoting first split a password holding ``'``
    (``'pa'"'"'ss'``) into pieces no redaction recognised."""
    from grokking_tracked.tracking.provenance import command_line
    from grokking_tracked.tracking.redact import redact

    password, markers = hard_password()
    def uri(base, user):
        return with_password(base, user, password) if encoded else f"{base.replace('://', f'://{user}:{password}@')}"
    tracking, storage = uri("http://127.0.0.1:5000", "alice"), uri("postgresql://127.0.0.1:5432/optuna", "bob")
    argv = ["grokking-tracked", "study", "s.toml", "--tracking-uri", tracking, f"--storage={storage}",
            "--storage", storage, "--set", f"note={tracking}", "--password", password, f"--api-key={password}"]
    line = redact(command_line(argv))  # as TrackedRun writes the tag
    assert not any(marker in line for marker in markers), line
    assert "--tracking-uri 'http://alice:***@127.0.0.1:5000'" in line and "--password ***" in line.replace("'", "")


def test_every_tag_param_and_text_a_tracked_run_writes_is_redacted(mlflow_server, tmp_path):
    from mlflow.entities import Param

    from grokking_tracked.tracking.runs import TrackedRun

    password = f"Pw-{uuid.uuid4().hex}"
    secret_uri = f"postgresql://carol:{password}@db:5432/optuna"
    with TrackedRun.create(MlflowClient(mlflow_server), f"secret-tags-{uuid.uuid4().hex[:8]}",
                           run_name=f"with {secret_uri}", tags={"storage": secret_uri},
                           params=[Param("where", secret_uri)], artifacts={"opening.json": {"storage": secret_uri}},
                           leased=False) as run:
        run.set_tags({"later": f"--token {password}"})
        run.log_params({"later_param": f"https://h/x?password={password}"})
        run.log_text(f"see {secret_uri}", "notes/text.txt")
        run.log_dict({"uri": secret_uri}, "notes/dict.json")
    written = everything_written(MlflowClient(mlflow_server), run.run_id, tmp_path)
    assert "postgresql://carol:***@db:5432/optuna" in written and "--token ***" in written
    assert password not in written


def test_no_password_of_the_tracking_uri_lands_in_a_run(mlflow_server, tmp_path, tmp_path_factory):
    password, markers = hard_password()
    experiment = f"secret-run-{uuid.uuid4().hex[:8]}"
    secret_uri = with_password(mlflow_server, "alice", password)
    assert "'" in secret_uri  # the character that split the shell-quoted command tag
    result = run_cli("run", *TASK, "--tracking-uri", secret_uri,
                     "--experiment", experiment, cwd=tmp_path, env=CLIENT_ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    server = MlflowClient(mlflow_server)
    runs = server.search_runs([server.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    written = everything_written(server, runs[0].info.run_id, tmp_path / "written")
    assert "--tracking-uri 'http://alice:***@" in written  # the command line is kept, its password is not
    assert not any(marker in written for marker in markers)
    assert not any(marker in result.stdout + result.stderr for marker in markers)
    analyzed = run_cli("analyze", runs[0].info.run_id, "--no-progress", f"--tracking-uri={secret_uri}",
                       cwd=tmp_path, env=CLIENT_ENV)  # the --option=VALUE spelling
    assert analyzed.returncode == 0, analyzed.stderr[-2000:]
    written = everything_written(server, runs[0].info.run_id, tmp_path / "analyzed")
    assert "analysis.1.provenance" in written and "'--tracking-uri=http://alice:***@" in written
    assert not any(marker in written for marker in markers)
    images = [info.path for info in server.list_artifacts(runs[0].info.run_id, "images")]
    assert images and all(path.startswith("images/") for path in images)  # step images came through the outbox
    assert not any(marker in analyzed.stdout + analyzed.stderr for marker in markers)
    # every byte on disk: the server's store and artifacts, the spool, the working directory
    assert files_holding(markers, server_root(tmp_path_factory), spool_root(), tmp_path) == []


@pytest.mark.parametrize("where", ["run --tracking-uri", "study --storage", "study --storage unparsable"])
def test_no_password_reaches_an_error_line(tmp_path, where):
    """A server or storage that cannot be reached, or a URL its library cannot parse, whose message quotes it."""
    password, markers = hard_password()
    spec = tmp_path / "study.toml"
    spec.write_text(STUDY.format(name="s", experiment="e"))
    if where == "run --tracking-uri":
        args = ["run", *TASK, "--tracking-uri", with_password("http://127.0.0.1:9", "alice", password)]
    elif where == "study --storage":
        args = ["study", str(spec), "--workers", "1", "--storage",
                with_password("postgresql://127.0.0.1:9/db", "bob", password)]
    else:  # the raw password: SQLAlchemy's parse error quotes the whole URL
        args = ["study", str(spec), "--workers", "1", "--storage", f"postgresql://bob:{password}@h:x/db"]
    result = run_cli(*args, cwd=tmp_path, env=CLIENT_ENV, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("grokking-tracked: error:"), result.stderr[-2000:]
    assert not any(marker in result.stdout + result.stderr for marker in markers), result.stderr
    assert files_holding(markers, tmp_path) == []


@pytest.fixture
def postgres_url_with_password(postgres_url):
    """``postgres_url``'s database, reached as a role that has a password, with that password in the URL."""
    import psycopg

    from psycopg import sql

    role, (password, markers) = f"gt_secret_{uuid.uuid4().hex[:8]}", hard_password()
    database = postgres_url.rsplit("/", 1)[1]
    with psycopg.connect(dbname="postgres", autocommit=True, **PG_DSN) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
        admin.execute(f'ALTER DATABASE "{database}" OWNER TO {role}')
    yield with_password(f"postgresql://{PG_DSN['host']}:{PG_DSN['port']}/{database}", role, password), markers
    with psycopg.connect(dbname="postgres", autocommit=True, **PG_DSN) as admin:
        admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
        admin.execute(f'ALTER DATABASE "{database}" OWNER TO {PG_DSN["user"]}')
    with psycopg.connect(dbname=database, autocommit=True, **PG_DSN) as owner:  # DROP OWNED acts per database
        owner.execute(f"DROP OWNED BY {role}")
    with psycopg.connect(dbname="postgres", autocommit=True, **PG_DSN) as admin:
        admin.execute(f"DROP ROLE {role}")


STUDY = """
[study]
name = "{name}"
experiment = "{experiment}"
n_trials = 1

[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 40
eval_every = 10
checkpoint_every = 0

[search]
lr = {{ type = "float", low = 3e-3, high = 3e-2, log = true }}

[sampler]
name = "random"
seed = 1
"""


def test_no_password_of_the_storage_or_tracking_uri_lands_in_a_study(mlflow_server, postgres_url_with_password,
                                                                     tmp_path, tmp_path_factory):
    import psycopg

    storage, storage_markers = postgres_url_with_password
    tracking_password, tracking_markers = hard_password()
    name, experiment = f"secret_{uuid.uuid4().hex[:8]}", f"secret-study-{uuid.uuid4().hex[:8]}"
    spec = tmp_path / "study.toml"
    spec.write_text(STUDY.format(name=name, experiment=experiment))
    result = run_cli("study", str(spec), "--workers", "1", "--no-progress", "--storage", storage,
                     "--tracking-uri", with_password(mlflow_server, "bob", tracking_password), cwd=tmp_path,
                     env={**CLIENT_ENV, "GROKKING_TORCH_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    secrets = (*storage_markers, *tracking_markers)

    server = MlflowClient(mlflow_server)
    runs = server.search_runs([server.get_experiment_by_name(experiment).experiment_id])
    roles = sorted(run.data.tags.get("grokking_tracked.role") for run in runs)
    assert roles == ["study", "trial"], roles
    for run in runs:
        written = everything_written(server, run.info.run_id, tmp_path / "written")
        assert not any(secret in written for secret in secrets), run.data.tags
    parent = next(run for run in runs if run.data.tags["grokking_tracked.role"] == "study")
    assert "postgresql://" in parent.data.tags["optuna.storage"] and ":***@" in parent.data.tags["optuna.storage"]

    # every row of every table of the Optuna storage: user attrs, system attrs, optuna-dashboard's notes
    with psycopg.connect(dbname=storage.rsplit("/", 1)[1], **PG_DSN) as connection:
        tables = [row[0] for row in connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
        stored = "\n".join(json.dumps(row[0]) for table in tables
                           for row in connection.execute(f'SELECT row_to_json(t) FROM "{table}" t'))
    assert "mlflow_run_url" in stored and "mlflow_parent_run_url" in stored  # the links are there...
    assert not any(secret in stored for secret in secrets)  # ...without credentials
    assert not any(secret in result.stdout + result.stderr for secret in secrets)
    # every byte on disk: the server's store and artifacts, the spool (figures included), the working directory
    assert files_holding(secrets, server_root(tmp_path_factory), spool_root(), tmp_path) == []
