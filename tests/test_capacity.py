"""The capacity plan (search/capacity.py): its arithmetic against hand-worked figures, and `kdlab report
--capacity` end to end against the same formula applied by hand to the latencies it measured.

    .venv/bin/python -m pytest -q tests/test_capacity.py
"""
import json
import math

import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, tiny_run_tree, write_config
from kdlab.distill.config import ConfigError, load_config
from kdlab.scripts.cli import main as kdlab
from kdlab.search.classification_export import serving_latency
from kdlab.search.capacity import (Serving, batching_line, capacity_section, comparison_markdown, latency_cv, markdown,
                                  plan, plan_one, predicted_for, queue_wait_p95_ms)

# batch -> (p50 ms, p95 ms) of the model itself on one replica
LAT = {1: (2.0, 3.0), 8: (8.0, 10.0), 32: (24.0, 30.0)}


def test_best_throughput_within_the_slo_with_the_fill_wait_and_overhead():
    """By hand, 1000 req/s, 30 % headroom, 5 ms overhead, SLO 50 ms; queueing (Kingman, exponential tail):
    wait95 = rho / (1 - rho) x (1 + cv^2) / 2 x (1 / capacity) / rho x ln(rho / 0.05), cv = (p95 / p50 - 1) / 1.645.
    batch 1:  500 req/s/replica -> ceil(1000 / 350) = 3 replicas, capacity 1500, rho 2/3, cv 0.30395:
              wait95 = 2 x 0.546193 x 0.6667 ms / 0.6667 x ln(13.333) = 2.8296 ms; 3 + 5 + 2.83 = 10.83 ms: meets.
    batch 8:  1000 req/s -> ceil(1000 / 700) = 2 replicas, 500 req/s each: 7 / 500 s = 14 ms to fill;
              capacity 2000, rho 0.5, cv 0.15198: wait95 = 1 x 0.511549 x 0.5 / 0.5 x ln(10) = 1.1779 ms;
              14 + 10 + 5 + 1.18 = 30.18 ms: meets, and 2x batch 1's throughput.
    batch 32: 1333 req/s -> ceil(1000 / 933.3) = 2 replicas: 31 / 500 s = 62 ms to fill: 97.6 ms, misses
              (3 replicas fill slower still); the old plan (largest batch within the model's own p95) chose it."""
    row = plan_one("m", LAT, target_rps=1000, p95_slo_ms=50, max_batch_size=32, headroom=0.3, overhead_ms=5,
                   threads=2)
    assert row.batch_size == 8 and row.instances == 2 and row.batching_helps is True
    assert row.throughput == pytest.approx(1000.0)
    assert row.fill_wait_ms == pytest.approx(14.0) and row.batch_wait_timeout_s == pytest.approx(0.014)
    assert (row.model_p95_ms, row.p95_ms) == (10.0, pytest.approx(30.1779, abs=1e-3))
    by_batch = {o["batch_size"]: o for o in row.options}
    assert [by_batch[b]["replicas"] for b in (1, 8, 32)] == [3, 2, 2]
    assert by_batch[1]["queue_p95_ms"] == pytest.approx(2.8296, abs=1e-3)
    assert by_batch[1]["p95_ms"] == pytest.approx(10.8296, abs=1e-3)
    assert by_batch[32]["p95_ms"] == pytest.approx(97.618, abs=1e-3)
    assert [by_batch[b]["utilisation"] for b in (1, 8, 32)] == pytest.approx([2 / 3, 0.5, 0.375])
    assert [by_batch[b]["meets_slo"] for b in (1, 8, 32)] == [True, True, False]
    sv = row.serve
    assert (sv["num_replicas"], sv["threads"], sv["max_batch_size"]) == (2, 2, 8)
    assert sv["batch_wait_timeout_s"] == pytest.approx(0.014)
    # Little's law at the planned share: 1000 x 0.7 req/s x (14 + 8 + 5) ms = 18.9 requests in flight per replica
    assert sv["autoscaling"] == {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 18.9}
    # twice what a replica completes within the SLO, 2 x 1000 req/s x 0.050 s, above one batch running and one
    # filling (16): Ray Serve's router, not the replica, would otherwise hold the rest (see serve_settings)
    assert sv["max_ongoing_requests"] == 100
    assert sv["max_queued_requests"] == 100  # 2 replicas x 1000 req/s x 0.050 s: what can still meet the SLO
    assert batching_line(row) == "m: batching helps: batch 8 serves 1000 requests/s per replica, 2.0x batch 1's"


def test_the_seq2seq_plan_counts_whole_generate_calls_and_the_tokens_they_make(tmp_path):
    """By hand, a seq2seq model whose request is one whole `generate` (12 new tokens on average), 30 req/s,
    25 % headroom, 10 ms overhead, SLO 400 ms; generate p50/p95 per call: batch 1 40/50 ms, batch 4 100/120 ms:
    batch 1: 1 / 0.040 = 25 req/s per instance -> ceil(30 / (25 x 0.75)) = ceil(1.6) = 2 instances, capacity 50,
             rho 0.6, cv 0.15198: wait95 = 1.5 x 0.511549 x 20 ms / 0.6 x ln(12) = 63.56 ms;
             no fill wait: 50 + 10 + 63.56 = 123.56 ms, meets.
    batch 4: 4 / 0.100 = 40 req/s -> ceil(30 / 30) = 1 instance, which gets all 30 req/s: 3 / 30 s = 100 ms to
             fill; rho 0.75, cv 0.12158: wait95 = 3 x 0.507391 x 25 ms / 0.75 x ln(15) = 137.41 ms;
             100 + 120 + 10 + 137.41 = 367.41 ms, meets; 40 > 25 x 1.1, so batch 4: one instance,
             40 x 12 = 480 generated tokens/s. (At a 300 ms SLO batch 4 would miss: the queue, not the batch.)"""
    cfg = load_config(write_config(tmp_path / "c.yaml", {
        "name": "s", "task": {"type": "seq2seq"}, "data": {"train_file": "a.tsv", "eval_file": "b.tsv"},
        "serving": {"target_rps": 30, "p95_slo_ms": 400, "headroom": 0.25, "overhead_ms": 10, "batch_sizes": [1, 4],
                    "replica_ms": 0}}))  # the replica's own work a request: test_a_replicas_own_work_... below
    section = capacity_section(cfg, {1: (40.0, 50.0), 4: (100.0, 120.0)}, 2, label="export",
                               unit="one generate call", tokens_per_request=12.0)
    row = section["plan"]
    assert (row["batch_size"], row["instances"], row["threads"]) == (4, 1, 2)
    assert row["throughput"] == pytest.approx(40.0) and row["fill_wait_ms"] == pytest.approx(100.0)
    assert row["p95_ms"] == pytest.approx(367.41, abs=0.01)
    by_batch = {o["batch_size"]: o for o in row["options"]}
    assert (by_batch[1]["throughput"], by_batch[1]["replicas"]) == (pytest.approx(25.0), 2)
    assert by_batch[1]["p95_ms"] == pytest.approx(123.56, abs=0.01)
    assert section["tokens_per_s_per_instance"] == pytest.approx(480.0)
    assert section["unit"] == "one generate call" and section["latency"]["4"] == {"p50_ms": 100.0, "p95_ms": 120.0}


def test_batch_one_wins_when_batching_does_not_pay():
    """The SST-2 case of issue 17: batch 1 at p50 0.83 ms serves 1205 req/s; batch 16 at 24.7 ms only 648.
    Batch 1 at 300 req/s: rho 0.249, cv 0.19776: wait95 = 0.33156 x 0.519554 x 0.83 ms / 0.249 x ln(4.98)
    = 0.9218 ms; 1.1 + 3 + 0.92 = 5.02 ms."""
    lat = {1: (0.83, 1.1), 16: (24.7, 27.0)}
    row = plan_one("student", lat, target_rps=300, p95_slo_ms=50, max_batch_size=32, headroom=0.3, overhead_ms=3)
    assert row.batch_size == 1 and row.batching_helps is False and row.instances == 1
    assert row.fill_wait_ms == 0.0 and row.p95_ms == pytest.approx(5.0218, abs=1e-3)
    # batch 16 would wait 15 / 300 s = 50 ms to fill: 50 + 27 + 3 (+ its queue) > 80 ms misses the SLO
    assert batching_line(row) == ("student: batching does not help: batch 1 serves 1205 requests/s per replica; "
                                  "no larger batch meets the SLO at this rate")


def test_a_larger_batch_must_beat_the_smaller_by_the_gain():
    lat = {1: (1.0, 1.0), 2: (1.9, 2.0)}  # batch 2: 1053 req/s, only 5 % above batch 1's 1000
    kw = dict(target_rps=100, p95_slo_ms=100, max_batch_size=32, headroom=0.0)
    assert plan_one("m", lat, **kw, batching_gain=0.1).batch_size == 1
    assert plan_one("m", lat, **kw, batching_gain=0.0).batch_size == 2


def test_headroom_is_applied_once():
    # 1000 req/s per replica at batch 1; 1400 req/s at 30 % headroom needs ceil(1400 / 700) = 2, not 3
    row = plan_one("m", {1: (1.0, 1.0)}, target_rps=1400, p95_slo_ms=100, max_batch_size=1, headroom=0.3)
    assert row.instances == 2 and row.serve["num_replicas"] == 2
    assert plan_one("m", {1: (1.0, 1.0)}, target_rps=1401, p95_slo_ms=100, max_batch_size=1,
                    headroom=0.3).instances == 3


def test_max_batch_size_caps_the_choice():
    row = plan_one("m", LAT, target_rps=10_000, p95_slo_ms=1000, max_batch_size=16, headroom=0.0)
    assert row.batch_size == 8 and [o["batch_size"] for o in row.options] == [1, 8]


def test_nothing_meets_the_slo():
    row = plan_one("slow", LAT, target_rps=10, p95_slo_ms=4, max_batch_size=32, headroom=0.3, overhead_ms=2)
    assert row.batch_size is None and row.instances is None
    assert row.note == "no batch meets p95 <= 4 ms through the server (best: batch 1, predicted 5.00 ms)"
    text = markdown([row], target_rps=10, p95_slo_ms=4, headroom=0.3, conditions="cpu", overhead_ms=2)
    assert "| slow | — | — | — | — | — | no batch meets" in text and "Assumes replicas behind Ray Serve's proxy" in text


def test_plan_keeps_model_order_and_rejects_bad_headroom():
    rows = plan({"b": LAT, "a": {1: (1.0, 1.0)}}, target_rps=100, p95_slo_ms=5, max_batch_size=32, headroom=0.5)
    assert [r.label for r in rows] == ["b", "a"]
    assert rows[1].throughput == pytest.approx(1000.0) and rows[1].instances == 1
    with pytest.raises(ValueError, match="headroom"):
        plan_one("m", LAT, target_rps=1, p95_slo_ms=5, max_batch_size=1, headroom=1.0)


def test_planning_needs_an_explicit_serving_slo(tmp_path, tiny_teacher_dir):
    config = write_config(tmp_path / "c.yaml", tiny_run_tree(tmp_path / "run", tiny_teacher_dir,
                                                             serving={"target_rps": 100}))
    with pytest.raises(ConfigError, match=r"serving.p95_slo_ms: not set; planning for serving.target_rps 100"):
        load_config(config)
    assert load_config(config, ["serving.p95_slo_ms=50"]).serving.p95_slo_ms == 50


def test_the_shipped_configs_plan_for_a_serving_slo_of_tens_of_ms():
    for name in ("sst2_minilm", "sst2_mpnet"):
        sv = load_config(ROOT / "configs" / f"{name}.yaml").serving
        assert sv.target_rps and 10 <= sv.p95_slo_ms < 100, name


def test_the_queue_wait_is_the_exact_m_m_1_tail_when_service_times_vary_as_an_exponential():
    """Kingman's mean is exact for M/M/1 (cv 1), and so is its exponential tail: P(wait > t) = rho e^{-(mu - lambda) t},
    so the p95 wait is ln(rho / 0.05) / (mu - lambda). At 80 req/s on 100: ln(16) / 20 s = 138.63 ms."""
    assert queue_wait_p95_ms(80, 100, cv=1.0) == pytest.approx(math.log(0.8 / 0.05) / 20 * 1e3)
    assert queue_wait_p95_ms(80, 100, cv=1.0) == pytest.approx(138.629, abs=1e-3)
    # deterministic service waits half as long (Pollaczek-Khinchine: M/D/1's mean wait is half M/M/1's)
    assert queue_wait_p95_ms(80, 100, cv=0.0) == pytest.approx(138.629 / 2, abs=1e-3)
    assert queue_wait_p95_ms(4, 100, cv=1.0) == 0.0  # rho 0.04: 95 % of requests do not wait at all
    assert queue_wait_p95_ms(100, 100, cv=0.0) == math.inf and queue_wait_p95_ms(0, 100, cv=0.0) == 0.0
    assert latency_cv(10.0, 10.0) == 0.0 and latency_cv(10.0, 26.45) == pytest.approx(1.0)


def test_shared_cores_bound_the_capacity_that_replicas_cannot_raise():
    """A 5 ms model on 2 shared cores whose serving stack costs 15 ms CPU a request: each replica could serve
    200 req/s, but every request costs 5 + 15 = 20 ms of CPU, so 2 cores serve at most 100 req/s, with 1 replica
    or 2; without `cores` the replicas bound it (200, 400)."""
    lat = {1: (5.0, 5.0)}
    shared = [Serving(lat, 1, r, stack_cpu_ms=15.0, cores=2).at(50)["capacity_rps"] for r in (1, 2)]
    own = [Serving(lat, 1, r, stack_cpu_ms=15.0).at(50)["capacity_rps"] for r in (1, 2)]
    assert shared == pytest.approx([100.0, 100.0]) and own == pytest.approx([200.0, 400.0])
    # 50 req/s on that machine: rho 0.5, cv 0: wait95 = 1 x 0.5 x 10 ms / 0.5 x ln(10) = 23.03 ms; + 5 + 3 overhead
    got = Serving(lat, 1, 1, overhead_ms=3.0, stack_cpu_ms=15.0, cores=2).at(50)
    assert got["utilisation"] == pytest.approx(0.5) and got["p95_ms"] == pytest.approx(5 + 3 + 23.0259, abs=1e-3)
    row = plan_one("m", lat, target_rps=300, p95_slo_ms=50, max_batch_size=1, headroom=0.3, stack_cpu_ms=15.0,
                   cores=2)
    assert row.batch_size is None and row.note.endswith("2 shared cores cannot serve 300 requests/s")


def test_a_batch_that_times_out_runs_with_the_requests_that_arrived():
    """Batch 8 with a 5 ms wait at 100 req/s on 1 replica: 8 requests would take 70 ms to arrive, so the batch
    leaves after 5 ms with 1 + 100 x 0.005 = 1.5 requests; its latency is interpolated between batch 1 (2 / 3 ms)
    and batch 8 (9 / 10 ms): p50 2.5, p95 3.5 ms; capacity 1.5 / 2.5 ms = 600 req/s."""
    got = Serving({1: (2.0, 3.0), 8: (9.0, 10.0)}, 8, 1, batch_wait_ms=5.0).at(100)
    assert (got["fill_ms"], got["batch"]) == (5.0, pytest.approx(1.5))
    assert (got["model_p50_ms"], got["model_p95_ms"]) == (pytest.approx(2.5), pytest.approx(3.5))
    assert got["capacity_rps"] == pytest.approx(600.0)


def test_the_sustained_rate_is_the_highest_rate_within_the_slo():
    """A 10 ms deterministic model, 1 replica, SLO 20 ms: p95 = 10 + 5 / (1 - rho) x ln(20 rho) ms; at rho 0.2
    that is 10 + 8.66 (meets), at rho 0.3 10 + 12.80 (misses), so the sustained rate lies between 20 and 30 req/s,
    where the predicted p95 crosses 20 ms."""
    s = Serving({1: (10.0, 10.0)}, 1)
    rate = s.sustained_rps(20.0)
    assert 20 < rate < 30
    assert s.at(rate)["p95_ms"] <= 20.0 < s.at(rate * 1.02)["p95_ms"]
    assert Serving({1: (25.0, 25.0)}, 1).sustained_rps(20.0) == 0.0  # the model alone misses: no rate holds
    # two replicas double the capacity and halve the time a queued request waits per request ahead of it
    assert Serving({1: (10.0, 10.0)}, 1, replicas=2).sustained_rps(20.0) > 2 * rate


def test_a_replicas_own_work_lengthens_its_service_time():
    """serving.replica_ms: a 14 ms model whose replica spends 9 ms of its own on each request serves 1 / 23 ms =
    43.48 req/s, not 1 / 14 ms = 71.43; a batch of 4 at 40 ms serves 4 / (40 + 4 x 9) ms = 52.63 req/s; the plan's
    throughput per replica and replica count follow: at 70 req/s with 30 % headroom batch 1 needs
    ceil(70 / (43.48 x 0.7)) = ceil(2.30) = 3 replicas, against ceil(70 / (71.43 x 0.7)) = ceil(1.40) = 2."""
    lat = {1: (14.0, 14.0), 4: (40.0, 40.0)}
    assert Serving(lat, 1, replica_ms=9.0).at(10)["capacity_rps"] == pytest.approx(1e3 / 23)
    assert Serving(lat, 1).at(10)["capacity_rps"] == pytest.approx(1e3 / 14)
    assert Serving(lat, 4, replica_ms=9.0).at(1e3)["capacity_rps"] == pytest.approx(4e3 / 76)  # full batches
    assert Serving(lat, 1, replicas=2, replica_ms=9.0).at(10)["capacity_rps"] == pytest.approx(2e3 / 23)
    with_own = plan_one("m", lat, target_rps=70, p95_slo_ms=1_000, max_batch_size=1, headroom=0.3, replica_ms=9.0)
    without = plan_one("m", lat, target_rps=70, p95_slo_ms=1_000, max_batch_size=1, headroom=0.3)
    assert with_own.throughput == pytest.approx(1e3 / 23) and (with_own.instances, without.instances) == (3, 2)
    # the sustained rate falls with it, and stays under the capacity it implies
    assert Serving(lat, 1, replica_ms=9.0).sustained_rps(100.0) < 1e3 / 23 < Serving(lat, 1).sustained_rps(100.0)


def test_the_wait_factor_scales_the_queueing_wait_only():
    """The 50 req/s case above (wait95 23.03 ms on top of 5 ms model and 3 ms overhead) with serving.wait_factor 2:
    the wait doubles to 46.05 ms, the model time and overhead stay; the sustained rate at a 50 ms SLO falls, and a
    plan with the factor needs more replicas of a model whose replicas have their own cores."""
    lat = {1: (5.0, 5.0)}
    got = Serving(lat, 1, 1, overhead_ms=3.0, stack_cpu_ms=15.0, cores=2, wait_factor=2.0).at(50)
    assert got["queue_p95_ms"] == pytest.approx(2 * 23.0259, abs=1e-3)
    assert got["p95_ms"] == pytest.approx(5 + 3 + 2 * 23.0259, abs=1e-3)
    assert Serving(lat, 1, wait_factor=2.0).sustained_rps(50.0) < Serving(lat, 1).sustained_rps(50.0)
    # 10 ms deterministic model, SLO 20 ms, 60 req/s: 1 replica (rho 0.6) waits 31.06 ms, 2 (rho 0.3) 6.40 ms:
    # 2 replicas. With factor 4: 2 replicas 25.60 ms, 3 (rho 0.2) 4 x 2.89 = 11.55 ms, 4 (rho 0.15) 4 x 1.62 =
    # 6.46 ms: 4 replicas.
    plain = plan_one("m", {1: (10.0, 10.0)}, target_rps=60, p95_slo_ms=20, max_batch_size=1, headroom=0.3)
    slow = plan_one("m", {1: (10.0, 10.0)}, target_rps=60, p95_slo_ms=20, max_batch_size=1, headroom=0.3,
                    wait_factor=4.0)
    assert (plain.instances, slow.instances) == (2, 4)


def test_cpu_per_request_subtracts_the_idle_burn_and_the_models_own_time():
    """3 s of server CPU over a 10 s window with 100 answers, 0.1 core idle: (3 - 1) / 100 = 20 ms a request;
    the model ran batch 1 at 4.6 ms on 1 thread: 15.4 ms is the serving stack's; Locust used 0.5 s: 5 ms."""
    from kdlab.scripts.loadtest import cpu_per_request
    result = {"answered": 100, "window_s": 10.0, "model_p50_ms": 4.6, "batch_size_mean": 1.0}
    got = cpu_per_request(result, server_cpu_s=3.0, idle_cores=0.1, loadgen_cpu_s=0.5, threads=1)
    assert got == {"server_idle_cores": 0.1, "server_cpu_ms": pytest.approx(20.0), "loadgen_cpu_ms": pytest.approx(5.0),
                   "stack_cpu_ms": pytest.approx(15.4), "replica_cpu_ms": None, "replica_ms": None}
    # of the server's 3 s, the replicas used 1.5 s and burn 0.02 cores idle: (1.5 - 0.2) / 100 = 13 ms a request,
    # 8.4 ms of it beyond the model's 4.6 ms
    got = cpu_per_request(result, 3.0, 0.1, 0.5, 1, replica_cpu_s=1.5, replica_idle_cores=0.02)
    assert (got["replica_cpu_ms"], got["replica_ms"]) == (pytest.approx(13.0), pytest.approx(8.4))
    assert cpu_per_request({**result, "answered": 0}, 3.0, 0.1, 0.5, 1)["server_cpu_ms"] is None


def test_the_plan_predicts_a_load_tested_configuration(tmp_path):
    """A load test of batch 8 on 2 replicas at 500 req/s: by hand, 250 req/s per replica would fill 7 more texts in
    28 ms, but the server's wait is 20 ms, so a batch leaves with 1 + 250 x 0.020 = 6 requests; at batch 6 the
    model's p50 / p95 are 2 + 5/7 x 6 = 6.2857 and 3 + 5/7 x 7 = 8 ms (between batch 1 and 8); capacity
    2 x 6 / 6.2857 ms = 1909.1 req/s, rho 0.2619, cv (8 / 6.2857 - 1) / 1.645 = 0.16577: wait95 = 0.35484 x 0.513740
    x 0.52381 ms / 0.2619 x ln(5.2381) = 0.6016 ms; 20 + 8 + 5 (overhead) + 0.60 = 33.60 ms."""
    loadtest = {"offered_rps": 500, "achieved_rps": 498.0, "p95_ms": 38.0, "failures": 0, "overhead_ms": 6.0,
                "model": {"name": "m"}, "plan": {"overhead_ms": 5.0, "p95_slo_ms": 50},
                "server": {"max_batch_size": 8, "replicas": 2, "threads": 1, "batch_wait_timeout_s": 0.02},
                "model_latency": {str(b): {"p50_ms": p50, "p95_ms": p95} for b, (p50, p95) in LAT.items()}}
    row = predicted_for(loadtest)
    assert row["predicted_p95_ms"] == pytest.approx(33.60, abs=0.01)
    assert row["predicted_capacity_rps"] == pytest.approx(1909.09, abs=0.01)
    assert (row["measured_p95_ms"], row["achieved_rps"], row["batch"], row["replicas"]) == (38.0, 498.0, 8, 2)
    (tmp_path / "loadtest.json").write_text(json.dumps(loadtest))
    text = comparison_markdown(tmp_path)
    assert "| loadtest.json | m | 8 | 2 | 500 | 498.0 | 1909 | 33.60 | 38.00 | 0 |" in text
    assert comparison_markdown(tmp_path / "none") is None


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
                         serving={"target_rps": 100_000, "p95_slo_ms": 10_000, "headroom": 0.5,
                                  "batch_sizes": [1, 2, 4], "max_batch_size": 2, "overhead_ms": 4.0})
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
    assert ("Capacity for 100000 requests/s at p95 <= 10000 ms through the server, 50% headroom, serving overhead "
            "4 ms (cpu, 1 thread(s), sequence length data):") in printed
    for label in labels:
        measured = {int(b): v for b, v in result["latency"][label].items()}
        assert sorted(measured) == [1, 2, 4]
        # By hand: batch 4 exceeds serving.max_batch_size 2; both others meet a 10 s SLO; batch 2 is taken only
        # when it serves 10 % more requests/s than batch 1. The p95 adds the queueing wait at utilisation rho
        # (Kingman's mean with an exponential tail), as in test_best_throughput_within_the_slo_...
        options = {}
        for b in (1, 2):
            p50, p95 = measured[b]["p50_ms"], measured[b]["p95_ms"]
            throughput = b / ((p50 + b * result["replica_ms"]) / 1e3)  # the replica's own work, serial with it
            replicas = max(1, math.ceil(100_000 / (throughput * (1 - 0.5))))
            fill_ms = (b - 1) / (100_000 / replicas) * 1e3
            rho = 100_000 / (replicas * throughput)
            cv = (p95 / p50 - 1) / 1.645
            mean_wait_ms = rho / (1 - rho) * (1 + cv * cv) / 2 * 1e3 / (replicas * throughput)
            wait_ms = mean_wait_ms / rho * math.log(rho / 0.05) if rho > 0.05 else 0.0
            options[b] = (throughput, replicas, fill_ms + p95 + 4.0 + wait_ms)
        b = 2 if options[2][0] > options[1][0] * 1.1 else 1
        throughput, replicas, predicted = options[b]
        row = next(r for r in result["rows"] if r["label"] == label)
        assert (row["batch_size"], row["instances"], row["batching_helps"]) == (b, replicas, b > 1)
        assert row["throughput"] == pytest.approx(throughput) and row["p95_ms"] == pytest.approx(predicted)
        assert any(line.startswith(f"| {label} | {b} | ") and line.endswith(f" | {throughput:.0f} | {replicas} |")
                   for line in printed), label
    client = MlflowClient(tracking_uri=tree["tracking"]["uri"])
    parent = client.search_runs([client.get_experiment_by_name("cap").experiment_id],
                                filter_string="attributes.run_name = 'search'")[0]
    assert {"capacity.md", "capacity.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_capacity_times_each_model_on_its_own_tokenizer(tmp_path, tiny_teacher_dir, other_family_dir):
    """A front member of another family than the teacher (its own 400-word vocabulary here) is timed on dev texts
    through its own tokenizer: the teacher's ids (up to 30,521) would index past its embedding table."""
    profile = {"batch_size": 1, "seq_len": "data", "warmup_iters": 1, "min_iters": 5, "min_seconds": 0.1,
               "repeats": 2, "threads": 1, "p95_tolerance": 1.0, "max_rounds": 2}
    tree = tiny_run_tree(tmp_path / "run", tiny_teacher_dir, target=profile)
    tree["data"]["max_eval_samples"] = 32
    cfg = load_config(write_config(tmp_path / "c.yaml", tree), [])
    models = {"teacher fp32": (tiny_teacher_dir, "fp32", None), "other (fp32)": (other_family_dir, "fp32", None)}
    got = serving_latency(cfg, models, 1, [1, 2])
    assert list(got) == list(models)
    for label, by_batch in got.items():
        assert sorted(by_batch) == [1, 2]
        assert all(0 < p50 <= p95 for p50, p95 in by_batch.values()), label
