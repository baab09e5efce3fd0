"""Tracking faults: an unreachable MLflow server at start is one line; one lost mid-run does not stop training."""
import json
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_run_tree, write_config
from distill.config import load_config
from train.tracking import Tracker, mlflow_run


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket closes


def test_unreachable_server_at_start_is_one_line_and_leaves_nothing(tmp_path, tiny_teacher_dir):
    run_dir = tmp_path / "run"
    uri = f"http://kdlab:s3cret@127.0.0.1:{_closed_port()}"
    config = write_config(tmp_path / "c.yaml", tiny_run_tree(run_dir, tiny_teacher_dir, tracking={"uri": uri}))
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "distill.py"), "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kdlab: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "tracking.uri: cannot reach the MLflow server at http://kdlab:***@127.0.0.1" in lines[0]
    assert "s3cret" not in proc.stderr and not run_dir.exists()


def test_a_server_lost_mid_run_switches_to_local_records_and_says_so(tmp_path, monkeypatch, capsys):
    import mlflow
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                             "name=lost", "data.train_file=t.tsv", "data.eval_file=d.tsv"])
    calls = {"n": 0}
    real = mlflow.log_metrics

    def flaky(metrics, step=None, **kw):  # the server answers twice, then is gone
        calls["n"] += 1
        if calls["n"] > 2:
            raise ConnectionError("Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch")
        return real(metrics, step=step, **kw)

    monkeypatch.setattr(mlflow, "log_metrics", flaky)
    with mlflow_run(cfg, "distill", True) as tracker:
        for step in range(1, 6):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        tracker.set_tags({"kdlab.checkpoint": "x"})
    err = capsys.readouterr().err
    assert "MLflow tracking lost" in err and "training goes on" in err
    assert "was lost at step 3" in err and "4 record(s) kept" in err
    records = [json.loads(line) for line in (tmp_path / "run" / "tracking_offline.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "metrics"] == [3, 4, 5]
    assert records[0]["data"] == {"loss": pytest.approx(1 / 3)} and records[0]["run_id"] == tracker.run_id
    sent = mlflow.MlflowClient().get_metric_history(tracker.run_id, "loss")
    assert [m.step for m in sent] == [1, 2]  # nothing after the loss was silently dropped: it is in the file


def test_a_tracker_without_a_fallback_still_raises(monkeypatch):
    import mlflow
    monkeypatch.setattr(mlflow, "log_metrics", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("down")))
    with pytest.raises(ConnectionError):
        Tracker(True).log_metrics({"loss": 1.0}, step=1)


@pytest.mark.slow
def test_a_real_server_stopped_mid_run_leaves_training_finished_and_the_gap_recorded(tmp_path, tiny_teacher_dir):
    """A real `mlflow server`, stopped while `accelerate launch train/distill.py` trains."""
    import contextlib
    import os
    import time

    import mlflow

    from postgres import mlflow_server
    from test_distill_entry import ACCELERATE, SCRIPT

    run_dir = tmp_path / "run"
    with contextlib.ExitStack() as server:
        uri = server.enter_context(mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts",
                                                 workers=1))
        tree = tiny_run_tree(run_dir, tiny_teacher_dir, tracking={"uri": uri},
                             train={"max_steps": 400, "log_every_steps": 1, "eval_every_steps": 100})
        config = write_config(tmp_path / "c.yaml", tree)
        cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_1proc.yaml"), SCRIPT,
               "--config", str(config)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        client = mlflow.MlflowClient(uri)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      filter_string="tags.`kdlab.stage` = 'distill'")
            if runs and client.get_metric_history(runs[0].info.run_id, "distill/loss"):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "training ended before the server could be stopped"
    # the server is gone now; training must go on to the end
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "MLflow tracking lost" in err and "MLflow tracking was lost at step" in err
    records = [json.loads(line) for line in (run_dir / "tracking_offline.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "metrics" and r["step"] is not None]
    assert steps and max(steps) == 400  # the last step's loss is kept, not dropped
    summary = json.loads((run_dir / "student" / "kdlab_summary.json").read_text())
    assert summary["steps"] == 400
