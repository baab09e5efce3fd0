"""`kdlab serve`: an export folder's served artefact on Ray Serve, configured from its capacity plan.

    kdlab serve --model runs/sst2_minilm/export [--port 8000] [--replicas N] [--autoscale] [--address HOST:PORT]
    curl -s 127.0.0.1:8000/predict -d '{"texts": ["a gripping , funny film"]}'

Before Ray starts, the export folder is checked against its manifest (every file's sha256), the port is
checked free and `--address` checked to answer; each failure is one line and exit 2. Without `--address`
a private local Ray instance is started (never an existing one found on the machine) and stopped on exit;
with it, the application joins that cluster and only the application is deleted on exit. Ctrl-C (or
SIGTERM) deletes the application, which lets in-flight requests finish (Ray Serve's graceful shutdown),
then stops Serve and the local Ray instance: no process of ours is left.

Settings come from the export's capacity plan (manifest capacity.plan.serve: replicas, threads per replica,
max_batch_size, batch_wait_timeout_s, max_ongoing_requests, max_queued_requests, autoscaling) unless given
here; an export without a plan serves one replica, unbatched, on the threads it was measured with.
The application itself is scripts/serve_app.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

import ray
from ray import serve

from kdlab.distill.deploy import APP_NAME, deployment_options, plan_settings, read_manifest
from kdlab.distill.errors import ConfigError, ExportError
from kdlab.distill.export import verify
from kdlab.scripts.serve_app import AppSettings, build, model_version, settings_for


def check_export(folder: Path) -> dict:
    """The manifest of an intact export folder: every file it lists present with its size and sha256."""
    manifest = read_manifest(folder)
    try:
        verify(folder, manifest)
    except ExportError as exc:
        raise ConfigError(str(exc)) from None
    return manifest


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--port {port}: {host}:{port} is not free ({exc.strerror}); valid: a port nothing "
                              f"listens on (e.g. --port {port + 1})") from None


def check_address(address: str) -> None:
    """A Ray cluster's GCS answers at host:port (ray.init would otherwise retry for a minute before failing)."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("ray://")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: not host:port; valid: the head node's address as `ray start --head` "
                          f"prints it, e.g. 10.0.0.5:6379")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as exc:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); valid: the "
                          f"address of a running head node (ray start --head)") from None


def local_replicas(wanted: int, threads: int) -> tuple[int, str | None]:
    """Replicas that fit this machine's CPUs at `threads` each, and a note when the plan wanted more."""
    fit = max(1, (os.cpu_count() or 1) // threads)
    if wanted <= fit:
        return wanted, None
    return fit, (f"the plan asks for {wanted} replica(s) of {threads} thread(s); this machine has {os.cpu_count()} "
                 f"CPU(s): serving {fit} (run on a cluster with --address for the rest)")


def wait_ready(url: str, timeout_s: float) -> dict:
    """Poll GET /health until a replica says ready; the last answer as a dict."""
    deadline, last = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                last = json.loads(r.read())
                if last.get("status") == "ready":
                    return last
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = {"status": str(exc)}
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health: not ready after {timeout_s:.0f} s (last answer: {last})")


def full_priority_workers() -> None:
    """Run a private Ray instance's workers (the replicas and the HTTP proxy) at the caller's priority. Ray starts
    them at nice 15 by default, so on a shared machine any neighbour at normal priority (a training job, a test
    run) preempts the service. A user's own RAY_worker_niceness stands."""
    os.environ.setdefault("RAY_worker_niceness", "0")


def deploy(settings: AppSettings, options: dict, *, host: str, port: int, request_timeout_s: float,
           ready_timeout_s: float = 300.0) -> str:
    """Start Serve's proxy on host:port (when Serve is not running yet), deploy the app and wait for its warm-up.

    Returns the application's URL. Ray must be initialised.
    """
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s},
                logging_config={"log_level": "WARNING"})
    serve.run(build(settings, options), name=APP_NAME, route_prefix="/", logging_config={"log_level": "WARNING"})
    url = f"http://{host}:{port}"
    wait_ready(url, ready_timeout_s)
    return url


def summary(manifest: dict, settings: AppSettings, options: dict, url: str) -> str:
    scaling = options.get("autoscaling_config")
    replicas = (f"{scaling['min_replicas']}-{scaling['max_replicas']} replicas (autoscaling, "
                f"{scaling['target_ongoing_requests']:g} ongoing requests each)" if scaling
                else f"{options['num_replicas']} replica(s)")
    batching = (f"batches up to {settings.max_batch_size} (wait {settings.batch_wait_timeout_s * 1e3:.1f} ms)"
                if settings.max_batch_size > 1 else "unbatched")
    return (f"serving {manifest['name']} {model_version(manifest)} ({manifest['served']['recipe']}) at {url}/predict: "
            f"{replicas}, {settings.threads} thread(s) each, {batching}, max {options['max_ongoing_requests']} "
            f"ongoing / {options['max_queued_requests']} queued; Ctrl-C stops")


def interrupt(signum, frame) -> None:
    """SIGTERM (a container stop, `kill`) drains like Ctrl-C."""
    raise KeyboardInterrupt


def main(args) -> int:
    """`kdlab serve` (arguments: scripts/cli.py add_serve_arguments). 0 after Ctrl-C or SIGTERM."""
    folder = Path(args.model)
    manifest = check_export(folder)
    plan = plan_settings(manifest)
    if args.autoscale and not plan.get("autoscaling"):
        raise ConfigError(f"--autoscale: {folder} has no capacity plan to scale from; export it with "
                          f"serving.target_rps and serving.p95_slo_ms set, or give --replicas instead")
    check_port(args.host, args.port)
    if args.address:
        check_address(args.address)
    threads = args.threads or plan.get("threads") or (manifest.get("conditions") or {}).get("threads") or 1
    settings = settings_for(folder, threads=threads, max_batch_size=args.max_batch_size,
                            batch_wait_timeout_s=args.batch_wait_timeout_s, max_texts=args.max_texts)
    options = deployment_options(plan, replicas=args.replicas, autoscale=args.autoscale,
                                 max_ongoing_requests=args.max_ongoing_requests,
                                 max_queued_requests=args.max_queued_requests, threads=settings.threads,
                                 max_batch_size=settings.max_batch_size)
    if not args.address:
        key = "autoscaling_config" if args.autoscale else None
        wanted = options[key]["max_replicas"] if key else options["num_replicas"]
        fitted, note = local_replicas(wanted, settings.threads)
        if note:
            print(f"serve: {note}", flush=True)
            if key:
                options[key]["max_replicas"] = fitted
                options[key]["min_replicas"] = min(options[key]["min_replicas"], fitted)
            else:
                options["num_replicas"] = fitted

    started_ray = not ray.is_initialized()
    if started_ray and not args.address:
        full_priority_workers()
    if started_ray:
        # address="local": a private instance, even when another Ray runs on this machine.
        ray.init(address=args.address or "local", include_dashboard=False, logging_level="WARNING",
                 configure_logging=True)
    # After ray.init, which installs its own SIGTERM handler (it exits without stopping the node's agents).
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Ctrl-C must always drain.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        url = deploy(settings, options, host=args.host, port=args.port, request_timeout_s=args.request_timeout_s)
        print(summary(manifest, settings, options, url), flush=True)
        print(json.dumps({"settings": asdict(settings), "deployment": options}), flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nserve: stopping: in-flight requests finish first", flush=True)
        return 0
    finally:
        # Deleting the app drains it (replicas finish what they hold); Serve's proxy and controller go with
        # serve.shutdown on our own instance only: on a shared cluster other applications keep theirs.
        try:
            serve.delete(APP_NAME)
            if started_ray and not args.address:
                serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
