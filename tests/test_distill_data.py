"""What a student is trained on: its own tokenizer's tokens, the teacher's labels per text, a transfer set.

Each test runs the real `kdlab distill` (or `kdlab search`) on a tiny teacher and real SST-2 rows and asserts on
what the run left behind: the student folder, its summary, the teacher-label cache, the trial folders.
"""
import csv
import json
import os
from pathlib import Path

import optuna
import pytest
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from conftest import SST2, tiny_run_tree, write_config
from kdlab.scripts.cli import main as kdlab
from kdlab.train.soft_labels import choose_form, teacher_soft_labels
from kdlab.train.teacher import weights_digest

pytestmark = pytest.mark.slow


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "student" / "kdlab_summary.json").read_text())


def cache_entries() -> list[Path]:
    root = Path(os.environ["KDLAB_CACHE_DIR"]) / "teacher_logits"
    return sorted(p for p in root.iterdir() if (p / "logits.safetensors").is_file()) if root.is_dir() else []


def test_a_student_of_another_family_trains_on_its_own_tokens(tmp_path, tiny_teacher_dir, other_family_dir):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_run_tree(
        run_dir, tiny_teacher_dir, student={"pretrained": other_family_dir, "num_layers": 1}))
    assert kdlab(["distill", "--config", str(config)]) == 0
    student_tok = AutoTokenizer.from_pretrained(run_dir / "student")
    assert student_tok.get_vocab() == AutoTokenizer.from_pretrained(other_family_dir).get_vocab()
    assert student_tok.get_vocab() != AutoTokenizer.from_pretrained(tiny_teacher_dir).get_vocab()
    model_cfg = AutoConfig.from_pretrained(run_dir / "student")
    assert (model_cfg.vocab_size, model_cfg.hidden_size, model_cfg.num_hidden_layers) == (len(student_tok), 32, 1)
    summary = summary_of(run_dir)
    assert summary["teacher_logits_cached"] and summary["student"]["family"] == other_family_dir
    assert summary["training_data"]["labelled_rows"] == 200 and summary["training_data"]["transfer"] == {}
    assert summary["teacher_labels"]["form"] == "fp32" and summary["teacher_labels"]["rows"] == 200
    assert set(summary["grad_norm_start"]) == {"kd", "ce"} and min(summary["grad_norm_start"].values()) > 0
    # the student's second layer is the pretrained model's last (uniform, top-aligned), not a random one
    base = AutoModelForSequenceClassification.from_pretrained(other_family_dir, num_labels=2)
    first = AutoModelForSequenceClassification.from_pretrained(run_dir / "student")
    assert first.bert.embeddings.word_embeddings.weight.shape == base.bert.embeddings.word_embeddings.weight.shape


def test_a_transfer_set_is_labelled_once_and_trains_on_kd(tmp_path, tiny_teacher_dir):
    dev = [line.split("\t")[0] for line in (SST2 / "dev.tsv").read_text().splitlines()[1:3]]
    extra = tmp_path / "more.txt"
    extra.write_text("\n".join([dev[0], "  " + dev[1].replace(" ", "  "), "an unlabelled line of praise",
                                "a second unlabelled line", "a third one , dull"]) + "\n")
    transfer = {"unlabelled_train": True, "max_unlabelled": 300, "text_files": [str(extra)], "label_with": "fp32",
                "augment": {"copies": 1, "seed": 3}}
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_run_tree(run_dir, tiny_teacher_dir, distill={"transfer": transfer}))
    before = set(cache_entries())
    assert kdlab(["distill", "--config", str(config)]) == 0
    data = summary_of(run_dir)["training_data"]
    assert data["labelled_rows"] == 200
    assert data["transfer_dropped"]["equals_eval_or_test"] == 2  # the two dev sentences, spaces or not
    assert data["transfer"]["text_files"] == 3 and 0 < data["transfer"]["unlabelled_train"] <= 300
    assert 0 < data["transfer"]["augmented"] <= 200
    assert data["augment"]["copies"] == 1 and data["teacher_labels"] == "fp32"
    new = set(cache_entries()) - before
    # One entry per segment: the labelled rows (already cached when an earlier test fine-tuned the same tiny
    # teacher to the same weights), the unlabelled rows, the text file, the augmented copies.
    sizes = sorted(json.loads((p / "meta.json").read_text())["rows"] for p in new)
    transfer_sizes = sorted([data["transfer"]["unlabelled_train"], 3, data["transfer"]["augmented"]])
    assert sizes in (transfer_sizes, sorted(transfer_sizes + [200]))
    # Another student on the same teacher and texts reads the cache: nothing is labelled again.
    assert kdlab(["distill", "--config", str(config), "student.num_layers=2"]) == 0
    labels = summary_of(run_dir)["teacher_labels"]
    assert labels["reused"] and labels["rows"] == 200 + sum(data["transfer"].values())
    assert set(cache_entries()) - before == new


def test_search_trials_use_the_students_tokenizer(tmp_path, tiny_teacher_dir, other_family_dir):
    run_dir = tmp_path / "run"
    tree = tiny_run_tree(run_dir, tiny_teacher_dir, student={"pretrained": other_family_dir, "num_layers": 1},
                         target={"p95_ms": 10_000}, search={"n_trials": 1, "num_layers": [1], "recipes": ["fp32"],
                                                            "train_steps": 4, "seed_trials": 1})
    config = write_config(tmp_path / "c.yaml", tree)
    assert kdlab(["search", "--config", str(config), "tracking.enabled=false"]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    trial = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE][0]
    folder = run_dir / "trials" / str(trial.number)
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == AutoTokenizer.from_pretrained(other_family_dir).get_vocab()
    assert AutoConfig.from_pretrained(folder).hidden_size == 32  # cut from the pretrained model, not the teacher


def test_a_search_over_two_families_trains_each_on_its_own_tokens(tmp_path, tiny_teacher_dir, other_family_dir,
                                                                 monkeypatch):
    """search.families: [teacher, <other family>]: the two seed trials are one student of each family, each trained
    and scored on its own tokenizer's tokens and saved with it, cut from its own weights; the teacher's reference
    point reads the teacher's tokens."""
    run_dir = tmp_path / "run"
    tree = tiny_run_tree(run_dir, tiny_teacher_dir, target={"p95_ms": "teacher*100", "min_quality": "teacher*0.1"},
                         search={"n_trials": 2, "recipes": ["fp32"], "train_steps": 4, "seed_trials": 2,
                                 "families": ["teacher", other_family_dir]})
    config = write_config(tmp_path / "c.yaml", tree)
    monkeypatch.setattr("kdlab.search.study.prune_checkpoints", lambda *a: None)  # keep off-front trials' folders
    assert kdlab(["search", "--config", str(config), "tracking.enabled=false"]) in (0, 3)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    trials = {t.user_attrs["family"]: t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert set(trials) == {"teacher", other_family_dir}
    for family, source, hidden in (("teacher", tiny_teacher_dir, AutoConfig.from_pretrained(tiny_teacher_dir).hidden_size),
                                   (other_family_dir, other_family_dir, 32)):
        folder = run_dir / "trials" / str(trials[family].number)
        assert AutoTokenizer.from_pretrained(folder).get_vocab() == AutoTokenizer.from_pretrained(source).get_vocab()
        assert AutoConfig.from_pretrained(folder).hidden_size == hidden
        assert trials[family].params["family"] == family
    with open(run_dir / "report" / "pareto.csv", newline="") as fh:
        assert {r["family"] for r in csv.DictReader(fh)} == {"teacher", other_family_dir}
    # The teacher's reference quality (what teacher*0.1 resolved against) is the teacher scored on its own tokens:
    # the same figure the fine-tune recorded on dev.
    reference = study.user_attrs["reference"]["quality"]
    recorded = json.loads((run_dir / "teacher" / "kdlab_teacher.json").read_text())
    assert reference == pytest.approx(recorded["dev"]["accuracy"], abs=1e-6), (reference, recorded["dev"])


def test_the_fast_labelling_form_is_used_only_after_its_dev_check(tiny_teacher_dir, tmp_path):
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    dev = [line.split("\t")[0] for line in (SST2 / "dev.tsv").read_text().splitlines()[1:65]]
    batches = [dict(tok(dev[i:i + 16], padding=True, return_tensors="pt")) for i in range(0, 64, 16)]
    said = []
    form, forward, check = choose_form(teacher, "auto", batches, min_agreement=0.5, temperature=2.0,
                                       workdir=tmp_path, threads=1, say=said.append)
    assert form == "onnx-int8" and check["rows"] == 64 and check["label_agreement"] >= 0.5
    assert "labelling with it" in said[-1]
    strict, _, check = choose_form(teacher, "auto", batches, min_agreement=1.0, temperature=2.0,
                                   workdir=tmp_path / "b", threads=1, say=said.append)
    assert strict == ("onnx-int8" if check["label_agreement"] == 1.0 else "fp32")
    logits, report = teacher_soft_labels(teacher, tok, [dev], weights=weights_digest(teacher), max_length=64,
                                         form="auto", dev_batches=batches, min_agreement=0.5, root=tmp_path / "c",
                                         say=said.append)
    assert report.form == "onnx-int8" and report.check["label_agreement"] >= 0.5 and logits.shape == (64, 2)
