"""Benchmark: exports served on Ray Serve and load-tested with Locust, against the capacity plan (issue 17).

    make bench-serve
    .venv/bin/python scripts/bench_serve.py runs/sst2_minilm/export runs/sst2_minilm/teacher_export \
        [--data ../shared/data/sst2/dev.tsv] [--out benchmarks/results/serve_sst2.json] [--quick]

Each argument is an export folder (kdlab export; the teacher exported the same way with --recipe fp32). On one
private local Ray instance, with server and load generator sharing this machine (replicas capped at 2, one
thread each), for each model:
- unbatched (batch 1) and batched (the plan's batch when it batches, else 8 with a 5 ms wait) on 1 replica, and
  the better of the two on 2 replicas: the sustained rate of each, the highest offered rate with p95 <= the SLO
  and no failures (a ladder from a quarter of the predicted capacity: up x1.4 a step, or down by halves);
- the serving overhead fitted once, on the first model's unbatched 1 replica at 5 req/s (p50 through the server
  minus the model's own p50 at batch 1), then every configuration's sustained rate predicted from the
  export's measured latency with it (`predicted_rps`, `fitted` true for the fitted one);
- batching: which of batched and unbatched sustained more, and which the plan chose;
then for the first model, autoscaling (1..2 replicas) under a step load (low -> 1.5x one replica's sustained
rate -> low) with the replica count sampled each second, and one replica of two SIGKILLed under load.
`--quick` (seconds per run, two rungs) checks that the paths work; its figures mean nothing.
Writes benchmarks/results/serve_sst2.json with the keys the issue lists.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
from ray import serve

from kdlab.distill.deploy import APP_NAME, deployment_options, plan_settings, read_manifest
from kdlab.eval.latency import machine_info, versions
from kdlab.scripts.bench_readme import publish
from kdlab.scripts.loadtest import model_latency, run_loadtest
from kdlab.scripts.serve import deploy, full_priority_workers
from kdlab.scripts.serve_app import settings_for

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


def start(folder: Path, port: int, replicas: int, batching: dict, autoscale: dict | None = None) -> str:
    """Deploy a fresh application (the previous one deleted: no replica of an earlier run carries over)."""
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    settings = settings_for(folder, threads=1, **batching)
    options = deployment_options(plan_settings(read_manifest(folder)), replicas=replicas, threads=1,
                                 max_batch_size=settings.max_batch_size)
    if autoscale:
        options.pop("num_replicas")
        options["autoscaling_config"] = autoscale
    return deploy(settings, options, host="127.0.0.1", port=port, request_timeout_s=30)


def predicted_rps(latency: dict, batching: dict, replicas: int, overhead_ms: float, slo_ms: float) -> float:
    """A configuration's sustainable rate by the plan: replicas x batch / p50 at that batch, if the predicted p95
    there (the wait to fill, at most the batch wait; the model's p95; the overhead) meets the SLO, else 0."""
    b = batching["max_batch_size"]
    near = min((int(k) for k in latency), key=lambda k: (abs(k - b), k))
    p50, p95 = latency[str(near)]["p50_ms"], latency[str(near)]["p95_ms"]
    throughput = b / (p50 / 1e3)
    fill_ms = min(batching["batch_wait_timeout_s"] * 1e3, (b - 1) / throughput * 1e3)
    return replicas * throughput if fill_ms + p95 + overhead_ms <= slo_ms else 0.0


def sustained(url: str, folder: Path, data: str, start_rps: float, slo_ms: float, duration_s: float, rungs: int,
              work: Path) -> tuple[float, list[dict]]:
    """The highest offered rate with p95 <= SLO and no failures: up x1.4 from `start_rps` while it holds, or, when
    the first rate misses, down by halves until one holds (0 when none down to 1 req/s does)."""
    best, runs, rate, direction = 0.0, [], max(1.0, start_rps), None
    for _ in range(rungs):
        r = run_loadtest(url, data, rate=rate, duration_s=duration_s, model=str(folder),
                         out=work / f"lt-{time.time_ns()}.json", log=False)
        runs.append(r)
        holds = not r["failures"] and r["p95_ms"] is not None and r["p95_ms"] <= slo_ms
        if holds:
            best = max(best, rate)
            if direction == "down":
                break
            direction, rate = "up", rate * 1.4
        else:
            if direction == "up" or rate <= 1.0:
                break
            direction, rate = "down", max(1.0, rate / 2)
    return best, runs


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


def step_load(folder: Path, port: int, data: str, base_rps: float, slo_ms: float, phase_s: float,
              work: Path) -> dict:
    plan = plan_settings(read_manifest(folder))
    target = (plan.get("autoscaling") or {}).get("target_ongoing_requests", 2)
    url = start(folder, port, 1, {"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
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
    timeline, step_at, recovery_s, t = [], None, None, 0.0
    for phase, rate in (("low", 0.3 * base_rps), ("high", 1.5 * base_rps), ("low", 0.3 * base_rps)):
        r = run_loadtest(url, data, rate=max(1.0, rate), duration_s=phase_s, model=str(folder),
                         out=work / f"step-{phase}-{time.time_ns()}.json", log=False)
        for w in r["timeline"]:
            replicas = next((n for s, n in reversed(samples) if s <= t + w["t"]), None)
            timeline.append({"t": t + w["t"], "phase": phase, "replicas": replicas, "offered_rps": r["offered_rps"],
                             "achieved_rps": w["answered"], "p95_ms": w["p95_ms"], "failures": w["failures"],
                             "rejected_503": w["rejected_503"]})
        if phase == "high":
            step_at = t
            late = [w for w in r["timeline"] if w["p95_ms"] is not None and w["p95_ms"] > slo_ms]
            recovery_s = (late[-1]["t"] + 1.0) if late else 0.0
        t += r["window_s"]
    stop.set()
    sampler.join()
    return {"timeline": timeline, "step_at_s": step_at, "recovery_s": recovery_s,
            "failures": sum(w["failures"] - w["rejected_503"] for w in timeline),
            "rejected_503": sum(w["rejected_503"] for w in timeline)}


def replica_kill(folder: Path, port: int, data: str, rate: float, duration_s: float, work: Path) -> dict:
    url = start(folder, port, MAX_REPLICAS, {"max_batch_size": 1, "batch_wait_timeout_s": 0.0})
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
    parser.add_argument("--quick", action="store_true", help="seconds per run: checks the paths, not the figures")
    args = parser.parse_args(argv)
    duration_s, rungs, phase_s = (3.0, 2, 4.0) if args.quick else (30.0, 8, 60.0)
    folders = [Path(e).resolve() for e in args.exports]
    manifests = [read_manifest(f) for f in folders]
    slo = args.slo_ms or (manifests[0].get("capacity") or {}).get("p95_slo_ms") or 50.0
    work = Path(tempfile.mkdtemp(prefix="kdlab-bench-serve-"))
    started = time.time()
    full_priority_workers()
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    port = free_port()
    models, batching, overhead_ms, autoscale, kill = [], [], None, None, None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        for i, (folder, manifest) in enumerate(zip(folders, manifests)):
            latency = model_latency(manifest)
            measured = {}
            for mode, config in configs_of(manifest).items():
                url = start(folder, port, 1, config)
                fitted = overhead_ms is None and mode == "unbatched"
                if fitted:  # at a low rate (5 req/s), where no request waits for another
                    fit = run_loadtest(url, args.data, rate=5.0, duration_s=duration_s * 2, model=str(folder),
                                       out=work / "fit.json", log=False)
                    overhead_ms = fit["overhead_ms"] or 0.0
                    print(f"bench_serve: serving overhead fitted on {manifest['name']} unbatched x1 at 5 req/s: "
                          f"{overhead_ms:.2f} ms (p50 {fit['p50_ms']:.2f} ms)", flush=True)
                guess = predicted_rps(latency, config, 1, overhead_ms, slo) or 20.0
                rate, runs = sustained(url, folder, args.data, guess / 4, slo, duration_s, rungs, work)
                measured[mode] = rate
                last = next((r for r in reversed(runs) if r["offered_rps"] == rate), runs[0])
                models.append({"name": manifest["name"], "folder": str(folder), "recipe": manifest["served"]["recipe"],
                               "replicas": 1, "mode": mode, "max_batch_size": config["max_batch_size"],
                               "sustained_rps": rate, "p50_ms": last["p50_ms"], "p95_ms": last["p95_ms"],
                               "overhead_ms": last["overhead_ms"], "fitted": fitted,
                               "predicted_rps": predicted_rps(latency, config, 1, overhead_ms, slo)})
                print(f"bench_serve: {manifest['name']} {mode} x1: {rate:.0f} req/s sustained", flush=True)
            best = max(measured, key=measured.get)
            config = configs_of(manifest)[best]
            url = start(folder, port, MAX_REPLICAS, config)
            rate, runs = sustained(url, folder, args.data, max(measured[best], 4.0), slo, duration_s, rungs, work)
            last = next((r for r in reversed(runs) if r["offered_rps"] == rate), runs[0])
            models.append({"name": manifest["name"], "folder": str(folder), "recipe": manifest["served"]["recipe"],
                           "replicas": MAX_REPLICAS, "mode": best, "max_batch_size": config["max_batch_size"],
                           "sustained_rps": rate, "p50_ms": last["p50_ms"], "p95_ms": last["p95_ms"],
                           "overhead_ms": last["overhead_ms"], "fitted": False,
                           "predicted_rps": predicted_rps(latency, config, MAX_REPLICAS, overhead_ms, slo)})
            plan_batch = plan_settings(manifest).get("max_batch_size")
            batching.append({"name": manifest["name"], "folder": folder.name, "best_measured": best,
                             "plan_choice": None if plan_batch is None else
                             ("batched" if plan_batch > 1 else "unbatched")})
            if i == 0:
                base = measured["unbatched"] or 10.0
                autoscale = step_load(folder, port, args.data, base, slo, phase_s, work)
                kill = replica_kill(folder, port, args.data, max(1.0, base / 2), duration_s * 2, work)
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"benchmark": "serve_sst2", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "quick": args.quick,
              "seconds": round(time.time() - started, 1), "machine": machine_info(), "versions": versions(),
              "slo_ms": slo, "fitted_overhead_ms": overhead_ms, "models": models, "batching": batching,
              "autoscale": autoscale, "replica_kill": kill}
    out = Path(args.out)
    if args.quick:  # figures that mean nothing stay out of benchmarks/README.md
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        print(f"bench_serve: wrote {out} in {result['seconds']:.0f} s", flush=True)
    else:
        publish(result, markdown(result), marker="serve", heading="Serving on Ray Serve, load-tested (SST-2)",
                out=out, readme=ROOT / "benchmarks" / "README.md", script="scripts/bench_serve.py", work=work)
    return 0


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    """The README section: measured against predicted for each configuration, then the step load and the kill."""
    m = result["machine"]
    lines = [f"{m.get('cpu', 'CPU')}, {m.get('cpus', '?')} CPUs; server, replicas and Locust on the same machine; "
             f"SLO p95 <= {result['slo_ms']:.0f} ms through the server; serving overhead fitted at 5 req/s "
             f"(unbatched, 1 replica): {fmt(result['fitted_overhead_ms'])} ms. Sustained = the highest offered "
             f"rate of a ladder (x1.4 up, /2 down, 30 s a rung) with p95 within the SLO and no failure; "
             f"predicted = the capacity plan's rate from the export's own latency and the fitted overhead.", "",
             "| model | recipe | replicas | batching | predicted req/s | sustained req/s | p50 ms | p95 ms | "
             "overhead ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        mode = "unbatched" if r["max_batch_size"] == 1 else f"up to {r['max_batch_size']}"
        lines.append(f"| {r['name']} (`{Path(r['folder']).name}`) | {r['recipe']} | {r['replicas']} | {mode} | {fmt(r['predicted_rps'], 0)} | "
                     f"{fmt(r['sustained_rps'], 0)} | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | "
                     f"{fmt(r['overhead_ms'])} |")
    for b in result["batching"]:
        choice = (f"the plan chose {b['plan_choice']}" if b["plan_choice"] else "the plan found no configuration "
                  f"within the SLO")
        lines.append(f"\n{b['name']}{' (' + b['folder'] + ')' if b.get('folder') else ''}: "
                     f"{b['best_measured']} sustained more; {choice}.")
    a = result.get("autoscale")
    if a:
        peak = max((w["replicas"] or 0 for w in a["timeline"]), default=0)
        lines.append(f"\nStep load under autoscaling (1..{MAX_REPLICAS} replicas): replicas peaked at {peak}; "
                     f"p95 back within the SLO {fmt(a['recovery_s'], 0)} s after the step; "
                     f"{a['failures']} failures, {a['rejected_503']} answered 503.")
    k = result.get("replica_kill")
    if k:
        lines.append(f"\nOne of {MAX_REPLICAS} replicas SIGKILLed under load: {k['failures']} of {k['requests']} "
                     f"requests failed ({k['failures_by_kind'] or 'none'}); replaced after {fmt(k['recovery_s'], 0)} s.")
    lines.append(f"\nFull record: `benchmarks/results/serve_sst2.json` ({result['seconds']:.0f} s).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
