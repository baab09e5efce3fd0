"""The real `accelerate launch train/distill.py` on a tiny teacher and real SST-2 rows.

Each test asserts on what the run leaves behind: checkpoints, the summary, MLflow runs.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

from conftest import ROOT, free_port, tiny_run_tree, write_config

pytestmark = pytest.mark.slow
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
SCRIPT = str(ROOT / "train" / "distill.py")


def launch(config: Path, *overrides, processes: int = 1, check: bool = True, launcher: tuple = ()):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if processes == 1:
        cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_1proc.yaml"), *launcher]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes),
               "--main_process_port", str(free_port())]
    proc = subprocess.run([*cmd, SCRIPT, "--config", str(config), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def pause_env(stage_step: str, release: Path) -> dict:
    """The environment of a run that pauses after a known step (train/loop.py's test hook, `pause_point`):
    after step N of stage STAGE ("distill:40") it writes `release`.reached and waits until `release` exists."""
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "KDLAB_PAUSE_AFTER_STEP": stage_step,
            "KDLAB_PAUSE_FILE": str(release)}


def wait_for_pause(release: Path, proc: subprocess.Popen, log: Path | None = None, timeout_s: float = 600) -> dict:
    """Block until the run of `proc` is paused (its `release`.reached exists); returns what it wrote there.

    `timeout_s` only bounds a broken run: nothing here races the machine's speed."""
    reached = release.with_name(release.name + ".reached")
    deadline = time.monotonic() + timeout_s
    while not reached.is_file():
        tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before its pause\n{tail}"
        assert time.monotonic() < deadline, f"no pause within {timeout_s} s\n{tail}"
        time.sleep(0.05)
    return json.loads(reached.read_text())


def mlflow_client(run_dir: Path) -> mlflow.MlflowClient:
    """A client on the run's SQLite store (what tiny_run_tree's tracking.uri names), not the process-wide URI."""
    return mlflow.MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")


def mlflow_runs(run_dir: Path, experiment: str = "tiny"):
    client = mlflow_client(run_dir)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {run_dir.parent / 'mlflow.db'}"
    return client.search_runs([found.experiment_id])


def test_launch_fine_tunes_teacher_distils_and_logs(tmp_path, tiny_teacher_dir):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_run_tree(run_dir, tiny_teacher_dir))
    proc = launch(config)

    summary = json.loads((run_dir / "student" / "kdlab_summary.json").read_text())
    student = AutoModelForSequenceClassification.from_pretrained(run_dir / "student")
    assert student.config.num_hidden_layers == 1 and student.config.num_labels == 2
    assert summary["student_params"] == sum(p.numel() for p in student.parameters())
    labels = summary["teacher_labels"]
    assert summary["teacher_logits_cached"] and labels["rows"] == 200 and labels["form"] == "fp32"
    assert (Path(os.environ["KDLAB_CACHE_DIR"]) / "teacher_logits" / labels["key"] / "logits.safetensors").is_file()
    assert summary["mixed_precision"] == "no"  # what configs/accelerate/cpu_1proc.yaml says
    assert (run_dir / "teacher" / "kdlab_teacher.json").is_file() and (run_dir / "config.yaml").is_file()
    assert "dev accuracy" in proc.stdout

    runs = {r.info.run_name: r for r in mlflow_runs(run_dir)}
    assert set(runs) == {"teacher-finetune", "distill"}
    distill = runs["distill"]
    assert distill.data.params["student.num_layers"] == "1"
    assert distill.data.params["distill.temperature"] == "2.0"
    assert distill.data.metrics["best_dev_accuracy"] == pytest.approx(summary["best_dev"]["accuracy"])
    client = mlflow_client(run_dir)
    history = [m.value for m in client.get_metric_history(distill.info.run_id, "distill/loss")]
    assert len(history) == summary["steps"] == 26  # 200 rows / 16 = 13 steps x 2 epochs
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5  # the loss fell

    # A second run with the same teacher config reuses the fine-tuned teacher, and the launcher's
    # --mixed_precision reaches training when the config leaves train.mixed_precision unset.
    again = launch(config, "student.init=random", "train.max_steps=2", launcher=("--mixed_precision", "bf16"))
    assert "reusing fine-tuned checkpoint" in again.stdout
    assert json.loads((run_dir / "student" / "kdlab_summary.json").read_text())["mixed_precision"] == "bf16"
    assert len([r for r in mlflow_runs(run_dir) if r.info.run_name == "teacher-finetune"]) == 1


def test_resume_continues_step_count(tmp_path, tiny_teacher_dir):
    run_dir = tmp_path / "run"
    tree = tiny_run_tree(run_dir, tiny_teacher_dir, train={"max_steps": 6, "save_state_every_steps": 3})
    config = write_config(tmp_path / "c.yaml", tree)
    launch(config)
    states = sorted(p.name for p in (run_dir / "student_run" / "state").iterdir())
    assert states == ["finished.json", "step_3", "step_6"]  # finished: the same command would start over
    proc = launch(config, "train.max_steps=10", "train.resume_from=latest")  # extending it resumes explicitly
    assert "at step 6" in proc.stdout
    summary = json.loads((run_dir / "student" / "kdlab_summary.json").read_text())
    assert summary["steps"] == 10
    history = mlflow_client(run_dir).get_metric_history(summary["mlflow_run_id"], "distill/loss")
    assert [m.step for m in history] == [7, 8, 9, 10]


def test_two_cpu_processes_split_the_batches(tmp_path, tiny_teacher_dir):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_run_tree(run_dir, tiny_teacher_dir, train={"num_epochs": 1}))
    launch(config, processes=2)
    summary = json.loads((run_dir / "student" / "kdlab_summary.json").read_text())
    assert summary["steps"] == 7  # 13 batches of 16 shared by 2 ranks: ceil(13 / 2)
    assert 0.0 <= summary["best_dev"]["accuracy"] <= 1.0


@pytest.mark.parametrize("override,message", [
    ("data.train_file=/nonexistent/train.tsv", "data.train_file: file not found: /nonexistent/train.tsv"),
    ("data.text_column=text", "data.text_column: column 'text' not in"),
    ("student.num_heads=5", "student.num_heads: 5 heads do not divide hidden_size 64"),
    ("train.warmup=0.1", "unknown key 'train.warmup'"),
    ("train.batch_size=big", "train.batch_size: expected an integer, got 'big'"),
    ("teacher.source=/nonexistent/teacher", "teacher.source: folder not found: /nonexistent/teacher"),
])
def test_bad_input_exits_2_with_one_line_and_no_run_folder(tmp_path, tiny_teacher_dir, override, message):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_run_tree(run_dir, tiny_teacher_dir))
    proc = subprocess.run([sys.executable, SCRIPT, "--config", str(config), override], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last.startswith("kdlab: error: ") and message in last
    assert not run_dir.exists()


def test_a_pretrained_student_without_its_tokenizer_is_refused(tmp_path, tiny_teacher_dir):
    other = tmp_path / "other_vocab"
    BertModel(BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(other)
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_run_tree(run_dir, tiny_teacher_dir))
    proc = subprocess.run([sys.executable, SCRIPT, "--config", str(config), f"student.pretrained={other}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"kdlab: error: student.pretrained: {other} has no tokenizer files (one of tokenizer.json, vocab.txt, "
        f"vocab.json, spiece.model, tokenizer.model, sentencepiece.bpe.model, merges.txt); a student of another "
        f"family tokenizes with its own: save its tokenizer beside the weights")
    assert not run_dir.exists()
