"""Scale-out rehearsal (issue 11): one `mlflow server` with a PostgreSQL backend store and proxied artifacts, one
PostgreSQL Optuna storage, and 1, 2, 4, 8 workers started as separate `grokking-tracked study` invocations, as
separate machines would be. Prints trials/hour and errors for each.

    python benchmarks/scale_out.py                       # 1,2,4,8 invocations, 16 trials each round
    python benchmarks/scale_out.py --invocations 1,2 --trials 8

Needs PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres). Each round is a fresh study on the same server
and storage; an invocation runs one single-threaded worker (`--workers 1`), as one small machine would. On this
2-core machine more than 2 invocations share the cores: the table shows where throughput stops growing here, and
that nothing is lost or doubled when many workers join one study.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _machine import describe

SPEC = """
[study]
name = "scale"
experiment = "scale-out"
n_trials = 16
heartbeat_interval = 5
grace_period = 20

[task]
p = 31
d_model = 32
d_mlp = 128
max_steps = 300
eval_every = 10
checkpoint_every = 0
stop_margin = 0

[search]
lr = { type = "float", low = 3e-3, high = 3e-2, log = true }
weight_decay = { type = "float", low = 0.3, high = 3.0, log = true }
train_frac = { type = "float", low = 0.4, high = 0.8 }

[sampler]
name = "random"

[pruner]
name = "none"
"""


def create_database(name: str) -> str:
    import psycopg

    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def start_server(backend: str, artifacts: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                                "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                                "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return process, url
        except requests.RequestException:
            pass
        if process.poll() is not None:
            raise SystemExit("mlflow server exited")
        time.sleep(0.5)
    raise SystemExit("mlflow server did not come up")


def one_round(invocations: int, trials: int, storage: str, server: str, workdir: Path) -> dict:
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    name = f"scale_{invocations}_{uuid.uuid4().hex[:6]}"
    spec = workdir / f"{name}.toml"
    spec.write_text(SPEC.replace('name = "scale"', f'name = "{name}"').replace("n_trials = 16", f"n_trials = {trials}"))
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "GROKKING_TORCH_THREADS": "1",
           "GROKKING_TRACKED_SPOOL": str(workdir / "spool")}
    command = [sys.executable, "-m", "grokking_tracked", "study", str(spec), "--storage", storage,
               "--tracking-uri", server, "--workers", "1", "--no-progress"]
    started = time.perf_counter()
    processes = [subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for _ in range(invocations)]
    errors = [p.communicate()[1].strip().splitlines()[-1:] for p in processes]
    wall = time.perf_counter() - started
    failed_invocations = [e for p, e in zip(processes, errors) if p.returncode != 0]
    study = optuna.load_study(study_name=name, storage=storage)
    states = [t.state for t in study.get_trials()]
    finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("scale-out")
    runs = client.search_runs([experiment.experiment_id], f"tags.`optuna.study_name` = '{name}'", max_results=1000)
    children = [r for r in runs if r.data.tags.get("grokking_tracked.role") == "trial"]
    run_ids = [t.user_attrs.get("mlflow_run_id") for t in study.get_trials()]
    return {"invocations": invocations, "wall": wall, "finished": finished, "failed_trials": states.count(TrialState.FAIL),
            "trials_per_hour": 3600 * finished / wall, "failed_invocations": failed_invocations,
            "runs": len(children), "running_runs": sum(r.info.status == "RUNNING" for r in runs),
            "runs_once": len(set(run_ids)) == len(run_ids) == len(children)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--invocations", default="1,2,4,8")
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    print("machine:", describe())
    tag = uuid.uuid4().hex[:8]
    databases = [f"gt_scale_mlflow_{tag}", f"gt_scale_optuna_{tag}"]
    workdir = Path(tempfile.mkdtemp(prefix="scale-out-"))
    server = None
    try:
        backend, storage = (create_database(name) for name in databases)
        server, url = start_server(backend, workdir / "artifacts")
        print(f"mlflow server {url} (PostgreSQL backend, proxied artifacts), Optuna storage {storage}", flush=True)
        rows = []
        for n in (int(x) for x in args.invocations.split(",")):
            row = one_round(n, args.trials, storage, url, workdir)
            rows.append(row)
            print(f"  {n} invocation(s): {row['finished']} trials finished in {row['wall']:.0f} s = "
                  f"{row['trials_per_hour']:.0f} trials/hour; failed trials {row['failed_trials']}, failed "
                  f"invocations {len(row['failed_invocations'])}, MLflow child runs {row['runs']} (each trial once: "
                  f"{row['runs_once']}), runs left RUNNING {row['running_runs']}", flush=True)
        print("invocations | trials/hour | finished | failed trials | runs once | RUNNING left")
        for row in rows:
            print(f"{row['invocations']:>11} | {row['trials_per_hour']:>11.0f} | {row['finished']:>8} | "
                  f"{row['failed_trials']:>13} | {str(row['runs_once']):>9} | {row['running_runs']:>12}")
    finally:
        if server is not None:
            os.killpg(server.pid, 9)
            server.wait()
        for name in databases:
            drop_database(name)
        shutil.rmtree(workdir, ignore_errors=True)
    print("machine at the end:", describe())


if __name__ == "__main__":
    main()
