"""`kdlab predict` (scripts/predict.py): batch inference over an export folder, streamed, resumable.

Run: .venv/bin/python -m pytest -q tests/test_predict.py

A tiny random-init BERT is exported as a real export folder (dynamic-int8, and onnx-int8 for one
test) and run over 300 real SST-2 dev rows; the tests assert on the JSON lines it leaves behind,
against an independent oracle (tests/test_oracles.py: the folder's tokenizer and a raw forward of
its weights, quantized with quantize_dynamic or run by an onnxruntime session on the served .onnx
file, never kdlab's own loading code), and on the one-line errors for bad input.
"""
from __future__ import annotations

import argparse
import csv
import inspect
import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from conftest import SST2, build_export
from test_oracles import RawServed, labels_of, one_thread
from kdlab.distill.config import ConfigError
from kdlab.distill.export import MANIFEST, ExportError, load_served, write_manifest
from kdlab.scripts.cli import add_predict_arguments
from kdlab.scripts.predict import Cursor, PredictInputError, main, partial_path, read_rows, run_predict
from kdlab.search.registry import code_package, pyfunc_arguments

N_ROWS = 300
BATCH = 32


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def export_int8(tmp_path_factory, tokenizer) -> Path:
    return build_export(tmp_path_factory.mktemp("predict") / "export", tokenizer, "dynamic-int8")


@pytest.fixture(scope="session")
def sst2_texts() -> list[str]:
    with open(SST2 / "dev.tsv", newline="", encoding="utf-8") as fh:
        rows = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row["sentence"] for _, row in zip(range(N_ROWS), rows)]


@pytest.fixture(scope="session")
def sst2_tsv(tmp_path_factory) -> Path:
    """The first 300 rows of the real SST-2 dev file, as it is on disk."""
    path = tmp_path_factory.mktemp("sst2") / "dev300.tsv"
    with open(SST2 / "dev.tsv", encoding="utf-8") as fh:
        path.write_text("".join(line for _, line in zip(range(N_ROWS + 1), fh)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def reference(export_int8, sst2_tsv, tmp_path_factory) -> bytes:
    """The output of one uninterrupted run at batch 32."""
    out = tmp_path_factory.mktemp("reference") / "out.jsonl"
    run_predict(export_int8, sst2_tsv, out, batch_size=BATCH, threads=1, progress=False)
    return out.read_bytes()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def probs_tensor(recs: list[dict], labels=("0", "1")) -> torch.Tensor:
    return torch.tensor([[r["probs"][name] for name in labels] for r in recs])


def oracle(export: Path, recipe: str = "dynamic-int8") -> RawServed:
    """The export's served artefact rebuilt from its raw files, with the manifest's max_length."""
    raw = RawServed(export, recipe)
    raw.max_length = json.loads((export / MANIFEST).read_text())["max_length"]
    return raw


def oracle_probs(raw: RawServed, texts: list[str], pairs: list[str] | None = None, batch: int = BATCH):
    """Probabilities over the same batches run_predict forms."""
    return raw.probs(texts, pairs, batch=batch, max_length=raw.max_length)


@pytest.fixture(scope="session")
def raw_int8(export_int8) -> RawServed:
    return oracle(export_int8)


# ---------------------------------------------------------------- what it writes


def test_rows_in_order_with_the_served_artefacts_probabilities(export_int8, sst2_tsv, sst2_texts, raw_int8,
                                                               tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_predict(export_int8, sst2_tsv, out, batch_size=BATCH, threads=1, progress=False)
    recs = records(out)
    assert [r["row"] for r in recs] == list(range(N_ROWS))
    assert summary["rows"] == summary["predicted"] == N_ROWS and summary["resumed_from"] == 0
    assert summary["output"] == str(out) and summary["recipe"] == "dynamic-int8" and summary["rows_per_second"] > 0
    assert not partial_path(out).exists()

    probs = probs_tensor(recs)
    assert {r["label"] for r in recs} <= {"0", "1"}
    assert torch.allclose(probs.sum(-1), torch.ones(N_ROWS), atol=1e-5)
    assert [r["label"] for r in recs] == [("0", "1")[i] for i in probs.argmax(-1).tolist()]
    # Rounded to 6 decimals, they are the int8 model's softmax for the same rows and batches, computed raw.
    expected = oracle_probs(raw_int8, sst2_texts)
    assert torch.allclose(probs, expected, atol=1e-6, rtol=0)
    assert [r["label"] for r in recs] == labels_of(expected, ("0", "1"))


def test_dynamic_int8_export_serves_the_quantized_module_not_fp32(export_int8, sst2_tsv, sst2_texts, raw_int8,
                                                                  tmp_path):
    out = tmp_path / "out.jsonl"
    run_predict(export_int8, sst2_tsv, out, batch_size=BATCH, threads=1, progress=False)
    got = probs_tensor(records(out))[:BATCH]

    served = load_served(export_int8, threads=1)
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in served.artefact.module.modules())
    batch = raw_int8.encode(sst2_texts[:BATCH], max_length=raw_int8.max_length)
    quantized = oracle_probs(raw_int8, sst2_texts[:BATCH])
    with torch.inference_mode():
        fp32 = torch.softmax(raw_int8.fp32(**batch).logits, -1)
    assert torch.allclose(got, quantized, atol=1e-6, rtol=0)
    assert (got - fp32).abs().max() > 1e-5  # int8 weights and activations move the probabilities


@pytest.mark.parametrize("recipe, served_file", [("onnx-int8", "model.int8.onnx"),
                                                  ("onnx-int8-ffn", "model.int8-ffn.onnx")])
def test_onnx_int8_export_serves_the_int8_graph(tmp_path, tokenizer, sst2_texts, recipe, served_file):
    export = build_export(tmp_path / "export", tokenizer, recipe)
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in sst2_texts[:64]), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    summary = run_predict(export, source, out, batch_size=16, threads=1, progress=False)
    assert summary["recipe"] == recipe and summary["rows"] == 64

    served = load_served(export, threads=1)
    assert [f.name for f in served.artefact.files] == [served_file] and served.artefact.module is None
    # An onnxruntime session of its own on the folder's int8 graph gives the same probabilities...
    raw = oracle(export, recipe)
    expected = oracle_probs(raw, sst2_texts[:64], batch=16)
    recs = records(out)
    assert torch.allclose(probs_tensor(recs), expected, atol=1e-6, rtol=0)
    assert [r["label"] for r in recs] == labels_of(expected, ("0", "1"))
    # ...and not those of the fp32 graph beside it (model.onnx): the int8 graph is the one served.
    fp32_graph = oracle_probs(oracle(export, "onnx-fp32"), sst2_texts[:64], batch=16)
    assert (probs_tensor(recs) - fp32_graph).abs().max() > 1e-5


def test_every_input_format_gives_the_same_output(export_int8, sst2_texts, tmp_path):
    texts = sst2_texts[:100]
    (tmp_path / "in.txt").write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "sentence": t}) + "\n"
                                               for i, t in enumerate(texts)), encoding="utf-8")
    with open(tmp_path / "in.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", "sentence"])
        writer.writerows([[0, t] for t in texts])
    outputs = set()
    for name in ("in.txt", "in.jsonl", "in.csv"):
        out = tmp_path / f"{name}.out.jsonl"
        run_predict(export_int8, tmp_path / name, out, batch_size=BATCH, threads=1, progress=False)
        outputs.add(out.read_bytes())
    assert len(outputs) == 1 and len(outputs.pop().splitlines()) == 100


def test_the_mlflow_pyfunc_gives_kdlab_predicts_labels_and_probabilities(export_int8, sst2_tsv, sst2_texts,
                                                                          raw_int8, tmp_path):
    """The pyfunc (distill/mlflow_model.py), logged with the registry's own arguments, next to `kdlab predict`."""
    manifest = json.loads((export_int8 / MANIFEST).read_text())
    mlflow.pyfunc.save_model(tmp_path / "pyfunc", **pyfunc_arguments(export_int8, manifest,
                                                                     code_package(tmp_path / "code")))
    model = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    out = tmp_path / "out.jsonl"
    run_predict(export_int8, sst2_tsv, out, batch_size=64, threads=1, progress=False)  # the pyfunc's batches
    recs = records(out)
    with one_thread():
        got = model.predict(sst2_texts)
    assert list(got.columns) == ["label", "prob_0", "prob_1"] == model.metadata.get_output_schema().input_names()
    assert len(got) == N_ROWS and got["label"].tolist() == [r["label"] for r in recs]
    # kdlab predict writes 6 decimals of the same float32 probabilities the pyfunc returns in full.
    assert [{"0": round(p0, 6), "1": round(p1, 6)} for p0, p1 in zip(got["prob_0"], got["prob_1"])] == \
        [r["probs"] for r in recs]
    expected = oracle_probs(raw_int8, sst2_texts, batch=64)
    assert torch.allclose(torch.tensor(got[["prob_0", "prob_1"]].to_numpy(), dtype=torch.float32), expected,
                          atol=1e-6, rtol=0)
    assert got["label"].tolist() == labels_of(expected, ("0", "1"))
    # A one-column DataFrame (what `mlflow models serve` hands over) gives the same rows (the same first batch).
    with one_thread():
        assert model.predict(pd.DataFrame({"sentence": sst2_texts[:64]})).equals(got.head(64))


def test_pair_columns_come_from_the_manifest(export_int8, sst2_texts, raw_int8, tmp_path):
    export = tmp_path / "pair_export"
    shutil.copytree(export_int8, export)
    manifest = json.loads((export / MANIFEST).read_text())
    manifest.pop("files")
    write_manifest(export, {**manifest, "text_column": "premise", "text_pair_column": "hypothesis"})
    premises, hypotheses = sst2_texts[:40], sst2_texts[40:80]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"premise": p, "hypothesis": h}) + "\n" for p, h in zip(premises, hypotheses)),
                      encoding="utf-8")
    out = tmp_path / "out.jsonl"
    run_predict(export, source, out, batch_size=BATCH, threads=1, progress=False)
    got = probs_tensor(records(out))
    assert torch.allclose(got, oracle_probs(raw_int8, premises, hypotheses), atol=1e-6, rtol=0)
    assert not torch.allclose(got, oracle_probs(raw_int8, premises), atol=1e-4)  # the second text is read

    txt = tmp_path / "one_text.txt"
    txt.write_text("a film\n", encoding="utf-8")
    with pytest.raises(PredictInputError, match="reads text pairs"):
        run_predict(export, txt, tmp_path / "txt.jsonl", progress=False)


# ---------------------------------------------------------------- resuming an interrupted run


def interrupted(out: Path, reference: bytes, k: int) -> None:
    """OUTPUT.partial as a run killed while writing row k leaves it: k complete lines and a torn one."""
    lines = reference.splitlines(keepends=True)
    partial_path(out).write_bytes(b"".join(lines[:k]) + lines[k][: len(lines[k]) // 2])


def test_resume_at_a_batch_boundary_gives_the_uninterrupted_output(export_int8, sst2_tsv, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    interrupted(out, reference, 2 * BATCH)
    summary = run_predict(export_int8, sst2_tsv, out, batch_size=BATCH, threads=1, progress=False)
    assert summary["resumed_from"] == 2 * BATCH and summary["predicted"] == N_ROWS - 2 * BATCH
    assert out.read_bytes() == reference and not partial_path(out).exists()


def test_resume_mid_batch_writes_every_row_once_and_realigns_batches(export_int8, sst2_tsv, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    k = 50
    interrupted(out, reference, k)
    summary = run_predict(export_int8, sst2_tsv, out, batch_size=BATCH, threads=1, progress=False)
    assert summary["resumed_from"] == k and summary["rows"] == N_ROWS
    got, want = records(out), [json.loads(line) for line in reference.splitlines()]
    assert [r["row"] for r in got] == list(range(N_ROWS))
    # From the next batch boundary on, batches hold the same rows as in the uninterrupted run; the
    # shortened batch before it may differ in the last decimals (per-batch int8 activation scales).
    assert got[:k] == want[:k] and got[2 * BATCH:] == want[2 * BATCH:]
    assert torch.allclose(probs_tensor(got[k:2 * BATCH]), probs_tensor(want[k:2 * BATCH]), atol=1e-3)


def test_no_resume_starts_over(export_int8, sst2_tsv, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    partial_path(out).write_text("not json\n")
    run_predict(export_int8, sst2_tsv, out, batch_size=BATCH, resume=False, threads=1, progress=False)
    assert out.read_bytes() == reference and not partial_path(out).exists()


@pytest.mark.parametrize("content, message", [
    (b"not json\n", "not an interrupted run"),
    (b'{"row": 7, "label": "0", "probs": {"0": 0.5, "1": 0.5}}\n', "not an interrupted run"),
])
def test_a_foreign_partial_is_refused_and_kept(export_int8, sst2_tsv, tmp_path, content, message):
    out = tmp_path / "out.jsonl"
    partial_path(out).write_bytes(content)
    with pytest.raises(PredictInputError, match=message):
        run_predict(export_int8, sst2_tsv, out, batch_size=BATCH, threads=1, progress=False)
    assert partial_path(out).read_bytes() == content and not out.exists()


def test_a_partial_longer_than_the_input_is_refused(export_int8, sst2_tsv, reference, tmp_path):
    short = tmp_path / "short.tsv"
    short.write_text("".join(sst2_tsv.read_text(encoding="utf-8").splitlines(keepends=True)[:11]), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    partial_path(out).write_bytes(reference)
    with pytest.raises(PredictInputError, match=f"holds {N_ROWS} rows but .*short.tsv has only 10"):
        run_predict(export_int8, short, out, threads=1, progress=False)
    assert partial_path(out).read_bytes() == reference


# ---------------------------------------------------------------- reading: streamed, one-line errors


def test_the_reader_streams_one_line_at_a_time(tmp_path):
    assert inspect.isgeneratorfunction(read_rows)
    path = tmp_path / "big.tsv"
    path.write_bytes(b"sentence\tlabel\n" + b"a fine film\t1\n" * 5000 + b"caf\xe9\t1\n")
    cursor = Cursor()
    rows = read_rows(path, "sentence", cursor=cursor)
    assert next(rows) == ("a fine film", None)
    assert cursor.line == 2  # the header and one row read; the bad byte at the end not reached
    with pytest.raises(PredictInputError, match="line 5002"):
        list(rows)


BAD_INPUTS = [
    ("missing column", "in.tsv", b"text\tlabel\nfine\t1\n", ["in.tsv", "line 1", "no column 'sentence'",
                                                                "columns: text, label"]),
    ("empty file", "in.tsv", b"", ["in.tsv", "empty file", "valid: .tsv"]),
    ("header only", "in.csv", b"sentence,label\n", ["in.csv", "no rows after the header"]),
    ("not UTF-8", "in.tsv", b"sentence\tlabel\ngood\t1\ncaf\xe9\t1\n", ["in.tsv", "line 3", "0xe9", "not UTF-8",
                                                                        "valid: UTF-8"]),
    ("unknown extension", "in.xlsx", b"sentence\n", ["in.xlsx", "unknown input format '.xlsx'", ".jsonl", ".txt"]),
    ("field count", "in.csv", b"sentence,label\ngood, fun,1\n", ["in.csv", "line 2", "3 fields", "header has 2"]),
    ("bad JSON", "in.jsonl", b'{"sentence": "ok"}\n{"sentence": \n', ["in.jsonl", "line 2", "not valid JSON"]),
    ("missing key", "in.jsonl", b'{"sentence": "ok"}\n{"text": "no"}\n', ["line 2", "no key 'sentence'",
                                                                           "keys: text"]),
    ("JSON array", "in.json", b'[{"sentence": "ok"}]\n', ["in.json", "line 1", "JSON array"]),
    ("not found", "missing.tsv", None, ["missing.tsv", "not found"]),
]


@pytest.mark.parametrize("name, filename, content, expected", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_and_leaves_no_output(export_int8, tmp_path, name, filename, content, expected):
    source = tmp_path / filename
    if content is not None:
        source.write_bytes(content)
    out = tmp_path / "out.jsonl"
    with pytest.raises(PredictInputError) as err:
        run_predict(export_int8, source, out, batch_size=4, threads=1, progress=False)
    message = str(err.value)
    assert "\n" not in message and all(part in message for part in expected), message
    assert isinstance(err.value, ConfigError)  # what `kdlab` turns into "kdlab: error: ..." and exit 2
    assert not out.exists() and not partial_path(out).exists()


def test_bad_bytes_after_written_batches_leave_no_partial(export_int8, tmp_path):
    source = tmp_path / "in.tsv"
    source.write_bytes(b"sentence\tlabel\n" + b"a fine film\t1\n" * 40 + b"caf\xe9\t1\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(PredictInputError, match="line 42"):
        run_predict(export_int8, source, out, batch_size=4, threads=1, progress=False)
    assert not out.exists() and not partial_path(out).exists()


def test_a_tampered_export_is_refused(export_int8, sst2_tsv, tmp_path):
    export = tmp_path / "tampered"
    shutil.copytree(export_int8, export)
    weights = export / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="model.safetensors does not match its sha256"):
        load_served(export)
    out = tmp_path / "out.jsonl"
    with pytest.raises(ExportError, match="sha256"):
        run_predict(export, sst2_tsv, out, progress=False)
    with pytest.raises(ConfigError, match="sha256"):  # `kdlab predict` reports it in one line, exit 2
        main(parse("--model", str(export), "--input", str(sst2_tsv), "--output", str(out), "--no-progress"))
    assert not out.exists() and not partial_path(out).exists()


# ---------------------------------------------------------------- the command-line pair


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kdlab predict")
    add_predict_arguments(parser)
    return parser.parse_args(list(argv))


def test_main_prints_the_summary_line(export_int8, sst2_tsv, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = parse("--model", str(export_int8), "--input", str(sst2_tsv), "--output", str(out), "--batch-size", "50",
                 "--threads", "1", "--no-progress")
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"predict: {N_ROWS} rows in ") and "rows/s" in line and "dynamic-int8" in line
    assert line.endswith(f"-> {out}") and len(records(out)) == N_ROWS


def test_main_lets_bad_input_reach_the_cli_as_config_error(export_int8, tmp_path):
    source = tmp_path / "in.tsv"
    source.write_text("text\nfine\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no column 'sentence'"):
        main(parse("--model", str(export_int8), "--input", str(source), "--output", str(tmp_path / "o.jsonl"),
                   "--text-column", "sentence", "--no-progress"))
    assert main(parse("--model", str(export_int8), "--input", str(source), "--output", str(tmp_path / "o.jsonl"),
                      "--text-column", "text", "--threads", "1", "--no-progress")) == 0


def test_on_error_skip_keeps_every_row_in_place(export_int8, sst2_texts, raw_int8, tmp_path):
    """Malformed rows become {"row": i, "error": "...line N..."}; every other row is predicted as usual."""
    texts = sst2_texts[:6]
    raw = ("sentence\tlabel\n".encode() + f"{texts[0]}\t1\n".encode() + b"one field only\n"
           + f"{texts[1]}\t0\n".encode() + b"caf\xe9 au lait\t1\n" + f"{texts[2]}\t1\n".encode())
    path = tmp_path / "mixed.tsv"
    path.write_bytes(raw)
    out = tmp_path / "out.jsonl"
    with pytest.raises(PredictInputError, match="line 3: 1 fields where the header has 2"):
        run_predict(export_int8, path, out, batch_size=4, threads=1, progress=False)  # default: stop
    summary = run_predict(export_int8, path, out, batch_size=4, threads=1, progress=False, on_error="skip")
    recs = records(out)
    assert [r["row"] for r in recs] == [0, 1, 2, 3, 4] and summary["skipped"] == 2
    assert "line 3: 1 fields" in recs[1]["error"] and "line 5: byte 0xe9" in recs[3]["error"]
    good = [recs[0], recs[2], recs[4]]
    # Batches of 4 input rows: the good rows of the first (texts 0 and 1) are predicted together,
    # then text 2 alone (dynamic int8 scales activations per batch).
    first, second = oracle_probs(raw_int8, [texts[0], texts[1]]), oracle_probs(raw_int8, [texts[2]])
    assert [r["label"] for r in good] == labels_of(first, ("0", "1")) + labels_of(second, ("0", "1"))
    assert torch.allclose(probs_tensor(good), torch.cat([first, second]), atol=1e-5)

    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text(json.dumps({"sentence": texts[0]}) + "\n{not json\n" + json.dumps({"text": "x"}) + "\n")
    run_predict(export_int8, jsonl, out, threads=1, progress=False, on_error="skip", resume=False)
    recs = records(out)
    assert "label" in recs[0] and "line 2: not valid JSON" in recs[1]["error"] and "no key 'sentence'" in recs[2]["error"]
