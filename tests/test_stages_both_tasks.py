"""Each stage function over both built-in tasks: `run_gate`, `run_export`, `predict` and `run_capacity` call the
task for what differs (data, teacher, measurement, the export folder, the served artefact, one request's latency)
and keep the rest themselves, so classification and seq2seq go through the same code.

    .venv/bin/python -m pytest tests/test_stages_both_tasks.py -q
"""
from __future__ import annotations

import csv
import dataclasses

import pytest

from conftest import tiny_run_tree, write_config
from kdlab.distill.config import load_config
from kdlab.distill.task import task_of
from kdlab.api import load_export, predict
from kdlab.eval.latency import clamp_threads
from kdlab.search.capacity import plan_for, run_capacity
from kdlab.search.export import run_export, summary_line
from kdlab.search.gate import run_gate
from test_seq2seq import pairs, seq2seq_tree, tiny_t5_dir  # noqa: F401  (fixtures)

FAST = {"warmup_iters": 1, "min_iters": 5, "min_seconds": 0.1, "repeats": 1, "max_rounds": 1, "p95_tolerance": 1.0}


@pytest.fixture(params=["classification", "seq2seq"])
def config(request, tmp_path, tiny_teacher_dir):
    """A tiny config of each task, fp32 only, timed briefly; the teacher is fine-tuned by the gate itself."""
    run = tmp_path / "run"
    if request.param == "classification":
        tree = tiny_run_tree(run, tiny_teacher_dir)
    else:
        tree = seq2seq_tree(run, request.getfixturevalue("tiny_t5_dir"), request.getfixturevalue("pairs"))
    tree.setdefault("target", {}).update(FAST)
    tree["quantization"] = {"recipes": ["fp32"]}
    tree.setdefault("tracking", {})["enabled"] = False
    return load_config(write_config(tmp_path / "c.yaml", tree))


@pytest.mark.slow
def test_gate_export_and_predict_are_one_function_each_for_both_tasks(config):
    task = task_of(config)
    result = run_gate(config)
    (row,) = result.rows
    metric = config.task.metric
    assert (row.recipe, row.status, metric) == ("fp32", "ok", task.metrics[0])
    # The fp32 artefact is the teacher itself: the gate's score of it is the task's own dev score of the teacher.
    assert row.quality == pytest.approx(result.conditions["teacher_dev"][metric], abs=1e-9)
    assert 0 <= row.quality <= task.quality_scale and row.p95_ms > 0
    assert result.conditions["metric"] == metric and result.conditions["threads"] >= 1
    with open(config.run_dir / "report" / "gate.csv", newline="") as fh:
        (written,) = list(csv.DictReader(fh))
    assert (written["recipe"], float(written["quality"])) == ("fp32", pytest.approx(row.quality))

    # export: with no targets the teacher's fp32 meets them; the export's own dev score of it is the gate's
    assert result.passed is not None and result.passed.recipe == "fp32"
    manifest = run_export(config)
    assert manifest["task"]["type"] == config.task.type and manifest["choice"]["kind"] == "teacher"
    assert manifest["measured"]["quality"] == pytest.approx(row.quality, abs=1e-6)
    assert summary_line(manifest, config.run_dir / "export").startswith("exported teacher fp32 (fp32) to ")

    # predict: one record per text in the task's terms, from the served artefact
    served = load_export(config.run_dir / "export")
    texts = ["Ein Mann fährt Fahrrad.", "a gripping film"]
    records = predict(served, texts)
    if config.task.type == "seq2seq":
        assert records == [{"output": out} for out in served.generate_texts(texts)]
    else:
        labels, probs = served.predict_texts(texts)
        assert [r["label"] for r in records] == labels
        for record, row in zip(records, probs.tolist()):
            assert list(record["probs"].values()) == pytest.approx(row, abs=1e-7)
        assert all(r["label"] == max(r["probs"], key=r["probs"].get) for r in records)

    # capacity: the same stage function times the teacher per request as the task serves one (a forward pass, a
    # whole generate) at each batch size, and plans from exactly those figures
    planned = dataclasses.replace(config, serving=dataclasses.replace(config.serving, target_rps=5, p95_slo_ms=60_000,
                                                                      batch_sizes=[1, 2]))
    cap = run_capacity(planned, [])
    assert cap["unit"] == task.capacity_unit(config) and list(cap["latency"]) == ["teacher fp32"]
    table = {int(b): (v["p50_ms"], v["p95_ms"]) for b, v in cap["latency"]["teacher fp32"].items()}
    assert sorted(table) == [1, 2] and all(0 < p50 <= p95 for p50, p95 in table.values())
    (row,) = cap["rows"]
    assert row == dataclasses.asdict(plan_for(planned, "teacher fp32", table, clamp_threads(config.target.threads)[0]))
    assert row["batch_size"] in (1, 2) and row["instances"] >= 1
