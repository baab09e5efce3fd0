"""`kdlab gate --model DIR` and `kdlab export --model DIR` on the student of `accelerate launch train/distill.py`.

Run: .venv/bin/python -m pytest -q tests/test_model_candidate.py

The student comes from the launcher (configs/accelerate/cpu_1proc.yaml) on a tiny teacher and 200 real SST-2
rows; the teacher's own gate stores the fp32 figures that the student's relative targets resolve against. The
tests assert on what the commands leave behind: the model's gate table and gate.json beside (never over) the
teacher's report, the export's manifest, parity and card, the distillation's MLflow run tagged with the export
and the registered version logged on that run; and that measuring and exporting build no Accelerator, so that
a training later in the same process gets the config's mixed precision and gradient accumulation.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import pytest
from transformers import AutoModelForSequenceClassification

from conftest import tiny_run_tree, write_config
from kdlab.scripts.cli import main as kdlab
from test_distill_entry import launch

pytestmark = pytest.mark.slow
PROFILE = {"batch_size": 1, "seq_len": "data", "warmup_iters": 2, "min_iters": 10, "min_seconds": 0.2,
           "repeats": 2, "threads": 1, "p95_tolerance": 1.0, "max_rounds": 3}
# Relative to the fp32 teacher; loose enough that a 1-layer student of a random 2-layer teacher passes on a busy
# machine too (its p95 is below the teacher's; its accuracy near the teacher's, both near chance).
FACTORS = {"p95_ms": 20.0, "min_quality": 0.5}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def reset_accelerate() -> None:
    """Forget every Accelerator an earlier test of this process built (accelerate keeps them in shared state)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def accelerate_initialised() -> bool:
    from accelerate.state import AcceleratorState, GradientState, PartialState
    return bool(PartialState._shared_state or AcceleratorState._shared_state or GradientState._shared_state)


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_teacher_dir):
    """A config, and the student its real `accelerate launch train/distill.py` wrote to run/student."""
    root = tmp_path_factory.mktemp("model_candidate")
    tree = tiny_run_tree(root / "run", tiny_teacher_dir, quantization={"recipes": ["fp32", "dynamic-int8"]},
                         target={**PROFILE, **{k: f"teacher*{f}" for k, f in FACTORS.items()}},
                         train={"num_epochs": 1}, export={"latency_batch_sizes": [1, 4]})
    tree["name"] = "cand"
    config = write_config(root / "cand.yaml", tree)
    launch(config)
    return root, config, root / "run" / "student"


@pytest.fixture(scope="module")
def gated(student):
    """The teacher's gate, then the student's, both in this process, from a process state with no Accelerator."""
    root, config, folder = student
    reset_accelerate()
    teacher_code = kdlab(["gate", "--config", str(config)])
    teacher_csv = root / "run" / "report" / "gate.csv"
    teacher_bytes = teacher_csv.read_bytes()
    code = kdlab(["gate", "--config", str(config), "--model", str(folder)])
    yield {"teacher_code": teacher_code, "teacher_bytes": teacher_bytes, "code": code}
    reset_accelerate()


def model_report(root: Path) -> Path:
    found = list((root / "run" / "gate_models").iterdir())
    assert len(found) == 1 and found[0].name.startswith("student-"), found
    return found[0]


def test_gate_model_measures_the_student_against_the_teachers_stored_fp32(student, gated, capsys):
    root, config, folder = student
    summary = json.loads((folder / "kdlab_summary.json").read_text())
    teacher_csv = root / "run" / "report" / "gate.csv"
    assert gated["teacher_code"] in (0, 3) and gated["code"] in (0, 3)
    # The teacher's report is the teacher's: the model's gate writes beside it.
    assert teacher_csv.read_bytes() == gated["teacher_bytes"]
    report = model_report(root)
    rows = read_csv(report / "gate.csv")
    assert [(r["recipe"], r["status"], r["candidate"]) for r in rows] == [("fp32", "ok", "True"),
                                                                          ("dynamic-int8", "ok", "True")]
    # The student scored with its own tokenizer on the dev rows its training evaluated: the same accuracy.
    assert float(rows[0]["quality"]) == pytest.approx(summary["best_dev"]["accuracy"])
    assert {(r["device"], r["threads"], r["batch_size"], r["seq_len"]) for r in rows} == {("cpu", "1", "1", "data")}

    # Relative targets: the factor times the fp32 teacher's figure as the teacher's gate.csv stores it.
    fp32 = next(r for r in read_csv(teacher_csv) if r["recipe"] == "fp32")
    record = json.loads((report / "gate.json").read_text())
    assert record["targets"]["p95_ms"] == pytest.approx(FACTORS["p95_ms"] * float(fp32["p95_ms"]))
    assert record["targets"]["min_quality"] == pytest.approx(FACTORS["min_quality"] * float(fp32["quality"]))
    assert record["targets"]["max_size_mb"] is None
    assert record["model"] == str(folder.resolve()) and record["distill_run_id"] == summary["mlflow_run_id"]
    meets = [r["recipe"] for r in rows if r["meets_targets"] == "True"]
    for r in rows:
        expected = (float(r["p95_ms"]) <= record["targets"]["p95_ms"]
                    and float(r["quality"]) >= record["targets"]["min_quality"])
        assert (r["meets_targets"] == "True") == expected, r
    md = (report / "gate.md").read_text()
    assert md.startswith(f"# Gate: model {folder} × quantization recipes") and "(teacher*20.0)" in md

    # The verdict names a command that exists: the export of this folder under the first passing recipe.
    assert meets and gated["code"] == 0 and record["verdict"] == "PASS" and record["recipe"] == meets[0]
    assert record["message"].endswith(f"export it with: kdlab export --config {config} --model {folder} "
                                      f"--recipe {meets[0]}")
    assert (report / "gate.md").read_text().strip().endswith(f"**{record['message']}**")

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cand").experiment_id
    gate_run = client.search_runs([experiment], filter_string="tags.kdlab.stage = 'gate-model'")
    assert len(gate_run) == 1
    tags, metrics = gate_run[0].data.tags, gate_run[0].data.metrics
    assert tags["kdlab.model"] == str(folder.resolve()) and tags["kdlab.distill_run_id"] == summary["mlflow_run_id"]
    assert metrics["target_p95_ms"] == pytest.approx(record["targets"]["p95_ms"])
    assert len(client.search_runs([experiment], filter_string="tags.kdlab.stage = 'gate'")) == 1  # the teacher's


def test_export_model_registers_it_on_the_distillation_run(student, gated, capsys):
    root, config, folder = student
    summary = json.loads((folder / "kdlab_summary.json").read_text())
    rows = read_csv(model_report(root) / "gate.csv")
    meeting = [r for r in rows if r["meets_targets"] == "True"]
    best = max(meeting, key=lambda r: (float(r["quality"]), -float(r["p95_ms"])))
    assert kdlab(["export", "--config", str(config), "--model", str(folder)]) == 0
    out = root / "run" / "export"
    manifest = json.loads((out / "manifest.json").read_text())
    choice = manifest["choice"]
    assert (choice["kind"], choice["recipe"], manifest["served"]["recipe"]) == ("model", best["recipe"], best["recipe"])
    # Paths as manifests record them (kdlab.eval.paths): the folder relative to the run folder it lies in.
    assert choice["label"] == "model <run>/student" and choice["source"] == "<run>/student"
    assert choice["search_figures"]["quality"] == pytest.approx(float(best["quality"]))
    assert choice["architecture"] == summary["student"]
    assert manifest["parity"]["rows"] == 200 and manifest["parity"]["bound"] == 0.99
    assert manifest["parity"]["label_agreement"] >= 0.99
    assert manifest["parity"]["reference_quality"] == pytest.approx(summary["best_dev"]["accuracy"])
    # The folder is the student: same weights (the fp32 model's dev quality is the training's), its tokenizer.
    exported = AutoModelForSequenceClassification.from_pretrained(out)
    assert exported.config.num_hidden_layers == 1
    card = (out / "README.md").read_text()
    assert "Distilled from the teacher" in card and "the model's own tokenizer" in card

    # MLflow: the export is logged on the distillation's run, which says where it went and which version it is.
    reg = manifest["mlflow"]
    assert reg["run_id"] == summary["mlflow_run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version(reg["model_name"], reg["version"])
    assert version.run_id == summary["mlflow_run_id"]
    assert str(client.get_model_version_by_alias(reg["model_name"], "champion").version) == reg["version"]
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "distill" and run.info.status == "FINISHED"
    assert run.data.tags["kdlab.export"] == str(out)
    assert run.data.tags["kdlab.export_version"] == f"{reg['model_name']}/{reg['version']}"
    assert run.data.tags["kdlab.export_recipe"] == best["recipe"]


def test_export_model_recipe_must_be_one_its_gate_measured(student, gated, capsys):
    root, config, folder = student
    capsys.readouterr()
    assert kdlab(["export", "--config", str(config), "--model", str(folder), "--recipe", "onnx-int8",
                  "--out", str(root / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"kdlab: error: --recipe: 'onnx-int8' was not measured by kdlab gate --model {folder}; "
                   f"measured: fp32, dynamic-int8")
    assert not (root / "never").exists()
    # --recipe R exports the folder under R, as its gate measured it.
    out = root / "int8"
    assert kdlab(["export", "--config", str(config), "--model", str(folder), "--recipe", "dynamic-int8",
                  "--out", str(out), "export.register=false"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["choice"]["kind"], manifest["served"]["recipe"]) == ("model", "dynamic-int8")
    rows = {r["recipe"]: r for r in read_csv(model_report(root) / "gate.csv")}
    assert manifest["choice"]["search_figures"]["p95_ms"] == pytest.approx(float(rows["dynamic-int8"]["p95_ms"]))


def test_gate_and_export_build_no_accelerator_and_a_later_training_gets_its_own(student, gated, tmp_path):
    _, config, folder = student
    # The fixture's two gates ran in this process; an export now, with nothing registered.
    assert kdlab(["export", "--config", str(config), "--model", str(folder), "--recipe", "fp32",
                  "--out", str(tmp_path / "fp32"), "export.register=false"]) == 0
    assert not accelerate_initialised()
    # A distillation in the same process afterwards: bf16 and accumulation as configured. (Before, the gate's
    # Accelerator(cpu=True) fixed mixed precision 'no' for the process, and this run raised.) With 2 batches per
    # step, one epoch is 7 steps over all 13 batches (200 rows); accumulation ignored would stop after 7 batches.
    run2 = tmp_path / "run2"
    assert kdlab(["distill", "--config", str(config), f"output_dir={run2}", "teacher.fine_tune=never",
                  "train.mixed_precision=bf16", "train.grad_accum_steps=2", "train.num_epochs=1"]) == 0
    summary = json.loads((run2 / "student" / "kdlab_summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and summary["steps"] == 7
    assert summary["samples_per_second"] * summary["train_seconds"] == pytest.approx(200, rel=0.03)


def test_a_seq2seq_model_folder_is_gated_and_exported_the_same_way(tmp_path, capsys):
    """A T5 trained elsewhere (here: built with random weights), under a seq2seq config with absolute targets."""
    from conftest import DATA
    from kdlab.scripts.build_t5 import build_t5
    multi30k = DATA / "multi30k"
    lines = [line for lang in ("de", "en") for line in (multi30k / f"train.{lang}").read_text().splitlines()[:300]]
    model = build_t5(tmp_path / "t5", lines, vocab_size=300, d_model=32, layers=1, heads=2)
    data = {}
    for key, lang in (("eval_file", "de"), ("eval_target_file", "en")):
        rows = (multi30k / f"val.{lang}").read_text().splitlines()[:16]
        (tmp_path / f"dev.{lang}").write_text("\n".join(rows) + "\n")
        data[key] = str(tmp_path / f"dev.{lang}")
    data.update(train_file=data["eval_file"], train_target_file=data["eval_target_file"])
    tree = {"name": "s2s", "output_dir": str(tmp_path / "run"), "task": {"type": "seq2seq"},
            "data": {**data, "max_length": 48, "max_target_length": 48}, "teacher": {"source": str(model)},
            "target": {**PROFILE, "p95_ms": 60000}, "quantization": {"recipes": ["fp32", "dynamic-int8"]},
            "generation": {"max_new_tokens": 8}, "export": {"latency_batch_sizes": [1], "register": False},
            "serving": {"target_rps": 5, "p95_slo_ms": 60000, "batch_sizes": [1, 2]},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    config = write_config(tmp_path / "s2s.yaml", tree)
    assert kdlab(["gate", "--config", str(config), "--model", str(model)]) == 0  # absolute targets: no teacher gate
    report = next((tmp_path / "run" / "gate_models").iterdir())
    rows = read_csv(report / "gate.csv")
    assert [(r["recipe"], r["status"], r["meets_targets"]) for r in rows] == [("fp32", "ok", "True"),
                                                                              ("dynamic-int8", "ok", "True")]
    assert not (tmp_path / "run" / "report").exists()  # the teacher's report folder: untouched, never created
    assert kdlab(["export", "--config", str(config), "--model", str(model)]) == 0
    manifest = json.loads((tmp_path / "run" / "export" / "manifest.json").read_text())
    best = max(rows, key=lambda r: (float(r["quality"]), -float(r["p95_ms"])))
    assert (manifest["task"]["type"], manifest["choice"]["kind"], manifest["served"]["recipe"]) == (
        "seq2seq", "model", best["recipe"])
    # The export's fp32 BLEU on the dev set is what the gate measured for fp32: same model, rows and decoding.
    assert manifest["parity"]["reference_quality"] == pytest.approx(float(rows[0]["quality"]), abs=1e-3)
    # The capacity plan counts whole generate calls. By hand from its measured latencies (search/capacity.py):
    # throughput = batch / (p50 + batch x serving.replica_ms), replicas = ceil(5 / (throughput x 0.7)), batch 2
    # only at 10 % more requests/s.
    cap = manifest["capacity"]
    assert cap["unit"] == "one whole generate call (1 beam(s), at most 8 new tokens)"
    assert set(cap["latency"]) == {"1", "2"}
    thr = {b: b / ((cap["latency"][str(b)]["p50_ms"] + b * cap["replica_ms"]) / 1000) for b in (1, 2)}
    b = 2 if thr[2] > thr[1] * 1.1 else 1
    assert (cap["plan"]["batch_size"], cap["plan"]["instances"]) == (b, max(1, math.ceil(5 / (thr[b] * 0.7))))
    assert 0 < cap["tokens_per_request"] <= 8  # generation.max_new_tokens bounds every output
    assert cap["tokens_per_s_per_instance"] == pytest.approx(thr[b] * cap["tokens_per_request"], rel=1e-9)
    assert cap["latency"]["1"]["p50_ms"] == manifest["latency"][0]["p50_ms"]  # one timing serves both
    assert "## Capacity" in (tmp_path / "run" / "export" / "README.md").read_text()
    # A target no recipe meets: MISS (exit 3), and the default export then refuses with one line; --recipe still works.
    export = tmp_path / "run" / "export"
    assert kdlab(["gate", "--config", str(config), "--model", str(model), "target.p95_ms=0.000001"]) == 3
    assert json.loads((report / "gate.json").read_text())["message"].endswith(
        f"{model} cannot serve within the targets (kdlab search --config {config} looks for a student that can)")
    before = (export / "manifest.json").read_bytes()
    capsys.readouterr()
    assert kdlab(["export", "--config", str(config), "--model", str(model), "--force"]) == 2
    assert capsys.readouterr().err == (f"kdlab: error: --model: no recipe that kdlab gate --model {model} measured "
                                       f"meets the targets ({report / 'gate.csv'}: fp32, dynamic-int8); choose one "
                                       f"with --recipe R\n")
    assert (export / "manifest.json").read_bytes() == before  # the earlier export is untouched


def test_a_gate_that_must_fine_tune_the_teacher_builds_the_training_accelerator(tmp_path, tiny_teacher_dir):
    """The one Accelerator the gate may build is train/accel.py's, and only to fine-tune: accumulation as set."""
    from accelerate.state import AcceleratorState, GradientState
    tree = tiny_run_tree(tmp_path / "run", tiny_teacher_dir, target=PROFILE, quantization={"recipes": ["fp32"]},
                         train={"grad_accum_steps": 2})
    config = write_config(tmp_path / "ft.yaml", tree)
    reset_accelerate()
    try:
        assert kdlab(["gate", "--config", str(config)]) == 0  # no target set: fp32 meets "every target"
        marker = json.loads((tmp_path / "run" / "teacher" / "kdlab_teacher.json").read_text())
        assert marker["steps"] == 7  # 13 batches of 16, two per optimizer step
        assert GradientState().num_steps == 2 and AcceleratorState().mixed_precision == "no"
        # The teacher is fine-tuned now: the same gate again builds nothing.
        reset_accelerate()
        assert kdlab(["gate", "--config", str(config)]) == 0
        assert not accelerate_initialised()
    finally:
        reset_accelerate()
