"""The student search (`kdlab search`, `kdlab report`): tiny random-init teacher, 200 real SST-2 rows.

Run: .venv/bin/python -m pytest -q tests/test_search.py

End-to-end tests run the real `kdlab search` in this process (SQLite Optuna storage and MLflow store
in a temporary folder) and assert on the Optuna study's trials, the MLflow parent and child runs,
the report files and the checkpoints left behind; unit tests pin the space, constraints and screening.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_run_tree, write_config
from kdlab.distill.config import ConfigError, StudentConfig, load_config
from kdlab.distill.quantize import apply_recipe
from kdlab.distill.students import build_student
from kdlab.scripts.cli import main as kdlab
from kdlab.search.space import FamilySpace, SearchSpace, TeacherShape
from kdlab.search.objective import constraint_values, screened_out
from kdlab.search.study import storage_url
from kdlab.search.targets import Targets

FAST_PROFILE = {"batch_size": 1, "seq_len": "data", "warmup_iters": 2, "min_iters": 10, "min_seconds": 0.2,
                "repeats": 2, "threads": 1, "p95_tolerance": 1.0, "max_rounds": 3}
# A searched learning rate makes every drawn candidate distinct (a repeat would be pruned, not run).
SPACE = {"num_layers": [1, 2], "hidden_size": [32, 64], "num_heads": [2, 4], "recipes": ["dynamic-int8"],
         "learning_rate": {"min": 1e-4, "max": 1e-2, "log": True}, "train_steps": 3, "seed_trials": 2}
TRAIN_STEPS = 3


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One folder (and one MLflow database) for the module; each test uses its own config name."""
    return tmp_path_factory.mktemp("search")


def search_config(root: Path, teacher: str, name: str, target: dict | None = None, **search) -> Path:
    tree = tiny_run_tree(root / name, teacher, target={**FAST_PROFILE, **(target or {})},
                         search={**SPACE, **search})
    tree["name"] = name
    tree["teacher"]["fine_tune"] = "never"  # a random head is teacher enough to distil from; no fine-tuning
    tree["tracking"]["uri"] = f"sqlite:///{root / 'mlflow.db'}"
    return write_config(root / f"{name}.yaml", tree)


def load_study(root: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / name / 'optuna.db'}")


def runs_of(root: Path, experiment: str):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    parents = [r for r in runs if r.info.run_name == "search"]
    children = [r for r in runs if r.data.tags.get("kdlab.stage") == "search-trial"]
    return parents, children


def served_sizes_mb(teacher_dir: str) -> dict:
    """Sizes of the two seed students (1 and 2 teacher layers at full width) under dynamic-int8."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir, num_labels=2)
    batch = AutoTokenizer.from_pretrained(teacher_dir)(["a fine film"], return_tensors="pt")
    return {layers: apply_recipe("dynamic-int8", build_student(teacher, StudentConfig(num_layers=layers)),
                                 example_batch=dict(batch)).size_mb for layers in (1, 2)}


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def main_search(root, tiny_teacher_dir):
    """A 4-trial search whose size budget lies between the 1- and 2-layer full-width students.

    Size does not depend on weights, so the screening is deterministic: the first seed (half the
    teacher's layers, full width, dynamic-int8) is trained, the second (all layers) is rejected untrained.
    """
    sizes = served_sizes_mb(tiny_teacher_dir)
    assert sizes[1] < sizes[2]
    budget_mb = (sizes[1] + sizes[2]) / 2
    config = search_config(root, tiny_teacher_dir, "main",
                           target={"p95_ms": 10_000, "min_quality": 0.01, "max_size_mb": budget_mb},
                           max_draws=4)  # 4 trials of any kind: n_trials alone counts only the trained ones
    code = kdlab(["search", "--config", str(config), "--n-trials", "4"])
    return config, code, budget_mb


def test_search_records_trials_constraints_checkpoints_and_mlflow_runs(root, main_search, capsys):
    config, code, budget_mb = main_search
    assert code == 0
    study = load_study(root, "main")
    # The objectives are named in the storage, so optuna-dashboard and Optuna's plots label them.
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["quality", "p95_ms"]
    trials = study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    seeds = [(t.user_attrs["num_layers"], t.user_attrs["hidden_size"], t.user_attrs["init"], t.user_attrs["recipe"])
             for t in trials[:2]]
    assert seeds == [(1, 64, "teacher-layers", "dynamic-int8"), (2, 64, "teacher-layers", "dynamic-int8")]

    for t in trials:
        u, c = t.user_attrs, t.constraints
        assert u["hidden_size"] % u["num_heads"] == 0
        assert set(c) == {"p95_ms", "size_mb", "quality", "agreement"}
        assert c["p95_ms"] == pytest.approx(u["p95_ms"] / 10_000 - 1)
        assert c["size_mb"] == pytest.approx(u["size_mb"] / budget_mb - 1)
        assert u["feasible"] == all(v <= 0 for v in c.values())  # the agreement gap counts as any target's
        checkpoint = root / "main" / "trials" / str(t.number)
        if u["screened_out"]:
            assert u["size_mb"] > budget_mb and c["size_mb"] > 0 and c["quality"] == pytest.approx(1.0)
            assert c["agreement"] == pytest.approx(0.99)  # no served artefact: nothing agrees
            assert u["train_seconds"] == 0 and u["steps"] == 0 and t.values[0] == 0.0
            assert t.values[1] == u["p95_ms"] == u["pre_p95_ms"] > 0
            assert not checkpoint.exists()
        else:
            assert u["size_mb"] < budget_mb and all(v <= 0 for k, v in c.items() if k != "agreement")
            assert 0.0 <= u["label_agreement"] <= 1.0
            assert u["p95_low_ms"] <= u["p95_high_ms"] and u["p95_verdict"] == "meets"  # 10 s budget: far above
            assert c["agreement"] == pytest.approx(0.99 - u["label_agreement"])  # export.min_label_agreement
            assert u["steps"] == TRAIN_STEPS and u["train_seconds"] > 0
            assert 0.0 <= t.values[0] == u["quality"] <= 1.0
            assert c["quality"] == pytest.approx(1 - u["quality"] / 0.01)
    assert trials[1].user_attrs["screened_out"] and not trials[0].user_attrs["screened_out"]

    front = sorted(t.number for t in study.best_trials)
    assert 0 in front or any(dominated_by(trials[0], trials[n]) for n in front)
    assert front == brute_force_front(trials)  # exactly the feasible trials no feasible trial dominates
    assert 1 not in front  # the screened-out seed misses the size budget: infeasible, never on the front
    for t in trials:  # front members keep their checkpoint (HF folder + tokenizer + figures); others are pruned
        folder = root / "main" / "trials" / str(t.number)
        assert folder.is_dir() == (t.number in front)
    member = root / "main" / "trials" / str(front[0])
    files = {p.name for p in member.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "kdlab_trial.json"} <= files
    figures = json.loads((member / "kdlab_trial.json").read_text())
    assert figures["p95_ms"] == trials[front[0]].user_attrs["p95_ms"] and figures["feasible"] is True

    report = root / "main" / "report"
    with open(report / "pareto.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["trial"]) for r in rows] == [0, 1, 2, 3]
    assert sorted(int(r["trial"]) for r in rows if r["is_pareto"] == "True") == front
    assert all(r["screened_out"] == str(t.user_attrs["screened_out"]) for r, t in zip(rows, trials))
    assert all(r["label_agreement"] == ("" if t.user_attrs["screened_out"] else str(t.user_attrs["label_agreement"]))
               for r, t in zip(rows, trials))
    assert (rows[0]["threads"], rows[0]["batch_size"], rows[0]["seq_len"]) == ("1", "1", "data")
    html = (report / "pareto.html").read_text()
    assert "1L x 64 (4 heads, ffn 128), teacher-layers, dynamic-int8" in html  # the hover text: the label
    assert '<script src="https://cdn.plot.ly' not in html and len(html) > 1_000_000  # plotly.js embedded: opens offline
    assert (report / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    parents, children = runs_of(root, "main")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"pareto.png", "pareto.html", "pareto.csv"} <= artifacts
    assert parent.data.metrics["trials"] == 4 and parent.data.metrics["front_size"] == len(front)
    by_trial = {int(r.data.params["trial_number"]): r for r in children}
    for t in trials:
        run = by_trial[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_id == t.user_attrs["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.tags["state"] == "COMPLETE"
        assert run.data.tags["screened_out"] == str(t.user_attrs["screened_out"]).lower()
        assert run.data.tags["feasible"] == str(all(v <= 0 for v in t.constraints.values())).lower()
        assert run.data.tags["is_pareto"] == str(t.number in front).lower()
        assert run.data.params["num_layers"] == str(t.user_attrs["num_layers"])
        assert run.data.params["recipe"] == "dynamic-int8" and "learning_rate" in run.data.params
        assert {"quality", "p50_ms", "p95_ms", "throughput", "size_mb", "params",
                "train_seconds"} <= set(run.data.metrics)
        assert run.data.metrics["p95_ms"] == pytest.approx(t.user_attrs["p95_ms"])
        assert run.data.metrics["train_seconds"] == pytest.approx(t.user_attrs["train_seconds"])

    # Where the time went: each trial's phases; a screened-out one never reached training; the study's total is its
    # search call's wall time, split into setup, the trials' phases and idle, and is on the parent run.
    phases = ("screening", "training", "evaluation", "quantization", "measurement", "other")
    for t in trials:
        spent = t.user_attrs["seconds"]
        assert set(spent) == set(phases) and all(v >= 0 for v in spent.values()) and spent["screening"] > 0
        if t.user_attrs["screened_out"]:
            assert spent["training"] == spent["evaluation"] == spent["quantization"] == spent["measurement"] == 0
        else:  # training excludes its periodic dev evaluations, which count as evaluation
            assert spent["training"] > 0 and spent["evaluation"] > 0 and spent["measurement"] > 0
    sessions = [v for k, v in study.user_attrs.items() if k.startswith("time_session/")]
    assert len(sessions) == 1 and sessions[0]["setup_s"] > 0
    totals = {p: sum(t.user_attrs["seconds"][p] for t in trials) for p in phases}
    assert parent.data.metrics["time_wall_s"] == pytest.approx(sessions[0]["wall_s"], abs=0.05)
    assert parent.data.metrics["time_training_s"] == pytest.approx(totals["training"], abs=0.05)
    assert parent.data.metrics["time_idle_s"] == pytest.approx(
        sessions[0]["wall_s"] - sessions[0]["setup_s"] - sum(totals.values()), abs=0.2)


def dominated_by(a, b) -> bool:
    return b.values[0] >= a.values[0] and b.values[1] <= a.values[1] and tuple(b.values) != tuple(a.values)


def brute_force_front(trials) -> list[int]:
    """The Pareto front by pairwise comparison: COMPLETE trials with every constraint <= 0 (Optuna's
    feasibility) that no other such trial dominates (quality >=, p95 <=, not both equal)."""
    feasible = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                and all(v <= 0 for v in t.constraints.values())]
    return sorted(a.number for a in feasible if not any(dominated_by(a, b) for b in feasible))


def test_brute_force_front_oracle_on_hand_made_trials():
    """The oracle above on trials whose front is known by hand."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for quality, p95, violation in [(0.80, 5.0, -0.1), (0.90, 9.0, 0.0), (0.85, 5.0, -0.5), (0.95, 1.0, 0.2),
                                    (0.85, 5.0, -0.2), (0.70, 9.5, -1.0)]:
        study.add_trial(optuna.trial.create_trial(values=[quality, p95], constraints={"p95_ms": violation}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    # 2 and 4 tie and both dominate 0 and 5; 1 (violation exactly 0) is feasible and the most accurate;
    # 3 would dominate every trial but violates its constraint.
    assert brute_force_front(study.trials) == [1, 2, 4]
    assert sorted(t.number for t in study.best_trials) == [1, 2, 4]


def test_report_rebuilds_table_and_plots_from_the_stored_study(root, main_search, capsys):
    config, _, _ = main_search
    report = root / "main" / "report"
    for name in ("pareto.png", "pareto.html", "pareto.csv"):
        (report / name).unlink()
    capsys.readouterr()
    assert kdlab(["report", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    front = sorted(t.number for t in load_study(root, "main").best_trials)
    assert "Pareto front" in out and f"{len(front)} of 4 trials" in out
    assert "targets: p95 ≤ 10000.00 ms; quality ≥ 0.0100" in out
    assert re.search(r"^time: \d+ s over 1 search call\(s\): .*training \d+ s \(\d+%\)", out, re.MULTILINE), out
    assert out.strip().splitlines()[-1].startswith(f"search 'main': {len(front)} student(s) on the front of 4 trials")
    assert all((report / name).is_file() for name in ("pareto.png", "pareto.html", "pareto.csv"))


def test_resuming_adds_trials_to_the_same_study_and_parent_run(root, tiny_teacher_dir):
    # A study of its own: resuming `main` would change the trial counts the other tests assert on.
    config = search_config(root, tiny_teacher_dir, "resume", target={"p95_ms": 10_000})
    assert kdlab(["search", "--config", str(config), "--n-trials", "2"]) == 0
    first = load_study(root, "resume").trials
    assert all("fixed_params" in t.system_attrs for t in first)  # the two enqueued seeds
    before = {t.number: t.values for t in first}
    assert kdlab(["search", "--config", str(config), "--n-trials", "2"]) == 0
    study = load_study(root, "resume")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert {t.number: t.values for t in study.trials[:2]} == before  # kept, not re-run
    assert [t.state.name for t in study.trials[2:]] == ["COMPLETE", "COMPLETE"]
    assert all("fixed_params" not in t.system_attrs for t in study.trials[2:])  # drawn, not re-enqueued seeds
    parents, children = runs_of(root, "resume")
    assert len(parents) == 1 and len(children) == 4  # same parent run, two more children
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}


def test_a_failing_trial_is_recorded_and_the_study_goes_on(root, tiny_teacher_dir, monkeypatch):
    import kdlab.search.classification_search as trial_parts  # where a classification trial applies its recipe
    real, calls = trial_parts.apply_recipe, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(trial_parts, "apply_recipe", flaky)
    # Everything screened (fast); max_draws ends the call after two trials, trained or not.
    config = search_config(root, tiny_teacher_dir, "flaky", target={"p95_ms": 1e-6}, max_draws=2)
    assert kdlab(["search", "--config", str(config), "--n-trials", "2"]) == 3
    trials = load_study(root, "flaky").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[0].user_attrs["error"] == "RuntimeError: injected failure"
    assert trials[1].user_attrs["screened_out"] is True
    _, children = runs_of(root, "flaky")
    failed = next(r for r in children if r.data.params["trial_number"] == "0")
    assert failed.info.status == "FAILED" and failed.data.tags["state"] == "FAIL"
    assert failed.data.tags["error"] == "RuntimeError: injected failure"


def test_every_candidate_screened_out_exits_3_without_training(root, tiny_teacher_dir, monkeypatch, capsys):
    import kdlab.search.objective as objective_module

    def no_training(*args, **kwargs):
        raise AssertionError("a screened-out candidate was trained")

    monkeypatch.setattr(objective_module, "fit", no_training)  # any training call would make its trial FAIL
    # Relative to the fp32 teacher, which the search then measures itself (no gate was run here).
    config = search_config(root, tiny_teacher_dir, "hopeless", target={"p95_ms": "teacher*0.000001"}, seed_trials=1,
                           max_draws=3)  # screened draws do not use up n_trials; max_draws bounds them
    assert kdlab(["search", "--config", str(config), "--n-trials", "3", "tracking.enabled=false"]) == 3
    study = load_study(root, "hopeless")
    reference = study.user_attrs["reference"]
    assert reference["p95_ms"] > 0 and 0 <= reference["quality"] <= 1
    assert study.user_attrs["targets"]["p95_ms"] == pytest.approx(1e-6 * reference["p95_ms"])
    assert study.user_attrs["targets"]["spec"] == {"p95_ms": "teacher*0.000001"}
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all(t.user_attrs["screened_out"] and t.user_attrs["train_seconds"] == 0 and t.user_attrs["steps"] == 0
               for t in trials)
    assert all(t.constraints["p95_ms"] > 0 and t.values[0] == 0.0 for t in trials)
    assert not (root / "hopeless" / "trials").exists()
    fastest = min(trials, key=lambda t: t.user_attrs["p95_ms"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"no feasible student: fastest candidate measured {fastest.user_attrs['p95_ms']:.2f} ms vs budget "
                    f"0.00 ms (trial {fastest.number}); 3 of 3 candidates screened out before training")
    report = root / "hopeless" / "report"
    assert all((report / n).is_file() for n in ("pareto.png", "pareto.html", "pareto.csv"))
    with open(report / "pareto.csv", newline="") as fh:
        assert [r["screened_out"] for r in csv.DictReader(fh)] == ["True"] * 3


# ---------------------------------------------------------------- bad input


BAD = [
    (["search.num_layers=[]"], "search.num_layers: empty list"),
    (["search.num_layers={min: 3, max: 1}"], "search.num_layers: min 3 is above max 1"),
    (["search.hidden_size=[30]", "search.num_heads=[4, 8]"],
     "search.num_heads: no head count in [4, 8] divides any search.hidden_size [30]"),
    (["search.recipes=[int3]"], "search.recipes: unknown recipe 'int3'; valid: fp32"),
    (["search.recipes=[]"], "search.recipes: is empty"),
    (["search.init=[magic]"], "search.init: unknown init 'magic'; valid: teacher-layers, teacher-slice, random"),
    (["search.hidden_size=[64, 128]"], "search.hidden_size: 128 exceeds the teacher's hidden size 64"),
    (["search.num_layers=[1, 3]"], "search.num_layers: 3 exceeds the teacher's layers 2"),
    (["search.init=[teacher-layers]"], "search.init: teacher-layers alone needs the teacher's widths"),
    (["search.storage=postgresql://kdlab@127.0.0.1:1/optuna"], "search.storage: cannot open 'postgresql://kdlab@127.0.0.1:1/optuna'"),
    (["search.storage=sqlite:////nonexistent-kdlab/x/optuna.db"], "search.storage: cannot open 'sqlite:////nonexistent-kdlab/x/optuna.db'"),
    (["--n-trials", "0"], "--n-trials: must be >= 1"),
    (["search.families=[teacher, teacher]"], "search.families: lists a family twice: ['teacher', 'teacher']"),
    (["search.families=[]"], "search.families: must be a non-empty list of names, got []"),
    (["search.families=[teacher, /nonexistent-kdlab/model]"], "search.families: /nonexistent-kdlab/model: "),
    (["search.families=[teacher, minilm-l6]", "search.hidden_size=[64, 128]", "search.init=[teacher-layers, teacher-slice]"],
     "search.families: teacher: search.hidden_size: 128 exceeds the teacher's hidden size 64"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_exits_2_with_one_line_before_any_work(root, tiny_teacher_dir, capsys, args, message):
    config = search_config(root, tiny_teacher_dir, "bad")
    assert kdlab(["search", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdlab: error: ") and message in err and "\n" not in err, err
    assert not (root / "bad").exists()  # refused before anything was written


def test_resuming_with_other_targets_is_refused(root, main_search, capsys):
    config, _, _ = main_search
    assert kdlab(["search", "--config", str(config), "target.p95_ms=5000"]) == 2
    err = capsys.readouterr().err
    assert "search.study_name: study 'main'" in err and "target.p95_ms was '10000', now '5000'" in err


def test_report_without_a_study_is_a_config_error(root, tiny_teacher_dir, capsys):
    config = search_config(root, tiny_teacher_dir, "never_searched")
    assert kdlab(["report", "--config", str(config)]) == 2
    assert "search.storage: no study database at" in capsys.readouterr().err


# ---------------------------------------------------------------- space, constraints, screening (unit)


TEACHER = TeacherShape(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536)  # MiniLM-L6


def space(*overrides) -> SearchSpace:
    return SearchSpace(load_config(None, ["data.dataset=glue", *overrides]), TEACHER)


def test_drawn_candidates_respect_heads_and_initialisation_rules():
    s = space("search.num_layers={min: 1, max: 8}", "search.hidden_size=[128, 192, 384, 512]",
              "search.num_heads=[3, 4, 6, 12]", "search.init=[teacher-layers, teacher-slice, random]",
              "search.recipes=[fp32, dynamic-int8]", "search.learning_rate={min: 1e-5, max: 1e-3, log: true}")
    assert s.heads_for == {128: [4], 192: [3, 4, 6, 12], 384: [3, 4, 6, 12], 512: [4]}
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(200):
        trial = study.ask()
        c = s.suggest(trial)
        study.tell(trial, (0.5, 1.0))
        seen.add(c.init)
        assert c.hidden_size % c.num_heads == 0 and 1e-5 <= c.learning_rate <= 1e-3
        assert c.intermediate_size == 1536 * c.hidden_size // 384  # the teacher's FFN/hidden ratio
        fits = c.num_layers <= 6 and c.hidden_size <= 384 and c.num_heads <= 12 and c.hidden_size // c.num_heads <= 32
        if c.init == "teacher-layers":
            assert (c.hidden_size, c.num_heads, c.num_layers <= 6) == (384, 12, True)
        elif c.init == "teacher-slice":
            assert fits and (c.hidden_size, c.num_heads) != (384, 12)
        else:
            assert c.init == "random"
    assert seen == {"teacher-layers", "teacher-slice", "random"}


def test_seeds_are_teacher_layer_subsets_at_full_width_with_dynamic_int8():
    s = space("search.num_layers={min: 1, max: 6}", "search.hidden_size=[192, 384]",
              "search.recipes=[fp32, onnx-int8, dynamic-int8]")
    seeds = s.seeds(3)
    assert [(c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size, c.init, c.recipe) for c in seeds] == [
        (3, 384, 12, 1536, "teacher-layers", "dynamic-int8"), (2, 384, 12, 1536, "teacher-layers", "dynamic-int8"),
        (4, 384, 12, 1536, "teacher-layers", "dynamic-int8")]
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial(s.params_of(seeds[0]))
    assert s.suggest(study.ask()) == seeds[0]  # the enqueued parameters reproduce the seed


def test_seeds_take_the_first_preferred_recipe_the_latency_model_expects_within_the_budget():
    """Budget 2.0 ms, screening margin 5 % (bound 2.1 ms); a stand-in model at 0.8 ms a layer under dynamic-int8,
    0.5 under onnx-int8, 2.0 under fp32. 3 layers: dynamic-int8 2.4 ms does not fit, onnx-int8 1.5 does; 2 layers:
    dynamic-int8 1.6 fits; 4 layers: dynamic-int8 3.2 does not, onnx-int8 2.0 does. The central prediction decides,
    not the low edge that rules a draw out."""
    from types import SimpleNamespace

    from kdlab.search.study import seed_fits
    s = space("search.num_layers={min: 1, max: 6}", "search.recipes=[fp32, onnx-int8, dynamic-int8]")
    per_layer = {"dynamic-int8": 0.8, "onnx-int8": 0.5, "fp32": 2.0}
    model = SimpleNamespace(predict=lambda family, recipe, layers, hidden, ffn: layers * per_layer[recipe])
    fits = seed_fits(SimpleNamespace(latency_model=model, targets=Targets(p95_ms=2.0),
                                     cfg=load_config(None, ["data.dataset=glue"])))
    assert [(c.num_layers, c.recipe) for c in s.seeds(3, fits=fits)] == [
        (3, "onnx-int8"), (2, "dynamic-int8"), (4, "onnx-int8")]
    per_layer["onnx-int8"] = 0.75  # 3 layers 2.25 ms, 4 layers 3.0 ms: nothing fits, the preferred recipe stays
    assert [(c.num_layers, c.recipe) for c in s.seeds(3, fits=fits)] == [
        (3, "dynamic-int8"), (2, "dynamic-int8"), (4, "dynamic-int8")]
    assert seed_fits(SimpleNamespace(latency_model=None, targets=Targets(p95_ms=2.0), cfg=None)) is None


OTHER = TeacherShape(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072)  # MPNet-base's shape


def test_families_are_drawn_with_their_own_shapes_and_share_the_training_knobs():
    cfg = load_config(None, ["data.dataset=glue", "search.recipes=[fp32, dynamic-int8]",
                             "search.learning_rate=[1.0e-4, 3.0e-4]"])
    fs = FamilySpace({"teacher": SearchSpace(cfg, TEACHER, "teacher", "teacher:"),
                      "mpnet-base": SearchSpace(cfg, OTHER, "mpnet-base", "mpnet-base:")})
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(60):
        trial = study.ask()
        c = fs.suggest(trial)
        study.tell(trial, (0.5, 1.0))
        shape = {"teacher": TEACHER, "mpnet-base": OTHER}[c.family]
        # Each family defaults to its own width, head size and depth (1..its layers), and is cut from itself.
        assert (c.hidden_size, c.num_heads, c.intermediate_size, c.init) == (
            shape.hidden_size, shape.num_heads, shape.intermediate_size, "teacher-layers")
        assert 1 <= c.num_layers <= shape.num_layers
        names = set(trial.params)
        assert names == {"family", f"{c.family}:num_layers", "recipe", "learning_rate"}, names
        seen.setdefault(c.family, set()).add(c.num_layers)
    assert set(seen) == {"teacher", "mpnet-base"} and max(seen["mpnet-base"]) > 6  # MPNet's 12 layers reachable
    # The seeds take each family's half-depth student in turn; enqueued, they come back as themselves.
    seeds = fs.seeds(3)
    assert [(c.family, c.num_layers, c.hidden_size) for c in seeds] == [("teacher", 3, 384), ("mpnet-base", 6, 768),
                                                                        ("teacher", 2, 384)]
    for seed in seeds:
        study.enqueue_trial(fs.params_of(seed))
        assert fs.suggest(study.ask()) == seed
    assert set(fs.describe()["families"]) == {"teacher", "mpnet-base"}


def test_constraint_values_are_relative_gaps():
    targets = Targets(p95_ms=10.0, max_size_mb=4.0, min_quality=0.8)
    assert constraint_values(targets, 12.0, 2.0, 0.9) == pytest.approx(
        {"p95_ms": 0.2, "size_mb": -0.5, "quality": 1 - 0.9 / 0.8})
    assert constraint_values(Targets(p95_ms=10.0), 5.0, 99.0, 0.1) == {"p95_ms": -0.5}  # unset targets: no constraint


def test_a_served_artefact_that_disagrees_with_its_weights_is_infeasible():
    """The 4-class case: 98.65 % agreement under export.min_label_agreement 0.99 is a violated constraint, so the
    study never chooses a student whose export would be refused."""
    targets = Targets(p95_ms=10.0, min_quality=0.8)
    gaps = constraint_values(targets, 5.0, 2.0, 0.91, agreement=0.9865, min_agreement=0.99)
    assert gaps["agreement"] == pytest.approx(0.0035) and gaps["p95_ms"] < 0 and gaps["quality"] < 0
    assert not all(v <= 0 for v in gaps.values())
    assert constraint_values(targets, 5.0, 2.0, 0.91, agreement=0.995, min_agreement=0.99)["agreement"] < 0


def test_a_trial_below_the_export_agreement_bound_is_recorded_infeasible_and_never_chosen(tmp_path):
    """record_trained on a real study with hand figures: a student that dominates the other but whose served
    artefact agrees with its fp32 weights on 98.65 % of dev labels (export.min_label_agreement 0.99) gets a
    positive `agreement` constraint, user attr feasible False, and is neither on the front nor the export's choice."""
    from types import SimpleNamespace

    from kdlab.search.export import all_choices
    from kdlab.search.objective import record_trained
    from kdlab.search.study_report import trial_rows
    from kdlab.search.targets import GateRow

    cfg = load_config(search_config(tmp_path, str(tmp_path / "teacher"), "agree"))
    logged = []
    tracker = SimpleNamespace(log_metrics=logged.append)
    ctx = SimpleNamespace(cfg=cfg, targets=Targets(p95_ms=10.0), meta={"targets": {}, "conditions": {}})
    result = SimpleNamespace(train_seconds=1.0, steps=3, best_metric=0.9)
    candidate = SimpleNamespace(to_dict=lambda: {"recipe": "dynamic-int8"})
    cfg.run_dir.mkdir(parents=True)
    study = optuna.create_study(study_name="agree", storage=storage_url(cfg), directions=["maximize", "minimize"])
    for quality, p95_ms, agreement in ((0.92, 2.0, 0.9865), (0.88, 3.0, 0.995), (0.85, 4.0, 1.0)):
        trial = study.ask()
        trial.set_user_attr("recipe", "dynamic-int8" if agreement < 1.0 else "fp32")
        trial_dir = cfg.run_dir / "trials" / str(trial.number)
        trial_dir.mkdir(parents=True)
        post = GateRow("dynamic-int8", p50_ms=p95_ms, p95_ms=p95_ms, p99_ms=p95_ms, size_mb=1.0)
        values = record_trained(trial, tracker, ctx, candidate, trial_dir, quality, post, post, 1000, result,
                                agreement)
        study.tell(trial, values)
    bad, good, fp32 = study.trials
    assert bad.constraints["agreement"] == pytest.approx(0.0035) and bad.user_attrs["feasible"] is False
    assert bad.user_attrs["label_agreement"] == 0.9865 and logged[0]["label_agreement"] == 0.9865  # MLflow figure
    assert good.constraints["agreement"] == pytest.approx(-0.005) and good.user_attrs["feasible"] is True
    assert fp32.constraints["agreement"] == pytest.approx(-0.01) and fp32.user_attrs["feasible"] is True
    record = json.loads((cfg.run_dir / "trials" / "0" / "kdlab_trial.json").read_text())
    assert record["feasible"] is False and record["constraints"]["agreement"] == pytest.approx(0.0035)
    rows = trial_rows(study.get_trials(), cfg.run_dir)
    assert [(r["feasible"], r["violates"], r["is_pareto"]) for r in rows] == [
        (False, "agreement", False), (True, "", True), (True, "", False)]
    assert [t.number for t in study.best_trials] == [1]  # Optuna's own front leaves it out too
    _, pool = all_choices(cfg)
    assert [c.trial for c in pool] == [1]


def test_screening_uses_the_margin_for_latency_only():
    targets = Targets(p95_ms=10.0, max_size_mb=4.0)
    assert screened_out(targets, 10.4, 3.0, margin=0.05) == []        # within timing noise of the budget
    assert screened_out(targets, 10.6, 3.0, margin=0.05) == ["p95"]
    assert screened_out(targets, 1.0, 4.1, margin=0.05) == ["size"]   # size does not change with training
    assert screened_out(Targets(), 1e9, 1e9, margin=0.0) == []
    # With its p95's bootstrap interval: rejected only when the whole interval lies beyond budget x (1 + margin).
    assert screened_out(targets, 11.0, 3.0, margin=0.05, p95_low_ms=10.4) == []  # straddles 10.5: train it
    assert screened_out(targets, 11.0, 3.0, margin=0.05, p95_low_ms=10.6) == ["p95"]


def test_a_repeated_candidate_is_pruned_without_work():
    from types import SimpleNamespace

    from kdlab.search.objective import objective
    s = space("search.num_layers=[2, 3]")
    study = optuna.create_study(directions=["maximize", "minimize"])
    for _ in range(2):
        study.enqueue_trial(s.params_of(s.seeds(1)[0]))
    first = study.ask()
    for key, value in s.suggest(first).to_dict().items():
        first.set_user_attr(key, value)
    study.tell(first, (0.8, 2.0))
    again = study.ask()
    with pytest.raises(optuna.TrialPruned, match="same candidate as trial 0"):
        objective(again, SimpleNamespace(space=s))  # no teacher, data or tracking: it stops before any work
    study.tell(again, state=optuna.trial.TrialState.PRUNED)
    assert study.trials[1].user_attrs["duplicate_of"] == 0


def _refallback(tmp_path, recipes, drawn, agreements, latency=None, budget_ms=None):
    """_serve_agreeing on stand-in task parts: each recipe's agreement is given, and with `latency` a stand-in
    latency model (error 10 %) against `budget_ms`; returns (candidate, found, served, trial)."""
    import dataclasses
    from types import SimpleNamespace

    from kdlab.search.objective import PhaseClock, _serve_agreeing
    overrides = [f"search.recipes=[{', '.join(recipes)}]"]
    s = space(*overrides)
    served = []

    def serve(recipe, model, ctx, workdir):
        served.append(recipe)
        return recipe

    parts = SimpleNamespace(served=serve, quality=lambda artefact, trained, c, ctx: (0.9, agreements[c.recipe]))
    model = None if latency is None else SimpleNamespace(predict=lambda family, recipe, *shape: latency[recipe],
                                                         rules_out=lambda p, bound: p * 0.9 > bound)
    ctx = SimpleNamespace(cfg=load_config(None, ["data.dataset=glue", *overrides]), space=s, latency_model=model,
                          parts=parts, clock=PhaseClock(), targets=Targets(p95_ms=budget_ms))
    candidate = dataclasses.replace(s.seeds(1)[0], recipe=drawn)
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    trial.set_user_attr("recipe", drawn)
    return candidate, _serve_agreeing(trial, candidate, None, ctx, tmp_path, agreements[drawn]), served, trial


def test_a_student_whose_artefact_disagrees_is_re_served_fastest_first_without_retraining(tmp_path):
    """export.min_label_agreement 0.99: onnx-int8 agreed on 97 %, so the same weights are served under the other
    recipes in the latency model's order (dynamic-int8 at 2 ms before fp32 at 4 ms), stopping at the first that
    agrees; the trial records the recipe served, the one drawn and each recipe's agreement."""
    latency = {"onnx-int8": 1.0, "dynamic-int8": 2.0, "fp32": 4.0}
    candidate, found, served, trial = _refallback(tmp_path, ["fp32", "dynamic-int8", "onnx-int8"], "onnx-int8",
                                                  {"onnx-int8": 0.97, "dynamic-int8": 0.985, "fp32": 1.0}, latency)
    assert served == ["dynamic-int8", "fp32"]  # 98.5 % is still below 99 %
    again, artefact, quality, agreement = found
    assert (again.recipe, artefact, quality, agreement) == ("fp32", "fp32", 0.9, 1.0)
    assert {k: v for k, v in again.to_dict().items() if k != "recipe"} == {
        k: v for k, v in candidate.to_dict().items() if k != "recipe"}  # same student, only the recipe differs
    assert trial.user_attrs == {"recipe": "fp32", "drawn_recipe": "onnx-int8", "label": again.label(),
                                "recipe_agreement": {"onnx-int8": 0.97, "dynamic-int8": 0.985, "fp32": 1.0}}
    assert again.label().endswith(", fp32")  # how reports name it: the recipe it is served by

    _, found, served, _ = _refallback(tmp_path, ["fp32", "dynamic-int8", "onnx-int8"], "onnx-int8",
                                      {"onnx-int8": 0.97, "dynamic-int8": 0.995, "fp32": 1.0}, latency)
    assert served == ["dynamic-int8"] and found[0].recipe == "dynamic-int8"  # fp32 is never built
    # Without a latency model: the seed order, int8 before fp32.
    _, found, served, _ = _refallback(tmp_path, ["fp32", "onnx-int8", "dynamic-int8"], "dynamic-int8",
                                      {"dynamic-int8": 0.98, "onnx-int8": 0.999, "fp32": 1.0})
    assert served == ["onnx-int8"] and found[0].recipe == "onnx-int8"
    # Budget 2 ms (bound 2.1 with the 5 % margin): fp32 at 4 ms is ruled out (4 x 0.9 > 2.1), so it is never
    # served; dynamic-int8 at 2 ms still disagrees, and the trial keeps its drawn recipe.
    _, found, served, trial = _refallback(tmp_path, ["fp32", "dynamic-int8", "onnx-int8"], "onnx-int8",
                                          {"onnx-int8": 0.97, "dynamic-int8": 0.985, "fp32": 1.0}, latency, 2.0)
    assert found is None and served == ["dynamic-int8"] and trial.user_attrs["recipe"] == "onnx-int8"
    # No recipe agrees (no fp32 in the space): the trial keeps its drawn recipe and stays infeasible.
    _, found, served, trial = _refallback(tmp_path, ["dynamic-int8", "onnx-int8"], "onnx-int8",
                                          {"onnx-int8": 0.97, "dynamic-int8": 0.98})
    assert found is None and served == ["dynamic-int8"]
    assert trial.user_attrs["recipe"] == "onnx-int8" and trial.user_attrs["drawn_recipe"] == "onnx-int8"


def test_a_re_served_candidate_drawn_again_is_a_repeat():
    """A student drawn as onnx-int8 and re-served as fp32 is known: drawing onnx-int8 again would train the same
    weights to the same disagreement, so it is pruned as a repeat of the first."""
    import dataclasses
    from types import SimpleNamespace

    from kdlab.search.objective import objective
    s = space("search.num_layers=[2, 3]", "search.recipes=[fp32, onnx-int8]")
    drawn = dataclasses.replace(s.seeds(1)[0], recipe="onnx-int8")
    study = optuna.create_study(directions=["maximize", "minimize"])
    first = study.ask()
    for key, value in {**drawn.to_dict(), "recipe": "fp32", "drawn_recipe": "onnx-int8"}.items():
        first.set_user_attr(key, value)
    study.tell(first, (0.8, 2.0))
    study.enqueue_trial(s.params_of(drawn))
    again = study.ask()
    with pytest.raises(optuna.TrialPruned, match="same candidate as trial 0"):
        objective(again, SimpleNamespace(space=s))


def test_default_storage_lives_in_the_run_folder(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", {"name": "x", "data": {"dataset": "glue"}}))
    assert storage_url(cfg) == "sqlite:///runs/x/optuna.db"
    with pytest.raises(ConfigError, match="search.n_trials: must be >= 1"):
        load_config(None, ["data.dataset=glue", "search.n_trials=0"])
