"""Benchmark: exports served on Ray Serve and load-tested with Locust, against the capacity plan (issue 17).

    make bench-serve
    .venv/bin/python scripts/bench_serve.py runs/sst2_minilm/export runs/sst2_minilm/teacher_export \
        [--data ../shared/data/sst2/dev.tsv] [--out benchmarks/results/serve_sst2.json] [--quick]

Each argument is an export folder (kdlab export; the teacher exported the same way with --recipe fp32). On one
private local Ray instance, with server and load generator sharing this machine (replicas capped at 2, one
thread each):
- the fit, on one configuration (the first model unbatched on 1 replica): at 5 req/s the serving overhead (p50
  through the server minus the model's own p50); at 20 req/s and at 0.8x the capacity that implies, the CPU of
  server (beyond its idle burn) and load generator (it shares the cores here, so it counts against them), whose
  line in the rate gives the CPU one more request costs beyond the model's and the cores any load burns
  (`cpu_line`), and the same line for the replica processes alone, whose slope less the model's p50 is the
  replica's own work a request (`replica_ms`, serial with the model); then that configuration's mean sustained
  rate over its rounds, and the queueing-wait factor with which the serving model reproduces it
  (`fit_wait_factor`: on 2 shared cores a request also queues for the CPU behind the proxy's and Locust's work,
  which the replica's M/G/1 wait does not see);
- for each model, unbatched (batch 1) and batched (the plan's batch when it batches, else 8 with a 5 ms wait) on
  1 replica, interleaved, --repeats rounds each, the better of the two on 2 replicas, and unbatched on 1 replica
  at a looser SLO the fp32 teacher can meet (--loose-slo-ms): the sustained rate of each, the highest offered
  rate with p95 <= the SLO and no failures (a ladder from the prediction: x1.25 up while it holds or /1.25 down
  while it misses, then the geometric middle of the last hold and first miss), beside the rate the serving model
  predicts with the fitted figures (`predicted_rps`, `prediction_error`, `fitted` true for the fitted
  configuration);
- batching, judged by the plan's own rule (a larger batch only when it serves serving.batching_gain more): on the
  mean of the rounds, whether batched beat unbatched by that much, whether the serving model predicted so, what
  the plan chose; a model that sustains nothing at the SLO either way is judged at the looser SLO;
then for the first model, autoscaling (1..2 replicas, target ongoing requests from Little's law at 1 - headroom of
its sustained rate) under a step load (0.3x its 1-replica sustained rate -> 1 - headroom of what 2 replicas
sustain -> back, 60 s each) with the replica count sampled each second and recovery judged on the p95 over the
trailing 10 s (loadtest.TRAILING_S; a single second's p95 rests on a few dozen requests), and one replica of two
SIGKILLed under load. Every
deployment gets the queue bounds the capacity plan gives its configuration (capacity.queue_limits).
`--quick` (seconds per run, two rungs) checks that the paths work; its figures mean nothing.
Writes benchmarks/results/serve_sst2.json with the keys the issue lists (another pair of models: --out and
--section, so that each pair keeps its own file and README section).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from ray import serve

from kdlab.distill.deploy import APP_NAME, deployment_options, plan_settings, read_manifest
from kdlab.distill.export import load_served
from kdlab.eval.latency import machine_info, versions
from kdlab.eval.paths import portable_path
from kdlab.scripts.bench_readme import publish
from kdlab.scripts.loadtest import TRAILING_S, read_texts, run_loadtest
from kdlab.scripts.serve import deploy, full_priority_workers
from kdlab.scripts.serve_app import settings_for
from kdlab.search.capacity import Serving, queue_limits

ROOT = Path(__file__).resolve().parents[1]
MAX_REPLICAS = 2  # server and load generator share the machine's 2 cores


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configs_of(manifest: dict) -> dict[str, dict]:
    plan = plan_settings(manifest)
    batched = ({"max_batch_size": plan["max_batch_size"], "batch_wait_timeout_s": plan["batch_wait_timeout_s"]}
               if plan.get("max_batch_size", 1) > 1 else {"max_batch_size": 8, "batch_wait_timeout_s": 0.005})
    return {"unbatched": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}, "batched": batched}


def limits_for(latency: dict, batching: dict, replicas: int, slo_ms: float) -> dict:
    """The queue bounds the capacity plan would set for this configuration (search/capacity.py queue_limits),
    from the model's latency measured now: each configuration gets its own, not the export plan's."""
    b = batching["max_batch_size"]
    p50 = latency[str(b)]["p50_ms"] if str(b) in latency else latency["1"]["p50_ms"] * b
    return queue_limits(b, b / (p50 / 1e3), replicas, slo_ms)


def start(folder: Path, port: int, replicas: int, batching: dict, limits: dict,
          autoscale: dict | None = None) -> str:
    """Deploy a fresh application (the previous one deleted: no replica of an earlier run carries over)."""
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    settings = settings_for(folder, threads=1, **batching)
    options = deployment_options(plan_settings(read_manifest(folder)), replicas=replicas, threads=1,
                                 max_batch_size=settings.max_batch_size, **limits)
    if autoscale:
        options.pop("num_replicas")
        options["autoscaling_config"] = autoscale
    return deploy(settings, options, host="127.0.0.1", port=port, request_timeout_s=30)


@dataclass
class Fit:
    """The serving figures fitted on one configuration (the first model, unbatched, 1 replica)."""
    overhead_ms: float  # at 5 req/s: p50 through the server minus the model's own p50
    stack_cpu_ms: float  # CPU one more request costs the server beyond the model, plus the load generator's
    cores: float  # the machine's cores less what the idle server burns and what any load burns (`load_cores`)
    load_cores: float = 0.0  # CPU the server and load generator burn under load whatever the rate
    wait_factor: float = 1.0  # fitted last, on the same configuration's sustained rate (fit_wait_factor)
    replica_ms: float = 0.0  # the replica's own CPU one more request costs beyond the model's (serving.replica_ms)


def cpu_line(low: dict, high: dict, keys=("server_cpu_ms", "loadgen_cpu_ms")) -> tuple[float, float]:
    """(cores burnt under load whatever the rate, CPU ms one more request costs) of server and load generator
    together (`keys`: the replicas alone with ("replica_cpu_ms",)), from two offered rates on one configuration:
    the line through cores(rate) = CPU ms a request x rate.

    A request's CPU falls as the rate rises (the proxy and Locust serve more requests per wake-up: 16.1 ms at
    20 req/s, 11.0 ms plus Locust's at 157 req/s in one run here), so one rate's per-request figure overstates
    what a busy server spends (fitted at 20 req/s alone, the plan under-predicted the student's rate at the
    500 ms SLO by 36 %). A line with a negative intercept (CPU a request rising with the rate) is pinned at
    zero cores and taken through the higher rate's point."""
    def cores(r: dict) -> tuple[float, float]:
        rate = r["achieved_rps"] or 0.0
        return rate, sum(r.get(k) or 0.0 for k in keys) * rate / 1e3
    (r1, c1), (r2, c2) = sorted((cores(low), cores(high)))
    if r2 - r1 < 1e-9:
        return 0.0, c2 / r2 * 1e3 if r2 else 0.0
    slope = (c2 - c1) / (r2 - r1)
    fixed = c1 - slope * r1
    if fixed < 0:
        fixed, slope = 0.0, c2 / r2
    return fixed, slope * 1e3


def predicted_rps(latency: dict, batching: dict, replicas: int, fit: Fit, slo_ms: float,
                  wait_factor: float | None = None) -> float:
    """A configuration's sustained rate by the capacity plan's serving model (search/capacity.py Serving)."""
    table = {int(b): (v["p50_ms"], v["p95_ms"]) for b, v in latency.items()}
    return Serving(table, batching["max_batch_size"], replicas, threads=1,
                   batch_wait_ms=batching["batch_wait_timeout_s"] * 1e3, overhead_ms=fit.overhead_ms,
                   stack_cpu_ms=fit.stack_cpu_ms, cores=fit.cores,
                   wait_factor=fit.wait_factor if wait_factor is None else wait_factor,
                   replica_ms=fit.replica_ms).sustained_rps(slo_ms)


WAIT_FACTORS = (0.1, 20.0)  # the range fit_wait_factor searches


def fit_wait_factor(latency: dict, batching: dict, replicas: int, fit: Fit, slo_ms: float,
                    measured_rps: float) -> float:
    """The queueing-wait factor with which the serving model predicts `measured_rps` for the configuration it was
    measured on: bisection in log scale over WAIT_FACTORS (the predicted rate falls as the factor rises), the
    nearer bound when none reaches it, 1 when nothing was sustained."""
    if measured_rps <= 0:
        return 1.0
    lo, hi = (math.log(f) for f in WAIT_FACTORS)
    if predicted_rps(latency, batching, replicas, fit, slo_ms, math.exp(lo)) <= measured_rps:
        return WAIT_FACTORS[0]
    if predicted_rps(latency, batching, replicas, fit, slo_ms, math.exp(hi)) >= measured_rps:
        return WAIT_FACTORS[1]
    for _ in range(30):
        mid = (lo + hi) / 2
        if predicted_rps(latency, batching, replicas, fit, slo_ms, math.exp(mid)) > measured_rps:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def batching_choice(unbatched_rps: float, batched_rps: float, gain: float) -> str | None:
    """The plan's rule (search/capacity.py plan_one) applied to two rates: batched only when it serves `gain` more
    than unbatched (serving.batching_gain: batching costs latency, and a few per cent is timing noise); None when
    neither serves anything."""
    if not unbatched_rps and not batched_rps:
        return None
    return "batched" if batched_rps > unbatched_rps * (1 + gain) else "unbatched"


def fresh_latency(folder: Path, texts: list[str], batch_sizes=(1, 2, 4, 8), seconds: float = 4.0) -> dict:
    """The served artefact's own p50/p95 per batch (tokenizing included, as a replica runs it: load_served,
    predict_records, 1 thread), measured here and now, before Ray starts: an export's latency table was measured
    when it was exported, under whatever else that machine ran then."""
    torch.set_num_threads(1)
    served = load_served(folder, threads=1)
    out, i = {}, 0
    for b in batch_sizes:
        served.predict_records(texts[:b], None)  # warm-up
        times, started = [], time.perf_counter()
        while len(times) < 10 or (time.perf_counter() - started < seconds and len(times) < 500):
            batch = [texts[(i + k) % len(texts)] for k in range(b)]
            i += b
            t0 = time.perf_counter()
            served.predict_records(batch, None)
            times.append((time.perf_counter() - t0) * 1e3)
        out[str(b)] = {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
                       "n": len(times)}
    return out


def sustained(url: str, folder: Path, data: str, start_rps: float, slo_ms: float, duration_s: float, rungs: int,
              work: Path) -> tuple[float, list[dict]]:
    """The highest offered rate with p95 <= SLO, no failures and at least 90 % of it answered: from `start_rps`, up
    x1.25 a rung while it holds or down /1.25 while it misses, then one rung at the geometric middle of the last
    hold and the first miss (resolution about 12 %); 0 when no rate down to 1 req/s holds."""
    def holds(r: dict) -> bool:  # requests still unanswered when Locust stops are in no record: check the rate too
        return (not r["failures"] and r["p95_ms"] is not None and r["p95_ms"] <= slo_ms
                and r["achieved_rps"] >= 0.9 * r["offered_rps"])

    runs, rate, hold, miss = [], max(1.0, start_rps), 0.0, None
    while len(runs) < rungs:
        r = run_loadtest(url, data, rate=rate, duration_s=duration_s, model=str(folder),
                         out=work / f"lt-{time.time_ns()}.json", log=False)
        runs.append(r)
        if holds(r):
            hold = max(hold, rate)
        else:
            miss = rate if miss is None else min(miss, rate)
        if miss is not None and hold > 0:
            break
        if miss is not None and rate <= 1.0:
            return 0.0, runs
        rate = rate * 1.25 if miss is None else max(1.0, rate / 1.25)
    if miss is not None and hold > 0 and len(runs) < rungs:
        middle = (hold * miss) ** 0.5
        r = run_loadtest(url, data, rate=middle, duration_s=duration_s, model=str(folder),
                         out=work / f"lt-{time.time_ns()}.json", log=False)
        runs.append(r)
        if holds(r):
            hold = middle
    return hold, runs


def parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def replica_pids() -> list[int]:
    """Our replicas' processes: children of the raylet this process started (never another Ray's)."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(f"ray::ServeReplica:{APP_NAME}:".encode()) and parent_of(parent_of(int(pid))) == os.getpid():
                pids.append(int(pid))
    return pids


def running_replicas() -> int:
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def step_load(folder: Path, port: int, data: str, low_rps: float, high_rps: float, slo_ms: float, phase_s: float,
              work: Path, target_ongoing: float, limits: dict) -> dict:
    target = target_ongoing
    url = start(folder, port, 1, {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}, limits,
                autoscale={"min_replicas": 1, "max_replicas": MAX_REPLICAS, "target_ongoing_requests": target,
                           "upscale_delay_s": 5.0, "downscale_delay_s": 30.0})
    samples, stop = [], threading.Event()

    def sample():
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - t0, running_replicas()))
            time.sleep(1)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    timeline, step_at, recovery_s, last_second_s, t = [], None, None, None, 0.0
    for phase, rate in (("low", low_rps), ("high", high_rps), ("low", low_rps)):
        r = run_loadtest(url, data, rate=max(1.0, rate), duration_s=phase_s, model=str(folder),
                         out=work / f"step-{phase}-{time.time_ns()}.json", log=False)
        for w in r["timeline"]:
            replicas = next((n for s, n in reversed(samples) if s <= t + w["t"]), None)
            timeline.append({"t": t + w["t"], "phase": phase, "replicas": replicas, "offered_rps": r["offered_rps"],
                             "achieved_rps": w["answered"], "p95_ms": w["p95_ms"],
                             "p95_trailing_ms": w.get("p95_trailing_ms"), "failures": w["failures"],
                             "rejected_503": w["rejected_503"]})
        if phase == "high":
            step_at = t
            recovery_s, last_second_s = recovery(r["timeline"], slo_ms)
        t += r["window_s"]
    stop.set()
    sampler.join()
    return {"timeline": timeline, "step_at_s": step_at, "recovery_s": recovery_s, "trailing_s": TRAILING_S,
            "last_second_over_slo_s": last_second_s, "target_ongoing_requests": target,
            "rates": {"low": max(1.0, low_rps), "high": max(1.0, high_rps)},
            "failures": sum(w["failures"] - w["rejected_503"] for w in timeline),
            "rejected_503": sum(w["rejected_503"] for w in timeline)}


def recovery(windows: list[dict], slo_ms: float) -> tuple[float, float | None]:
    """Seconds after the step at which the trailing p95 (loadtest.TRAILING_S) came back within the SLO and stayed
    there (the end of the last one-second window whose trailing p95 was over it; 0 when none was), and the end of
    the last second whose own p95 was over it (None when none was)."""
    def last_over(key: str) -> float | None:
        late = [w["t"] + 1.0 for w in windows if w.get(key) is not None and w[key] > slo_ms]
        return late[-1] if late else None
    return last_over("p95_trailing_ms") or 0.0, last_over("p95_ms")


def replica_kill(folder: Path, port: int, data: str, rate: float, duration_s: float, work: Path,
                 limits: dict) -> dict:
    url = start(folder, port, MAX_REPLICAS, {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}, limits)
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(run_loadtest(
        url, data, rate=rate, duration_s=duration_s, model=str(folder), out=work / "kill.json", log=False)))
    runner.start()
    time.sleep(duration_s / 3)
    victims = replica_pids()
    killed_at = time.monotonic()
    if victims:
        os.kill(victims[0], signal.SIGKILL)  # one of this benchmark's own replicas
    recovery_s = None
    while time.monotonic() - killed_at < duration_s * 2:
        time.sleep(0.5)
        if running_replicas() == MAX_REPLICAS and replica_pids() and victims[0] not in replica_pids():
            recovery_s = time.monotonic() - killed_at
            break
    runner.join()
    return {"requests": out.get("requests"), "failures": out.get("failures"),
            "failures_by_kind": out.get("failures_by_kind"), "recovery_s": recovery_s, "killed_pid": victims[:1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="export folders; the first is the one fitted and step-loaded")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_sst2.json"))
    parser.add_argument("--slo-ms", type=float, default=None, help="default: the first export's plan's SLO, else 50")
    parser.add_argument("--loose-slo-ms", type=float, default=500.0,
                        help="a second SLO that the fp32 teacher can meet, for each model unbatched on 1 replica")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of batched and unbatched on 1 replica, interleaved (the batching choice is "
                             "judged on their mean: one round's winner flipped between runs here)")
    parser.add_argument("--section", default="serve",
                        help="the benchmarks/README.md section it writes (another pair of models: another section "
                             "and --out, so that the pair the issue names keeps its own)")
    parser.add_argument("--quick", action="store_true", help="seconds per run: checks the paths, not the figures")
    args = parser.parse_args(argv)
    duration_s, rungs, phase_s = (3.0, 2, 4.0) if args.quick else (30.0, 8, 60.0)
    folders = [Path(e).resolve() for e in args.exports]
    manifests = [read_manifest(f) for f in folders]
    slo = args.slo_ms or (manifests[0].get("capacity") or {}).get("p95_slo_ms") or 50.0
    work = Path(tempfile.mkdtemp(prefix="kdlab-bench-serve-"))
    started = time.time()
    texts = read_texts(Path(args.data), manifests[0].get("text_column"))
    latencies = {}
    for folder in folders:
        latencies[folder] = fresh_latency(folder, texts, seconds=1.0 if args.quick else 4.0)
        print(f"bench_serve: {folder.name} model latency now (1 thread, tokenizing included): " + ", ".join(
            f"batch {b} p50 {v['p50_ms']:.2f} ms" for b, v in latencies[folder].items()), flush=True)
    full_priority_workers()

    def fresh_server() -> None:
        """A new local Ray and Serve: each model is measured on a server nothing ran on before. (Tried because the
        fp32 MiniLM teacher, measured after 25 minutes of the student's deployments, sustained 8.2 req/s at the
        50 ms SLO while a `kdlab serve` of it alone held p95 43 ms at 12.8 and 20 req/s; the fresh instance did
        not close that gap: 0-5.4 req/s in the next run. The cause is still open.)"""
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})

    port = free_port()
    models, batching, fit, fit_run, cpu_run, cpu_high_run, autoscale, kill = [], [], None, None, None, None, None, None

    def measure_config(folder: Path, manifest: dict, mode: str, config: dict, replicas: int, slo_ms: float,
                       start_rps: float | None = None) -> dict:
        limits = limits_for(latencies[folder], config, replicas, slo_ms)
        url = start(folder, port, replicas, config, limits)
        predicted = predicted_rps(latencies[folder], config, replicas, fit, slo_ms)
        rate, runs = sustained(url, folder, args.data, start_rps or predicted or 1.0, slo_ms, duration_s, rungs, work)
        at = next((r for r in reversed(runs) if r["offered_rps"] == rate), runs[-1])
        row = {"name": manifest["name"], "folder": str(folder), "recipe": manifest["served"]["recipe"],
               "replicas": replicas, "mode": mode, "max_batch_size": config["max_batch_size"], "slo_ms": slo_ms,
               "sustained_rps": rate, "p50_ms": at["p50_ms"], "p95_ms": at["p95_ms"], "overhead_ms": at["overhead_ms"],
               "server_cpu_ms": at.get("server_cpu_ms"), "stack_cpu_ms": at.get("stack_cpu_ms"),
               "loadgen_cpu_ms": at.get("loadgen_cpu_ms"), "fitted": False, "predicted_rps": predicted,
               "prediction_error": None if not rate else predicted / rate - 1,
               "ladder": [{"offered_rps": r["offered_rps"], "achieved_rps": r["achieved_rps"], "p50_ms": r["p50_ms"],
                           "p95_ms": r["p95_ms"], "failures": r["failures"],
                           "failures_by_kind": r.get("failures_by_kind")} for r in runs],
               **limits}
        print(f"bench_serve: {manifest['name']} ({folder.name}) {mode} x{replicas} at p95 <= {slo_ms:g} ms: "
              f"{rate:.1f} req/s sustained, {predicted:.1f} predicted", flush=True)
        return row

    try:
        fresh_server()
        unbatched = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
        # The fit: the first model unbatched on 1 replica at 5 req/s, where no request waits for another.
        url = start(folders[0], port, 1, unbatched, limits_for(latencies[folders[0]], unbatched, 1, slo))
        fit_run = run_loadtest(url, args.data, rate=5.0, duration_s=duration_s * 2, model=str(folders[0]),
                               out=work / "fit.json", log=False)
        # CPU at 20 req/s (Locust's start-up spread over enough requests), then at 0.8x the capacity that figure
        # implies: two points of the line cores(rate) on the same configuration (cpu_line)
        cpu_run = run_loadtest(url, args.data, rate=20.0, duration_s=duration_s, model=str(folders[0]),
                               out=work / "fit-cpu.json", log=False)
        cpus = os.cpu_count() or 1
        free = cpus - (cpu_run["server_idle_cores"] or 0.0)
        per_request = (cpu_run["server_cpu_ms"] or 0.0) + (cpu_run["loadgen_cpu_ms"] or 0.0)
        cpu_high_run = run_loadtest(url, args.data, rate=max(40.0, 0.8 * free * 1e3 / max(per_request, 1e-3)),
                                    duration_s=duration_s, model=str(folders[0]), out=work / "fit-cpu-high.json",
                                    log=False)
        model_p50 = latencies[folders[0]]["1"]["p50_ms"]  # measured now, not the export's table
        load_cores, marginal_ms = cpu_line(cpu_run, cpu_high_run)
        replica_marginal_ms = cpu_line(cpu_run, cpu_high_run, keys=("replica_cpu_ms",))[1]
        fit = Fit(overhead_ms=fit_run["p50_ms"] - model_p50, stack_cpu_ms=max(0.0, marginal_ms - model_p50),
                  cores=free - load_cores, load_cores=load_cores,
                  replica_ms=max(0.0, replica_marginal_ms - model_p50))
        print(f"bench_serve: fitted on {manifests[0]['name']} unbatched x1: overhead {fit.overhead_ms:.2f} ms at 5 "
              f"req/s; CPU at {cpu_run['achieved_rps']:.0f} and {cpu_high_run['achieved_rps']:.0f} req/s: serving "
              f"stack + load generator {fit.stack_cpu_ms:.2f} ms a request beyond the model, {load_cores:.2f} cores "
              f"under any load, {fit.cores:.2f} of {cpus} cores left; the replica {fit.replica_ms:.2f} ms a request "
              f"beyond the model", flush=True)
        for i, (folder, manifest) in enumerate(zip(folders, manifests)):
            if i:
                fresh_server()
            configs = configs_of(manifest)
            gain = (manifest.get("capacity") or {}).get("batching_gain", 0.1)
            rounds: dict[str, list[dict]] = {mode: [] for mode in configs}
            for round_ in range(1, max(1, args.repeats) + 1):
                for mode, config in configs.items():
                    row = measure_config(folder, manifest, mode, config, 1, slo)
                    row["round"] = round_
                    row["fitted"] = i == 0 and mode == "unbatched"
                    rounds[mode].append(row)
                    models.append(row)
                if not any(r["sustained_rps"] for rs in rounds.values() for r in rs):
                    break  # nothing holds at this SLO either way: another round would measure zeros again
            if i == 0:
                # The last fitted figure: the wait factor that reproduces the fitted configuration's mean sustained
                # rate over its rounds (one 30 s round of it gave 68.6 and then 106.8 req/s here: fitted on the first
                # alone, the second landed at -36 %). The rows measured so far are predicted again with it.
                fitted = [r["sustained_rps"] for r in rounds["unbatched"]]
                fit.wait_factor = fit_wait_factor(latencies[folder], unbatched, 1, fit, slo, float(np.mean(fitted)))
                for mode, rs in rounds.items():
                    for r in rs:
                        r["predicted_rps"] = predicted_rps(latencies[folder], configs[mode], 1, fit, slo)
                        r["prediction_error"] = (r["predicted_rps"] / r["sustained_rps"] - 1
                                                 if r["sustained_rps"] else None)
                print(f"bench_serve: queueing-wait factor {fit.wait_factor:.2f} reproduces the fitted "
                      f"configuration's mean {np.mean(fitted):.1f} req/s", flush=True)
            mean = {m: float(np.mean([r["sustained_rps"] for r in rs])) for m, rs in rounds.items()}
            predicted = {m: rs[0]["predicted_rps"] for m, rs in rounds.items()}
            best = max(mean, key=mean.get)
            most_row = measure_config(folder, manifest, best, configs[best], MAX_REPLICAS, slo)
            models.append(most_row)
            judged_at, loose = slo, bool(args.loose_slo_ms and args.loose_slo_ms != slo)
            if loose:
                loose_rows = {"unbatched": measure_config(folder, manifest, "unbatched", unbatched, 1,
                                                          args.loose_slo_ms)}
                models.append(loose_rows["unbatched"])
                if not any(mean.values()):  # nothing at the SLO: batching is judged where the model does serve
                    loose_rows["batched"] = measure_config(folder, manifest, "batched", configs["batched"], 1,
                                                           args.loose_slo_ms)
                    models.append(loose_rows["batched"])
                    judged_at = args.loose_slo_ms
                    mean = {m: r["sustained_rps"] for m, r in loose_rows.items()}
                    predicted = {m: r["predicted_rps"] for m, r in loose_rows.items()}
            plan_batch = plan_settings(manifest).get("max_batch_size")
            measured_choice = batching_choice(mean["unbatched"], mean["batched"], gain)
            predicted_choice = batching_choice(predicted["unbatched"], predicted["batched"], gain)
            batching.append({"name": manifest["name"], "folder": folder.name, "slo_ms": judged_at,
                             "batching_gain": gain, "rounds": len(rounds["unbatched"]) if judged_at == slo else 1,
                             "mean_sustained_rps": mean, "predicted_rps": predicted,
                             "best_measured": measured_choice, "best_predicted": predicted_choice,
                             "matches": measured_choice is not None and measured_choice == predicted_choice,
                             "plan_choice": None if plan_batch is None else
                             ("batched" if plan_batch > 1 else "unbatched")})
            if i == 0:
                base = mean["unbatched"] or 10.0
                # The step rises to 1 - headroom of what the most replicas sustain unbatched (measured above when
                # the better mode on 2 replicas was unbatched, else predicted): the plan's own operating point, a
                # load it promises within the SLO, so the question is whether autoscaling adds the replica in
                # time. (At 0.9x, a repeat run sat where a 1-second p95 crosses the SLO by chance: 12 of 60 s.)
                # Each replica aims at the requests in flight (Little's law) of one loaded to 1 - headroom of its
                # sustained rate, as the plan does.
                most = (most_row["sustained_rps"] if best == "unbatched" else
                        predicted_rps(latencies[folder], unbatched, MAX_REPLICAS, fit, slo)) or base
                headroom = (manifest.get("capacity") or {}).get("headroom", 0.3)
                in_flight = max(0.5, round((1 - headroom) * base * (rounds["unbatched"][0]["p50_ms"] or 10.0) / 1e3,
                                           2))
                limits = limits_for(latencies[folder], unbatched, MAX_REPLICAS, slo)
                autoscale = step_load(folder, port, args.data, 0.3 * base, (1 - headroom) * most, slo, phase_s, work,
                                      target_ongoing=in_flight, limits=limits)
                kill = replica_kill(folder, port, args.data, max(1.0, base / 2), duration_s * 2, work, limits)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    result = {"benchmark": "serve_sst2", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "quick": args.quick,
              "seconds": round(time.time() - started, 1), "machine": machine_info(), "versions": versions(),
              "slo_ms": slo, "loose_slo_ms": args.loose_slo_ms, "fitted_overhead_ms": fit.overhead_ms if fit else None,
              "model_latency": {portable_path(f): lat for f, lat in latencies.items()},  # keys: portable too
              "fit": {**asdict(fit), **{name: {k: r.get(k) for k in (
                  "offered_rps", "achieved_rps", "p50_ms", "p95_ms", "overhead_ms", "server_idle_cores", "server_cpu_ms",
                  "stack_cpu_ms", "loadgen_cpu_ms", "replica_cpu_ms", "replica_ms")}
                  for name, r in (("run", fit_run), ("cpu_run", cpu_run), ("cpu_high_run", cpu_high_run)) if r}}
              if fit else None,
              "models": models, "batching": batching,
              "autoscale": autoscale, "replica_kill": kill}
    out = Path(args.out)
    if args.quick:  # figures that mean nothing stay out of benchmarks/README.md
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        print(f"bench_serve: wrote {out} in {result['seconds']:.0f} s", flush=True)
    else:
        pair = "" if args.section == "serve" else ": " + ", ".join(f"{m['name']} `{f.name}`"
                                                                   for f, m in zip(folders, manifests))
        publish(result, markdown(result, record=portable_path(out)), marker=args.section,
                heading=f"Serving on Ray Serve, load-tested (SST-2{pair})", out=out,
                readme=ROOT / "benchmarks" / "README.md", script="scripts/bench_serve.py", work=work)
    return 0


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def recovery_text(a: dict, slo_ms: float) -> str:
    """When p95 came back within the SLO after the step, or that it did not while the high load lasted. Runs
    before the trailing window was recorded judged single seconds; they say so."""
    high = [w for w in a["timeline"] if w.get("phase") == "high"]
    trailing = a.get("trailing_s")
    key = "p95_trailing_ms" if trailing else "p95_ms"
    what = f"p95 over the trailing {trailing:g} s" if trailing else "the per-second p95"
    up = next((w["t"] - a["step_at_s"] for w in high if (w["replicas"] or 0) > 1), None)
    second = f" (a second replica running {up:.0f} s after the step)" if up is not None else ""
    if high and high[-1].get(key) is not None and high[-1][key] > slo_ms:
        return f"{what} not back within the SLO while the high load lasted{second}"
    text = f"{what} back within the SLO {fmt(a['recovery_s'], 0)} s after the step{second}"
    if trailing:
        last = a.get("last_second_over_slo_s")
        text += ("; no single second's p95 over it" if last is None else
                 f"; a single second's p95 last over it {last:.0f} s after the step")
    return text


def markdown(result: dict, record: str = "benchmarks/results/serve_sst2.json") -> str:
    """The README section: measured against predicted for each configuration, then the step load and the kill."""
    m, f = result["machine"], result.get("fit") or {}
    run, high = f.get("cpu_run") or {}, f.get("cpu_high_run") or {}
    lines = [f"{m.get('cpu', 'CPU')}, {m.get('cpus', '?')} CPUs; server, replicas (1 thread each) and Locust on the "
             f"same machine. Fitted once, on the first model unbatched on 1 replica: serving overhead "
             f"{fmt(f.get('overhead_ms'), 2)} ms at 5 req/s (p50 through the server minus the model's own); from the "
             f"CPU at {fmt(run.get('achieved_rps'), 0)} and {fmt(high.get('achieved_rps'), 0)} req/s (server and "
             f"Locust share the cores), {fmt(f.get('stack_cpu_ms'))} ms a request beyond the model's and "
             f"{fmt(f.get('load_cores'), 2)} cores under any load, leaving {fmt(f.get('cores'), 2)} cores "
             f"({fmt(run.get('server_idle_cores'), 2)} burnt by the idle server), of which the replica's own "
             f"{fmt(f.get('replica_ms'))} ms a request beyond the model (serving.replica_ms: serial with the model in "
             f"the replica's service time); then that configuration's mean sustained rate over its rounds and the "
             f"queueing-wait factor that makes the serving model reproduce it: {fmt(f.get('wait_factor'), 2)} "
             f"(serving.wait_factor). Sustained = the highest offered rate of a ladder "
             f"(x1.25 up or /1.25 down from the prediction, then the geometric middle; 30 s a rung) with p95 within "
             f"the SLO, no failure and 90 % of the offered rate answered; predicted = the capacity plan's serving model (search/capacity.py `Serving`: "
             f"fill wait, the model's latency at the batch that fills, overhead, queueing on the replicas or the "
             f"shared cores) with the fitted figures.", "",
             "The models' own latency, measured at the start of the run (served artefact, 1 thread, tokenizing "
             "included): " + "; ".join(f"`{Path(folder).name}` batch 1 p50 {lat['1']['p50_ms']:.2f} ms, p95 "
                                       f"{lat['1']['p95_ms']:.2f} ms, batch 8 p50 {lat['8']['p50_ms']:.1f} ms"
                                       for folder, lat in (result.get("model_latency") or {}).items()) + ".", "",
             "| model | recipe | replicas | batching | SLO ms | predicted req/s | sustained req/s | error | p50 ms | "
             "p95 ms | server CPU ms/req |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        mode = "unbatched" if r["max_batch_size"] == 1 else f"up to {r['max_batch_size']}"
        err = "-" if r.get("prediction_error") is None else f"{r['prediction_error']:+.0%}"
        fitted = " (fitted here)" if r.get("fitted") else ""
        mode += f", round {r['round']}" if r.get("round", 1) > 1 else ""
        lines.append(f"| {r['name']} (`{Path(r['folder']).name}`){fitted} | {r['recipe']} | {r['replicas']} | {mode} | "
                     f"{r.get('slo_ms', result['slo_ms']):g} | {fmt(r['predicted_rps'])} | {fmt(r['sustained_rps'])} | "
                     f"{err} | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r.get('server_cpu_ms'))} |")
    judged = [r for r in result["models"] if not r.get("fitted") and r.get("prediction_error") is not None]
    within = [r for r in judged if abs(r["prediction_error"]) <= 0.25]
    unsustained = sum(1 for r in result["models"] if not r.get("fitted") and not r["sustained_rps"])
    lines.append(f"\nConfigurations other than the fitted one within ±25 % of the prediction: {len(within)} of "
                 f"{len(judged)}" + (f" ({unsustained} more sustained no rate at all: no error to take)"
                                     if unsustained else "") + ".")
    for b in result["batching"]:
        choice = (f"the export's plan chose {b['plan_choice']}" if b["plan_choice"] else "the export's plan found no "
                  "configuration within its SLO")
        mean, pred = b.get("mean_sustained_rps") or {}, b.get("predicted_rps") or {}
        rounds = f"mean of {b['rounds']} rounds" if b.get("rounds", 1) > 1 else "one round"
        lines.append(f"\n{b['name']}{' (' + b['folder'] + ')' if b.get('folder') else ''}, batching at p95 <= "
                     f"{fmt(b.get('slo_ms'), 0)} ms ({rounds}): unbatched {fmt(mean.get('unbatched'))}, batched "
                     f"{fmt(mean.get('batched'))} req/s measured ({fmt(pred.get('unbatched'))} and "
                     f"{fmt(pred.get('batched'))} predicted); by the plan's rule (batched only when it serves "
                     f"{b.get('batching_gain', 0.1):.0%} more) measured **{b['best_measured'] or 'neither'}**, predicted "
                     f"**{b['best_predicted'] or 'neither'}** ({'match' if b.get('matches') else 'no match'}); "
                     f"{choice}.")
    a = result.get("autoscale")
    if a:
        peak = max((w["replicas"] or 0 for w in a["timeline"]), default=0)
        lines.append(f"\nStep load under autoscaling (1..{MAX_REPLICAS} replicas, target "
                     f"{a.get('target_ongoing_requests')} ongoing requests a replica; "
                     f"{fmt((a.get('rates') or {}).get('low'))} -> {fmt((a.get('rates') or {}).get('high'))} -> "
                     f"{fmt((a.get('rates') or {}).get('low'))} req/s, 60 s each): replicas peaked at {peak}; "
                     f"{recovery_text(a, result['slo_ms'])}; {a['failures']} failures, {a['rejected_503']} answered "
                     f"503.")
    k = result.get("replica_kill")
    if k:
        lines.append(f"\nOne of {MAX_REPLICAS} replicas SIGKILLed under load: {k['failures']} of {k['requests']} "
                     f"requests failed ({k['failures_by_kind'] or 'none'}); replaced after {fmt(k['recovery_s'], 0)} s.")
    lines.append(f"\nFull record: `{record}` ({result['seconds']:.0f} s).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
