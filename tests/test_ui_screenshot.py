"""scripts/ui_screenshot.py without a browser: finding the search's runs, the UI address and chart state.

Run: .venv/bin/python -m pytest -q tests/test_ui_screenshot.py

The parent run is logged by the real search/study_tracking.py into a SQLite MLflow store in a temporary
folder, so a change of its name or tags there breaks the lookup here, not only in the screenshot.
Taking the screenshot needs Chromium and is not part of the suite (`make screenshot`).
"""
from __future__ import annotations

from types import SimpleNamespace

import mlflow
import optuna
import pytest

from kdlab.distill.config import Config
from kdlab.scripts.ui_screenshot import (
    artifact_url,
    chart_inputs,
    chart_view_state,
    find_search_parent,
)
from kdlab.search.study_tracking import StudyTracking
from kdlab.train.tracking import mlflow_run


def tiny_config(root, name: str) -> Config:
    cfg = Config()
    cfg.name = name
    cfg.tracking.uri = f"sqlite:///{root / 'mlflow.db'}"
    return cfg


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store: a distill run, and a search whose parent has one trained and one screened-out trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = tmp_path_factory.mktemp("ui_store")
    with mlflow_run(tiny_config(root, "no_search"), "distill", is_main=True):
        pass
    cfg = tiny_config(root, "tiny")
    with mlflow_run(cfg, "distill", is_main=True) as run:
        run.log_metrics({"distill/loss": 0.5})
    study = optuna.create_study(directions=["maximize", "minimize"])
    tracking = StudyTracking(cfg)
    with tracking.parent(study) as parent:
        parent.log_metrics({"best_quality": 0.8})
        with tracking.child(study.ask(), {"num_layers": 1}) as trained:
            trained.log_metrics({"quality": 0.8, "p95_ms": 1.2})
        with tracking.child(study.ask(), {"num_layers": 4}) as screened:
            screened.set_tags({"screened_out": "true"})
            screened.log_metrics({"quality": 0.0, "p95_ms": 9.0})
    return SimpleNamespace(uri=cfg.tracking.uri, experiment_id=mlflow.get_experiment_by_name("tiny").experiment_id,
                           parent_run_id=tracking.parent_run_id)


def test_finds_the_parent_run_that_the_search_logs_and_nothing_else(store):
    assert find_search_parent(store.uri, "tiny") == (store.experiment_id, store.parent_run_id)
    assert find_search_parent(store.uri, "no_search") is None
    assert find_search_parent(store.uri, "absent") is None


def test_a_missing_sqlite_store_has_no_parent_and_is_not_created(tmp_path):
    assert find_search_parent(f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny") is None
    assert not (tmp_path / "mlflow.db").exists()


def test_chart_inputs_count_only_the_trained_trials_of_the_search(store):
    keys, n_points = chart_inputs(store.uri, store.experiment_id, store.parent_run_id)
    assert keys == ["best_quality", "distill/loss", "p95_ms", "quality"]
    assert n_points == 1


def test_artifact_url_opens_the_run_page_at_the_file():
    assert (artifact_url("http://127.0.0.1:5123", "2", "abc", "pareto.png")
            == "http://127.0.0.1:5123/#/experiments/2/runs/abc/artifacts/pareto.png?workflowType=machine_learning")


def test_chart_view_state_leaves_one_scatter_chart_of_the_trained_trials():
    state = chart_view_state("abc", ["quality", "p95_ms", "distill/loss"], "p95_ms", "quality")
    shown = [c for c in state["compareRunCharts"] if not c["deleted"]]
    assert [(c["type"], c["xaxis"]["key"], c["yaxis"]["key"]) for c in shown] == [("SCATTER", "p95_ms", "quality")]
    placeholders = {c["metricKey"] for c in state["compareRunCharts"] if c["deleted"]}
    assert placeholders == {"quality", "p95_ms", "distill/loss"}
    assert state["searchFilter"] == "tags.mlflow.parentRunId = 'abc' and tags.screened_out = 'false'"
    assert state["runsExpanded"] == {"abc": True}
    assert {c["metricSectionId"] for c in state["compareRunCharts"]} == {s["uuid"] for s in state["compareRunSections"]}
