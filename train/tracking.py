"""MLflow logging that only the main process does; every other process gets a no-op tracker.

Tracking faults: an HTTP tracking server that does not answer when a run starts is a one-line
ConfigError (`check_reachable`), before anything is trained. A server lost in the middle of a run
does not stop training: the first failed call switches the tracker to local logging (JSON lines in
runs/<name>/tracking_offline.jsonl, every metric, param and tag it could not send), and the end of the
run says when tracking was lost and where the records are, so the gap is never silent.

mlflow is imported where a run is active, never at the top: a disabled tracker (tracking.enabled=false,
or any process but the main one) must work where mlflow is not installed (the GPU machine) and must not
pay for importing it.
"""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from kdlab.distill.config import Config, ConfigError, flatten, redact, to_dict

# MLflow's param values are capped at 6000 characters; long lists are truncated, not refused.
_MAX_PARAM = 500


class Tracker:
    """A thin wrapper so training code never checks `is_main_process` before logging.

    With `offline_path`, a call that fails (server gone) switches the tracker to writing JSON lines
    there instead; `lost` then holds when and why.
    """

    def __init__(self, active: bool, offline_path: Path | None = None):
        self.active = active
        self.run_id: str | None = None
        self.offline_path = offline_path
        self.lost: dict | None = None
        self.kept = 0

    def _send(self, kind: str, payload: dict, step: int | None, call) -> None:
        if not self.active:
            return
        if self.lost is None:
            try:
                call()
                return
            except Exception as exc:
                if self.offline_path is None:
                    raise
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                self.lost = {"at_step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "error": first}
                print(f"kdlab: warning: MLflow tracking lost ({first}); training goes on, logging to "
                      f"{self.offline_path}", file=sys.stderr)
        self.offline_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.offline_path, "a") as fh:
            fh.write(json.dumps({"run_id": self.run_id, "kind": kind, "step": step, "time": time.time(),
                                 "data": payload}, default=str) + "\n")
        self.kept += 1

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if not self.active:
            return
        import mlflow  # lazy: see the module docstring
        values = {k: float(v) for k, v in metrics.items()}
        self._send("metrics", values, step, lambda: mlflow.log_metrics(values, step=step))

    def log_params(self, params: dict) -> None:
        if not self.active:
            return
        import mlflow  # lazy: see the module docstring
        values = {k: str(v)[:_MAX_PARAM] for k, v in params.items()}
        self._send("params", values, None, lambda: mlflow.log_params(values))

    def set_tags(self, tags: dict) -> None:
        if not self.active:
            return
        import mlflow  # lazy: see the module docstring
        values = {k: str(v) for k, v in tags.items()}
        self._send("tags", values, None, lambda: mlflow.set_tags(values))

    def log_artifact(self, path: str | Path) -> None:
        if not self.active:
            return
        import mlflow  # lazy: see the module docstring
        self._send("artifact", {"path": str(path)}, None, lambda: mlflow.log_artifact(str(path)))

    def report(self) -> str | None:
        """The end-of-run line about lost tracking (None when nothing was lost)."""
        if self.lost is None:
            return None
        step = f" at step {self.lost['at_step']}" if self.lost["at_step"] is not None else ""
        return (f"kdlab: warning: MLflow tracking was lost{step} ({self.lost['time']}: {self.lost['error']}); "
                f"training finished; {self.kept} record(s) kept in {self.offline_path} instead")


def check_reachable(cfg: Config) -> None:
    """An http(s) tracking server must answer /health now: a one-line ConfigError instead of minutes of retries."""
    uri = cfg.tracking.uri
    if not cfg.tracking.enabled or not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server is not behind a proxy
    try:
        with opener.open(url, timeout=10) as response:
            if response.status == 200:
                return
            why = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        why = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        why = str(getattr(exc, "reason", exc))
    raise ConfigError(f"tracking.uri: cannot reach the MLflow server at {redact(uri)} ({why}); start it (mlflow "
                      f"server --host 127.0.0.1 ...), or use sqlite:///runs/mlflow.db, or tracking.enabled=false")


def ensure_experiment(cfg: Config) -> None:
    """Select the config's experiment, creating it with its artefacts beside a SQLite store.

    MLflow's default artefact root for a SQLite store is ./mlruns under the current folder;
    DESIGN.md puts them in mlartifacts/ next to the database (runs/mlartifacts/ by default).
    """
    import mlflow  # lazy: see the module docstring
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    # MLflow retries a failing HTTP call 7 times with exponential backoff (minutes); a lost server
    # should switch the tracker to local logging within seconds instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    uri = cfg.tracking.uri
    name = cfg.tracking.experiment or cfg.name
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        if mlflow.get_experiment_by_name(name) is None:
            mlflow.create_experiment(name, artifact_location=(db.parent / "mlartifacts").resolve().as_uri())
    mlflow.set_experiment(name)


@contextmanager
def mlflow_run(cfg: Config, run_name: str, is_main: bool, nested: bool = False, tags: dict | None = None):
    """Start an MLflow run (experiment = config name) on the main process; log the resolved config.

    If the server goes away during the run, logging continues locally (see the module docstring) and
    the loss is reported when the run ends.
    """
    if not (cfg.tracking.enabled and is_main):
        yield Tracker(False)
        return
    import mlflow  # lazy: see the module docstring
    ensure_experiment(cfg)
    run = mlflow.start_run(run_name=run_name, nested=nested)
    tracker = Tracker(True, offline_path=cfg.run_dir / "tracking_offline.jsonl")
    tracker.run_id = run.info.run_id
    tracker.log_params(flatten(to_dict(cfg)))
    tracker.set_tags({"kdlab.stage": run_name, **(tags or {})})
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        try:
            mlflow.end_run(status=status)
        except Exception:  # the server is gone (end_run has already dropped the run locally); the file says why
            pass
        if tracker.lost is not None:
            print(tracker.report(), file=sys.stderr)
