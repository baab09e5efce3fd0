"""MLflow for a search: one parent run `search` per study, one nested child run per trial.

Library module for search/study.py; nothing to launch. The parent run's id is stored on the Optuna
study, so a resumed study (or a second worker) logs into the same parent. After every trial the
parent gets pareto.png / .html / .csv and summary metrics, and each child's `state`, `feasible`,
`screened_out`, `is_pareto` tags are brought up to date (a later trial can push one off the front).

(optuna_integration's MLflowCallback logs no parent run, feasibility or front membership and is
deprecated in Optuna 5, so this is our own.) mlflow is imported inside the methods, after the
`enabled` check, as in train/tracking.py: a search with tracking.enabled=false never loads it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from kdlab.distill.config import Config, flatten, to_dict
from kdlab.train.tracking import Tracker, ensure_experiment

PARENT_ATTR = "mlflow_parent_run_id"
TAG_KEYS = ("state", "feasible", "screened_out", "is_pareto")


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class StudyTracking:
    """MLflow logging of one study; every method is a no-op when tracking is disabled."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        self.parent_run_id: str | None = None
        self._tags: dict[str, dict] = {}  # run id -> tags last written, to write only what changed

    def ensure_experiment(self) -> None:
        if self.enabled:
            ensure_experiment(self.cfg)

    @contextmanager
    def parent(self, study):
        """The study's parent run, resumed when the study already has one in this tracking store."""
        if not self.enabled:
            yield Tracker(False)
            return
        import mlflow  # lazy: see the module docstring
        from mlflow.exceptions import MlflowException
        self.ensure_experiment()
        run_id = study.user_attrs.get(PARENT_ATTR)
        resumed = False
        if run_id:
            try:
                resumed = mlflow.get_run(run_id).info.lifecycle_stage == "active"
            except MlflowException:  # another tracking store, or the run was deleted
                resumed = False
        if resumed:
            run = mlflow.start_run(run_id=run_id)
        else:
            run = mlflow.start_run(run_name="search")
            mlflow.set_tags({"kdlab.stage": "search", "optuna.study": study.study_name})
            winner = self._elect(study.study_name, run.info)
            if winner != run.info.run_id:  # another worker created the study's parent first: use theirs
                mlflow.end_run()
                mlflow.MlflowClient().delete_run(run.info.run_id)
                run, resumed = mlflow.start_run(run_id=winner), True
            else:
                # Params are immutable in MLflow: log the resolved config once, when the parent is created.
                mlflow.log_params({k: str(v)[:500] for k, v in flatten(to_dict(self.cfg)).items()})
            study.set_user_attr(PARENT_ATTR, run.info.run_id)
        try:
            tracker = Tracker(True)
            tracker.run_id = self.parent_run_id = run.info.run_id
            yield tracker
            status = "FINISHED"
        except BaseException:
            status = "FAILED"
            raise
        finally:
            mlflow.end_run(status=status)

    @staticmethod
    def _elect(study_name: str, info) -> str:
        """The study's parent when workers start together: the oldest running `search` run tagged with the study.

        Each worker tags its own candidate before looking, so a later worker always sees an earlier
        one, and all of them agree on the oldest (start time, then run id); the others delete theirs.
        Only running parents count: a finished one belongs to an earlier study of the same name (its
        optuna.db deleted). Start times come from each worker's clock: machines must keep time (NTP).
        """
        import mlflow  # lazy: see the module docstring (called only with tracking enabled)
        name = study_name.replace("'", "\\'")
        runs = mlflow.MlflowClient().search_runs(
            [info.experiment_id], filter_string=f"tags.`optuna.study` = '{name}' and tags.`kdlab.stage` = 'search' "
                                          f"and attributes.status = 'RUNNING'")
        live = [r for r in runs if r.info.lifecycle_stage == "active"] or []
        return min(live, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if live else info.run_id

    @contextmanager
    def child(self, trial, params: dict):
        """A nested run for one trial; MLflow marks it FAILED if the trial raises."""
        if not self.enabled:
            yield Tracker(False)
            return
        import mlflow  # lazy: see the module docstring
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            tracker = Tracker(True)
            tracker.run_id = run.info.run_id
            tracker.log_params({**params, "trial_number": trial.number})
            tags = {"state": "RUNNING", "feasible": "false", "screened_out": "false", "is_pareto": "false"}
            tracker.set_tags({**tags, "kdlab.stage": "search-trial", "optuna.trial_number": trial.number})
            self._tags[run.info.run_id] = tags
            yield tracker

    def refresh(self, rows: list[dict], report_paths: dict, summary: dict) -> None:
        """Bring every child's tags up to date, and put the report files and summary on the parent."""
        if not self.enabled or self.parent_run_id is None:
            return
        from mlflow.entities import Metric, RunTag  # lazy: see the module docstring
        from mlflow.tracking import MlflowClient
        client = MlflowClient(self.cfg.tracking.uri)
        for row in rows:
            run_id = row.get("mlflow_run_id")
            if not run_id:
                continue
            want = {k: _text(row[k]) for k in TAG_KEYS}
            if row.get("error"):
                want["error"] = str(row["error"])[:4000]
            have = self._tags.get(run_id, {})
            changed = [RunTag(k, v) for k, v in want.items() if have.get(k) != v]
            if changed:
                client.log_batch(run_id, tags=changed)
                self._tags[run_id] = {**have, **want}
        step = int(summary.get("trials", 0))
        now = int(time.time() * 1000)
        client.log_batch(self.parent_run_id, metrics=[Metric(k, float(v), now, step) for k, v in summary.items()
                                                      if v is not None])
        for path in report_paths.values():
            client.log_artifact(self.parent_run_id, str(path))
