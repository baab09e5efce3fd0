"""Tracking faults: an unreachable MLflow server at start is one line; one lost mid-run does not stop training."""
import json
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_run_tree, write_config
from kdlab.distill.config import load_config
from kdlab.train.tracking import Tracker, mlflow_run


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket closes


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


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
    sent = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_metric_history(tracker.run_id, "loss")
    assert [m.step for m in sent] == [1, 2]  # nothing after the loss was silently dropped: it is in the file


def test_a_tracker_without_a_fallback_still_raises(monkeypatch):
    import mlflow
    monkeypatch.setattr(mlflow, "log_metrics", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("down")))
    with pytest.raises(ConnectionError):
        Tracker(True).log_metrics({"loss": 1.0}, step=1)


@pytest.mark.slow
def test_a_real_server_stopped_mid_run_leaves_training_finished_and_the_gap_recorded(tmp_path, tiny_teacher_dir):
    """A real `mlflow server`, stopped while `accelerate launch train/distill.py` is paused after step 50
    (train/loop.py's pause hook); released, training must go on to step 400 with steps 51-400 kept locally."""
    import os
    import signal
    import time

    import mlflow

    from postgres import mlflow_server
    from test_distill_entry import ACCELERATE, SCRIPT, pause_env, wait_for_pause

    run_dir = tmp_path / "run"
    release, out_log, err_log = tmp_path / "release", tmp_path / "out.log", tmp_path / "err.log"
    proc = None
    try:
        with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", workers=1) as uri:
            tree = tiny_run_tree(run_dir, tiny_teacher_dir, tracking={"uri": uri},
                                 train={"max_steps": 400, "log_every_steps": 1, "eval_every_steps": 100})
            config = write_config(tmp_path / "c.yaml", tree)
            cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_1proc.yaml"), SCRIPT,
                   "--config", str(config)]
            # Output to files, not pipes: nothing reads them while the run is paused.
            with open(out_log, "w") as out, open(err_log, "w") as err:
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, start_new_session=True,
                                        env=pause_env("distill:50", release))
            reached = wait_for_pause(release, proc, err_log)
            assert (reached["stage"], reached["step"]) == ("distill", 50)
        # mlflow_server stopped the server; once nothing answers on its port, release the run: it must go on
        port, deadline = int(uri.rsplit(":", 1)[1]), time.monotonic() + 60
        while _answers(port):
            assert time.monotonic() < deadline, f"something still answers on port {port}"
            time.sleep(0.1)
        release.touch()
        assert proc.wait(timeout=600) == 0, err_log.read_text()[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err_log.read_text()
    assert "MLflow tracking lost" in err and "MLflow tracking was lost at step 51 " in err  # the first call after
    summary = json.loads((run_dir / "student" / "kdlab_summary.json").read_text())
    assert summary["steps"] == 400
    records = [json.loads(line) for line in (run_dir / "tracking_offline.jsonl").read_text().splitlines()]
    assert {r["run_id"] for r in records} == {summary["mlflow_run_id"]}
    kept = [r["step"] for r in records if r["kind"] == "metrics" and "distill/loss" in r["data"]]
    assert kept == list(range(51, 401))  # every step after the loss, once each, up to the last
    assert [r["step"] for r in records if "distill/dev_accuracy" in r["data"]] == [100, 200, 300, 400]
    # what the server stored before it stopped: steps 1-50, so no step is missing or in both places
    sent = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'server.db'}").get_metric_history(summary["mlflow_run_id"],
                                                                                          "distill/loss")
    assert sorted(m.step for m in sent) == list(range(1, 51))
