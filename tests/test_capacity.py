"""The capacity plan (search/capacity.py): its arithmetic against hand-computed figures, and `kdlab report
--capacity` end to end against the same formula applied by hand to the latencies it measured."""
import json
import math

import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_run_tree, write_config
from kdlab.scripts.cli import main as kdlab
from kdlab.search.capacity import markdown, plan, plan_one

# batch -> (p50 ms, p95 ms) of one instance
LAT = {1: (2.0, 3.0), 8: (8.0, 10.0), 32: (24.0, 30.0)}


def test_largest_batch_within_the_slo_sets_throughput_and_instances():
    row = plan_one("m", LAT, target_rps=1000, p95_slo_ms=12, max_batch_size=32, headroom=0.3)
    # batch 8 is the largest with p95 <= 12 ms: 8 / 0.008 s = 1000 req/s; 1000 / (1000 x 0.7) -> 2 instances
    assert (row.batch_size, row.p95_ms) == (8, 10.0)
    assert row.throughput == pytest.approx(1000.0)
    assert row.instances == 2


def test_max_batch_size_and_zero_headroom():
    row = plan_one("m", LAT, target_rps=1000, p95_slo_ms=100, max_batch_size=16, headroom=0.0)
    assert row.batch_size == 8 and row.instances == 1  # batch 32 fits the SLO but exceeds the cap
    big = plan_one("m", LAT, target_rps=1000, p95_slo_ms=100, max_batch_size=32, headroom=0.0)
    assert big.batch_size == 32 and big.throughput == pytest.approx(32 / 0.024)  # 1333 req/s -> 1 instance
    assert big.instances == 1
    assert plan_one("m", LAT, target_rps=1334, p95_slo_ms=100, max_batch_size=32, headroom=0.0).instances == 2


def test_nothing_meets_the_slo():
    row = plan_one("slow", LAT, target_rps=10, p95_slo_ms=2.5, max_batch_size=32, headroom=0.3)
    assert row.batch_size is None and row.instances is None
    assert "no batch meets p95 <= 2.5 ms (batch 1: 3.00 ms)" == row.note
    text = markdown([row], target_rps=10, p95_slo_ms=2.5, headroom=0.3, conditions="cpu")
    assert "| slow | — | — | — | no batch meets" in text and "Assumes independent instances" in text


def test_plan_keeps_model_order_and_rejects_bad_headroom():
    rows = plan({"b": LAT, "a": {1: (1.0, 1.0)}}, target_rps=100, p95_slo_ms=5, max_batch_size=32, headroom=0.5)
    assert [r.label for r in rows] == ["b", "a"]
    assert rows[1].throughput == pytest.approx(1000.0) and rows[1].instances == 1
    with pytest.raises(ValueError, match="headroom"):
        plan_one("m", LAT, target_rps=1, p95_slo_ms=5, max_batch_size=1, headroom=1.0)


# ---------------------------------------------------------------- `kdlab report --capacity`, end to end


@pytest.mark.slow
def test_report_capacity_prints_the_plan_of_the_measured_latencies(tmp_path, tiny_teacher_dir, capsys):
    """gate + a one-trial search, then `kdlab report --capacity`: its printed table against the plan formula
    applied by hand to the latencies it measured (report/capacity.json)."""
    profile = {"batch_size": 1, "seq_len": "data", "warmup_iters": 2, "min_iters": 10, "min_seconds": 0.2,
               "repeats": 2, "threads": 1, "p95_tolerance": 1.0, "max_rounds": 3, "p95_ms": 10_000}
    tree = tiny_run_tree(tmp_path / "cap", tiny_teacher_dir, target=profile,
                         quantization={"recipes": ["fp32", "dynamic-int8"]},
                         search={"num_layers": [1], "hidden_size": [64], "num_heads": [4], "recipes": ["dynamic-int8"],
                                 "train_steps": 3, "seed_trials": 1, "n_trials": 1},
                         # no serving.p95_slo_ms: the SLO is the study's resolved target.p95_ms (10 s)
                         serving={"target_rps": 100_000, "headroom": 0.5, "batch_sizes": [1, 2, 4],
                                  "max_batch_size": 2})
    tree["name"] = "cap"
    tree["teacher"]["fine_tune"] = "never"
    tree["data"]["max_eval_samples"] = 64
    config = str(write_config(tmp_path / "cap.yaml", tree))
    assert kdlab(["gate", "--config", config]) == 0
    assert kdlab(["search", "--config", config]) == 0
    capsys.readouterr()
    assert kdlab(["report", "--config", config, "--capacity"]) == 0
    printed = capsys.readouterr().out.splitlines()

    result = json.loads((tmp_path / "cap" / "report" / "capacity.json").read_text())
    labels = ["teacher fp32", "teacher dynamic-int8", "trial 0 (dynamic-int8)"]  # teacher, best gate recipe, front
    assert list(result["latency"]) == labels
    assert (result["p95_slo_ms"], result["target_rps"], result["headroom"]) == (10_000, 100_000, 0.5)
    assert ("Capacity for 100000 requests/s at p95 <= 10000 ms, 50% headroom (cpu, 1 thread(s), sequence length "
            "data):") in printed
    for label in labels:
        measured = {int(b): v for b, v in result["latency"][label].items()}
        assert sorted(measured) == [1, 2, 4]
        # Every batch meets a 10 s SLO; batch 4 exceeds serving.max_batch_size 2: an instance serves batch 2.
        assert all(v["p95_ms"] <= 10_000 for v in measured.values())
        p50, p95 = measured[2]["p50_ms"], measured[2]["p95_ms"]
        throughput = 2 / (p50 / 1e3)
        instances = max(1, math.ceil(100_000 / (throughput * (1 - 0.5))))
        assert f"| {label} | 2 | {p95:.2f} | {throughput:.0f} | {instances} |" in printed
        row = next(r for r in result["rows"] if r["label"] == label)
        assert (row["batch_size"], row["instances"]) == (2, instances)
        assert row["throughput"] == pytest.approx(throughput)
    client = MlflowClient(tracking_uri=tree["tracking"]["uri"])
    parent = client.search_runs([client.get_experiment_by_name("cap").experiment_id],
                                filter_string="attributes.run_name = 'search'")[0]
    assert {"capacity.md", "capacity.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
