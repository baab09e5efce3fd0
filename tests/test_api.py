"""The README's Python API example, run as written on a tiny teacher and 200 real SST-2 rows.

Run: .venv/bin/python -m pytest -q tests/test_api.py

The example's code block is read from README.md (between the api-example markers) and run unchanged in
a fresh interpreter whose working folder holds a tiny `configs/smoke.yaml`; the test asserts on what it
prints and leaves behind, and checks its predictions against a raw forward of the exported model.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_run_tree, write_config
from test_oracles import RawServed, labels_of

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PROFILE = {"batch_size": 1, "seq_len": "data", "warmup_iters": 2, "min_iters": 10, "min_seconds": 0.2,
           "repeats": 2, "threads": 1, "p95_ms": "teacher*20", "min_quality": "teacher*0.5"}


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- api-example -->\n```python\n(.*?)```\n<!-- /api-example -->", text, re.S)
    assert match, "README.md: no api-example block"
    return match.group(1)


def test_the_readme_api_example_runs_and_its_predictions_are_the_exported_models(tmp_path, tiny_teacher_dir):
    run_dir = tmp_path / "runs" / "smoke"
    tree = tiny_run_tree(run_dir, tiny_teacher_dir, target=PROFILE,
                         quantization={"recipes": ["fp32", "dynamic-int8"]}, export={"latency_batch_sizes": [1]})
    tree["name"] = "smoke"
    tree["tracking"]["uri"] = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "configs").mkdir()
    write_config(tmp_path / "configs" / "smoke.yaml", tree)
    code = readme_example()
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()

    # What it left: the student (40 steps, as the override asks), its gate, the export of that student.
    summary = json.loads((run_dir / "student" / "kdlab_summary.json").read_text())
    assert summary["steps"] == 40
    export = tmp_path / "runs" / "smoke" / "student_export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["choice"]["kind"] == "model" and manifest["served"]["recipe"] == "dynamic-int8"
    assert any(line.startswith(("PASS", "MISS")) for line in lines)
    quality, p95 = map(float, next(line for line in lines if re.fullmatch(r"[0-9.]+ [0-9.]+", line)).split())
    assert quality == manifest["measured"]["quality"] and p95 == manifest["latency"][0]["p95_ms"]

    # kdlab.predict's answer against a raw forward of the exported weights under the same recipe.
    [predicted] = ast.literal_eval(lines[-1])
    raw = RawServed(export, "dynamic-int8").probs(["a gripping , funny film"])
    assert predicted["label"] == labels_of(raw, manifest["labels"])[0]
    assert list(predicted["probs"]) == manifest["labels"]
    assert [predicted["probs"][k] for k in manifest["labels"]] == pytest.approx(raw[0].tolist(), abs=1e-6)
