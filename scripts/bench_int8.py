"""Benchmark: how often does an int8 artefact change a trained model's labels? Per-tensor against per-channel scales.

    make bench-int8                    # every bench-kd student and teacher found under runs/
    .venv/bin/python scripts/bench_int8.py --models runs/x/student runs/y/teacher
    .venv/bin/python scripts/bench_int8.py --quick      # one tiny model: checks the paths, not for claims

`export.min_label_agreement` (0.99) refuses an export whose served artefact agrees with its own fp32 weights
on fewer dev labels, and the search counts such a trial infeasible. In the SST-2 searches every student that
reached the quality floor as int8 agreed on 98.05-98.17 % of dev labels, so int8 precision, not latency, bounded
the search. This benchmark measures each form of each trained model on the whole SST-2 dev set (872 rows, each
model's own tokenizer): label agreement with its fp32 weights, dev accuracy, size, and p50/p95 at batch 1,
1 thread, real dev lengths, all forms of one model timed interleaved in one run.

Forms: fp32; dynamic-int8 and onnx-int8 as kdlab built them before RECIPE_REVISION 2 (`per-tensor`: one weight
scale per tensor; onnx-int8 also quantized the embedding tables); onnx-int8 per channel with int8 embedding tables
(`int8-embeddings`); and the recipes as they are now (per-channel weights, onnx-int8's embeddings in fp32).

Writes benchmarks/results/int8_agreement.json and its section in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,  # noqa: E402
                          BertForSequenceClassification)

from kdlab.distill.config import load_config  # noqa: E402
from kdlab.distill.export import parity  # noqa: E402
from kdlab.distill.quantize import (Quantized, apply_recipe, dynamic_int8_module, onnx_int8_file,  # noqa: E402
                                    serve_onnx, torch_served)
from kdlab.eval.latency import TargetProfile, machine_info, measure, versions  # noqa: E402
from kdlab.scripts.bench_readme import publish  # noqa: E402
from kdlab.search.timing import cycling, timing_batches  # noqa: E402
from kdlab.train.data import load_task_data, make_loader, tokenize  # noqa: E402
from kdlab.train.teacher import resolve_source  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "int8_agreement.json"
CONFIG = ROOT / "configs" / "sst2_mpnet.yaml"  # its data section: SST-2 dev, max_length 64
BATCH = 128  # rows per agreement batch
FORMS = ("fp32", "dynamic-int8 per-tensor", "dynamic-int8", "onnx-int8 per-tensor", "onnx-int8 int8-embeddings",
         "onnx-int8")


def default_models() -> list[Path]:
    """bench-kd's trained students and fine-tuned teachers, where they exist."""
    found = sorted((ROOT / "runs" / "bench_kd" / "runs").glob("*/student")) + sorted((ROOT / "runs").glob("kd_*/teacher"))
    return [p for p in found if (p / "model.safetensors").is_file()]


def tiny_model(folder: Path) -> Path:
    """--quick: a 2-layer BERT on MiniLM-L6's tokenizer, untrained (its labels are noise: paths only)."""
    tok = AutoTokenizer.from_pretrained(resolve_source("minilm-l6"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=128))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def forms_of(model, example: dict, work: Path) -> dict[str, Quantized]:
    served = {"fp32": apply_recipe("fp32", model, example_batch=example, threads=1)}
    served["dynamic-int8 per-tensor"] = torch_served("dynamic-int8 per-tensor",
                                                     dynamic_int8_module(model, per_channel=False), "cpu")
    served["dynamic-int8"] = apply_recipe("dynamic-int8", model, example_batch=example, threads=1)
    served["onnx-int8"] = apply_recipe("onnx-int8", model, example_batch=example, threads=1, workdir=work)
    for name, kwargs in (("onnx-int8 per-tensor", {"per_channel": False, "op_types": None}),
                         ("onnx-int8 int8-embeddings", {"op_types": None})):
        path = work / f"{name.replace(' ', '_')}.onnx"
        onnx_int8_file(work / "model.onnx", path, **kwargs)
        served[name] = serve_onnx(name, path, threads=1)
    return served


def measure_model(folder: Path, cfg) -> list[dict]:
    model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    data = load_task_data(cfg.data, 42)
    ds = tokenize(data.eval, tok, cfg.data, data.label_names)
    batches = list(make_loader(ds, tok, BATCH, shuffle=False))
    with torch.inference_mode():  # tracing for ONNX export runs fine under it; the forms are read-only
        served = forms_of(model, batches[0], Path(tempfile.mkdtemp(prefix="kdlab-int8-")))
        timing, lengths = timing_batches(ds, tok, 1, "data", vocab_size=len(tok), seed=0)
        profile = TargetProfile(device="cpu", threads=1, batch_size=1, seq_len=int(lengths["seq_len_median"]),
                                warmup_iters=10, min_iters=50, min_seconds=2.0, repeats=5)
        reports = measure({name: cycling(q, timing) for name, q in served.items()}, profile)
        rows = []
        for name, q in served.items():
            agreement = parity(q, served["fp32"], batches)
            correct = sum(int((q.predict(b).argmax(-1) == b["labels"]).sum()) for b in batches)
            rows.append({"model": folder.parent.name + "/" + folder.name, "layers": model.config.num_hidden_layers,
                         "hidden": model.config.hidden_size, "form": name,
                         "label_agreement": round(agreement["label_agreement"], 4),
                         "flipped_rows": agreement["rows"] - round(agreement["label_agreement"] * agreement["rows"]),
                         "dev_accuracy": round(correct / len(ds), 4), "size_mb": round(q.size_mb, 1),
                         "p50_ms": round(reports[name].p50_ms, 3), "p95_ms": round(reports[name].p95_ms, 3)})
    return rows


def markdown(result: dict) -> str:
    lines = [f"Conditions: {result['conditions']['summary']}.", "",
             "| model | form | label agreement | flipped rows | dev accuracy | size MB | p50 ms | p95 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} ({r['layers']} x {r['hidden']}) | {r['form']} | {r['label_agreement']:.2%} | "
                     f"{r['flipped_rows']} | {r['dev_accuracy']:.4f} | {r['size_mb']} | "
                     f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} |")
    lines += ["", "Median over the models, per form: " + "; ".join(
        f"{form} {s['median_agreement']:.2%} agreement, p95 {s['median_p95_ratio']:.2f}x fp32"
        for form, s in result["summary"].items()) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=Path, default=None,
                        help="trained sequence-classifier folders (default: bench-kd's students and teachers)")
    parser.add_argument("--quick", action="store_true", help="one tiny untrained model: paths only, not for claims")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    started = time.perf_counter()
    os.chdir(ROOT)  # the config's data paths are relative to the repository
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    models = [tiny_model(Path(tempfile.mkdtemp(prefix="kdlab-int8-tiny-")))] if args.quick else (
        args.models or default_models())
    if not models:
        sys.exit("bench_int8: no trained models given and none under runs/ (run make bench-kd first, or pass --models)")
    cfg = load_config(CONFIG, ["data.max_eval_samples=64"] if args.quick else [])
    rows = []
    for folder in models:
        print(f"== {folder}", flush=True)
        rows += measure_model(Path(folder), cfg)
        for r in rows[-len(FORMS):]:
            print(f"   {r['form']:<26} agreement {r['label_agreement']:.2%}  accuracy {r['dev_accuracy']:.4f}  "
                  f"p95 {r['p95_ms']:.2f} ms", flush=True)
    fp32 = {r["model"]: r["p95_ms"] for r in rows if r["form"] == "fp32"}
    summary = {form: {"median_agreement": round(statistics.median(r["label_agreement"] for r in rows
                                                                  if r["form"] == form), 4),
                      "min_agreement": min(r["label_agreement"] for r in rows if r["form"] == form),
                      "median_p95_ratio": round(statistics.median(r["p95_ms"] / fp32[r["model"]] for r in rows
                                                                  if r["form"] == form), 3)}
               for form in FORMS}
    result = {"machine": machine_info(), "versions": versions(),
              "conditions": {"data": "SST-2 dev (872 rows)", "batch_size": 1, "threads": 1,
                             "seq_len": "real dev rows, each model's tokenizer", "agreement_batch": BATCH,
                             "quick": args.quick,
                             "summary": "SST-2 dev (872 rows) through each model's own tokenizer; agreement with the "
                                        "model's fp32 labels; latency at batch 1, 1 thread, real dev lengths, the "
                                        "forms of one model interleaved"},
              "rows": rows, "summary": summary, "seconds": round(time.perf_counter() - started, 1)}
    # --quick checks the paths: its JSON goes where --out says, never into the README's published section.
    readme = Path(tempfile.mkdtemp(prefix="kdlab-int8-readme-")) / "README.md" if args.quick else (
        ROOT / "benchmarks" / "README.md")
    publish(result, markdown(result), marker="int8", heading="int8 label agreement (SST-2, `make bench-int8`)",
            out=args.out, readme=readme, script="scripts/bench_int8.py", repo=ROOT)


if __name__ == "__main__":
    main()
