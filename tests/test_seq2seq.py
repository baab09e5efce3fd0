"""Seq2seq through the real entry points: a tiny random T5 built here (scripts/build_t5.py) and real Multi30k pairs.

Asserts on what runs leave behind: the student checkpoint (it loads with AutoModelForSeq2SeqLM and
generates), the cached sequence-level KD targets, the MLflow metrics, the gate table; and on the
one-line errors of bad seq2seq input.
"""
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from conftest import DATA, ROOT, mlflow_store, write_config
from test_distill_entry import launch

MULTI30K = DATA / "multi30k"
KDLAB = str(Path(sys.executable).parent / "kdlab")


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> str:
    sys.path.insert(0, str(ROOT))
    from kdlab.scripts.build_t5 import build_t5
    lines = [line for lang in ("de", "en") for line in (MULTI30K / f"train.{lang}").read_text().splitlines()[:400]]
    return str(build_t5(tmp_path_factory.mktemp("tiny_t5"), lines, vocab_size=400, d_model=32, layers=2, heads=2))


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> dict:
    """100 training and 24 dev pairs of real Multi30k (German -> English), line-aligned files."""
    folder = tmp_path_factory.mktemp("multi30k")
    for split, src, n in (("train", "train", 100), ("dev", "val", 24)):
        for lang in ("de", "en"):
            lines = (MULTI30K / f"{src}.{lang}").read_text().splitlines()[:n]
            (folder / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    return {"train_file": str(folder / "train.de"), "train_target_file": str(folder / "train.en"),
            "eval_file": str(folder / "dev.de"), "eval_target_file": str(folder / "dev.en")}


def seq2seq_tree(run_dir: Path, teacher: str, pairs: dict, **sections) -> dict:
    tree = {
        "name": "tiny_s2s", "output_dir": str(run_dir),
        "task": {"type": "seq2seq"},
        "data": {**pairs, "max_length": 48, "max_target_length": 48},
        "teacher": {"source": teacher, "fine_tune": "always", "num_epochs": 1, "learning_rate": 3e-3},
        "student": {"encoder_layers": 1, "decoder_layers": 1},
        "distill": {"alpha": 0.5, "temperature": 2.0},
        "train": {"max_steps": 6, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 3e-3, "log_every_steps": 1},
        "generation": {"max_new_tokens": 12},
        "tracking": {"uri": f"sqlite:///{run_dir.parent / 'mlflow.db'}"},
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return tree


@pytest.mark.slow
def test_launch_distils_a_t5_student_with_sequence_kd(tmp_path, tiny_t5_dir, pairs):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", seq2seq_tree(run_dir, tiny_t5_dir, pairs, distill={"seq_kd": "mix"}))
    proc = launch(config)
    assert "dev bleu" in proc.stdout

    summary = json.loads((run_dir / "student" / "kdlab_summary.json").read_text())
    assert summary["task"] == "seq2seq" and summary["training"] == "seq-kd"
    assert summary["student"] == {"encoder_layers": 1, "decoder_layers": 1, "width": 32, "init": "teacher-layers"}
    # mix: the 100 references followed by one teacher output per source (none came out empty here, or fewer)
    cached = list((run_dir / "cache").glob("seq_kd-*.json"))
    assert len(cached) == 1
    targets = json.loads(cached[0].read_text())["targets"]
    assert len(targets) == 100
    assert summary["train_rows"] == 100 + sum(1 for t in targets if t)

    student = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "student")
    assert (student.config.num_layers, student.config.num_decoder_layers) == (1, 1)
    tok = AutoTokenizer.from_pretrained(run_dir / "student")
    out = student.generate(**tok(["Ein Mann schläft."], return_tensors="pt", return_token_type_ids=False),
                           max_new_tokens=5)
    assert out.shape[0] == 1 and 1 < out.shape[1] <= 6

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("tiny_s2s").experiment_id])}
    assert set(runs) == {"teacher-finetune", "distill"}
    metrics = runs["distill"].data.metrics
    assert metrics["best_dev_bleu"] == pytest.approx(summary["best_dev"]["bleu"])
    assert {"distill/dev_bleu", "distill/dev_chrf", "distill/dev_rougeL", "distill/kd", "distill/ce"} <= set(metrics)
    assert runs["distill"].data.tags["kdlab.training"] == "seq-kd"


def test_sequence_kd_targets_are_generated_once_and_reused(tmp_path, tiny_t5_dir, pairs, monkeypatch):
    from accelerate import Accelerator

    from kdlab.distill.config import load_config
    from kdlab.train.seq2seq import load_seq2seq, prepare, seq_kd_targets, seq_kd_train_set
    config = write_config(tmp_path / "c.yaml", seq2seq_tree(tmp_path / "run", tiny_t5_dir, pairs,
                                                            distill={"seq_kd": "only", "seq_kd_num_beams": 2}))
    cfg = load_config(str(config))
    acc = Accelerator(cpu=True)
    prep = prepare(cfg, acc)
    teacher = load_seq2seq(tiny_t5_dir, cfg, prep.tokenizer).eval()
    calls = []
    original = type(teacher).generate
    monkeypatch.setattr(type(teacher), "generate", lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
    first = seq_kd_targets(teacher, prep, cfg, acc)
    assert len(first) == len(prep.data.train) == 100 and calls and all(k["num_beams"] == 2 for k in calls)
    # each target is that source's own output: generating row 7 alone gives the cached text
    one = teacher.generate(**{k: torch.tensor([prep.train_ds[7][k]]) for k in ("input_ids", "attention_mask")},
                           num_beams=2, max_new_tokens=12, do_sample=False)
    assert prep.tokenizer.decode(one[0], skip_special_tokens=True).strip() == first[7]
    calls.clear()
    assert seq_kd_targets(teacher, prep, cfg, acc) == first and calls == []  # read back, not generated again
    only = seq_kd_train_set(prep, first, cfg)
    assert len(only) == sum(1 for t in first if t)


@pytest.mark.slow
def test_gate_times_whole_generate_calls_and_skips_onnx_with_a_reason(tmp_path, tiny_t5_dir, pairs):
    run_dir = tmp_path / "run"
    tree = seq2seq_tree(run_dir, tiny_t5_dir, pairs, quantization={"recipes": ["fp32", "dynamic-int8", "onnx-int8"]},
                        target={"min_iters": 5, "min_seconds": 0.2, "repeats": 1, "warmup_iters": 1,
                                "p95_ms": "teacher*0.01"})
    config = write_config(tmp_path / "c.yaml", tree)
    proc = subprocess.run([KDLAB, "gate", "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]  # MISS: 1 % of the teacher's p95 is out of reach
    rows = {r["recipe"]: r for r in __import__("csv").DictReader(open(run_dir / "report" / "gate.csv"))}
    assert rows["onnx-int8"]["status"] == "skipped" and "ONNX export of seq2seq generation" in rows["onnx-int8"]["reason"]
    for name in ("fp32", "dynamic-int8"):
        assert rows[name]["status"] == "ok"
        assert float(rows[name]["p95_ms"]) > 0 and float(rows[name]["tokens_per_s"]) > 0
        assert 0 <= float(rows[name]["quality"]) <= 100
    assert float(rows["dynamic-int8"]["size_mb"]) < float(rows["fp32"]["size_mb"])


def test_generate_never_sees_token_type_ids():
    from kdlab.train.seq2seq import encoder_inputs
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "token_type_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.ones(1, 2, dtype=torch.long)}
    assert set(encoder_inputs(batch, "cpu")) == {"input_ids", "attention_mask"}


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing left


def run_bad(tmp_path, tree) -> subprocess.CompletedProcess:
    config = write_config(tmp_path / "bad.yaml", tree)  # the script itself: `accelerate launch` turns 2 into 1
    return subprocess.run([sys.executable, str(ROOT / "train" / "distill.py"), "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def assert_one_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("kdlab: error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in err[0], err[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["line_counts", "empty_line", "bert_teacher", "no_pad_token"])
def test_bad_seq2seq_input_is_one_line(tmp_path, tiny_t5_dir, tiny_teacher_dir, pairs, case):
    run_dir = tmp_path / "run"
    tree = seq2seq_tree(run_dir, tiny_t5_dir, pairs)
    if case == "line_counts":
        short = tmp_path / "short.en"
        short.write_text("\n".join(Path(pairs["train_target_file"]).read_text().splitlines()[:99]) + "\n")
        tree["data"]["train_target_file"] = str(short)
        fragments = ("data.train_target_file", "has 99 lines", "has 100")
    elif case == "empty_line":
        lines = Path(pairs["train_file"]).read_text().splitlines()
        lines[41] = "  "
        holed = tmp_path / "holed.de"
        holed.write_text("\n".join(lines) + "\n")
        tree["data"]["train_file"] = str(holed)
        fragments = ("data.train_file", "empty text at line 42")
    elif case == "bert_teacher":
        tree["teacher"]["source"] = tiny_teacher_dir
        fragments = ("teacher.source", "encoder only", "teacher.encoder_decoder=true")
    else:
        broken = tmp_path / "no_pad"
        model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
        model.save_pretrained(broken)
        config = json.loads((Path(tiny_t5_dir) / "tokenizer_config.json").read_text())
        for name in Path(tiny_t5_dir).iterdir():
            if name.name.startswith(("tokenizer", "special_tokens")):
                (broken / name.name).write_bytes(name.read_bytes())
        config.pop("pad_token", None)
        (broken / "tokenizer_config.json").write_text(json.dumps(config))
        tree["teacher"]["source"] = str(broken)
        fragments = ("teacher.source", "no pad token")
    proc = run_bad(tmp_path, tree)
    assert_one_line(proc, *fragments)
    assert not run_dir.exists()


@pytest.mark.slow
def test_two_trial_seq2seq_search_leaves_a_pareto_front(tmp_path, tiny_t5_dir, pairs):
    run_dir = tmp_path / "run"
    tree = seq2seq_tree(run_dir, tiny_t5_dir, pairs,
                        target={"min_iters": 5, "min_seconds": 0.2, "repeats": 1, "warmup_iters": 1,
                                "p95_ms": "teacher*2"},
                        search={"n_trials": 2, "train_steps": 3, "seed_trials": 2, "recipes": ["fp32"],
                                "decoder_layers": [1, 2], "encoder_layers": [1, 2],
                                "stop_at": []})  # both students train to the end: the front has both depths
    config = write_config(tmp_path / "c.yaml", tree)
    proc = subprocess.run([KDLAB, "search", "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2+1 layers (encoder+decoder)" in proc.stdout and "2+2 layers (encoder+decoder)" in proc.stdout
    report = run_dir / "report"
    assert (report / "pareto.png").stat().st_size > 0
    rows = list(__import__("csv").DictReader(open(report / "pareto.csv")))
    assert len(rows) == 2 and {r["decoder_layers"] for r in rows} == {"1", "2"}
    assert any(r["is_pareto"] == "True" for r in rows)
    trained = [r for r in rows if r["screened_out"] == "False"]
    assert trained and all(0 <= float(r["quality"]) <= 100 and int(r["steps"]) == 3 for r in trained)
    for r in (r for r in trained if r["is_pareto"] == "True"):  # front members keep their checkpoint
        summary = json.loads((run_dir / "trials" / r["trial"] / "kdlab_trial.json").read_text())
        assert summary["candidate"]["decoder_layers"] == int(r["decoder_layers"])

    # export the front's best: a folder that loads and generates, registered as a pyfunc that returns texts;
    # a held-out test table (source and target columns), named only now, is scored once by the export
    held = [[line for line in (MULTI30K / f"test.{lang}").read_text().splitlines() if line.strip()][-12:]
            for lang in ("de", "en")]
    test_file = tmp_path / "test.tsv"
    test_file.write_text("source\ttarget\n" + "".join(f"{a}\t{b}\n" for a, b in zip(*held)))
    proc = subprocess.run([KDLAB, "export", "--config", str(config), "export.latency_batch_sizes=[1,2]",
                           f"data.test_file={test_file}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = run_dir / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    test = manifest["test"]
    assert (test["rows"], test["metric"]) == (12, "bleu") and "held-out test bleu" in proc.stdout
    from kdlab.distill.export import load_served
    from kdlab.eval.metrics import generation_metrics
    outputs = load_served(export).generate_texts(held[0])  # one batch, as the export's loader makes it
    lower = (lambda t: t.lower()) if manifest["lowercase_scoring"] else (lambda t: t)
    assert test["quality"] == pytest.approx(
        generation_metrics([lower(t) for t in outputs], [lower(t) for t in held[1]])["bleu"])
    assert f"bleu **{test['quality']:.2f}**" in (export / "README.md").read_text()
    with mlflow_store(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        assert mlflow.get_run(manifest["mlflow"]["run_id"]).data.metrics["test_bleu"] == pytest.approx(test["quality"])
    assert manifest["task"]["type"] == "seq2seq" and manifest["served"]["recipe"] == "fp32"
    assert [r["batch_size"] for r in manifest["latency"]] == [1, 2]
    assert manifest["latency"][1]["throughput"] == pytest.approx(2000 / manifest["latency"][1]["mean_ms"])
    assert manifest["parity"]["identical_outputs"] == 1.0  # fp32 served = the fp32 model
    assert "ONNX" in manifest["onnx"] and not list(export.glob("*.onnx"))
    # The card opens with Hugging Face metadata: the served artefact's dev BLEU, the manifest's measured quality.
    card = (export / "README.md").read_text()
    meta = ModelCard(card).data
    assert (meta.pipeline_tag, meta.library_name, meta.tags) == ("text2text-generation", "transformers",
                                                                 ["kdlab", "distillation", "fp32"])
    (result,) = meta.eval_results
    assert (result.metric_type, result.dataset_type, result.dataset_split) == \
        ("bleu", Path(pairs["eval_file"]).parent.name, "dev")
    assert result.metric_value == manifest["measured"]["quality"] == manifest["parity"]["served_quality"]
    # No folder of this machine in the manifest or the card (the pairs, the teacher and the run are in tmp).
    text = json.dumps(manifest) + card
    assert str(tmp_path.parent) not in text and str(ROOT) not in text and str(DATA) not in text
    assert manifest["choice"]["source"] == f"<run>/trials/{manifest['choice']['trial']}"
    model = AutoModelForSeq2SeqLM.from_pretrained(export)
    assert model.config.num_decoder_layers in (1, 2)
    served = load_served(export)
    texts = ["Ein Hund rennt.", "Zwei Männer stehen."]
    assert len(served.generate_texts(texts)) == 2
    with mlflow_store(f"sqlite:///{tmp_path / 'mlflow.db'}"):  # `models:/` resolves through the registry URI
        pyfunc = mlflow.pyfunc.load_model("models:/tiny_s2s@champion")
    assert list(pyfunc.predict(texts)) == served.generate_texts(texts)
    assert not pyfunc.metadata.get_output_schema().has_input_names()  # one unnamed string column: the texts

    # batch prediction of a plain-text file: one {"row", "output"} line per source, the served artefact's text
    sources = tmp_path / "sources.txt"
    sources.write_text("\n".join(texts + ["Eine Frau liest."]) + "\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([KDLAB, "predict", "--model", str(export), "--input", str(sources), "--output", str(out),
                           "--batch-size", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in lines] == [0, 1, 2]
    assert [r["output"] for r in lines[:2]] == served.generate_texts(texts)
