"""MLflow logging that only the main process does; every other process gets a no-op tracker."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from distill.config import Config, flatten, to_dict

# MLflow's param values are capped at 6000 characters; long lists are truncated, not refused.
_MAX_PARAM = 500


class Tracker:
    """A thin wrapper so training code never checks `is_main_process` before logging."""

    def __init__(self, active: bool):
        self.active = active
        self.run_id: str | None = None

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.active:
            import mlflow
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_params(self, params: dict) -> None:
        if self.active:
            import mlflow
            mlflow.log_params({k: str(v)[:_MAX_PARAM] for k, v in params.items()})

    def set_tags(self, tags: dict) -> None:
        if self.active:
            import mlflow
            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path) -> None:
        if self.active:
            import mlflow
            mlflow.log_artifact(str(path))


def ensure_experiment(cfg: Config) -> None:
    """Select the config's experiment, creating it with its artefacts beside a SQLite store.

    MLflow's default artefact root for a SQLite store is ./mlruns under the current folder;
    DESIGN.md puts them in mlartifacts/ next to the database (runs/mlartifacts/ by default).
    """
    import mlflow
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
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
    """Start an MLflow run (experiment = config name) on the main process; log the resolved config."""
    if not (cfg.tracking.enabled and is_main):
        yield Tracker(False)
        return
    import mlflow
    ensure_experiment(cfg)
    with mlflow.start_run(run_name=run_name, nested=nested) as run:
        tracker = Tracker(True)
        tracker.run_id = run.info.run_id
        tracker.log_params(flatten(to_dict(cfg)))
        tracker.set_tags({"kdlab.stage": run_name, **(tags or {})})
        yield tracker
