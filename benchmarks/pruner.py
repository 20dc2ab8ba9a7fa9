"""The grokking-aware pruner measured (issue 29 item 5): the same study with no pruner, Optuna's median pruner and
``[pruner] name = "grokking"``, each repeated with the same sampler seeds.

    python benchmarks/pruner.py [--spec studies/fastest_grokking.toml] [--n-trials 30] [--repetitions 2]
                                [--progress-every 100] [--pruners none median grokking] [--keep DIR]

For every repetition r the three studies share the spec's task, search space and step budget, and the sampler seed
(the spec's seed + r); only the [pruner] table differs (the median pruner keeps the spec's own arguments, or Optuna's
defaults). Each study runs the documented command (`grokking-tracked study SPEC --n-trials N --workers 1`) in a fresh
directory with the embedded stores; ``--progress-every`` is set in all three so the collapse fraction the grokking
pruner reads costs every study the same. Printed per study, read back from its Optuna storage:

- wall: the study command's wall time; best: the best value; to best: seconds from the first trial's start until a
  trial first reached that best value; to ref: until a trial first reached the no-pruner study's best value of the
  same repetition (or "never");
- steps: training steps of all its trials; to ref (steps): steps spent, in the order trials finished, until a trial
  first reached the no-pruner study's best value: the load-independent cost of reaching it;
- pruned, false prunes: each pruned trial re-trained (in process, untracked) to its full budget with its params;
  a false prune is one that then generalises.

Nothing here is asserted in the test suite; the goal stated in the issue (>= 2x less wall time to the same best
value than no pruner, fewer false prunes than the median pruner) is to be checked against what it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _machine import describe

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # re-train the pruned trials with this tree's code, as its studies ran
PRUNER_TABLES = {
    "none": {"name": '"none"'},
    "median": None,  # the spec's own [pruner] table when it names the median pruner, else Optuna's defaults
    "grokking": {"name": '"grokking"', "report_every": "50"},
}


def sections(text: str) -> list[tuple[str, list[str]]]:
    """The spec's lines grouped by TOML table ("" for the lines before the first table)."""
    groups: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        match = re.match(r"\s*\[([A-Za-z_]+)\]", line)
        if match:
            groups.append((match.group(1), [line]))
        else:
            groups[-1][1].append(line)
    return groups


def key_of(line: str) -> str | None:
    match = re.match(r"\s*([A-Za-z_]+)\s*=", line)
    return match.group(1) if match else None


def rewrite(text: str, overrides: dict[str, dict[str, str]], replace: set[str]) -> str:
    """The spec with ``overrides[table][key] = value`` (TOML literals) set; tables in ``replace`` keep only the
    overridden keys."""
    out, seen = [], set()
    for table, lines in sections(text):
        seen.add(table)
        values = overrides.get(table, {})
        if table in replace:
            lines = lines[:1]
        kept = [line for line in lines if key_of(line) not in values]
        out += kept + [f"{key} = {value}" for key, value in values.items()]
    for table, values in overrides.items():
        if table not in seen:
            out += [f"[{table}]"] + [f"{key} = {value}" for key, value in values.items()]
    return "\n".join(out) + "\n"


def study_spec(base: str, pruner: str, name: str, seed: int, n_trials: int, progress_every: int) -> str:
    table = PRUNER_TABLES[pruner]
    own = dict(sections(base)).get("pruner", [])
    if table is None:
        median_own = any(key_of(line) == "name" and '"median"' in line for line in own)
        table = {"name": '"median"'} if not median_own else {}
        replace = set() if median_own else {"pruner"}
    else:
        replace = {"pruner"}
    overrides = {"study": {"name": f'"{name}"', "n_trials": str(n_trials)}, "sampler": {"seed": str(seed)},
                 "task": {"progress_every": str(progress_every)}, "pruner": table}
    return rewrite(base, overrides, replace)


def parse_time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def read_study(database: Path) -> list[dict]:
    with sqlite3.connect(database) as db:
        rows = db.execute("select t.trial_id, t.number, t.state, t.datetime_start, t.datetime_complete, v.value "
                          "from trials t left join trial_values v using (trial_id) order by t.number").fetchall()
        params = db.execute("select trial_id, param_name, param_value, distribution_json from trial_params").fetchall()
        final_steps = dict(db.execute("select trial_id, value_json from trial_user_attributes "
                                      "where key = 'final_step'").fetchall())
        reported = dict(db.execute("select trial_id, max(step) from trial_intermediate_values group by trial_id")
                        .fetchall())
        decisions = dict(db.execute("select trial_id, value_json from trial_user_attributes "
                                    "where key = 'pruner_decisions'").fetchall())
    by_trial: dict[int, dict] = {}
    for trial_id, name, value, distribution in params:
        # Optuna stores an internal representation: ints and floats as floats, categoricals as choice indices
        by_trial.setdefault(trial_id, {})[name] = (value, distribution)
    # steps trained: a finished trial's final_step; a pruned one stopped at its last report
    steps = {trial_id: int(json.loads(final_steps[trial_id])) if trial_id in final_steps
             else int(reported.get(trial_id) or 0) for trial_id, *_ in rows}
    return [{"id": r[0], "number": r[1], "state": r[2], "start": r[3], "complete": r[4], "value": r[5],
             "params": by_trial.get(r[0], {}), "steps": steps[r[0]],
             "decisions": json.loads(decisions[r[0]]) if r[0] in decisions else []} for r in rows]


def external_params(raw: dict) -> dict:
    import optuna

    return {name: optuna.distributions.json_to_distribution(dist).to_external_repr(value)
            for name, (value, dist) in raw.items()}


def seconds_to(trials: list[dict], target: float | None, origin: float) -> float | None:
    if target is None:
        return None
    reached = [parse_time(t["complete"]) for t in trials
               if t["state"] == "COMPLETE" and t["value"] is not None and t["value"] <= target and t["complete"]]
    return min(reached) - origin if reached else None


def steps_to(trials: list[dict], target: float | None) -> int | None:
    """Training steps spent, over the trials in the order they finished, until a trial first reached ``target``:
    the load-independent cost of reaching it (wall time on a shared 2-core machine is not)."""
    if target is None:
        return None
    spent = 0
    for trial in sorted((t for t in trials if t["complete"]), key=lambda t: parse_time(t["complete"])):
        spent += trial["steps"]
        if trial["state"] == "COMPLETE" and trial["value"] is not None and trial["value"] <= target:
            return spent
    return None


def false_prunes(spec_path: Path, trials: list[dict]) -> tuple[int, int]:
    """(pruned trials, of which generalise when re-trained to their full budget); prints each false prune with the
    rule that pruned it (the grokking pruner's) and the step it generalised at."""
    from grokking_tracked.study.spec import load_spec
    from grokking_tracked.train import Trainer

    spec = load_spec(spec_path)
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    generalised = 0
    for trial in pruned:
        config = spec.base_config().replace(**external_params(trial["params"]))
        result = Trainer(config, progress=False, threads=1).train()
        generalised += result.grokked
        if result.grokked:
            last = trial["decisions"][-1] if trial["decisions"] else {}
            print(f"    false prune: trial {trial['number']} pruned after {trial['steps']} steps"
                  f"{' by ' + last['rule'] + ' (' + last['reason'] + ')' if last else ''}; generalised at "
                  f"{result.step_of('generalization')} when re-trained", flush=True)
    return len(pruned), generalised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=ROOT / "studies" / "fastest_grokking.toml")
    parser.add_argument("--n-trials", type=int, default=30)
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--progress-every", type=int, default=100)
    parser.add_argument("--pruners", nargs="+", default=list(PRUNER_TABLES), choices=list(PRUNER_TABLES))
    parser.add_argument("--no-false-prunes", action="store_true", help="skip re-training the pruned trials")
    parser.add_argument("--keep", type=Path, help="keep every study's store under this directory")
    args = parser.parse_args()
    base = args.spec.read_text()
    base_seed = next((int(v) for line in dict(sections(base)).get("sampler", [])
                      if key_of(line) == "seed" for v in [line.split("=", 1)[1].split("#")[0].strip()]), 0)
    print("machine:", describe(), flush=True)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(ROOT),
           "GROKKING_TORCH_THREADS": os.environ.get("GROKKING_TORCH_THREADS", "1")}
    print(f"{'rep':>3} {'pruner':>9} {'wall s':>8} {'best':>8} {'to best s':>9} {'to ref s':>9} {'steps':>7} "
          f"{'to ref':>7} {'complete':>8} {'pruned':>6} {'false':>5}", flush=True)
    for rep in range(args.repetitions):
        reference = None
        for pruner in args.pruners:
            scratch = Path(tempfile.mkdtemp(prefix=f"pruner-{pruner}-{rep}-", dir=args.keep))
            name = f"pruner_{pruner}_{rep}"
            spec_path = scratch / f"{name}.toml"
            spec_path.write_text(study_spec(base, pruner, name, base_seed + rep, args.n_trials, args.progress_every))
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "grokking_tracked", "study", str(spec_path), "--n-trials",
                                   str(args.n_trials), "--workers", "1", "--no-progress"], cwd=scratch, env=env,
                                  capture_output=True, text=True)
            wall = time.perf_counter() - started
            if done.returncode:
                print(f"{rep:>3} {pruner:>9} failed ({done.returncode}): {done.stderr[-1500:]}", flush=True)
                continue
            trials = read_study(scratch / "mlruns" / "optuna.db")
            values = [t["value"] for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
            best = min(values) if values else None
            if pruner == "none":
                reference = best
            origin = min(parse_time(t["start"]) for t in trials if t["start"])
            to_best, to_ref = seconds_to(trials, best, origin), seconds_to(trials, reference, origin)
            n_pruned, n_false = (sum(t["state"] == "PRUNED" for t in trials), None) if args.no_false_prunes \
                else false_prunes(spec_path, trials)

            def show(x, fmt):
                return "never" if x is None else format(x, fmt)

            print(f"{rep:>3} {pruner:>9} {wall:>8.1f} {show(best, '8.0f'):>8} {show(to_best, '9.1f'):>9} "
                  f"{show(to_ref, '9.1f'):>9} {sum(t['steps'] for t in trials):>7} "
                  f"{show(steps_to(trials, reference), 'd'):>7} {len(values):>8} {n_pruned:>6} {show(n_false, 'd'):>5}"
                  f"  (store: {scratch})", flush=True)
    print("machine at the end:", describe())


if __name__ == "__main__":
    main()
