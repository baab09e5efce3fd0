"""Crash-safe training: atomic state saves, torn states skipped, and kill -9 then the same command resumes.

The kill test runs the real `accelerate launch train/distill.py` twice on the same config in two run
folders: once uninterrupted, once killed with SIGKILL (the whole process group) right after the state
of step KILLED_AT was saved and then started again with the same command. Both must end with the same
best dev accuracy and the same best student weights.

Runs are stopped at known steps with train/loop.py's pause hook (KDLAB_PAUSE_AFTER_STEP/KDLAB_PAUSE_FILE),
never by racing the machine's speed; a stale Optuna trial is made stale in its database, not by waiting.
"""
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from conftest import ROOT, tiny_run_tree, write_config
from test_distill_entry import ACCELERATE, SCRIPT, launch, mlflow_runs, pause_env, wait_for_pause

from kdlab.train.loop import STATE_MARKER, atomic_dir, latest_state, pause_point, wait_at_pause, why_torn

KDLAB = str(Path(ACCELERATE).parent / "kdlab")


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
    assert latest_state(root, said.append) == good
    assert "no kdlab_state.json" in said[0] and "step_16" in said[0]
    assert "optimizer.bin has 10 bytes, not the 50 written" in said[1]
    assert why_torn(good) is None


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


def test_pause_hook_stops_only_the_named_stage_and_waits_for_its_release_file(tmp_path, monkeypatch):
    release = tmp_path / "release"
    monkeypatch.delenv("KDLAB_PAUSE_AFTER_STEP", raising=False)
    assert pause_point("distill") is None  # unset: no pause, whatever KDLAB_PAUSE_FILE says
    monkeypatch.setenv("KDLAB_PAUSE_AFTER_STEP", "distill:40")
    monkeypatch.setenv("KDLAB_PAUSE_FILE", str(release))
    assert pause_point("distill") == (40, release)
    assert pause_point("teacher") is None
    for bad in ("40", "distill:", "distill:0", "distill:x"):
        monkeypatch.setenv("KDLAB_PAUSE_AFTER_STEP", bad)
        with pytest.raises(ValueError, match="needs the form STAGE:N"):
            pause_point("distill")
    monkeypatch.setenv("KDLAB_PAUSE_AFTER_STEP", "distill:40")
    monkeypatch.delenv("KDLAB_PAUSE_FILE")
    with pytest.raises(ValueError, match="KDLAB_PAUSE_FILE set to the release file"):
        pause_point("distill")

    class Main:
        is_main_process = True
    paused = threading.Thread(target=wait_at_pause, args=(Main(), "distill", 40, release), daemon=True)
    paused.start()
    reached = tmp_path / "release.reached"
    paused.join(timeout=0.5)  # it must still be waiting: nothing released it
    assert paused.is_alive()
    assert json.loads(reached.read_text()) == {"pid": os.getpid(), "stage": "distill", "step": 40}
    release.touch()
    paused.join(timeout=60)
    assert not paused.is_alive()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release", "release.reached"]  # no temporary left


def test_a_resume_after_an_epoch_boundary_trains_on_the_batches_of_an_uninterrupted_run(tmp_path, minilm_dir):
    import datasets
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from kdlab.distill.config import TrainConfig
    from kdlab.train.data import make_loader
    from kdlab.train.loop import fit
    from kdlab.train.tracking import Tracker
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    rows = 40  # batches of 8: 5 steps per epoch, 3 epochs
    ds = datasets.Dataset.from_dict({"input_ids": [[101, 1000 + i, 102] for i in range(rows)],
                                     "attention_mask": [[1, 1, 1]] * rows, "labels": [0] * rows,
                                     "idx": list(range(rows))})
    accelerator = Accelerator(cpu=True)

    def train(out_dir: Path, **cfg) -> list:
        seen = []

        def compute_loss(model, batch):
            seen.append(batch["idx"].tolist())
            return model(batch["input_ids"].float()).pow(2).mean(), {}
        torch.manual_seed(0)
        fit(accelerator, torch.nn.Linear(3, 1), make_loader(ds, tok, 8, shuffle=True, seed=42),
            cfg=TrainConfig(max_steps=15, save_state_every_steps=7, eval_every_steps=100, log_every_steps=100,
                            **cfg),
            compute_loss=compute_loss, evaluate=lambda m: {"accuracy": 0.0}, save_best=lambda m: None,
            out_dir=out_dir, tracker=Tracker(False))
        return seen

    straight = train(tmp_path / "straight")
    assert len(straight) == 15 and sorted(sum(straight[:5], [])) == list(range(rows))
    resumed = train(tmp_path / "resumed", resume_from=str(tmp_path / "straight" / "state" / "step_7"))
    assert resumed == straight[7:]  # steps 8-15: epoch 1 from its third batch, then epoch 2


# Killed in the fourth epoch (13 steps each): the resumed run must draw the batches of that epoch, not epoch 0's.
KILLED_AT = 50


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
            release, log = tmp_path / "release", tmp_path / "killed.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=pause_env(f"distill:{KILLED_AT}", release))
            try:  # paused after step KILLED_AT and its state save; killed there, never released
                reached = wait_for_pause(release, proc, log)
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            assert (reached["stage"], reached["step"]) == ("distill", KILLED_AT)
            state = run_dir / "student_run" / "state"
            # the state of that step, complete; no temporary folder of a save
            # the two newest states (every 10 steps), the newest complete
            assert sorted(p.name for p in state.iterdir()) == [f"step_{KILLED_AT - 10}", f"step_{KILLED_AT}"]
            assert why_torn(state / f"step_{KILLED_AT}") is None
            assert not (run_dir / "student" / "kdlab_summary.json").exists()  # it was killed before the end
            again = launch(config)
            assert f"resumed from {state / f'step_{KILLED_AT}'} at step {KILLED_AT}" in again.stdout
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
    import optuna
    run_dir = tmp_path / "run"
    # heartbeat_s=30: a grace period of 60 s that the test never waits out (the heartbeat is set back below).
    # A budget far above any student: the retry must train whatever a loaded machine measures (5 timed calls; a
    # p95 of 41 ms against a p50 of 0.7 ms was seen beside a training job), this test is about the crash.
    tree = tiny_run_tree(run_dir, tiny_teacher_dir,
                         target={"min_iters": 5, "min_seconds": 0.2, "repeats": 1, "warmup_iters": 1,
                                 "p95_ms": "teacher*200"},
                         search={"n_trials": 1, "train_steps": 40, "seed_trials": 1, "recipes": ["fp32"],
                                 "num_layers": [1], "heartbeat_s": 30, "max_retries": 1})
    config = write_config(tmp_path / "c.yaml", tree)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    release, log = tmp_path / "release", tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen([KDLAB, "search", "--config", str(config)], cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  env=pause_env("distill:20", release))
    url = f"sqlite:///{run_dir / 'optuna.db'}"
    db = run_dir / "optuna.db"
    try:  # paused inside the trial's training, after step 20; killed there, never released
        reached = wait_for_pause(release, worker, log)
        # Read the worker's database without opening it as an Optuna storage (that would create its tables).
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            rows = con.execute("SELECT t.number, t.trial_id, a.value_json FROM trials t JOIN trial_user_attributes a "
                               "ON a.trial_id = t.trial_id WHERE t.state = 'RUNNING' AND a.key = 'mlflow_run_id'"
                               ).fetchall()
            beats = con.execute("SELECT trial_id FROM trial_heartbeats").fetchall()
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert (reached["stage"], reached["step"]) == ("distill", 20)
    assert len(rows) == 1, rows  # the one trial in training, with its MLflow child run
    running, trial_id, dead_run_id = rows[0][0], rows[0][1], json.loads(rows[0][2])
    assert beats == [(trial_id,)]  # its worker's heartbeat thread had recorded it
    # The worker is dead: make its last heartbeat an hour old, past the 60 s grace period, instead of
    # sleeping against the clock. (Optuna compares it with the database's own clock, as set here.)
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        moved = con.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour') "
                            "WHERE trial_id = ?", (trial_id,)).rowcount
        age_s = con.execute("SELECT (julianday('now') - julianday(heartbeat)) * 86400 FROM trial_heartbeats "
                            "WHERE trial_id = ?", (trial_id,)).fetchone()[0]
    assert moved == 1 and age_s > 3600 - 60

    proc = subprocess.run([KDLAB, "search", "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"kdlab: trial {running} had no heartbeat for 60 s (its worker died): marked FAIL and enqueued again"
            in proc.stderr.splitlines())
    trials = optuna.load_study(study_name="tiny", storage=url).get_trials()
    dead = trials[running]
    assert dead.state == optuna.trial.TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == running]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].params == dead.params
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 1  # no duplicate completions
    assert dead.user_attrs["mlflow_run_id"] == dead_run_id
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    dead_run = client.get_run(dead_run_id)
    assert dead_run.info.status == "FAILED" and dead_run.data.tags["state"] == "FAIL"
    assert dead_run.data.tags["error"] == "worker died: no heartbeat for 60 s"
    # the dead trial trained exactly to its pause, and logged every step up to there
    assert [m.step for m in client.get_metric_history(dead_run_id, "distill/loss")] == list(range(1, 21))
    assert client.get_run(retry[0].user_attrs["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_leaves_only_complete_state_and_the_same_command_continues(
        tmp_path, tiny_teacher_dir):
    run_dir = tmp_path / "run"
    train = {"save_state_every_steps": 10, "eval_every_steps": 10}  # 2 epochs x 13 batches = 26 steps
    config = write_config(tmp_path / "c.yaml", tiny_run_tree(run_dir, tiny_teacher_dir, train=train))
    release, out_log, err_log = tmp_path / "release", tmp_path / "out.log", tmp_path / "err.log"
    with open(out_log, "w") as out, open(err_log, "w") as err:
        # SIGINT back to its default in the child: a suite started in the background of a non-interactive shell
        # inherits it ignored, and Python then installs no KeyboardInterrupt handler (the Ctrl-C would be lost).
        proc = subprocess.Popen([KDLAB, "distill", "--config", str(config)], cwd=ROOT, stdout=out, stderr=err,
                                start_new_session=True, env=pause_env("distill:20", release),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:  # paused after step 20 (its evaluation, best checkpoint and state save done): Ctrl-C there
        reached = wait_for_pause(release, proc, err_log)
        assert (reached["pid"], reached["stage"], reached["step"]) == (proc.pid, "distill", 20)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = err_log.read_text()
    assert code == 130, stderr[-3000:]
    message = "kdlab: interrupted (distill); run the same command again to continue"
    # Exactly one kdlab line, this one, ending its line. (It may follow the progress bar's text on that line:
    # the interrupted bar is never closed, and scripts/cli.py prints no newline before the message.)
    assert re.findall(r"kdlab:[^\r\n]*", stderr) == [message], stderr[-3000:]
    assert message + "\n" in stderr
    assert "Traceback" not in stderr

    # Nothing half-written: no temporary folder or file of a save, every state complete, a loadable best
    # checkpoint, no summary of a run that did not finish, and its MLflow run not left RUNNING.
    assert [p for p in run_dir.rglob("*") if ".tmp" in p.name or ".old-" in p.name] == []
    state = run_dir / "student_run" / "state"
    assert sorted(p.name for p in state.iterdir()) == ["step_10", "step_20"]
    assert [why_torn(state / n) for n in ("step_10", "step_20")] == [None, None]
    assert AutoModelForSequenceClassification.from_pretrained(run_dir / "student").config.num_hidden_layers == 1
    assert not (run_dir / "student" / "kdlab_summary.json").exists()
    interrupted = [r for r in mlflow_runs(run_dir) if r.info.run_name == "distill"]
    assert [r.info.status for r in interrupted] == ["FAILED"]

    # "run the same command again to continue": it resumes from step 20 and finishes
    again = subprocess.run([KDLAB, "distill", "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {state / 'step_20'} at step 20" in again.stdout
    assert json.loads((run_dir / "student" / "kdlab_summary.json").read_text())["steps"] == 26
