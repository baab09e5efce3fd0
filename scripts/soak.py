"""Soak: a student search by 2 workers on one PostgreSQL study while workers are killed and restarted.

    make soak                                                          # 20 trials of 300 steps, a kill every 15 s
    .venv/bin/python scripts/soak.py --trials 4 --kill-every 30 --out /tmp/soak.json   # a quick check

What README "Scaling out" describes, on one machine and under fire: a throw-away PostgreSQL cluster
holds the Optuna study (`search.storage`) and the backend of a real `mlflow server` (`tracking.uri`),
both from tests/postgres.py. The teacher (a tiny random-init BERT with MiniLM's tokenizer, or
`--teacher minilm-l6`) is fine-tuned and its logits cached once by `kdlab distill`; then two
`kdlab search --n-trials <trials>` workers run on the real SST-2 rows while this process (the
third) SIGKILLs a random worker every `--kill-every` seconds and starts it again. Workers are
stopped (SIGINT, then SIGKILL) once the study holds `--trials` COMPLETE trials; a worker may have
finished more by then, and trials in flight are left as they are: both are counted, not hidden.

Written to benchmarks/results/soak.json (or --out), with machine, versions and seconds:
requested, completed (COMPLETE trials, screened-out ones included), pruned, failed, running_left,
kills, retried (trials enqueued again after a worker died), duplicate_trials (COMPLETE trials
sharing identical params with an earlier COMPLETE one and no `duplicate_of`),
mlflow_runs_per_trial_max, mlflow_parent_runs, front_matches_study (`kdlab report` recomputes the
front from the study; it must equal study.best_trials) and front_left_by_workers_matches_study
(the pareto.csv the last worker wrote, before that report). Logs: runs/soak/logs/.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import yaml
from optuna.storages import RetryFailedTrialCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_tiny_teacher  # noqa: E402
from kdlab.eval.latency import machine_info, versions  # noqa: E402
from kdlab.scripts.bench_readme import write_result  # noqa: E402
from postgres import PostgresUnavailable, mlflow_server, postgres_cluster  # noqa: E402

KDLAB = str(Path(sys.executable).parent / "kdlab")
SST2 = ROOT.parent / "shared" / "data" / "sst2"
WORKDIR = ROOT / "runs" / "soak"
STUDY = "soak"
# Large enough that 20 trials rarely exhaust it, all-categorical so two workers can draw the same student.
SPACE = {"num_layers": [1, 2], "hidden_size": [32, 64], "num_heads": [2, 4], "intermediate_size": [64, 128],
         "recipes": ["fp32", "dynamic-int8"], "temperature": [1.0, 2.0, 4.0], "seed_trials": 2}
PROFILE = {"batch_size": 1, "seq_len": "data", "warmup_iters": 2, "min_iters": 10, "min_seconds": 0.3,
           "repeats": 2, "threads": 1, "p95_tolerance": 1.0, "max_rounds": 3}
HEARTBEAT_S = 5  # a killed worker's trial is failed (and retried) by the other worker 2 x this later


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20, help="COMPLETE trials the study must reach")
    p.add_argument("--kill-every", type=float, default=15.0, help="seconds between two SIGKILLs of a random worker")
    p.add_argument("--train-steps", type=int, default=300, help="optimizer steps per trial (search.train_steps)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--teacher", default="tiny", help="tiny (2 layers x 64, random weights) or a teacher.source")
    p.add_argument("--train-rows", type=int, default=2000, help="SST-2 train rows (data.max_train_samples)")
    p.add_argument("--max-minutes", type=float, default=90.0, help="give up (and say so) after this long")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    return p.parse_args(argv)


def write_config(args, storage: str, tracking: str) -> tuple[Path, list[str]]:
    teacher = args.teacher
    if teacher == "tiny":
        teacher = make_tiny_teacher(WORKDIR / "tiny_teacher")
    tree = {
        "name": STUDY, "output_dir": str(WORKDIR / "run"),
        "data": {"train_file": str(SST2 / "train.tsv"), "eval_file": str(SST2 / "dev.tsv"),
                 "max_train_samples": args.train_rows, "max_eval_samples": 400, "max_length": 64},
        "teacher": {"source": teacher, "num_epochs": 1, "learning_rate": 1e-3 if args.teacher == "tiny" else 5e-5},
        "student": {"num_layers": 1, "init": "teacher-layers"},
        "train": {"batch_size": 32, "eval_batch_size": 128, "learning_rate": 1e-3, "warmup_ratio": 0.0},
        "target": PROFILE,
        "search": {**SPACE, "train_steps": args.train_steps, "heartbeat_s": HEARTBEAT_S, "max_retries": 2},
    }
    path = WORKDIR / "soak.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    # The URLs go on the command line, as with a real password (which would come from the environment).
    return path, [f"search.storage={storage}", f"tracking.uri={tracking}"]


class Workers:
    """`args.workers` kdlab search processes; `kill_one` SIGKILLs a random one and starts it again."""

    def __init__(self, cmd: list[str], n: int, seed: int):
        self.cmd, self.n = cmd, n
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.starts = [0] * n
        self.exits: list[dict] = []
        self.kills: list[dict] = []
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

    def start(self, slot: int) -> None:
        with open(WORKDIR / "logs" / f"worker{slot}-{self.starts[slot]}.log", "w") as log:  # the child keeps its own
            self.procs[slot] = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.starts[slot] += 1

    def start_all(self) -> None:
        for slot in range(self.n):
            self.start(slot)

    def reap(self, t0: float) -> None:
        """Record workers that exited on their own (done with --n-trials, or failed) and start them again."""
        with self.lock:
            for slot, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None:
                    self.exits.append({"worker": slot, "code": proc.returncode, "at_s": round(time.time() - t0, 1)})
                    self.start(slot)

    def kill_one(self, t0: float, running_trials: list[int]) -> None:
        with self.lock:
            alive = [slot for slot, p in enumerate(self.procs) if p is not None and p.poll() is None]
            if not alive:
                return
            slot = self.rng.choice(alive)
            self.procs[slot].kill()  # SIGKILL: no handler runs, as when a machine is lost
            self.procs[slot].wait()
            self.kills.append({"worker": slot, "at_s": round(time.time() - t0, 1), "running_trials": running_trials})
            self.start(slot)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGINT (Optuna marks the trial in flight FAIL, MLflow closes its run), then SIGKILL what is left."""
        with self.lock:
            live = [p for p in self.procs if p is not None and p.poll() is None]
            for proc in live:
                proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + grace_s
            for proc in live:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class Watcher:
    """Reads the study's trial states (one storage object; the study may not exist yet)."""

    def __init__(self, storage: str):
        self.url, self.storage = storage, None

    def counts(self) -> tuple[int, list[int]]:
        try:
            self.storage = self.storage or optuna.storages.RDBStorage(self.url)
            study = optuna.load_study(study_name=STUDY, storage=self.storage)
        except KeyError:  # no such study yet
            return 0, []
        trials = study.get_trials(deepcopy=False)
        return (sum(t.state.name == "COMPLETE" for t in trials),
                [t.number for t in trials if t.state.name == "RUNNING"])


def front_of_csv(path: Path) -> list[int] | None:
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return sorted(int(r["trial"]) for r in csv.DictReader(fh) if r["is_pareto"] == "True")


def audit(args, storage: str, tracking: str, config: Path, overrides: list[str],
          running_at_stop: list[int]) -> dict:
    """What the workers left: the study's trials, the MLflow runs, and the front against the study."""
    study = optuna.load_study(study_name=STUDY, storage=storage)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    seen, duplicates = set(), []
    for t in sorted((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.number):
        key = json.dumps(t.params, sort_keys=True)
        if key in seen and t.user_attrs.get("duplicate_of") is None:
            duplicates.append(t.number)
        seen.add(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # retried_trial_number, stable since 2.8
        retried = [t.number for t in trials if RetryFailedTrialCallback.retried_trial_number(t) is not None]
    in_flight = set(running_at_stop)

    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(experiment_names=[STUDY], output_format="list")
    parents = [r for r in runs if r.data.tags.get("kdlab.stage") == "search"]
    children = [r for r in runs if r.data.tags.get("kdlab.stage") == "search-trial"]
    per_trial = Counter(int(r.data.params["trial_number"]) for r in children if "trial_number" in r.data.params)

    left_by_workers = front_of_csv(config.parent / "run" / "report" / "pareto.csv")
    report = subprocess.run([KDLAB, "report", "--config", str(config), *overrides], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, check=False)
    (WORKDIR / "logs" / "report.log").write_text(report.stdout + report.stderr)
    recomputed = front_of_csv(config.parent / "run" / "report" / "pareto.csv")
    study_front = sorted(t.number for t in study.best_trials)
    return {
        "requested": args.trials, "trials": len(trials), "completed": states.get("COMPLETE", 0),
        "pruned": states.get("PRUNED", 0), "failed": states.get("FAIL", 0),
        "failed_in_flight_at_stop": sum(t.state.name == "FAIL" and t.number in in_flight for t in trials),
        "running_left": states.get("RUNNING", 0),
        "waiting_left": states.get("WAITING", 0), "retried": len(retried), "duplicate_trials": len(duplicates),
        "duplicate_trial_numbers": duplicates,
        "mlflow_runs_per_trial_max": max(per_trial.values(), default=0),
        "mlflow_child_runs": len(children), "mlflow_parent_runs": len(parents),
        "complete_trials_without_mlflow_run": sorted(t.number for t in trials
                                                     if t.state.name == "COMPLETE" and per_trial[t.number] == 0),
        "mlflow_runs_still_running": sum(r.info.status == "RUNNING" for r in children),
        "report_exit_code": report.returncode, "front_study": study_front, "front_recomputed": recomputed,
        "front_left_by_workers": left_by_workers,
        "front_matches_study": recomputed == study_front,
        "front_left_by_workers_matches_study": left_by_workers == study_front,
    }


def soak(args) -> dict:
    shutil.rmtree(WORKDIR, ignore_errors=True)
    (WORKDIR / "logs").mkdir(parents=True)
    t0 = time.time()
    with postgres_cluster((STUDY, "mlflow")) as pg, \
            mlflow_server(pg.url("mlflow"), WORKDIR / "mlartifacts", workers=2, log=WORKDIR / "logs" / "mlflow.log") \
            as tracking:
        storage = pg.url(STUDY)
        config, overrides = write_config(args, storage, tracking)
        print(f"soak: PostgreSQL on port {pg.port}, MLflow at {tracking}; fine-tuning the teacher once", flush=True)
        with open(WORKDIR / "logs" / "distill.log", "w") as log:
            subprocess.run([KDLAB, "distill", "--config", str(config), *overrides, "train.max_steps=2"], cwd=ROOT,
                           stdout=log, stderr=subprocess.STDOUT, check=True, timeout=3600)
        setup_s = time.time() - t0
        workers = Workers([KDLAB, "search", "--config", str(config), "--n-trials", str(args.trials), *overrides],
                          args.workers, args.seed)
        started = time.time()
        workers.start_all()
        print(f"soak: {args.workers} workers started; a SIGKILL every {args.kill_every:g} s until {args.trials} "
              "trials are COMPLETE", flush=True)
        watcher, stopped_because = Watcher(storage), "target reached"
        next_kill, completed, last = started + args.kill_every, 0, -1
        try:
            while True:
                time.sleep(2.0)
                completed, running = watcher.counts()
                if completed != last:
                    print(f"soak: {completed}/{args.trials} complete, {len(workers.kills)} kill(s), "
                          f"{time.time() - started:.0f} s", flush=True)
                    last = completed
                if completed >= args.trials:
                    break
                if time.time() - started > args.max_minutes * 60:
                    stopped_because = f"gave up after {args.max_minutes:g} minutes"
                    break
                if sum(e["code"] != 0 for e in workers.exits) > 3 * args.workers:
                    stopped_because = "workers keep failing on their own (see runs/soak/logs/)"
                    break
                workers.reap(started)
                if time.time() >= next_kill:
                    workers.kill_one(started, running)
                    next_kill = time.time() + args.kill_every
        finally:
            try:
                running_at_stop = watcher.counts()[1]
            finally:
                workers.stop()
        search_s = time.time() - started
        result = audit(args, storage, tracking, config, overrides, running_at_stop)
    return {
        "machine": machine_info(), "versions": versions(),
        "conditions": {"trials": args.trials, "workers": args.workers, "kill_every_s": args.kill_every,
                       "train_steps": args.train_steps, "teacher": args.teacher, "train_rows": args.train_rows,
                       "heartbeat_s": HEARTBEAT_S, "search_space": SPACE, "target": PROFILE,
                       "storage": "PostgreSQL (throw-away cluster, 127.0.0.1)",
                       "tracking": "mlflow server --workers 2, PostgreSQL backend, proxied artefacts"},
        **result, "kills": len(workers.kills), "kill_log": workers.kills, "worker_exits": workers.exits,
        "worker_starts": sum(workers.starts), "stopped_because": stopped_because,
        "setup_seconds": round(setup_s, 1), "search_seconds": round(search_s, 1),
        "seconds": round(time.time() - t0, 1),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trials < 1 or args.kill_every <= 0 or args.train_steps < 1 or args.workers < 1:
        print("soak: error: --trials, --train-steps and --workers must be >= 1, --kill-every > 0", file=sys.stderr)
        return 2
    # A SIGTERM to the soak still stops the workers, the MLflow server and PostgreSQL (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Started in the background by a shell, this process inherits SIGINT ignored, and so would the workers
    # (they would shrug off the SIGINT that stops them). A handler here is reset to the default in each child.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = soak(args)
    except PostgresUnavailable as exc:
        print(f"soak: error: PostgreSQL cannot be started: {exc}", file=sys.stderr)
        return 2
    write_result(args.out, result)
    print(f"soak: {result['completed']} of {result['requested']} requested trials COMPLETE ({result['trials']} in all: "
          f"{result['pruned']} pruned, {result['failed']} failed ({result['failed_in_flight_at_stop']} stopped in "
          f"flight), "
          f"{result['running_left']} left running), "
          f"{result['kills']} kills, {result['retried']} retried, {result['duplicate_trials']} duplicate(s), "
          f"at most {result['mlflow_runs_per_trial_max']} MLflow run(s) per trial, {result['mlflow_parent_runs']} "
          f"parent run(s), front matches study: {result['front_matches_study']}; {result['stopped_because']}; "
          f"{result['seconds']:.0f} s -> {args.out}", flush=True)
    return 0 if result["stopped_because"] == "target reached" else 1


if __name__ == "__main__":
    sys.exit(main())
