"""`kdlab loadtest`: offer a served model a constant request rate with Locust and report what it achieved.

    kdlab loadtest --url http://127.0.0.1:8000 --data ../shared/data/sst2/dev.tsv --rate 100 --duration-s 30 \
        [--max-requests 5000] [--model runs/sst2_minilm/export] [--out runs/sst2_minilm/report/loadtest.json]

Locust runs headless in a subprocess (its gevent patches the interpreter: scripts/locustfile.py), bounded in
time (--duration-s) and in count (--max-requests), at an offered rate whose arrivals are Poisson (each user on
its own schedule of exponential gaps, enough users that slow answers do not lower the rate; Locust's
constant_throughput users keep in step and send bursts: scripts/locustfile.py), with real texts read from --data
as `kdlab predict` reads
its input. Every request's raw time is recorded by our own listener (Locust's statistics round above 100 ms).
The report: offered and achieved requests/s (answered 200, over the time from the first request sent to the last
answer), p50/p95/p99 ms of the answered requests, failures by kind (HTTP 503 = turned away by the full queue),
the batch sizes the server ran, and with --model the serving overhead: p50 through the server minus the model's
own p50 at the batch it ran (the export's measured latency table); and CPU per answered request: the server's
(its Ray processes on this machine, beyond what they burn idle, measured for 3 s before the load), the serving
stack's (the server's minus the model's own: `stack_cpu_ms`, what serving.stack_cpu_ms takes), the replicas'
own beyond the model (`replica_ms`, what serving.replica_ms takes) and the load generator's. Written as JSON (default: the report folder
beside the export, runs/<name>/report/loadtest.json) and, when the export names an MLflow run, logged to it.
Only 127.0.0.1 / localhost URLs are accepted: a load test is not to be pointed at someone else's server.
"""
from __future__ import annotations

import bisect
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from itertools import islice
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import yaml

from kdlab.distill.deploy import read_manifest
from kdlab.distill.errors import ConfigError
from kdlab.eval.latency import machine_info, versions
from kdlab.scripts.predict import read_rows

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_TEXTS_READ = 5000
TRAILING_S = 10.0  # the timeline's trailing p95 window (seconds)


def read_texts(path: Path, text_column: str | None) -> list[str]:
    """Up to MAX_TEXTS_READ non-empty texts of the data file, read as `kdlab predict` reads its input."""
    texts = [text for text, _ in islice(read_rows(path, text_column), MAX_TEXTS_READ) if text.strip()]
    if not texts:
        raise ConfigError(f"--data {path}: no non-empty texts")
    return texts


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def model_p50_ms(manifest: dict, batch: float) -> tuple[float | None, int | None]:
    """The model's own p50 at the measured batch size nearest `batch` (the export's latency tables)."""
    table = {int(b): v["p50_ms"] for b, v in model_latency(manifest).items()}
    if not table:
        return None, None
    nearest = min(table, key=lambda b: (abs(b - batch), b))
    return table[nearest], nearest


def answered(record: dict) -> bool:
    """A request the server answered (HTTP 200, no transport error)."""
    return record["status"] == 200 and not record["error"]


def timeline(records: list[dict], window_s: float = 1.0, trailing_s: float = TRAILING_S) -> list[dict]:
    """Per window of sent time: requests sent, answered, p95 ms of the answered, failures and 503s; and the p95 of
    the answered requests sent in the trailing `trailing_s` up to the window's end (`p95_trailing_ms`). A one-second
    p95 rests on a few dozen requests (its 3rd-largest at 60 req/s) and jumps with any one slow request; the
    trailing one is what a dashboard's p95 over the last 10 s shows."""
    if not records:
        return []
    first = min(r["start_s"] for r in records)
    windows: dict[int, list[dict]] = {}
    for r in records:
        windows.setdefault(int((r["start_s"] - first) / window_s), []).append(r)
    done = sorted((r["start_s"] - first, r["ms"]) for r in records if answered(r))
    sent_at = [t for t, _ in done]
    out = []
    for i in sorted(windows):
        group = windows[i]
        ok = [r["ms"] for r in group if answered(r)]
        end = (i + 1) * window_s
        trailing = [ms for _, ms in done[bisect.bisect_left(sent_at, end - trailing_s):
                                             bisect.bisect_left(sent_at, end)]]
        out.append({"t": i * window_s, "sent": len(group), "answered": len(ok), "p95_ms": percentile(ok, 95),
                    "p95_trailing_ms": percentile(trailing, 95),
                    "failures": len(group) - len(ok), "rejected_503": sum(r["status"] == 503 for r in group)})
    return out


def summarise(records: list[dict], *, offered_rps: float, duration_s: float, manifest: dict | None) -> dict:
    ok = [r for r in records if answered(r)]
    ms = [r["ms"] for r in ok]
    failures = Counter(r["error"] or f"HTTP {r['status']}" for r in records if r not in ok)
    if records:
        first = min(r["start_s"] for r in records)
        last = max(r["start_s"] + r["ms"] / 1e3 for r in records)
        window_s = max(last - first, 1e-9)
    else:
        window_s = duration_s
    batches = [b for r in ok for b in (r["batch_sizes"] or [])]
    mean_batch = statistics.fmean(batches) if batches else None
    result = {"requests": len(records), "answered": len(ok), "offered_rps": offered_rps,
              "achieved_rps": len(ok) / window_s if records else 0.0, "window_s": window_s,
              "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99),
              "mean_ms": statistics.fmean(ms) if ms else None, "max_ms": max(ms) if ms else None,
              "failures": sum(failures.values()), "failures_by_kind": dict(failures),
              "rejected_503": failures.get("HTTP 503", 0),
              "batch_size_mean": mean_batch, "batch_sizes": dict(sorted(Counter(batches).items())),
              "overhead_ms": None, "model_p50_ms": None, "model_batch": None}
    starts = sorted(r["start_s"] for r in records)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    # How bursty the offered load was: Poisson arrivals at rate λ send 1 - exp(-0.005 λ) of requests within 5 ms
    # of the one before (10 % at 20 req/s); users in step send nearly all of them so.
    result["sent_within_5ms"] = sum(g < 0.005 for g in gaps) / len(gaps) if gaps else None
    result["timeline"] = timeline(records)
    if manifest is not None and mean_batch is not None and result["p50_ms"] is not None:
        model_p50, at = model_p50_ms(manifest, mean_batch)
        if model_p50 is not None:
            result.update(model_p50_ms=model_p50, model_batch=at, overhead_ms=result["p50_ms"] - model_p50)
    return result


def run_locust(url: str, texts: list[str], *, rate: float, duration_s: float, max_requests: int, users: int,
               texts_per_request: int, work: Path) -> list[dict]:
    (work / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    out = work / "requests.jsonl"
    env = {**os.environ, "KDLAB_LOADTEST_TEXTS": str(work / "texts.json"),
           "KDLAB_LOADTEST_RATE_PER_USER": repr(rate / users), "KDLAB_LOADTEST_MAX_REQUESTS": str(max_requests),
           "KDLAB_LOADTEST_TEXTS_PER_REQUEST": str(texts_per_request), "KDLAB_LOADTEST_OUT": str(out)}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url, "-u", str(users),
           "-r", str(users), "-t", f"{duration_s:g}s", "--stop-timeout", "5", "--loglevel", "WARNING",
           "--only-summary", "--exit-code-on-error", "0", "--skip-log-setup"]
    # Bounded: Locust stops itself at -t; the subprocess timeout is the backstop for a hung run.
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=duration_s + 60)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"locust exited {proc.returncode}: {tail[0]}")
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def server_settings(url: str) -> dict:
    """What the server says it runs (GET /health): model, recipe, threads, batching, replicas; one line if silent."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"--url {url}: GET /health answered {exc.code}; valid: a ready kdlab serve") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConfigError(f"--url {url}: no kdlab serve answers there ({getattr(exc, 'reason', exc)}); start one "
                          f"with kdlab serve --model EXPORT") from None


def model_latency(manifest: dict) -> dict:
    """{batch: {p50_ms, p95_ms}} of the model itself, as its export measured it (card table and plan)."""
    table = {str(r["batch_size"]): {"p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"]} for r in manifest.get("latency") or []}
    table.update((manifest.get("capacity") or {}).get("latency") or {})
    return dict(sorted(table.items(), key=lambda kv: int(kv[0])))


def ray_cpu_seconds() -> tuple[float, float] | None:
    """CPU seconds used so far by the Ray processes on this machine (raylet, GCS, proxy, controller, replicas,
    the kdlab serve driver), the server's side of a local load test, and by its replicas alone (Ray Serve names
    their processes ray::ServeReplica:...). None without /proc."""
    if not Path("/proc").is_dir():
        return None
    ticks, total, replicas = os.sysconf("SC_CLK_TCK"), 0, 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3]
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if argv[0].startswith(b"ray::") or any(b"/ray/" in a or a.endswith(b"kdlab") and b"serve" in argv
                                                for a in argv):
            ticks_used = int(fields[11]) + int(fields[12])  # utime, stime
            total += ticks_used
            replicas += ticks_used if argv[0].startswith(b"ray::ServeReplica:") else 0
    return total / ticks, replicas / ticks


def server_idle_cores(seconds: float = 3.0) -> tuple[float, float] | None:
    """Cores the idle server burns (Ray's heartbeats and polling), and its replicas of that, measured before the
    load starts."""
    before = ray_cpu_seconds()
    if before is None:
        return None
    time.sleep(seconds)
    after = ray_cpu_seconds()
    return tuple(max(0.0, (a - b) / seconds) for a, b in zip(after, before))


def cpu_per_request(result: dict, server_cpu_s: float | None, idle_cores: float | None, loadgen_cpu_s: float,
                    threads: int | None, replica_cpu_s: float | None = None,
                    replica_idle_cores: float | None = None) -> dict:
    """CPU per answered request: the server's beyond its idle burn, the load generator's, the serving stack's (the
    server's minus the model's own: threads x its p50 at the batch it ran / that batch), and of the server's, the
    replicas' (`replica_cpu_ms`) and their own work beyond the model (`replica_ms`, what serving.replica_ms takes)."""
    n = result["answered"]
    out = {"server_idle_cores": idle_cores, "server_cpu_ms": None, "loadgen_cpu_ms": loadgen_cpu_s / n * 1e3 if n else None,
           "stack_cpu_ms": None, "replica_cpu_ms": None, "replica_ms": None}
    if not n or server_cpu_s is None or idle_cores is None:
        return out
    out["server_cpu_ms"] = max(0.0, server_cpu_s - idle_cores * result["window_s"]) / n * 1e3
    if replica_cpu_s is not None and replica_idle_cores is not None:
        out["replica_cpu_ms"] = max(0.0, replica_cpu_s - replica_idle_cores * result["window_s"]) / n * 1e3
    if result.get("model_p50_ms") is not None and result.get("batch_size_mean"):
        model_cpu_ms = (threads or 1) * result["model_p50_ms"] / result["batch_size_mean"]
        out["stack_cpu_ms"] = max(0.0, out["server_cpu_ms"] - model_cpu_ms)
        if out["replica_cpu_ms"] is not None:
            out["replica_ms"] = max(0.0, out["replica_cpu_ms"] - model_cpu_ms)
    return out


def plan_of(manifest: dict) -> dict | None:
    cap = manifest.get("capacity") or {}
    if not cap.get("plan"):
        return None
    return {k: cap.get(k) for k in ("target_rps", "p95_slo_ms", "headroom", "overhead_ms", "stack_cpu_ms",
                                    "wait_factor", "cores", "replica_ms")} | {
        "batch_size": cap["plan"].get("batch_size"), "replicas": cap["plan"].get("instances")}


def default_out(model: str | None) -> Path | None:
    return Path(model).resolve().parent / "report" / "loadtest.json" if model else None


def tracking_uri(folder: Path) -> str | None:
    config = folder / "training_config.yaml"
    if not config.is_file():
        return None
    return ((yaml.safe_load(config.read_text()) or {}).get("tracking") or {}).get("uri")


def mlflow_run(folder: Path, manifest: dict) -> str | None:
    """The MLflow run the export was registered from, when its store (training_config.yaml) is known."""
    run_id = (manifest.get("mlflow") or {}).get("run_id")
    return run_id if run_id and tracking_uri(folder) else None


def log_to_mlflow(run_id: str, folder: Path, result: dict, out: Path) -> None:
    """Metrics and the JSON report on the model's MLflow run, in the store of the export's training config."""
    import mlflow  # only when there is a run to log to: train/tracking.py says why mlflow loads lazily
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(folder))
    step = int(time.time())
    for key in ("offered_rps", "achieved_rps", "p50_ms", "p95_ms", "p99_ms", "failures", "rejected_503",
                "overhead_ms", "server_cpu_ms", "stack_cpu_ms", "loadgen_cpu_ms"):
        if result.get(key) is not None:
            client.log_metric(run_id, f"loadtest_{key}", float(result[key]), step=step)
    client.log_artifact(run_id, str(out), artifact_path="loadtest")


def run_loadtest(url: str, data: str | Path, *, rate: float, duration_s: float, max_requests: int | None = None,
                 users: int | None = None, texts_per_request: int = 1, text_column: str | None = None,
                 model: str | None = None, out: str | Path | None = None, log: bool = True) -> dict:
    """Run one bounded load test; returns the report (also written to `out`)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or parsed.hostname not in LOCAL_HOSTS:
        raise ConfigError(f"--url {url}: valid: http://127.0.0.1:PORT (a load test targets this machine only)")
    if rate <= 0 or duration_s <= 0:
        raise ConfigError(f"--rate {rate:g}, --duration-s {duration_s:g}: both must be > 0")
    manifest = read_manifest(Path(model)) if model else None
    text_column = text_column or (manifest or {}).get("text_column")
    texts = read_texts(Path(data), text_column)
    max_requests = max_requests or math.ceil(rate * duration_s * 1.2)
    # Enough users that each sends at most 4 requests/s: a user waits for its answer, so at 250 ms per answer
    # or less the offered rate holds.
    users = users or max(1, min(400, math.ceil(rate / 4)))
    out = Path(out) if out else default_out(model)
    if out is None:
        raise ConfigError("--out: needed without --model (with it, the report folder beside the export)")
    server = server_settings(url)
    idle = server_idle_cores()
    with tempfile.TemporaryDirectory(prefix="kdlab-loadtest-") as work:
        started = time.time()
        cpu_before, children_before = ray_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
        records = run_locust(url, texts, rate=rate, duration_s=duration_s, max_requests=max_requests, users=users,
                             texts_per_request=texts_per_request, work=Path(work))
        cpu_after, children_after = ray_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu_s, replica_cpu_s = (None, None) if cpu_before is None else (
        cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1])
    loadgen_cpu_s = ((children_after.ru_utime + children_after.ru_stime)
                     - (children_before.ru_utime + children_before.ru_stime))
    result = {"url": url, "data": str(data), "rate": rate, "duration_s": duration_s, "max_requests": max_requests,
              "users": users, "texts_per_request": texts_per_request, "started": time.strftime(
                  "%Y-%m-%dT%H:%M:%S", time.localtime(started)),
              "model": ({"name": manifest["name"], "recipe": manifest["served"]["recipe"],
                         "folder": str(model)} if manifest else None),
              "server": server, "model_latency": model_latency(manifest) if manifest else None,
              "plan": plan_of(manifest) if manifest else None,
              "machine": machine_info(), "versions": versions(),
              **summarise(records, offered_rps=rate, duration_s=duration_s, manifest=manifest)}
    result.update(cpu_per_request(result, server_cpu_s, idle and idle[0], loadgen_cpu_s, server.get("threads"),
                                  replica_cpu_s, idle and idle[1]))
    # The run the report goes to (the export's registration), named in the report it logs there.
    result["mlflow_run_id"] = mlflow_run(Path(model), manifest) if log and manifest is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(out)
    if result["mlflow_run_id"]:
        log_to_mlflow(result["mlflow_run_id"], Path(model), result, out)
    return result


def summary_line(r: dict, out: Path | str) -> str:
    def f(v, fmt="{:.1f}"):
        return "—" if v is None else fmt.format(v)
    kinds = ", ".join(f"{k} {v}" for k, v in r["failures_by_kind"].items()) or "none"
    overhead = (f"; serving overhead {r['overhead_ms']:.2f} ms (p50 minus the model's {r['model_p50_ms']:.2f} ms at "
                f"batch {r['model_batch']})" if r.get("overhead_ms") is not None else "")
    if r.get("server_cpu_ms") is not None:
        overhead += (f"; server CPU {r['server_cpu_ms']:.1f} ms a request (serving stack {f(r.get('stack_cpu_ms'))} "
                     f"ms, in the replicas beyond the model {f(r.get('replica_ms'))} ms), load generator "
                     f"{f(r.get('loadgen_cpu_ms'))} ms")
    return (f"loadtest: offered {r['offered_rps']:g} req/s, achieved {r['achieved_rps']:.1f} req/s over "
            f"{r['window_s']:.1f} s ({r['answered']}/{r['requests']} answered); p50 {f(r['p50_ms'])} ms, p95 "
            f"{f(r['p95_ms'])} ms, p99 {f(r['p99_ms'])} ms; failures: {kinds}; mean batch "
            f"{f(r['batch_size_mean'])}{overhead} -> {out}")


def main(args) -> int:
    result = run_loadtest(args.url, args.data, rate=args.rate, duration_s=args.duration_s,
                          max_requests=args.max_requests, users=args.users, texts_per_request=args.texts_per_request,
                          text_column=args.text_column, model=args.model, out=args.out)
    print(summary_line(result, args.out or default_out(args.model)), flush=True)
    return 0
