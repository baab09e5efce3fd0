"""Portable paths (eval/paths.py): what manifests, model cards and benchmark results record instead of
absolute paths of the machine that ran them; and the committed benchmark results hold none.

Run: .venv/bin/python -m pytest -q tests/test_paths.py
"""
from __future__ import annotations

import json

import pytest

from conftest import DATA, ROOT
from kdlab.eval.paths import portable_path, portable_record, portable_text

RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def test_paths_inside_the_repository_are_relative_to_its_root():
    assert portable_path(ROOT / "configs" / "sst2_minilm.yaml") == "configs/sst2_minilm.yaml"
    assert portable_path(str(ROOT / "runs" / "x" / "trials" / "3"), run=ROOT / "runs" / "x") == "runs/x/trials/3"
    assert portable_path(ROOT) == "."


def test_paths_inside_the_data_root_start_with_its_marker(monkeypatch):
    assert portable_path(DATA / "sst2" / "dev.tsv") == "<data>/sst2/dev.tsv"
    monkeypatch.chdir(ROOT)  # the configs' relative form, read from the repository
    assert portable_path("../shared/data/sst2/train.tsv") == "<data>/sst2/train.tsv"


def test_named_roots_then_relative_as_given_then_the_name_alone(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert portable_path(run / "trials" / "3", run=run) == "<run>/trials/3"
    assert portable_path(run, run=run) == "<run>"
    assert portable_path(tmp_path / "teachers" / "minilm") == "<local>/minilm"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "teacher").mkdir()
    assert portable_path("../teacher") == "../teacher"  # relative, outside every root: as the user wrote it


@pytest.mark.parametrize("source", ["minilm-l6", "google/flan-t5-base", "sentence-transformers/all-MiniLM-L6-v2"])
def test_hub_ids_and_named_teachers_are_kept(source):
    assert portable_path(source) == source


def test_empty_values_are_kept():
    assert portable_path(None) is None and portable_path("") == ""


def test_paths_inside_text_are_rewritten_and_nothing_else(tmp_path):
    work = tmp_path / "w"
    text = (f"predict --model {work}/teacher --input {DATA}/sst2/train.tsv --output {work}/t.jsonl; "
            f"tracking.uri=sqlite:///{work}/mlflow.db sqlite:///runs/mlflow.db models:/exp@champion 9 requests/s "
            f"(kdlab search --config {ROOT}/configs/multi30k_t5.yaml). Written to /nowhere/out.json.")
    assert portable_text(text, work=work) == (
        "predict --model <work>/teacher --input <data>/sst2/train.tsv --output <work>/t.jsonl; "
        "tracking.uri=sqlite:///<work>/mlflow.db sqlite:///runs/mlflow.db models:/exp@champion 9 requests/s "
        "(kdlab search --config configs/multi30k_t5.yaml). Written to <local>/out.json.")
    assert portable_record({"a": [f"output_dir={work}", 3, None, work / "x"]}, work=work) == \
        {"a": ["output_dir=<work>", 3, None, "<work>/x"]}


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_committed_benchmark_results_name_no_folder_of_a_machine(path):
    text = path.read_text()
    for folder in ("/work/", "/tmp/", "/root/", "/home/", str(ROOT), str(DATA)):
        assert folder not in text, f"{path.name} records {folder}"
    # Every string is already portable: no absolute path is left for the writer to rewrite.
    result = json.loads(text)
    assert portable_record(result) == result


def test_the_committed_results_are_there():  # the parametrized check above would pass vacuously on none
    assert {p.name for p in RESULTS} >= {"export_sst2.json", "seq2seq_multi30k.json", "gate_sst2.json"}
