"""`kdlab export`: choosing, the export folder, its parity check, model card, manifest and MLflow registry.

A real 3-trial `kdlab search` on a tiny random-init teacher and 200 SST-2 rows gives something to
export; the tests assert on the folder and the registry it leaves behind. Expected values come from
independent oracles: the choice from the Optuna study itself (`study.best_trials`, feasibility from
`FrozenTrial.constraints`), parity and predictions from a raw forward of the exported files
(tests/test_oracles.py), the capacity plan from its formula on the measured latencies.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import DATA, ROOT, SST2, tiny_run_tree, write_config
from kdlab.distill.config import ConfigError, load_config
from kdlab.distill.export import load_served, sha256_file
from kdlab.scripts.cli import main as kdlab
from kdlab.search.card import hub_id
from kdlab.search.export import Choice, parse_pick, pick
from test_oracles import RawServed, labels_of, one_thread, parity_oracle, sst2_dev

pytestmark = pytest.mark.slow
PROFILE = {"batch_size": 1, "seq_len": "data", "warmup_iters": 2, "min_iters": 10, "min_seconds": 0.2,
           "repeats": 2, "threads": 1, "p95_tolerance": 1.0, "max_rounds": 3}
SPACE = {"num_layers": [1, 2], "hidden_size": [64], "num_heads": [4], "recipes": ["dynamic-int8", "onnx-int8"],
         "learning_rate": {"min": 1e-4, "max": 1e-2, "log": True}, "train_steps": 3, "seed_trials": 2}


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_teacher_dir):
    root = tmp_path_factory.mktemp("export")
    tree = tiny_run_tree(root / "exp", tiny_teacher_dir, target=PROFILE, search=SPACE,
                         export={"latency_batch_sizes": [1, 4]})
    tree["name"] = "exp"
    tree["teacher"]["fine_tune"] = "never"
    tree["tracking"]["uri"] = f"sqlite:///{root / 'mlflow.db'}"
    config = write_config(root / "exp.yaml", tree)
    assert kdlab(["search", "--config", str(config), "--n-trials", "3"]) == 0
    return root, config


def stored_study(root: Path) -> optuna.Study:
    return optuna.load_study(study_name="exp", storage=f"sqlite:///{root / 'exp' / 'optuna.db'}")


def feasible(t: optuna.trial.FrozenTrial) -> bool:
    """Optuna's convention: a COMPLETE trial whose every constraint is <= 0."""
    return t.state == optuna.trial.TrialState.COMPLETE and all(v <= 0 for v in t.constraints.values())


def checkpoint(root: Path, t: optuna.trial.FrozenTrial) -> Path:
    return root / "exp" / "trials" / str(t.number)


def exportable(root: Path, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trained (COMPLETE, not screened out) trials whose checkpoint folder is still there."""
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and not t.user_attrs.get("screened_out") and checkpoint(root, t).is_dir()]


def default_choice(root: Path) -> optuna.trial.FrozenTrial:
    """What `kdlab export` must take by default, from the study alone: of the feasible front members
    (study.best_trials) with a checkpoint, the highest quality (values[0]); ties go to the lower p95 (values[1])."""
    assert not (root / "exp" / "report" / "gate.csv").exists()  # no gate was run: only trials compete
    study = stored_study(root)
    kept = {t.number for t in exportable(root, study)}
    pool = [t for t in study.best_trials if feasible(t) and t.number in kept]
    assert pool, "the search left no feasible front member to export"
    return max(pool, key=lambda t: (t.values[0], -t.values[1]))


def strings(tree) -> list[str]:
    """Every string of a JSON tree."""
    if isinstance(tree, str):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else []
    return [s for v in values for s in strings(v)]


def machine_paths(manifest: dict, card: str, tmp: Path) -> list[str]:
    """What in an export's manifest and card names this machine's folders: manifest strings that are absolute
    paths, and the test's temporary folder, the repository and the data root wherever they appear."""
    text = json.dumps(manifest) + card
    return [s for s in strings(manifest) if s.startswith("/")] + [str(f) for f in (tmp, ROOT, DATA) if str(f) in text]


def pyfunc_and_predict(root: Path, model_uri: str, folder: Path, texts: list[str]):
    """The registered pyfunc's DataFrame for `texts` and the records `kdlab predict` writes for them, one thread."""
    with one_thread():
        got = mlflow.pyfunc.load_model(model_uri).predict(texts)
    source, out = root / "pyfunc_texts.txt", root / "pyfunc_texts.jsonl"
    source.write_text("".join(t + "\n" for t in texts))
    out.unlink(missing_ok=True)
    assert kdlab(["predict", "--model", str(folder), "--input", str(source), "--output", str(out),
                  "--threads", "1"]) == 0
    return got, [json.loads(line) for line in out.read_text().splitlines()]


def check_pyfunc(got, recs: list[dict], want: torch.Tensor, labels: list[str]) -> None:
    """Labels and probabilities of the pyfunc: the oracle's, and `kdlab predict`'s (which writes 6 decimals)."""
    columns = [f"prob_{name}" for name in labels]
    assert list(got.columns) == ["label", *columns]
    assert got["label"].tolist() == labels_of(want, labels) == [r["label"] for r in recs]
    probs = got[columns].to_numpy()
    assert torch.allclose(torch.tensor(probs, dtype=torch.float32), want, atol=1e-6, rtol=0)
    assert [dict(zip(labels, (round(p, 6) for p in row))) for row in probs.tolist()] == [r["probs"] for r in recs]


def test_export_writes_a_checked_folder_and_registers_it(searched):
    root, config = searched
    expected = default_choice(root)  # the most accurate feasible front member, read off the Optuna study
    recipe = expected.user_attrs["recipe"]
    assert kdlab(["export", "--config", str(config)]) == 0
    out = root / "exp" / "export"
    manifest = json.loads((out / "manifest.json").read_text())

    # The Hugging Face folder loads as a classifier with the task's labels and the trial's weights.
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 2 and manifest["labels"] == ["0", "1"]
    before = AutoModelForSequenceClassification.from_pretrained(checkpoint(root, expected)).eval()
    batch = AutoTokenizer.from_pretrained(out)(["a gripping film", "a dull mess"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before(**batch).logits)
    assert manifest["choice"]["trial"] == expected.number and manifest["served"]["recipe"] == recipe
    assert manifest["choice"]["search_figures"]["quality"] == expected.values[0]
    assert manifest["choice"]["search_figures"]["p95_ms"] == expected.values[1]
    assert (out / "model.onnx").is_file() and (out / "training_config.yaml").is_file()
    if recipe == "onnx-int8":
        assert manifest["served"]["file"] == "model.int8.onnx" and (out / "model.int8.onnx").is_file()

    # Every file is listed with its real hash; nothing is left beside the folder.
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"manifest.json"}
    assert all(sha256_file(out / n) == e["sha256"] for n, e in manifest["files"].items())
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".export")) == []

    # Parity was measured on the full dev set (200 rows here) against the fp32 model: the same figures come
    # out of a raw forward of the exported files over the same dev batches (eval_batch_size 64).
    p = manifest["parity"]
    texts, labels = sst2_dev(200)
    raw = RawServed(out, recipe)
    want = parity_oracle(raw, texts, labels, batch=64, max_length=manifest["max_length"])
    assert p["rows"] == 200 and p["label_agreement"] >= 0.99 and p["max_abs_diff"] >= 0.0
    assert p["label_agreement"] == want["label_agreement"]
    assert p["max_abs_diff"] == pytest.approx(want["max_abs_diff"], rel=1e-4) and want["max_abs_diff"] > 0
    assert p["served_quality"] == pytest.approx(want["served_quality"])
    assert p["reference_quality"] == pytest.approx(want["reference_quality"])
    assert manifest["measured"]["quality"] == p["served_quality"]
    assert [r["batch_size"] for r in manifest["latency"]] == [1, 4]
    assert all(r["p95_ms"] >= r["p50_ms"] > 0 for r in manifest["latency"])

    # The model card carries the manifest's numbers.
    card = (out / "README.md").read_text()
    assert f"{manifest['measured']['quality']:.4f}" in card and f"{manifest['latency'][0]['p95_ms']:.2f}" in card
    assert "models:/exp@champion" in card
    # It opens with Hugging Face metadata that huggingface_hub reads back: the measured dev quality in model-index.
    meta = ModelCard.load(out / "README.md").data
    assert (meta.pipeline_tag, meta.library_name) == ("text-classification", "transformers")
    assert meta.tags == ["kdlab", "distillation", recipe] and meta.datasets == ["sst2"] and meta.metrics == ["accuracy"]
    assert meta.base_model is None  # the teacher is a local folder, not a Hub id
    (result,) = meta.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_split, result.metric_type) == \
        ("text-classification", "sst2", "dev", "accuracy")
    assert result.metric_value == manifest["measured"]["quality"]

    # No path of this machine: the trial folder relative to the run, the data files to the data root.
    assert machine_paths(manifest, card, root.parent) == []
    assert manifest["choice"]["source"] == f"<run>/trials/{expected.number}"
    assert (manifest["data"]["train_file"], manifest["data"]["eval_file"]) == ("<data>/sst2/train.tsv",
                                                                               "<data>/sst2/dev.tsv")
    assert manifest["teacher"]["source"].startswith("<local>/") and manifest["teacher"]["hub_id"] is None

    # Registry: alias champion on the new version, tagged; the pyfunc gives labels and probabilities.
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("exp", "champion")
    assert str(version.version) == manifest["mlflow"]["version"]
    assert version.tags["trial"] == str(expected.number) and version.tags["recipe"] == recipe
    assert float(version.tags["quality"]) == pytest.approx(manifest["measured"]["quality"], abs=1e-6)
    assert version.run_id == expected.user_attrs["mlflow_run_id"]  # logged on the trial's own run
    texts = ["a gripping , funny film", "a dull , lifeless mess", "it is a movie"]
    got, recs = pyfunc_and_predict(root, "models:/exp@champion", out, texts)
    check_pyfunc(got, recs, raw.probs(texts, max_length=manifest["max_length"]), manifest["labels"])


def test_export_by_trial_and_pick_and_refusals(searched, capsys):
    root, config = searched
    # `--pick "min p95_ms"` takes the fastest exportable trial of the study (a tie goes to higher quality).
    candidates = exportable(root, stored_study(root))
    fastest = min(candidates, key=lambda t: (t.values[1], -t.values[0]))
    out = root / "picked"
    assert kdlab(["export", "--config", str(config), "--pick", "min p95_ms", "--out", str(out),
                  "export.register=false"]) == 0
    assert json.loads((out / "manifest.json").read_text())["choice"]["trial"] == fastest.number
    assert "mlflow" not in json.loads((out / "manifest.json").read_text())

    capsys.readouterr()
    assert kdlab(["export", "--config", str(config), "--trial", "99", "--out", str(root / "t99")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdlab: error: --trial: trial 99 has no trained checkpoint") and "\n" not in err
    assert not (root / "t99").exists()
    assert kdlab(["export", "--config", str(config), "--pick", "max accuracy", "--out", str(root / "bad")]) == 2
    assert "unknown field 'accuracy'" in capsys.readouterr().err and not (root / "bad").exists()


def test_failed_parity_leaves_the_earlier_export_untouched(searched, monkeypatch, capsys):
    root, config = searched
    out = root / "atomic"
    assert kdlab(["export", "--config", str(config), "--out", str(out), "export.register=false"]) == 0
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    capsys.readouterr()
    assert kdlab(["export", "--config", str(config), "--out", str(out), "export.register=false"]) == 2
    assert "exists; pass --force to replace it" in capsys.readouterr().err  # no silent overwrite
    import kdlab.search.classification_export as ex  # where the classifier's export checks parity
    monkeypatch.setattr(ex, "parity", lambda *a, **k: {"rows": 200, "max_abs_diff": 9.0, "label_agreement": 0.5})
    assert kdlab(["export", "--config", str(config), "--out", str(out), "--force", "export.register=false"]) == 2
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    assert [p.name for p in root.iterdir() if ".staging" in p.name] == []


def test_nothing_to_export_is_a_one_line_error(tmp_path, tiny_teacher_dir, capsys):
    tree = tiny_run_tree(tmp_path / "none", tiny_teacher_dir)
    config = write_config(tmp_path / "c.yaml", tree)
    assert kdlab(["export", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdlab: error: nothing to export") and "\n" not in err
    assert not (tmp_path / "none" / "export").exists()


def test_base_model_is_named_only_for_hub_teachers(tmp_path):
    assert hub_id("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"  # the named teacher's Hub id
    assert hub_id("google/flan-t5-base") == "google/flan-t5-base" and hub_id("bert-base-uncased") == "bert-base-uncased"
    assert hub_id(str(tmp_path)) is None and hub_id(None) is None and hub_id("<local>/teacher") is None


@pytest.mark.parametrize("text,parsed", [
    ("max quality", ("max", "quality", [])),
    ("max quality s.t. p95_ms<=8", ("max", "quality", [("p95_ms", "<=", 8.0)])),
    ("min p95_ms s.t. quality >= 0.85, size_mb<50", ("min", "p95_ms", [("quality", ">=", 0.85),
                                                                        ("size_mb", "<", 50.0)])),
    ("MAX quality s.t. p95_ms < 2.5 and size_mb <= 1e2", ("max", "quality", [("p95_ms", "<", 2.5),
                                                                             ("size_mb", "<=", 100.0)])),
])
def test_parse_pick(text, parsed):
    assert parse_pick(text) == parsed


@pytest.mark.parametrize("text", ["best", "max", "max quality s.t.", "max quality s.t. p95_ms ~ 3", "max speed"])
def test_parse_pick_refuses(text):
    with pytest.raises(ConfigError, match="--pick"):
        parse_pick(text)


def test_pick_applies_constraints_and_breaks_ties_on_latency():
    def c(label, q, p95, size=10.0):
        return Choice("trial", label, "fp32", None, {"quality": q, "p95_ms": p95, "size_mb": size})
    pool = [c("a", 0.90, 9.0), c("b", 0.88, 4.0), c("c", 0.88, 3.0), c("d", 0.80, 1.0, size=60.0)]
    assert pick(pool, "max quality").label == "a"
    assert pick(pool, "max quality s.t. p95_ms<=8").label == "c"  # b and c tie on quality; c is faster
    assert pick(pool, "min p95_ms s.t. size_mb<50").label == "c"
    with pytest.raises(ConfigError, match="no candidate satisfies"):
        pick(pool, "max quality s.t. p95_ms<0.5")


def hand_made_run(tmp_path: Path, trials: list, gate: list[dict] | None = None):
    """A run folder holding an Optuna study of hand-made trials (checkpoint folders for those marked so)
    and, optionally, a gate table; returns its config. Nothing is trained or measured."""
    tmp_path.mkdir(parents=True)
    cfg = load_config(write_config(tmp_path / "c.yaml", {"name": "hand", "output_dir": str(tmp_path / "run"),
                                                         "data": {"dataset": "glue"},
                                                         "teacher": {"source": str(tmp_path / "teacher")}}))
    cfg.run_dir.mkdir(parents=True)
    study = optuna.create_study(study_name="hand", storage=f"sqlite:///{cfg.run_dir / 'optuna.db'}",
                                directions=["maximize", "minimize"])
    for number, (quality, p95, violation, kept) in enumerate(trials):
        study.add_trial(optuna.trial.create_trial(
            values=[quality, p95], constraints={"p95_ms": violation},
            user_attrs={"recipe": "dynamic-int8", "screened_out": False, "quality": quality, "p95_ms": p95}))
        if kept:
            (cfg.run_dir / "trials" / str(number)).mkdir(parents=True)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    if gate:
        (cfg.run_dir / "report").mkdir()
        fields = ["recipe", "status", "candidate", "meets_targets", "quality", "p95_ms"]
        lines = [",".join(fields)] + [",".join(str(row[f]) for f in fields) for row in gate]
        (cfg.run_dir / "report" / "gate.csv").write_text("\n".join(lines) + "\n")
    return cfg


# (quality, p95_ms, constraint value, checkpoint kept). Trial 2 would dominate every other one but violates its
# target; trial 3 is dominated by trial 1; so the feasible front is {0, 1} and trial 1 is the most accurate.
HAND_TRIALS = [(0.80, 2.0, -0.5, True), (0.90, 6.0, -0.1, True), (0.95, 1.0, 0.3, True), (0.85, 7.0, -0.2, True)]


def test_default_choice_is_the_most_accurate_feasible_front_member(tmp_path):
    from kdlab.search.export import choose
    assert choose(hand_made_run(tmp_path / "a", HAND_TRIALS)).trial == 1
    # Without its checkpoint, trial 1 cannot be exported: the other front member is taken, never the
    # dominated trial 3 or the infeasible trial 2.
    no_checkpoint = [t if i != 1 else (*t[:3], False) for i, t in enumerate(HAND_TRIALS)]
    assert choose(hand_made_run(tmp_path / "b", no_checkpoint)).trial == 0


def test_default_choice_breaks_a_quality_tie_on_the_lower_p95(tmp_path):
    from kdlab.search.export import choose
    teacher = {"recipe": "dynamic-int8", "status": "ok", "candidate": "True", "meets_targets": "True",
               "quality": 0.90}
    unmet = {"recipe": "onnx-int8", "status": "ok", "candidate": "True", "meets_targets": "False",
             "quality": 0.99, "p95_ms": 0.5}  # misses a target: not in the default pool
    faster = choose(hand_made_run(tmp_path / "a", HAND_TRIALS, [{**teacher, "p95_ms": 4.0}, unmet]))
    assert (faster.kind, faster.recipe) == ("teacher", "dynamic-int8")  # 0.90 at 4 ms beats trial 1's 0.90 at 6
    slower = choose(hand_made_run(tmp_path / "b", HAND_TRIALS, [{**teacher, "p95_ms": 9.0}, unmet]))
    assert (slower.kind, slower.trial) == ("trial", 1)


def _run_tree(tmp_path, teacher, target, **sections):
    tree = tiny_run_tree(tmp_path / "run", teacher, target={**PROFILE, **target}, **sections,
                         quantization={"recipes": ["fp32", "dynamic-int8"]},
                         search={**SPACE, "n_trials": 2, "recipes": ["dynamic-int8"]},
                         export={"latency_batch_sizes": [1]})
    tree["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return write_config(tmp_path / "run.yaml", tree)


def test_run_exports_the_quantized_teacher_when_the_gate_passes(tmp_path, tiny_teacher_dir, capsys):
    config = _run_tree(tmp_path, tiny_teacher_dir, {"min_quality": "teacher*0.5"},
                       serving={"target_rps": 50, "p95_slo_ms": 1000, "batch_sizes": [1, 2]})
    assert kdlab(["run", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "exported teacher" in out
    manifest = json.loads((tmp_path / "run" / "export" / "manifest.json").read_text())
    assert manifest["choice"]["kind"] == "teacher" and manifest["choice"]["recipe"] in ("fp32", "dynamic-int8")
    assert not (tmp_path / "run" / "optuna.db").exists()  # no search on a PASS
    # The capacity plan needs no study when the SLO is given. By hand (search/capacity.py's docstring): per batch,
    # throughput = batch / (p50 + batch x serving.replica_ms, the replica's own work a request), replicas =
    # ceil(target_rps / (throughput x (1 - headroom))), predicted p95 = wait to fill the batch at target_rps /
    # replicas + p95 + serving.overhead_ms (default 12) + the p95 queueing wait at utilisation rho (Kingman's mean
    # rho / (1 - rho) x (1 + cv^2) / 2 x service time, exponential tail: mean / rho x ln(rho / 0.05));
    # batch 2 only when it serves 10 % more requests/s than batch 1 (both meet 1 s).
    cap = manifest["capacity"]
    assert (cap["target_rps"], cap["p95_slo_ms"], cap["headroom"], cap["overhead_ms"]) == (50, 1000, 0.3, 12.0)
    lat = cap["latency"]
    assert set(lat) == {"1", "2"}
    assert cap["replica_ms"] == 9.0  # the default
    thr = {b: b / ((lat[str(b)]["p50_ms"] + b * cap["replica_ms"]) / 1000) for b in (1, 2)}
    b = 2 if thr[2] > thr[1] * 1.1 else 1
    replicas = max(1, math.ceil(50 / (thr[b] * (1 - 0.3))))
    fill_ms = (b - 1) / (50 / replicas) * 1000
    assert (cap["plan"]["batch_size"], cap["plan"]["instances"]) == (b, replicas)
    assert cap["plan"]["throughput"] == pytest.approx(thr[b], rel=1e-9)
    rho = 50 / (replicas * thr[b])
    cv = (lat[str(b)]["p95_ms"] / lat[str(b)]["p50_ms"] - 1) / 1.645
    mean_wait_ms = rho / (1 - rho) * (1 + cv * cv) / 2 * 1000 / (replicas * thr[b])
    wait_ms = mean_wait_ms / rho * math.log(rho / 0.05) if rho > 0.05 else 0.0
    assert cap["plan"]["p95_ms"] == pytest.approx(fill_ms + lat[str(b)]["p95_ms"] + 12.0 + wait_ms)
    # Ray Serve's config and the Dockerfile are in the folder, hashed, with the plan's batching and replicas.
    assert {"serve_config.yaml", "Dockerfile"} <= set(manifest["files"])
    app = yaml.safe_load((tmp_path / "run" / "export" / "serve_config.yaml").read_text())["applications"][0]
    assert (app["args"]["model"], app["args"]["max_batch_size"]) == (".", b)
    assert app["deployments"][0]["num_replicas"] == replicas
    # The plan's batch-1 figures are the latency table's own measurement (one timing serves both).
    assert lat["1"]["p50_ms"] == manifest["latency"][0]["p50_ms"] and manifest["latency"][0]["batch_size"] == 1
    assert (tmp_path / "run" / "teacher" / "kdlab_teacher.json").is_file()  # the teacher was fine-tuned first


def test_run_searches_on_a_miss_and_exports_nothing_infeasible(tmp_path, tiny_teacher_dir, capsys):
    config = _run_tree(tmp_path, tiny_teacher_dir, {"p95_ms": 0.0001})  # no model answers in 0.1 microseconds
    assert kdlab(["run", "--config", str(config)]) == 3
    out = capsys.readouterr().out
    assert "MISS" in out and "no feasible student" in out
    assert (tmp_path / "run" / "optuna.db").is_file()
    assert not (tmp_path / "run" / "export").exists()


def test_the_gates_budget_is_the_studys_budget(tmp_path, tiny_teacher_dir, capsys):
    """kdlab run: the search's relative targets resolve against the fp32 teacher as the gate measured it (gate.csv),
    not a second measurement; a later search keeps the study's figure and refuses --remeasure; a new study with
    --remeasure measures its own."""
    config = _run_tree(tmp_path, tiny_teacher_dir, {"p95_ms": "teacher*0.001"})  # misses: the search runs
    assert kdlab(["run", "--config", str(config)]) == 3
    out = capsys.readouterr().out
    with open(tmp_path / "run" / "report" / "gate.csv", newline="") as fh:
        fp32 = next(r for r in csv.DictReader(fh) if r["recipe"] == "fp32")
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'optuna.db'}")
    assert study.user_attrs["targets"]["p95_ms"] == pytest.approx(0.001 * float(fp32["p95_ms"]), rel=1e-12)
    assert study.user_attrs["reference"]["source"] == "gate"
    budget = next(line for line in out.splitlines() if line.startswith("budget: "))
    assert f"fp32 teacher p95 {float(fp32['p95_ms']):.2f} ms" in budget and "measured by the gate" in budget
    assert f"p95 ≤ {0.001 * float(fp32['p95_ms']):.2f} ms" in out.split("budget: ")[0]  # the gate's line: same figure

    assert kdlab(["search", "--config", str(config), "--remeasure"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdlab: error: --remeasure: study 'tiny' fixed its budget") and "\n" not in err
    assert kdlab(["search", "--config", str(config), "--remeasure", "--n-trials", "1",
                  "search.study_name=again"]) == 3
    again = optuna.load_study(study_name="again", storage=f"sqlite:///{tmp_path / 'run' / 'optuna.db'}")
    assert again.user_attrs["reference"]["source"] == "search"
    assert "measured by the search" in capsys.readouterr().out


def test_onnx_int8_export_is_served_from_its_int8_graph_through_the_registry(searched):
    root, config = searched
    from kdlab.search.export import run_export, teacher_choice
    cfg = load_config(config, ["export.model_name=exp-onnx", "export.min_label_agreement=0.0"])
    manifest = run_export(cfg, out=str(root / "onnx"), choice=teacher_choice(cfg, "onnx-int8"))
    out = root / "onnx"
    assert manifest["served"] == {**manifest["served"], "recipe": "onnx-int8", "file": "model.int8.onnx"}
    assert (out / "model.int8.onnx").is_file() and (out / "model.onnx").is_file()
    p = manifest["parity"]
    assert p["rows"] == 200 and 0.0 <= p["max_abs_diff"] < 1.0 and 0.0 <= p["label_agreement"] <= 1.0
    # An onnxruntime session of our own on model.int8.onnx, against the folder's fp32 weights, same dev batches.
    raw = RawServed(out, "onnx-int8")
    want = parity_oracle(raw, *sst2_dev(200), batch=64, max_length=manifest["max_length"])
    assert p["label_agreement"] == want["label_agreement"] and want["max_abs_diff"] > 0
    assert p["max_abs_diff"] == pytest.approx(want["max_abs_diff"], rel=1e-4)
    assert manifest["measured"]["quality"] == p["served_quality"] == pytest.approx(want["served_quality"])
    served = load_served(out)
    assert served.artefact.recipe == "onnx-int8" and served.artefact.files[0].name == "model.int8.onnx"
    texts = ["a gripping , funny film", "a dull , lifeless mess"]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    got, recs = pyfunc_and_predict(root, "models:/exp-onnx@champion", out, texts)
    check_pyfunc(got, recs, raw.probs(texts, max_length=manifest["max_length"]), manifest["labels"])
    # The teacher under a recipe is quantized, not distilled; its card says so and carries its own quality.
    meta = ModelCard.load(out / "README.md").data
    assert meta.tags == ["kdlab", "onnx-int8"] and meta.eval_results[0].metric_value == manifest["measured"]["quality"]
    assert machine_paths(manifest, (out / "README.md").read_text(), root.parent) == []
    # fine_tune never: the teacher folder itself, outside the repository, the data and the run: by name only
    assert manifest["choice"]["source"] == manifest["teacher"]["source"] == f"<local>/{Path(cfg.teacher.source).name}"


def test_the_test_split_is_scored_at_export_and_never_read_before(tmp_path, tiny_teacher_dir, capsys):
    """The search runs with data.test_file naming a file that does not exist yet (reading it would fail), and leaves
    no trace of it in the study, its trial records, its report or its MLflow metrics; the export, after the file is
    written, scores it once on the served artefact, as `kdlab predict` labels it, into the manifest, the card, the
    summary line and the chosen trial's MLflow run (`test_accuracy`)."""
    test_file = tmp_path / "test.tsv"
    tree = tiny_run_tree(tmp_path / "t", tiny_teacher_dir, target=PROFILE, search={**SPACE, "seed_trials": 1},
                         export={"latency_batch_sizes": [1]})
    tree["name"] = "held"
    tree["teacher"]["fine_tune"] = "never"
    tree["data"]["test_file"] = str(test_file)
    config = write_config(tmp_path / "held.yaml", tree)
    assert kdlab(["search", "--config", str(config), "--n-trials", "1"]) == 0
    rows = (SST2 / "dev.tsv").read_text().splitlines()
    test_file.write_text("\n".join([rows[0], *rows[-60:]]) + "\n")
    study = optuna.load_study(study_name="held", storage=f"sqlite:///{tmp_path / 't' / 'optuna.db'}")
    run = tmp_path / "t"
    left = [json.dumps([study.user_attrs, *(t.user_attrs for t in study.trials)], default=str),
            *((run / "report" / name).read_text() for name in ("pareto.csv", "pareto.html")),
            *(p.read_text() for p in (run / "trials").glob("*/kdlab_trial.json"))]
    assert all(str(test_file) not in text and "test.tsv" not in text for text in left)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    searched_runs = mlflow.search_runs(experiment_names=["held"], output_format="list")
    assert searched_runs and not any(k.startswith("test_") for r in searched_runs for k in r.data.metrics)

    capsys.readouterr()
    assert kdlab(["export", "--config", str(config)]) == 0
    out = run / "export"
    manifest = json.loads((out / "manifest.json").read_text())
    test = manifest["test"]
    assert (test["rows"], test["metric"]) == (60, "accuracy")
    assert f"held-out test accuracy {test['quality']:.4f}" in capsys.readouterr().out  # the summary line
    predicted = tmp_path / "pred.jsonl"
    assert kdlab(["predict", "--model", str(out), "--input", str(test_file), "--output", str(predicted)]) == 0
    labels = [line.split("\t")[1] for line in rows[-60:]]
    got = [json.loads(line)["label"] for line in predicted.read_text().splitlines()]
    assert test["quality"] == pytest.approx(sum(a == b for a, b in zip(got, labels)) / 60)
    card = (out / "README.md").read_text()
    assert f"accuracy **{test['quality']:.4f}**" in card and "scored once at export" in card
    assert "Held-out test rows: " in card and "(60 rows), read only by the export" in card
    assert "Student training data: 200 labelled rows" in card
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model_run = mlflow.get_run(manifest["mlflow"]["run_id"])
    assert model_run.info.run_id == manifest["choice"]["mlflow_run_id"]  # the chosen trial's own run
    assert model_run.data.metrics["test_accuracy"] == pytest.approx(test["quality"])
    others = [r for r in mlflow.search_runs(experiment_names=["held"], output_format="list")
              if r.info.run_id != model_run.info.run_id]
    assert not any(k.startswith("test_") for r in others for k in r.data.metrics)


def test_a_test_file_with_unseen_labels_is_refused_before_anything_is_written(searched, tmp_path, capsys):
    root, config = searched
    bad = tmp_path / "test.tsv"
    bad.write_text("sentence\tlabel\na fine film\t1\na strange one\t7\n")
    out = tmp_path / "never"
    capsys.readouterr()
    assert kdlab(["export", "--config", str(config), f"data.test_file={bad}", "--out", str(out)]) == 2
    err = capsys.readouterr().err  # progress bars of the dev set's tokenizing come before it
    line = (f"kdlab: error: data.test_file: {bad} has label(s) [7] that never occur in the training rows "
            f"(labels there: 0, 1); valid: a test split of the same classes")
    assert err.strip().splitlines()[-1] == line and err.count("kdlab: error") == 1 and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".never*"))
    # `kdlab run` reads it before the gate: the same line, before any stage runs or writes
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert kdlab(["run", "--config", str(config), f"data.test_file={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_the_card_says_how_the_students_training_data_was_made():
    from kdlab.search.classification_export import training_data_lines
    made = {"labelled_rows": 2000, "transfer": {"unlabelled_train": 20000, "augmented": 4000, "texts": 0},
            "augment": {"copies": 2, "mask_prob": 0.1, "replace_prob": 0.1, "ngram_prob": 0.25, "ngram_max": 5,
                        "seed": 0},
            "teacher_labels": "onnx-int8 (dev agreement 99.8 %)"}
    assert training_data_lines(made, "trial", 2000, True) == [
        "- Student training data: 2,000 labelled rows (KD + cross-entropy), and a transfer set labelled by the "
        "teacher (KD only): unlabelled train 20,000, augmented 4,000",
        "- Augmented copies: 2 per labelled row (mask 0.1, word replacement 0.1, n-gram 0.25 up to 5 words, seed 0)",
        "- Teacher labels computed with: onnx-int8 (dev agreement 99.8 %)"]
    # Not recorded by the student's summary or trial record: what the config's labelled subset holds
    assert training_data_lines(None, "model", 200, True) == ["- Student training data: the labelled rows only (200 rows)"]
    assert training_data_lines(None, "model", 200, False) == [
        "- Training data of the model: not recorded (it was trained outside kdlab)"]
    assert training_data_lines(None, "teacher", 200, False) == []  # the teacher itself: no student to describe
