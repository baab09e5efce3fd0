"""The gate (`kdlab gate`): tiny random-init teacher, 128 real SST-2 dev rows, a seconds-long target profile.

Run: .venv/bin/python -m pytest -q tests/test_gate.py

End-to-end tests run the real `kdlab gate` and assert on its exit code, its one-line verdict,
report/gate.csv and gate.md, and the MLflow runs; unit tests pin the target arithmetic.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from accelerate import Accelerator

from conftest import ROOT, tiny_run_tree, write_config
from kdlab.distill.config import ConfigError, TargetConfig, load_config
from kdlab.distill.quantize import RECIPES, Quantized
from kdlab.scripts.cli import main as kdlab
from kdlab.search.classification_gate import dev_quality
from kdlab.search.gate import run_gate
from kdlab.search.targets import GateRow, Targets, check_row, resolve_targets, target_gaps, verdict
from kdlab.search.timing import timing_batches

KDLAB = [sys.executable, "-m", "kdlab"]
FAST_PROFILE = {"batch_size": 1, "seq_len": "data", "warmup_iters": 2, "min_iters": 10, "min_seconds": 0.2,
                "repeats": 2, "threads": 1}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One folder (and one MLflow database) for the module; each test uses its own config name."""
    return tmp_path_factory.mktemp("gate")


def gate_config(root: Path, teacher: str, name: str, recipes: list, **target) -> Path:
    tree = tiny_run_tree(root / name, teacher, target={**FAST_PROFILE, **target},
                         quantization={"recipes": recipes})
    tree["name"] = name
    tree["teacher"]["fine_tune"] = "never"  # a random head is enough to time and score; no training
    tree["data"]["max_eval_samples"] = 128
    tree["tracking"]["uri"] = f"sqlite:///{root / 'mlflow.db'}"
    return write_config(root / f"{name}.yaml", tree)


def gate(config: Path, *overrides):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*KDLAB, "gate", "--config", str(config), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- end to end


def test_loose_target_passes_and_leaves_table_files_and_mlflow_runs(root, tiny_teacher_dir):
    recipes = ["fp32", "fp16", "dynamic-int8", "onnx-int8"]
    config = gate_config(root, tiny_teacher_dir, "loose", recipes, p95_ms=10_000, min_quality=0.01, max_size_mb=1000)
    proc = gate(config)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    verdict_line = proc.stdout.strip().splitlines()[-1]
    # fp32 comes first in the ladder and meets these loose targets: the cheapest change wins.
    assert verdict_line.startswith("PASS: fp32 meets p95 ≤ 10000.00 ms")
    assert f"kdlab export --config {config} --recipe fp32" in verdict_line

    report = root / "loose" / "report"
    rows = read_csv(report / "gate.csv")
    assert [r["recipe"] for r in rows] == recipes
    by = {r["recipe"]: r for r in rows}
    assert by["fp16"]["status"] == "skipped" and "CUDA" in by["fp16"]["reason"] and by["fp16"]["p95_ms"] == ""
    for name in ("fp32", "dynamic-int8", "onnx-int8"):
        r = by[name]
        assert r["status"] == "ok" and r["meets_targets"] == "True", r
        assert 0.0 <= float(r["quality"]) <= 1.0
        assert 0 < float(r["p50_ms"]) <= float(r["p95_ms"]) <= float(r["p99_ms"])
        assert (r["threads"], r["batch_size"], r["seq_len"]) == ("1", "1", "data")
        assert 3 <= float(r["seq_len_median"]) <= 48  # real SST-2 lengths, truncated at data.max_length
    # onnx-int8 quantizes the MatMul weights only: on this 2-layer, 64-wide model the fp32 MiniLM-vocabulary
    # embedding table (7.8 MB) is most of either file, so int8 is smaller, but not by half.
    assert float(by["onnx-int8"]["size_mb"]) < float(by["fp32"]["size_mb"])
    md = (report / "gate.md").read_text()
    assert "| recipe | quality | p50 ms | p95 ms |" in md and verdict_line in md and "skipped: fp16 needs" in md
    assert (root / "loose" / "gate" / "onnx-int8" / "model.int8.onnx").is_file()

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("loose").experiment_id])
    parents = [r for r in runs if r.info.run_name == "gate"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["kdlab.gate"] == "PASS" and parent.data.tags["kdlab.gate_recipe"] == "fp32"
    assert parent.data.metrics["target_p95_ms"] == 10_000
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(recipes) and len(runs) == 1 + len(recipes)
    skipped = children["fp16"].data
    assert skipped.tags["status"] == "skipped" and "CUDA" in skipped.tags["reason"] and not skipped.metrics
    dyn = children["dynamic-int8"].data
    assert dyn.params == {"recipe": "dynamic-int8", "threads": "1", "batch_size": "1", "seq_len": "data",
                          "seq_len_median": by["dynamic-int8"]["seq_len_median"], "device": "cpu"}
    assert set(dyn.metrics) == {"quality", "p50_ms", "p95_ms", "p99_ms", "cv", "throughput", "size_mb"}
    assert dyn.metrics["p95_ms"] == pytest.approx(float(by["dynamic-int8"]["p95_ms"]))
    assert dyn.tags["status"] == "ok" and dyn.tags["meets_targets"] == "true"

    # The PASS line's command is a real one: run it as printed and look at the export it leaves.
    printed = shlex.split(verdict_line.split("export it with: ", 1)[1])
    assert printed == ["kdlab", "export", "--config", str(config), "--recipe", "fp32"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(Path(sys.executable).parent / printed[0]), *printed[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    export = root / "loose" / "export"
    assert proc.stdout.strip().splitlines()[-1].startswith(f"exported teacher fp32 (fp32) to {export}: quality ")
    manifest = json.loads((export / "manifest.json").read_text())
    choice = manifest["choice"]
    assert (choice["kind"], choice["label"], choice["recipe"], choice["trial"]) == ("teacher", "teacher fp32", "fp32",
                                                                                   None)
    # teacher.fine_tune=never: the teacher folder itself, outside the repository, the data and the run: by name
    assert choice["source"] == f"<local>/{Path(tiny_teacher_dir).name}"
    assert manifest["served"]["recipe"] == "fp32"
    # The figures the choice carries are the gate's own row for that recipe.
    assert choice["search_figures"]["p95_ms"] == pytest.approx(float(by["fp32"]["p95_ms"]))
    assert choice["search_figures"]["quality"] == pytest.approx(float(by["fp32"]["quality"]))
    assert (export / "model.safetensors").is_file() and (export / "README.md").is_file()


def test_export_recipe_must_be_one_the_gate_measured(root, tiny_teacher_dir, capsys):
    config = gate_config(root, tiny_teacher_dir, "recipes", ["fp32", "fp16", "dynamic-int8"], p95_ms=10_000)
    run_dir = root / "recipes"
    assert kdlab(["export", "--config", str(config), "--recipe", "fp32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"kdlab: error: --recipe: 'fp32' was not measured by the gate; no recipe was measured "
                   f"({run_dir / 'report' / 'gate.csv'} is missing or lists none); run kdlab gate --config {config}")
    assert not run_dir.exists()

    assert kdlab(["gate", "--config", str(config)]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in run_dir.iterdir())
    # fp16 was skipped (no CUDA), onnx-int8 not in this ladder, int3 no recipe at all: none was measured.
    for recipe in ("fp16", "onnx-int8", "int3"):
        assert kdlab(["export", "--config", str(config), "--recipe", recipe]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"kdlab: error: --recipe: '{recipe}' was not measured by the gate; measured recipes in "
                       f"{run_dir / 'report' / 'gate.csv'}: fp32, dynamic-int8")
        assert sorted(p.name for p in run_dir.iterdir()) == before  # no export/, no staging folder
    assert kdlab(["export", "--config", str(config), "--recipe", "fp32", "--trial", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("kdlab: error: --trial and --recipe: give one of --trial, --pick, --recipe (or none, for the "
                   "most accurate feasible model)")


def test_impossible_target_misses_with_the_gap_and_clamps_threads(root, tiny_teacher_dir):
    config = gate_config(root, tiny_teacher_dir, "impossible", ["fp32", "dynamic-int8"],
                         p95_ms=1e-6, max_size_mb=1000, threads=(os.cpu_count() or 1) + 62)
    proc = gate(config)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"target.threads: threads={(os.cpu_count() or 1) + 62} exceeds the {os.cpu_count()} CPUs" in proc.stderr
    rows = read_csv(root / "impossible" / "report" / "gate.csv")
    assert {r["threads"] for r in rows} == {str(os.cpu_count())}  # clamped, and the table says so
    assert all(r["meets_targets"] == "False" and r["misses"] == "p95" for r in rows)
    best = min(rows, key=lambda r: float(r["p95_ms"]))
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"MISS: best p95 {float(best['p95_ms']):.2f} ms ({best['recipe']}) vs budget 0.00 ms: "
                           f"missed by {float(best['p95_ms']) - 1e-6:.2f} ms")
    assert "best size" in line and line.endswith(f"distillation needed (kdlab search --config {config})")
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = client.search_runs([client.get_experiment_by_name("impossible").experiment_id],
                                filter_string="tags.kdlab.stage = 'gate'")[0]
    assert parent.data.tags["kdlab.gate"] == "MISS"
    assert parent.data.metrics["gap_p95_ms"] == pytest.approx(float(best["p95_ms"]) - 1e-6, rel=1e-3)


def test_relative_targets_resolve_against_the_fp32_teacher_of_the_same_run(root, tiny_teacher_dir):
    config = gate_config(root, tiny_teacher_dir, "relative", ["dynamic-int8"],
                         p95_ms="teacher*2", min_quality="teacher*0.9", max_size_mb="teacher*0.5")
    cfg = load_config(config, ["tracking.enabled=false"])
    result = run_gate(cfg, Accelerator(cpu=True))
    reference, dyn = result.rows
    # fp32 was not asked for, but relative targets need it: measured as a reference, never a candidate.
    assert (reference.recipe, reference.candidate, dyn.recipe) == ("fp32", False, "dynamic-int8")
    assert result.targets.p95_ms == pytest.approx(2 * reference.p95_ms)
    assert result.targets.min_quality == pytest.approx(0.9 * reference.quality)
    assert result.targets.max_size_mb == pytest.approx(0.5 * reference.size_mb)
    # The artefact's quality comes from running it on the dev set: fp32 agrees with the training loop's eval.
    assert reference.quality == pytest.approx(result.conditions["teacher_dev"]["accuracy"])
    # Embeddings dominate a 64-wide model and dynamic int8 leaves them fp32: it cannot halve the size.
    assert "size" in dyn.misses and result.passed is None and result.exit_code == 3
    assert result.gaps["max_size_mb"]["gap"] == pytest.approx(dyn.size_mb - 0.5 * reference.size_mb)
    assert "fp32 (ref)" in (root / "relative" / "report" / "gate.md").read_text()


# ---------------------------------------------------------------- bad input


BAD = [
    (["quantization.recipes=[fp32,int3]"],
     "quantization.recipes: unknown recipe 'int3'; valid: " + ", ".join(RECIPES)),
    (["target.p95_ms=-5"], "target.p95_ms: must be > 0, got -5"),
    (["target.p95_ms=0"], "target.p95_ms: must be > 0, got 0"),
    (["target.max_size_mb=0"], "target.max_size_mb: must be > 0, got 0"),
    (["target.min_quality=teacher/2"], "target.min_quality: cannot read 'teacher/2'; valid: a positive number or"),
    (["target.p95_ms=teacher*0"], "target.p95_ms: factor in 'teacher*0' must be > 0"),
    (["target.min_quality=97"], "target.min_quality: 97.0 is above 1"),
    (["target.seq_len=auto"], "target.seq_len: 'auto'; valid: a positive integer, or 'data'"),
    (["target.min_seconds=-1"], "target.min_seconds: must be >= 0"),
    (["target.device=tpu"], "target.device: 'tpu'; valid: cpu, cuda"),
    (["target.seq_len=4096"], "target.seq_len: 4096 exceeds the teacher's max_position_embeddings 128"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_input_exits_2_with_one_line(root, tiny_teacher_dir, capsys, overrides, message):
    config = gate_config(root, tiny_teacher_dir, "bad", ["fp32"])
    assert kdlab(["gate", "--config", str(config), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdlab: error: ") and message in err and "\n" not in err, err
    assert not (root / "bad").exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_target_without_cuda_is_a_one_line_error(root, tiny_teacher_dir, capsys):
    config = gate_config(root, tiny_teacher_dir, "nocuda", ["fp32"])
    assert kdlab(["gate", "--config", str(config), "target.device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "target.device: 'cuda' but this machine has no CUDA device" in err and "\n" not in err


def test_relative_target_without_a_teacher_reference_is_a_config_error():
    with pytest.raises(ConfigError, match=r"target.p95_ms: 'teacher\*0.5' is relative to the fp32 teacher"):
        resolve_targets(TargetConfig(p95_ms="teacher*0.5"), None)
    skipped = GateRow("fp32", status="skipped", reason="fp32 failed at first forward on cuda")
    with pytest.raises(ConfigError, match="failed at first forward") as info:
        resolve_targets(TargetConfig(min_quality="teacher*0.97"), skipped)
    assert "\n" not in str(info.value)
    absolute = resolve_targets(TargetConfig(p95_ms=12, min_quality=0.9, max_size_mb="5e1"), None)
    assert (absolute.p95_ms, absolute.min_quality, absolute.max_size_mb) == (12.0, 0.9, 50.0)


def test_config_defaults_list_the_full_ladder(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", {"data": {"dataset": "glue"}}))
    assert cfg.quantization.recipes == list(RECIPES) and cfg.quantization.allow_cpu_bf16 is False
    assert (cfg.target.warmup_iters, cfg.target.min_iters, cfg.target.repeats) == (10, 30, 5)


# ---------------------------------------------------------------- targets and verdict by hand


def row(name, p95, quality, size, candidate=True):
    return GateRow(name, p95_ms=p95, quality=quality, size_mb=size, stable=True, cv=0.01, candidate=candidate)


def judged(rows, targets):
    for r in rows:
        r.misses = check_row(r, targets)
        r.meets = not r.misses
    return rows


LADDER = [("fp32", 10.0, 0.90, 80.0), ("dynamic-int8", 4.0, 0.88, 20.0), ("onnx-int8", 3.0, 0.85, 19.0)]


def test_first_recipe_in_ladder_order_that_meets_every_target_passes():
    targets = Targets(p95_ms=5.0, min_quality=0.87)
    passed, message = verdict(judged([row(*r) for r in LADDER], targets), targets, "c.yaml")
    assert passed.recipe == "dynamic-int8"  # onnx-int8 is faster but misses quality
    assert message == ("PASS: dynamic-int8 meets p95 ≤ 5.00 ms (4.00 ms) and quality ≥ 0.8700 (0.8800); "
                       "export it with: kdlab export --config c.yaml --recipe dynamic-int8")


def test_a_figure_exactly_at_its_limit_meets_it():
    # The documented rule is p95 <= budget, quality >= floor, size <= max (the PASS line prints ≤ and ≥).
    targets = Targets(p95_ms=4.0, min_quality=0.88, max_size_mb=20.0)
    at_limit = judged([row("dynamic-int8", 4.0, 0.88, 20.0)], targets)
    assert at_limit[0].misses == [] and at_limit[0].meets
    passed, message = verdict(at_limit, targets, "c.yaml")
    assert passed.recipe == "dynamic-int8"
    assert message == ("PASS: dynamic-int8 meets p95 ≤ 4.00 ms (4.00 ms) and quality ≥ 0.8800 (0.8800) and "
                       "size ≤ 20.0 MB (20.0 MB); export it with: kdlab export --config c.yaml --recipe dynamic-int8")
    # The smallest step past each limit misses it.
    over = judged([row("dynamic-int8", math.nextafter(4.0, math.inf), math.nextafter(0.88, 0.0),
                       math.nextafter(20.0, math.inf))], targets)
    assert over[0].misses == ["p95", "quality", "size"]
    # teacher*1 resolves to the fp32 teacher's own p95, which then meets it exactly.
    fp32 = row("fp32", 7.31, 0.9, 80.0)
    relative = resolve_targets(TargetConfig(p95_ms="teacher*1"), fp32)
    assert relative.p95_ms == 7.31 and check_row(fp32, relative) == []


def test_miss_reports_the_gap_per_target():
    targets = Targets(p95_ms=2.0, min_quality=0.95, max_size_mb=50.0)
    rows = judged([row(*r) for r in LADDER], targets)
    gaps = target_gaps(rows, targets)
    assert gaps["p95_ms"] == {"best": 3.0, "recipe": "onnx-int8", "limit": 2.0, "gap": 1.0}
    assert gaps["min_quality"]["recipe"] == "fp32" and gaps["min_quality"]["gap"] == pytest.approx(0.05)
    assert gaps["max_size_mb"] == {"best": 19.0, "recipe": "onnx-int8", "limit": 50.0, "gap": -31.0}
    passed, message = verdict(rows, targets, "c.yaml")
    assert passed is None
    assert message.startswith("MISS: best p95 3.00 ms (onnx-int8) vs budget 2.00 ms: missed by 1.00 ms; "
                              "best quality 0.9000 (fp32) vs floor 0.9500: missed by 0.0500; "
                              "best size 19.0 MB (onnx-int8) vs max 50.0 MB: met")


def test_targets_met_separately_but_not_together_still_miss():
    targets = Targets(p95_ms=3.5, min_quality=0.89)
    passed, message = verdict(judged([row(*r) for r in LADDER], targets), targets, None)
    assert passed is None and "no single recipe meets every target at once" in message


def test_reference_row_never_passes_and_skipped_rows_are_not_candidates():
    targets = Targets(p95_ms=100.0)
    rows = judged([row("fp32", 10.0, 0.9, 80.0, candidate=False)], targets)
    rows.append(GateRow("fp16", status="skipped", reason="fp16 needs a CUDA device"))
    passed, message = verdict(rows, targets, None)
    assert passed is None and message.startswith("MISS: no recipe ran on the target (fp16: fp16 needs a CUDA device)")


def test_quality_is_computed_from_the_artefacts_own_predictions():
    labels = torch.tensor([0, 1, 1, 0, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [1.0, 0.5], [0.0, 2.0]])  # predicts 0,1,0,0,1
    batches = [{"input_ids": torch.zeros(3, 4, dtype=torch.long), "labels": labels[:3]},
               {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels[3:]}]
    outputs = iter([logits[:3], logits[3:]])
    served = Quantized("fake", "cpu", 1.0, [], lambda batch: next(outputs))
    assert dev_quality(served, batches, "accuracy", 2) == pytest.approx(4 / 5)
    outputs = iter([logits[:3], logits[3:]])
    served = Quantized("fake", "cpu", 1.0, [], lambda batch: next(outputs))
    assert dev_quality(served, batches, "f1", 2) == pytest.approx(0.8)  # tp 2, fp 0, fn 1: 2*2/(2*2+0+1)


def test_timing_batches_are_real_rows_padded_per_batch_or_fixed_random_ids(minilm_dir):
    import datasets
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    sentences = ["a", "a fine film", "bad", "a long and winding sentence about a film", "ok", "meh", "good fun"]
    ds = datasets.Dataset.from_dict(dict(tok(sentences)))
    batches, lengths = timing_batches(ds, tok, 3, "data", vocab_size=len(tok), seed=0)
    assert len(batches) == 2 and all(b["input_ids"].shape[0] == 3 for b in batches)
    real = sorted(len(ids) for ids in ds["input_ids"])
    assert lengths["seq_len_median"] == real[len(real) // 2]
    for b in batches:  # padded to the batch's own longest row, not to a global length
        assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())
    fixed, info = timing_batches(ds, tok, 4, 16, vocab_size=len(tok), seed=0)
    assert fixed[0]["input_ids"].shape == (4, 16) and info == {"seq_len_median": 16, "padded_len_median": 16}
    assert int(fixed[0]["attention_mask"].sum()) == 64
