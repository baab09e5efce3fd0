"""Two `kdlab search` workers on one PostgreSQL study and one real MLflow tracking server.

Run: .venv/bin/python -m pytest -q tests/test_scale_out.py

What docs/operations.md "Scaling out" describes for several machines, exercised on one: a throw-away PostgreSQL
cluster (tests/postgres.py) holds the Optuna study (`search.storage`) and the MLflow server's backend
store (`mlflow server --workers 2`, artefacts proxied through it, `tracking.uri=http://...`). The
teacher is fine-tuned, and its logits cached, once by `kdlab distill` before the workers start
(two workers fine-tuning into one run folder at once would race); then two `kdlab search` processes
run at the same time, 2 trials each, on a tiny random-init teacher and 200 real SST-2 rows. The
assertions are on what they leave: the study's trials, the MLflow child runs, pareto.csv and the
front `kdlab report` recomputes. Skips when PostgreSQL cannot be started (fails under
KDLAB_REQUIRE_POSTGRES=1, as on CI).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest

from conftest import ROOT, tiny_run_tree, write_config
from postgres import free_port, mlflow_server, postgres, postgres_url  # noqa: F401  (fixtures)
from kdlab.scripts.cli import main as kdlab

pytestmark = pytest.mark.slow
KDLAB = str(Path(sys.executable).parent / "kdlab")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
FAST_PROFILE = {"batch_size": 1, "seq_len": "data", "warmup_iters": 1, "min_iters": 5, "min_seconds": 0.2,
                "repeats": 1, "threads": 1, "p95_tolerance": 1.0, "max_rounds": 3,
                "p95_ms": "teacher*100"}  # relative: the two workers must agree on one measured figure
# A small, all-categorical space (no searched learning rate), so two workers can draw the same
# student: the duplicate check has something to catch.
SPACE = {"num_layers": [1, 2], "hidden_size": [32, 64], "num_heads": [2, 4], "recipes": ["dynamic-int8"],
         "train_steps": 3, "seed_trials": 2}
TRIALS_PER_WORKER = 2
PARAM_KEYS = ("num_layers", "hidden_size", "num_heads", "intermediate_size", "init", "recipe", "learning_rate",
              "temperature", "alpha")


@pytest.fixture(scope="module")
def tracking_uri(postgres, tmp_path_factory):  # noqa: F811
    """A real MLflow tracking server, backend in the cluster's `mlflow` database, 2 server workers."""
    root = tmp_path_factory.mktemp("mlflow_server")
    with mlflow_server(postgres.url("mlflow"), root / "artifacts", workers=2, log=root / "server.log") as uri:
        yield uri


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, tiny_teacher_dir, postgres_url, tracking_uri):  # noqa: F811
    root = tmp_path_factory.mktemp("scale_out")
    tree = tiny_run_tree(root / "run", tiny_teacher_dir, target=FAST_PROFILE, search=SPACE)
    tree["name"] = "scale"
    config = write_config(root / "scale.yaml", tree)
    # Given on the command line as a user would (a password would come from the environment, not the YAML).
    overrides = [f"search.storage={postgres_url}", f"tracking.uri={tracking_uri}"]

    # A cache of its own, so the teacher-label entries counted below are this study's.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "KDLAB_CACHE_DIR": str(root / "kdlab-cache")}
    # The teacher once, before any worker, as a user would: `kdlab distill` fine-tunes it
    # (teacher/kdlab_teacher.json) and caches its logits; the workers then only read both.
    # train.max_steps keeps the student part short; it is not in the teacher's key.
    prep = subprocess.run([KDLAB, "distill", "--config", str(config), *overrides, "train.max_steps=2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert prep.returncode == 0, f"kdlab distill exit {prep.returncode}\n{prep.stdout[-2000:]}\n{prep.stderr[-2000:]}"
    assert (root / "run" / "teacher" / "kdlab_teacher.json").is_file()
    caches = sorted((root / "kdlab-cache" / "teacher_logits").glob("*/logits.safetensors"))
    assert len(caches) == 1

    cmd = [KDLAB, "search", "--config", str(config), "--n-trials", str(TRIALS_PER_WORKER), *overrides]
    # Output to files, not pipes: a worker blocked on a full pipe would stall the study for the other.
    logs = [(root / f"worker{i}.out", root / f"worker{i}.err") for i in range(2)]
    workers = []
    for out_path, err_path in logs:
        with open(out_path, "w") as out, open(err_path, "w") as err:
            workers.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err))
    try:
        for proc in workers:
            proc.wait(timeout=420)
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = [(proc.returncode, out.read_text(), err.read_text()) for proc, (out, err) in zip(workers, logs)]
    pareto_csv = (root / "run" / "report" / "pareto.csv").read_text()  # as the last worker left it
    study = optuna.load_study(study_name="scale", storage=postgres_url)
    return {"root": root, "config": config, "overrides": overrides, "storage": postgres_url, "outputs": outputs,
            "pareto_csv": pareto_csv, "study": study, "caches": caches}


def test_both_workers_share_one_study(two_workers):
    for code, out, err in two_workers["outputs"]:
        assert code == 0, f"worker exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    trials = two_workers["study"].trials
    # --n-trials counts the students each worker trains; a draw pruned as a repeat of a twin comes on top.
    trained = [t for t in trials if t.state.name == "COMPLETE" and t.user_attrs.get("steps")]
    assert len(trained) == 2 * TRIALS_PER_WORKER
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert all(t.user_attrs.get("duplicate_of") is not None for t in trials if t.state.name == "PRUNED")
    # Each worker reports only the trials it ran: the two sets split the study between them.
    ran = [set(map(int, re.findall(r"^trial (\d+):", out, re.MULTILINE))) for _, out, _ in two_workers["outputs"]]
    assert all(ran) and not ran[0] & ran[1] and ran[0] | ran[1] == {t.number for t in trials}
    # One budget: the worker that created the study measured the teacher once; the other waited for that figure.
    budgets = [next(line for line in out.splitlines() if line.startswith("budget: ")) for _, out, _ in
               two_workers["outputs"]]
    assert budgets[0] == budgets[1] and "measured by the search" in budgets[0], budgets
    # The workers read the teacher and its logits; neither fine-tuned or cached again.
    assert sorted((two_workers["root"] / "kdlab-cache" / "teacher_logits").glob("*/logits.safetensors")) == \
        two_workers["caches"]
    assert all("teacher labels: reusing" in out for _, out, _ in two_workers["outputs"])
    assert all("reusing fine-tuned checkpoint" in out for _, out, _ in two_workers["outputs"])


def test_no_student_is_trained_twice(two_workers):
    trials = two_workers["study"].trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    params = Counter(tuple(t.user_attrs.get(k) for k in PARAM_KEYS) for t in complete)
    repeated = {p: n for p, n in params.items() if n > 1}
    assert not repeated, f"COMPLETE trials training the same student: {repeated}"
    for t in trials:
        if t.state.name == "PRUNED":  # the only reason a trial is pruned: it repeats a completed one
            twin = trials[t.user_attrs["duplicate_of"]]
            assert twin.state.name == "COMPLETE"
            assert all(t.user_attrs.get(k) == twin.user_attrs.get(k) for k in PARAM_KEYS)


class _NoTracking:
    """Stands in for StudyTracking: the duplicate check runs before any MLflow call that matters here."""

    @contextlib.contextmanager
    def child(self, trial, params):
        yield None


def test_a_duplicate_is_pruned_against_its_running_then_its_completed_twin(postgres_url, tiny_teacher_dir,  # noqa: F811
                                                                            tmp_path):
    """Three workers' handles on one PostgreSQL study draw the same enqueued student. The one holding the lowest
    trial number trains; the second, drawn while the first is still RUNNING, and the third, drawn after it
    completed, are both pruned as repeats of it, without training (search/objective.py run_trial)."""
    from kdlab.distill.config import load_config
    from kdlab.search.objective import objective, run_trial
    from kdlab.search.space import SearchSpace
    from kdlab.search.study import DIRECTIONS
    from kdlab.train.teacher import load_teacher_config

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_run_tree(tmp_path / "run", tiny_teacher_dir,
                                                                      search=SPACE)))
    space = SearchSpace.from_config(cfg, load_teacher_config(cfg))
    params = space.params_of(space.seeds(1)[0])
    name = "scale-duplicates"  # not the two workers' study, whose trials the other tests count
    optuna.create_study(study_name=name, storage=postgres_url, directions=DIRECTIONS)
    worker_a, worker_b, worker_c = (optuna.load_study(study_name=name, storage=postgres_url) for _ in range(3))
    for _ in range(3):
        worker_a.enqueue_trial(params)  # the same student, three times
    no_work = SimpleNamespace(space=space)  # no teacher, data or tracking: a repeat must stop before any work
    trained = []

    def train_while_a_twin_is_drawn(trial, candidate, ctx, tracker):
        trained.append(trial.number)
        twin = worker_b.ask()
        assert twin.number == 1 and worker_b.trials[0].state.name == "RUNNING"
        with pytest.raises(optuna.TrialPruned, match=f"same candidate as trial {trial.number}"):
            objective(twin, no_work)
        worker_b.tell(twin, state=optuna.trial.TrialState.PRUNED)
        return 0.5, 1.0

    first = worker_a.ask()
    assert first.number == 0
    worker_a.tell(first, run_trial(first, SimpleNamespace(space=space, tracking=_NoTracking(), cfg=cfg, latency_model=None),
                                   train_while_a_twin_is_drawn))
    late = worker_c.ask()
    with pytest.raises(optuna.TrialPruned, match="same candidate as trial 0"):
        objective(late, no_work)
    worker_c.tell(late, state=optuna.trial.TrialState.PRUNED)

    trials = optuna.load_study(study_name=name, storage=postgres_url).trials
    assert trained == [0]
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "PRUNED"]
    assert [t.user_attrs.get("duplicate_of") for t in trials] == [None, 0, 0]
    assert all(t.user_attrs.get(k) == trials[0].user_attrs.get(k) for t in trials[1:] for k in PARAM_KEYS)
    assert trials[0].user_attrs["num_layers"] == space.seeds(1)[0].num_layers


def test_every_finished_trial_has_one_mlflow_child_run(two_workers, tracking_uri):
    study = two_workers["study"]
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["scale"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("kdlab.stage") == "search"]
    children = [r for r in runs if r.data.tags.get("kdlab.stage") == "search-trial"]
    assert len(parents) == 1, f"{len(parents)} parent runs for one study"
    assert study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    per_trial = Counter(int(r.data.params["trial_number"]) for r in children)
    for t in study.trials:
        expected = 1 if t.state.name == "COMPLETE" else 0  # a pruned repeat is never trained or logged
        assert per_trial.get(t.number, 0) == expected, f"trial {t.number} ({t.state.name}): {per_trial}"
    by_trial = {int(r.data.params["trial_number"]): r for r in children}
    for number, run in by_trial.items():
        t = study.trials[number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["state"] == "COMPLETE"
        assert run.data.metrics["p95_ms"] == pytest.approx(t.user_attrs["p95_ms"])


def front_of(rows: list[dict]) -> list[int]:
    return sorted(int(r["trial"]) for r in rows if r["is_pareto"] == "True")


def test_report_recomputes_the_front_the_workers_left(two_workers, capsys):
    before = list(csv.DictReader(two_workers["pareto_csv"].splitlines()))
    assert kdlab(["report", "--config", str(two_workers["config"]), *two_workers["overrides"]]) == 0
    after = list(csv.DictReader((two_workers["root"] / "run" / "report" / "pareto.csv").read_text().splitlines()))
    study = optuna.load_study(study_name="scale", storage=two_workers["storage"])
    assert front_of(before) == front_of(after) == sorted(t.number for t in study.best_trials)
    assert [(r["trial"], r["state"], r["quality"], r["p95_ms"]) for r in before] == \
        [(r["trial"], r["state"], r["quality"], r["p95_ms"]) for r in after]
    assert "Pareto front" in capsys.readouterr().out


def test_multi_node_config_rendezvous_as_two_machines_on_one_host(tmp_path, tiny_teacher_dir):
    """configs/accelerate/multi_node_ddp.yaml as shipped, launched twice (machine_rank 0 and 1) over 127.0.0.1;
    on CPU (ACCELERATE_USE_CPU, gloo) in place of GPUs: one DDP run of 2 processes, written by rank 0 only."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_run_tree(run_dir, tiny_teacher_dir))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    launch = [ACCELERATE, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "multi_node_ddp.yaml"),
              "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(free_port()), "--mixed_precision", "no"]
    script = [str(ROOT / "train" / "distill.py"), "--config", str(config), "train.max_steps=4"]
    ranks = [subprocess.Popen([*launch, "--machine_rank", str(rank), *script], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in ranks]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(ranks, outputs):
        assert proc.returncode == 0, out[-3000:]
    summary = json.loads((run_dir / "student" / "kdlab_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 4
    assert "dev accuracy" in outputs[0] and "dev accuracy" not in outputs[1]  # rank 0 reports; rank 1 only trains
