"""Issue 16's seam: a task kdlab does not ship (tests/token_task.py, token tagging) through the real
`kdlab gate` (teacher and `--model DIR`), `kdlab search`, `kdlab export` and `kdlab predict`, given as
`task.type: token_task:TokenTagTask`, with no stage module changed.

    .venv/bin/python -m pytest tests/test_token_task.py -q
"""
from __future__ import annotations

import csv
import json

import optuna
import pytest
import torch
from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

from conftest import DATA, write_config
from kdlab.distill.task import load_task
from kdlab.scripts.cli import main as kdlab

PROFILE = {"batch_size": 1, "seq_len": "data", "warmup_iters": 2, "min_iters": 10, "min_seconds": 0.2,
           "repeats": 2, "threads": 1, "p95_tolerance": 1.0, "max_rounds": 3}


def first_piece_tags(tokenizer, model, words: list[str]) -> list[int]:
    """By hand, one sentence alone: the argmax tag of each word's first word piece."""
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        tags = model(**enc).logits[0].argmax(-1).tolist()
    first = {}
    for position, word in enumerate(enc.word_ids()):
        if word is not None:
            first.setdefault(word, position)
    return [tags[first[w]] for w in sorted(first)]


def load(folder):
    return AutoTokenizer.from_pretrained(folder), AutoModelForTokenClassification.from_pretrained(folder)


def word_tags(folder, sentence: str) -> list[int]:
    return first_piece_tags(*load(folder), sentence.split())


def tag_accuracy(folder, sentences: list[str]) -> float:
    """By hand: a word is right when the argmax tag of its first word piece says whether it starts with a capital."""
    tokenizer, model = load(folder)
    right = total = 0
    for sentence in sentences:
        words = sentence.split()
        tags = first_piece_tags(tokenizer, model, words)
        right += sum(tag == int(word[0].isupper()) for tag, word in zip(tags, words))
        total += len(tags)
    return right / total


@pytest.mark.slow
def test_a_task_from_outside_kdlab_goes_through_gate_search_export_and_predict(tmp_path, tiny_teacher_dir, capsys):
    lines = [line for line in (DATA / "multi30k" / "train.en").read_text(encoding="utf-8").splitlines() if line][:96]
    (tmp_path / "train.txt").write_text("\n".join(lines[:64]) + "\n", encoding="utf-8")
    (tmp_path / "dev.txt").write_text("\n".join(lines[64:]) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", {
        "name": "tags", "output_dir": str(run), "task": {"type": "token_task:TokenTagTask"},
        "data": {"train_file": str(tmp_path / "train.txt"), "eval_file": str(tmp_path / "dev.txt"), "max_length": 32},
        "teacher": {"source": tiny_teacher_dir, "num_epochs": 3, "learning_rate": 1e-3},
        "train": {"batch_size": 16, "eval_batch_size": 32, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                  "log_every_steps": 1},
        # Size decides, not timing: a 1-layer student is ~2 % smaller than the 2-layer teacher (embeddings dominate).
        "target": {**PROFILE, "max_size_mb": "teacher*0.99"},
        "quantization": {"recipes": ["fp32"]},
        "search": {"n_trials": 2, "num_layers": [1], "learning_rate": [1e-3, 3e-3], "recipes": ["fp32"],
                   "train_steps": 4, "latency_samples": 0, "seed_trials": 0, "stop_at": []},
        "export": {"register": False},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    assert load_task("token_task:TokenTagTask").name == "token-tags"

    # gate: the fine-tuned teacher under fp32 misses the size budget (it is the reference), scored by its own metric
    assert kdlab(["gate", "--config", str(config)]) == 3
    with open(run / "report" / "gate.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["recipe"], row["status"], row["misses"]) == ("fp32", "ok", "size")
    assert float(row["quality"]) == pytest.approx(tag_accuracy(run / "teacher", lines[64:]), abs=1e-12)

    # search: students cut to 1 layer, distilled on the teacher's per-token logits, feasible by size
    assert kdlab(["search", "--config", str(config)]) == 0
    study = optuna.load_study(study_name="tags", storage=f"sqlite:///{run / 'optuna.db'}")
    trained = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trained) == 2 and {t.params["learning_rate"] for t in trained} == {1e-3, 3e-3}
    teacher_mb = float(row["size_mb"])
    assert all(t.user_attrs["size_mb"] < teacher_mb * 0.99 and t.user_attrs["feasible"] for t in trained)
    for t in trained:  # the trial's own figure is its checkpoint's accuracy, as counted by hand
        if (run / "trials" / str(t.number)).is_dir():
            assert AutoConfig.from_pretrained(run / "trials" / str(t.number)).num_hidden_layers == 1
            assert t.values[0] == pytest.approx(tag_accuracy(run / "trials" / str(t.number), lines[64:]), abs=1e-12)

    # gate --model: a trained student folder, checked, tokenized and loaded by the task, measured as the teacher was
    best = max(trained, key=lambda t: (t.values[0], -t.values[1]))
    student = run / "trials" / str(best.number)
    assert kdlab(["gate", "--config", str(config), "--model", str(student)]) == 0  # 1 layer: within the size budget
    with open(next((run / "gate_models").iterdir()) / "gate.csv", newline="") as fh:
        (student_row,) = list(csv.DictReader(fh))
    assert float(student_row["quality"]) == pytest.approx(tag_accuracy(student, lines[64:]), abs=1e-12)
    assert float(student_row["size_mb"]) < teacher_mb * 0.99

    # export: the most accurate feasible trial, written and described by the task
    capsys.readouterr()
    assert kdlab(["export", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["task"] == {"type": "token_task:TokenTagTask", "metric": "token_accuracy"}
    assert (manifest["choice"]["kind"], manifest["choice"]["trial"]) == ("trial", best.number)
    assert manifest["measured"]["quality"] == pytest.approx(tag_accuracy(run / "export", lines[64:]), abs=1e-12)
    assert manifest["measured"]["quality"] == pytest.approx(best.values[0], abs=1e-12)
    assert out.strip().splitlines()[-1].startswith(f"exported trial {best.number}")
    assert {"model.safetensors", "config.json", "manifest.json"} <= {p.name for p in (run / "export").iterdir()}

    # capacity: `kdlab report --capacity` times the teacher and the front through the task (one request: one
    # forward pass tagging a text) and plans from what it measured
    assert kdlab(["report", "--config", str(config), "--capacity", "serving.target_rps=50",
                  "serving.p95_slo_ms=5000", "serving.batch_sizes=[1,2]"]) == 0
    cap = json.loads((run / "report" / "capacity.json").read_text())
    assert cap["unit"] == "one forward pass tagging every word of the request's texts"
    assert list(cap["latency"])[0] == "teacher fp32" and any(k.startswith("trial ") for k in cap["latency"])
    for label, table in cap["latency"].items():
        assert sorted(table) == ["1", "2"] and all(0 < v["p50_ms"] <= v["p95_ms"] for v in table.values()), label
    assert [r["label"] for r in cap["rows"]] == list(cap["latency"])

    # predict: the export's served artefact tags each word of a text file, one JSON line per text
    texts = lines[64:67]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert kdlab(["predict", "--model", str(run / "export"), "--input", str(tmp_path / "in.txt"),
                  "--output", str(tmp_path / "out.jsonl"), "--batch-size", "2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    names = ("lower", "capital")
    assert records == [{"row": i, "tags": [names[t] for t in word_tags(run / "export", text)]}
                       for i, text in enumerate(texts)]
