"""`kdlab serve` (scripts/serve_app.py, scripts/serve.py), serve_config.yaml and `kdlab loadtest` on one local Ray.

    .venv/bin/python -m pytest -q tests/test_serve.py

One private Ray instance serves the whole module (its own temp dir and ports, 2 CPUs, a small object store, no
dashboard), started from the tiny export's folder as `serve run serve_config.yaml` from there would be; it is shut
down at the end, and the teardown checks that no process of it is left. `ray stop` is never called: it would end
every Ray instance on the machine. Each test deploys the application it needs under the same name, replacing the
previous one, so the tests pass in any order.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from conftest import SST2, build_export, free_port  # noqa: E402
from kdlab.distill.deploy import (SERVE_CONFIG, deployment_options, plan_settings, read_manifest,  # noqa: E402
                                  serve_config, write_deploy_files)
from kdlab.distill.export import write_manifest  # noqa: E402
from kdlab.scripts.loadtest import run_loadtest, timeline  # noqa: E402
from kdlab.scripts.predict import run_predict  # noqa: E402
from kdlab.scripts.serve import deploy, full_priority_workers, wait_ready  # noqa: E402
from kdlab.scripts.serve_app import build, settings_for  # noqa: E402
from kdlab.search.capacity import plan_one  # noqa: E402

# The plan the tiny export carries: by hand, 200 req/s at 50 ms, batch 4 (2 ms p50) gives 2000 req/s per replica,
# 1 replica, (4 - 1) / 200 s = 15 ms to fill.
TINY_LATENCY = {1: (1.0, 1.5), 4: (2.0, 3.0)}


@pytest.fixture(scope="module")
def export(tmp_path_factory, minilm_dir) -> Path:
    """A tiny dynamic-int8 export with a capacity plan, serve_config.yaml and Dockerfile, hashed in its manifest."""
    from transformers import AutoTokenizer
    folder = build_export(tmp_path_factory.mktemp("serve") / "export", AutoTokenizer.from_pretrained(minilm_dir),
                          "dynamic-int8")
    manifest = read_manifest(folder)
    row = plan_one("export", TINY_LATENCY, target_rps=200, p95_slo_ms=50, max_batch_size=32, headroom=0.3,
                   overhead_ms=3.0, threads=1)
    manifest.pop("files")
    manifest["capacity"] = {"target_rps": 200, "p95_slo_ms": 50, "plan": row.__dict__}
    manifest["latency"] = [{"batch_size": b, "p50_ms": p50, "p95_ms": p95} for b, (p50, p95) in TINY_LATENCY.items()]
    write_deploy_files(folder, manifest)
    write_manifest(folder, manifest)
    return folder


def session_processes(marker: str) -> list[str]:
    """Command lines of the running processes that name `marker` (our Ray instance's temp dir)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                found.append(f"{pid}: {cmd[:120]}")
    return found


@pytest.fixture(scope="module")
def ray_port(export):
    """One local Ray + Serve for the module; yields Serve's HTTP port on 127.0.0.1."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # As kdlab serve does: Ray's default worker priority (nice 15) let a neighbouring training job starve the
    # HTTP proxy past its 5-s readiness check here, and Serve killed it before any test ran.
    full_priority_workers()
    # Short: Ray's unix socket paths must fit in 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="kdray-", dir="/tmp")
    cwd = os.getcwd()
    os.chdir(export)  # Ray's workers start in the directory ray.init ran in: `model: .` of serve_config.yaml
    try:
        ray.init(address="local", num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False,
                 _temp_dir=temp_dir, logging_level="WARNING")
    finally:
        os.chdir(cwd)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 20},
                logging_config={"log_level": "WARNING"})
    yield port
    serve.shutdown()
    ray.shutdown()
    deadline = time.monotonic() + 20
    while session_processes(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert session_processes(temp_dir) == [], "Ray processes of this test module outlived its shutdown"
    shutil.rmtree(temp_dir, ignore_errors=True)


def start(export: Path, port: int, wait: bool = True, replicas: int = 1, max_ongoing_requests=None,
          max_queued_requests=None, **settings) -> str:
    """Deploy the export as application 'kdlab' (replacing any) with these settings; its URL."""
    s = settings_for(export, **{"threads": 1, **settings})
    options = deployment_options(plan_settings(read_manifest(export)), replicas=replicas, threads=1,
                                 max_batch_size=s.max_batch_size, max_ongoing_requests=max_ongoing_requests,
                                 max_queued_requests=max_queued_requests)
    if wait:
        return deploy(s, options, host="127.0.0.1", port=port, request_timeout_s=20)
    serve.run(build(s, options), name="kdlab", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def call(url: str, body: bytes | dict | None = None, method: str = "POST", path: str = "/predict",
         timeout: float = 30) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def dev_texts(n: int) -> list[str]:
    with open(SST2 / "dev.tsv", newline="", encoding="utf-8") as fh:
        rows = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row["sentence"] for _, row in zip(range(n), rows)]


def test_predictions_equal_kdlab_predicts_and_long_texts_are_truncated(export, ray_port, tmp_path):
    url = start(export, ray_port, max_batch_size=8, batch_wait_timeout_s=0.2)
    texts = dev_texts(8)
    status, body = call(url, {"texts": texts})
    assert status == 200, body
    assert (body["model"], body["recipe"]) == ("tiny", "dynamic-int8") and body["version"].startswith("sha256:")
    # The 8 texts of one request ran as one batch of 8, as kdlab predict --batch-size 8 runs them.
    assert body["batch_sizes"] == [8] * 8 and "truncated" not in body
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n")
    run_predict(export, source, tmp_path / "out.jsonl", batch_size=8, threads=1, progress=False)
    expected = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{"label": e["label"], "probs": e["probs"]} for e in expected] == body["predictions"]

    status, body = call(url, {"texts": ["a fine film", "so long " * 2000]})
    assert status == 200 and body["truncated"] == [1] and "max_length of 64 tokens" in body["note"]
    assert len(body["predictions"]) == 2


def test_concurrent_requests_are_batched(export, ray_port):
    url = start(export, ray_port, max_batch_size=8, batch_wait_timeout_s=0.05)
    texts = dev_texts(24)
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda t: call(url, {"texts": [t]}), texts))
    assert all(status == 200 for status, _ in answers), answers
    sizes = [body["batch_sizes"][0] for _, body in answers]
    assert max(sizes) > 1, sizes  # single-text requests from 12 clients shared batches
    status, metrics = call(url, method="GET", path="/metrics")
    counted = {int(line.split('size="')[1].split('"')[0]): float(line.rsplit(" ", 1)[1])
               for line in metrics.splitlines() if line.startswith("kdlab_batches_total")}
    assert status == 200 and sum(size * n for size, n in counted.items()) == 24 and max(counted) > 1


def test_health_is_not_ready_before_warm_up(export, ray_port):
    # A long warm-up (the replica is up and answering, its model still warming): not ready, and /predict says so.
    url = start(export, ray_port, wait=False, max_batch_size=1, warmup_batches=3000)
    status, body = call(url, method="GET", path="/health")
    assert (status, body["status"]) == (503, "warming up")
    status, body = call(url, {"texts": ["a fine film"]})
    assert status == 503 and "warming up" in body["error"]
    assert wait_ready(url, 120)["status"] == "ready"
    assert call(url, {"texts": ["a fine film"]})[0] == 200


def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(export, ray_port):
    url = start(export, ray_port, max_texts=4)
    cases = [(b"{not json", 400, "body: not JSON"), ({"texts": []}, 422, "texts: empty list; valid: 1 to 4"),
             ({"text": "a"}, 422, "texts: missing or not a list"), ({"texts": ["a", 3]}, 422, "not a list of strings"),
             ({"texts": ["a"] * 5}, 413, "texts: 5 texts; valid: at most 4 per request"),
             ({"texts": ["a" * (2 << 20)]}, 413, "bytes; valid: at most 1,048,576")]
    for body, status, message in cases:
        got, answer = call(url, body)
        assert got == status and message in answer["error"], (body if isinstance(body, bytes) else str(body)[:80],
                                                              got, answer)
    assert call(url, method="GET", path="/nope")[0] == 404
    assert call(url, {"texts": ["still here"]})[0] == 200


def test_a_full_queue_answers_503_while_other_requests_succeed(export, ray_port):
    # One request in flight and one queued per replica; each request is 64 texts run one by one.
    url = start(export, ray_port, max_batch_size=1, max_ongoing_requests=1, max_queued_requests=1)
    body = {"texts": dev_texts(64)}
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: call(url, body)[0], range(16)))
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert set(statuses) <= {200, 503}, statuses
    assert call(url, {"texts": ["after the burst"]})[0] == 200


def test_serve_config_yaml_deploys_with_rays_own_serve_run(export, ray_port, monkeypatch):
    from ray.serve.schema import ServeDeploySchema
    from ray.serve.scripts import cli
    text = (export / SERVE_CONFIG).read_text()
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    app = config.applications[0]
    assert app.import_path == "kdlab.scripts.serve_app:app_builder" and app.args["model"] == "."
    assert (app.args["max_batch_size"], app.args["batch_wait_timeout_s"]) == (4, pytest.approx(0.015))
    assert app.deployments[0].num_replicas == 1
    assert serve_config(read_manifest(export)) == yaml.safe_load(text)
    assert "ARG TORCH_INDEX_URL" in (export / "Dockerfile").read_text()
    # --autoscale's options are the plan's, in a form Ray Serve accepts.
    from ray.serve.config import AutoscalingConfig
    scaling = deployment_options(plan_settings(read_manifest(export)), autoscale=True)["autoscaling_config"]
    assert AutoscalingConfig(**scaling).max_replicas == 1 and scaling["min_replicas"] == 1
    serve.delete("kdlab")
    # `serve run serve_config.yaml` from the export folder, in this process (Ray is up: it deploys onto it;
    # Serve's HTTP options of the file give way to the running proxy's, as Ray says).
    monkeypatch.chdir(export)
    cli.main(["run", SERVE_CONFIG, "--non-blocking"], standalone_mode=False)
    url = f"http://127.0.0.1:{ray_port}"
    assert wait_ready(url, 120)["model"] == "tiny"
    status, body = call(url, {"texts": dev_texts(3)})
    assert status == 200 and len(body["predictions"]) == 3


def test_a_bounded_load_test_reports_rates_percentiles_failures_and_overhead(export, ray_port, tmp_path):
    url = start(export, ray_port, max_batch_size=4, batch_wait_timeout_s=0.01)
    # The export as registered in MLflow: its manifest names the run, its training config the store.
    import mlflow
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = mlflow.MlflowClient(tracking_uri=uri).create_run(
        mlflow.MlflowClient(tracking_uri=uri).create_experiment("lt")).info.run_id
    registered = tmp_path / "export"
    registered.mkdir()
    manifest = read_manifest(export)
    manifest["mlflow"] = {"model_name": "tiny", "version": 1, "run_id": run_id}
    (registered / "manifest.json").write_text(json.dumps(manifest))
    (registered / "training_config.yaml").write_text(yaml.safe_dump({"tracking": {"uri": uri}}))
    started = time.monotonic()
    result = run_loadtest(url, SST2 / "dev.tsv", rate=20, duration_s=3, max_requests=40, model=str(registered))
    assert time.monotonic() - started < 60
    out = tmp_path / "report" / "loadtest.json"  # the report folder beside the export
    assert json.loads(out.read_text()) == json.loads(json.dumps(result)) and result["mlflow_run_id"] == run_id
    for key in ("offered_rps", "achieved_rps", "p50_ms", "p95_ms", "p99_ms", "failures", "failures_by_kind",
                "rejected_503", "overhead_ms", "batch_sizes", "requests", "machine", "versions"):
        assert key in result, key
    assert 0 < result["requests"] <= 40 and result["offered_rps"] == 20
    assert result["failures"] == 0 and result["answered"] == result["requests"]
    assert result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["overhead_ms"] == pytest.approx(result["p50_ms"] - result["model_p50_ms"])
    # Poisson arrivals, not users in step: at 20 req/s about 10 % of sends follow another within 5 ms; users in
    # step (Locust's constant_throughput) sent 90 % so
    assert result["sent_within_5ms"] < 0.4
    # CPU a request: the server's (its Ray processes), the serving stack's (that less the model's), Locust's
    assert result["server_cpu_ms"] > 0 and result["loadgen_cpu_ms"] > 0
    model_cpu_ms = result["server"]["threads"] * result["model_p50_ms"] / result["batch_size_mean"]
    assert result["stack_cpu_ms"] == pytest.approx(max(0.0, result["server_cpu_ms"] - model_cpu_ms))
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).data.metrics["loadtest_p95_ms"] == pytest.approx(result["p95_ms"])
    assert [a.path for a in client.list_artifacts(run_id, "loadtest")] == ["loadtest/loadtest.json"]


def test_the_length_check_never_unpads_a_batch_running_on_the_model_thread(export):
    """A request's length check (event loop) and a padded batch (model thread) tokenize at the same time. A fast
    tokenizer keeps its padding and truncation settings in one shared backend, so a check with truncation=False on
    the model's own tokenizer turned padding off under a running batch: 'Unable to create tensor' for mixed-length
    texts (seen under load with max_batch_size 8). Replayed here without Ray, from two threads, many times."""
    from kdlab.scripts.serve_app import ExportModel
    replica = ExportModel(dict(model=str(export), threads=1, max_batch_size=8, batch_wait_timeout_s=0.0))
    replica.warmup.result(timeout=60)
    texts = dev_texts(64)
    batches = [[texts[(i + k) % 64] for k in range(8)] for i in range(0, 240, 3)]  # lengths differ in each batch

    def run_batches():
        return sum(len(replica.timed_batch(batch, None)) for batch in batches)
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(run_batches)
        checks = 0
        while not done.done():
            assert replica.truncated(texts[checks % 64:checks % 64 + 8] + ["long " * 300], None) == [
                len(texts[checks % 64:checks % 64 + 8])]
            checks += 1
        assert done.result() == 8 * len(batches) and checks > 10


def test_bench_serve_fits_the_cpu_line_through_two_rates():
    """bench_serve's CPU fit by hand: 20 req/s at 14.1 + 2.0 ms a request is 0.322 cores, 60 req/s at 11.0 + 2.0 ms
    is 0.78 cores; the line's slope is 0.458 / 40 = 11.45 ms a request and it meets zero rate at 0.093 cores. A
    per-request cost that rises with the rate would give a negative intercept: pinned at 0 through the high point."""
    from kdlab.scripts.bench_serve import cpu_line

    def run(rate, server, loadgen):
        return {"achieved_rps": rate, "server_cpu_ms": server, "loadgen_cpu_ms": loadgen}
    fixed, marginal = cpu_line(run(20, 14.1, 2.0), run(60, 11.0, 2.0))
    assert fixed == pytest.approx(0.093) and marginal == pytest.approx(11.45)
    assert cpu_line(run(60, 11.0, 2.0), run(20, 14.1, 2.0)) == pytest.approx((0.093, 11.45))  # order-free
    assert cpu_line(run(20, 8.0, 2.0), run(60, 10.0, 2.0)) == pytest.approx((0.0, 12.0))
    # the replicas alone (their line's slope less the model's p50 is Fit.replica_ms): 20 x 12.5 = 0.25 cores and
    # 60 x 10.5 = 0.63 cores: 0.38 / 40 = 9.5 ms a request, 0.06 cores whatever the rate
    replicas = [{"achieved_rps": 20, "replica_cpu_ms": 12.5}, {"achieved_rps": 60, "replica_cpu_ms": 10.5}]
    assert cpu_line(*replicas, keys=("replica_cpu_ms",)) == pytest.approx((0.06, 9.5))


def test_bench_serve_fits_the_wait_factor_that_reproduces_the_fitted_rate():
    """The fitted configuration's measured rate pins the queueing-wait factor: the serving model with that factor
    predicts the rate back (to its 1 % grid), a lower measured rate needs a larger factor, and a rate beyond what
    any factor in range predicts takes the range's bound."""
    from kdlab.scripts.bench_serve import WAIT_FACTORS, Fit, fit_wait_factor, predicted_rps
    latency = {"1": {"p50_ms": 2.0, "p95_ms": 3.0}, "8": {"p50_ms": 12.0, "p95_ms": 15.0}}
    unbatched = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
    fit = Fit(overhead_ms=10.0, stack_cpu_ms=12.0, cores=1.9)
    plain = predicted_rps(latency, unbatched, 1, fit, 50.0)
    factors = [fit_wait_factor(latency, unbatched, 1, fit, 50.0, plain * f) for f in (0.8, 0.6)]
    assert 1.0 < factors[0] < factors[1]
    for f, factor in zip((0.8, 0.6), factors):
        assert predicted_rps(latency, unbatched, 1, fit, 50.0, factor) == pytest.approx(plain * f, rel=0.02)
    assert fit_wait_factor(latency, unbatched, 1, fit, 50.0, plain * 3) == WAIT_FACTORS[0]
    assert fit_wait_factor(latency, unbatched, 1, fit, 50.0, 0.0) == 1.0
    # the replica's own work a request lowers the prediction (serving.replica_ms)
    assert predicted_rps(latency, unbatched, 1, Fit(10.0, 12.0, 1.9, replica_ms=9.0), 50.0) < plain


def test_bench_serve_judges_batching_by_the_plans_rule():
    """Batched counts as the better option only when it serves serving.batching_gain (10 %) more than unbatched,
    the rule the plan chooses by: 4 % more is unbatched, 14 % more is batched; nothing served is no choice."""
    from kdlab.scripts.bench_serve import batching_choice
    assert batching_choice(76.5, 79.8, 0.1) == "unbatched"
    assert batching_choice(64.4, 73.6, 0.1) == "batched"
    assert batching_choice(81.0, 75.5, 0.1) == "unbatched"
    assert batching_choice(0.0, 0.0, 0.1) is None


def test_the_step_loads_recovery_is_judged_on_the_trailing_ten_second_p95():
    """20 s at 10 requests a second, 10 ms each, but the 10 sent in second 5 took 100 ms: that second's own p95 is
    100 ms; the trailing 10 s p95 is 100 ms from second 5 to second 14 (10 slow of at most 100 requests is the top
    10 %) and 10 ms again from second 15, when second 5 has left the window. Against a 50 ms SLO the step's recovery
    is the end of second 14 (15 s), and a single second was last over it at the end of second 5 (6 s)."""
    from kdlab.scripts.bench_serve import recovery
    records = [{"start_s": 100.0 + s + i / 10, "ms": 100.0 if s == 5 else 10.0, "status": 200, "error": None}
               for s in range(20) for i in range(10)]
    windows = timeline(records)
    assert [w["t"] for w in windows] == [float(s) for s in range(20)]
    assert [w["p95_ms"] for w in windows] == [100.0 if s == 5 else 10.0 for s in range(20)]
    assert [w["p95_trailing_ms"] for w in windows] == [100.0 if 5 <= s <= 14 else 10.0 for s in range(20)]
    assert recovery(windows, 50.0) == (15.0, 6.0)
    assert recovery(windows, 150.0) == (0.0, None)  # never over: back at once, no second over it
