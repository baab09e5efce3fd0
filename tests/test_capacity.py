"""The capacity plan's arithmetic (search/capacity.py) against hand-computed figures."""
import pytest

from search.capacity import markdown, plan, plan_one

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
