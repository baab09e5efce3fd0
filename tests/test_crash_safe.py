"""Crash-safe training: atomic state saves, torn states skipped, and kill -9 then the same command resumes.

The kill test runs the real `accelerate launch train/distill.py` twice on the same config in two run
folders: once uninterrupted, once killed with SIGKILL (the whole process group) after it saved a
state and then started again with the same command. Both must end with the same best dev accuracy
and the same best student weights.
"""
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_run_tree, write_config
from test_distill_entry import ACCELERATE, SCRIPT, launch

from train.loop import STATE_MARKER, _latest_state, _torn, atomic_dir


def _fake_state(root: Path, step: int, files: dict, marker: bool = True) -> Path:
    path = root / f"step_{step}"
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    if marker:
        (path / STATE_MARKER).write_text(json.dumps({"step": step, "fingerprint": "x",
                                                     "files": {n: len(d) for n, d in files.items()}}))
    return path


def test_torn_states_are_skipped_for_the_newest_complete_one(tmp_path):
    root = tmp_path / "state"
    _fake_state(root, 4, {"model.safetensors": b"a" * 100, "optimizer.bin": b"b" * 50})
    good = _fake_state(root, 8, {"model.safetensors": b"a" * 100, "optimizer.bin": b"b" * 50})
    truncated = _fake_state(root, 12, {"model.safetensors": b"a" * 100, "optimizer.bin": b"b" * 50})
    (truncated / "optimizer.bin").write_bytes(b"b" * 10)
    _fake_state(root, 16, {"model.safetensors": b"a" * 100}, marker=False)  # killed before its marker
    (root / ".step_20.tmp").mkdir()  # killed mid-save: never a state
    said = []
    assert _latest_state(root, said.append) == good
    assert "no kdlab_state.json" in said[0] and "step_16" in said[0]
    assert "optimizer.bin has 10 bytes, not the 50 written" in said[1]
    assert _torn(good) is None


def test_atomic_dir_keeps_the_old_folder_when_writing_fails(tmp_path):
    out = tmp_path / "student"
    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("killed")
    assert (out / "model.safetensors").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_to_the_same_result(tmp_path, tiny_teacher_dir):
    train = {"max_steps": 120, "save_state_every_steps": 10, "eval_every_steps": 30, "log_every_steps": 10}
    results = {}
    for name in ("straight", "killed"):
        run_dir = tmp_path / name
        config = write_config(tmp_path / f"{name}.yaml", tiny_run_tree(run_dir, tiny_teacher_dir, train=train))
        if name == "killed":
            cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_1proc.yaml"), SCRIPT,
                   "--config", str(config)]
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            state = run_dir / "student_run" / "state"
            deadline = time.time() + 600
            while not any((p / STATE_MARKER).is_file() for p in state.glob("step_*")) and time.time() < deadline:
                assert proc.poll() is None, "the run ended before it could be killed"
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            saved = max(int(p.name.split("_")[1]) for p in state.glob("step_*") if (p / STATE_MARKER).is_file())
            assert saved < 120
            again = launch(config)
            assert f"at step {saved}" in again.stdout  # the newest complete state, nothing earlier
        else:
            launch(config)
        summary = json.loads((run_dir / "student" / "kdlab_summary.json").read_text())
        results[name] = (summary, load_file(str(run_dir / "student" / "model.safetensors")))
    (a, wa), (b, wb) = results["straight"], results["killed"]
    assert b["steps"] == a["steps"] == 120
    assert b["best_step"] == a["best_step"]
    assert b["best_dev"]["accuracy"] == pytest.approx(a["best_dev"]["accuracy"], abs=1e-9)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-5), key


@pytest.mark.slow
def test_a_search_worker_killed_mid_trial_is_failed_retried_and_its_mlflow_run_closed(tmp_path, tiny_teacher_dir):
    import mlflow
    import optuna
    KDLAB = str(Path(ACCELERATE).parent / "kdlab")
    run_dir = tmp_path / "run"
    tree = tiny_run_tree(run_dir, tiny_teacher_dir,
                         target={"min_iters": 5, "min_seconds": 0.2, "repeats": 1, "warmup_iters": 1,
                                 "p95_ms": "teacher*5"},
                         search={"n_trials": 1, "train_steps": 40, "seed_trials": 1, "recipes": ["fp32"],
                                 "num_layers": [1], "heartbeat_s": 1, "max_retries": 1})
    config = write_config(tmp_path / "c.yaml", tree)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([KDLAB, "search", "--config", str(config)], cwd=ROOT, stdout=log, stderr=log,
                              start_new_session=True, env=env)
    url = f"sqlite:///{run_dir / 'optuna.db'}"
    db = run_dir / "optuna.db"
    deadline, running = time.time() + 600, None
    while running is None and time.time() < deadline:
        assert worker.poll() is None, f"the worker ended first: {(tmp_path / 'worker.log').read_text()[-2000:]}"
        time.sleep(0.2)
        # Read the worker's database without opening it as an Optuna storage (that would create its tables).
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                row = con.execute("SELECT t.number FROM trials t JOIN trial_user_attributes a ON a.trial_id = "
                                  "t.trial_id WHERE t.state = 'RUNNING' AND a.key = 'mlflow_run_id'").fetchone()
        except sqlite3.Error:
            continue
        running = row[0] if row else None
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    time.sleep(3)  # longer than 2 heartbeats: the trial is now stale

    proc = subprocess.run([KDLAB, "search", "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"trial {running} had no heartbeat" in proc.stderr
    trials = optuna.load_study(study_name="tiny", storage=url).get_trials()
    dead = trials[running]
    assert dead.state == optuna.trial.TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == running]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].params == dead.params
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 1  # no duplicate completions
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    dead_run = client.get_run(dead.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "FAILED" and dead_run.data.tags["state"] == "FAIL"
    assert client.get_run(retry[0].user_attrs["mlflow_run_id"]).info.status == "FINISHED"
