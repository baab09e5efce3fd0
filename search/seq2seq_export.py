"""`kdlab export` for seq2seq: the chosen student (or teacher recipe) as a folder that generates as measured.

Library module for search/export.py (`run_export` dispatches here when task.type=seq2seq). The
choice, the staging folder moved into place only when complete, the manifest with every file's
sha256, and the MLflow registration are the classification export's. What differs:
- the folder is `AutoModelForSeq2SeqLM`-loadable (safetensors, config, generation config, tokenizer);
  the manifest adds the decoding settings and the source prefix; no ONNX graph (SEQ2SEQ_ONNX_REASON);
- parity: the served artefact, reloaded from the folder, generates the whole dev set next to the fp32
  model; identical outputs and both qualities are recorded, and a served quality more than
  `export.max_quality_drop` points below the fp32 model's refuses the export;
- the card's latency table is whole `generate` calls at each `export.latency_batch_sizes`, with tokens/s.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch

from kdlab.distill.config import Config, ConfigError, save_config
from kdlab.distill.export import (ExportError, load_served, move_into_place, seq2seq_served_entry, write_manifest,
                            write_model)
from kdlab.distill.quantize import SEQ2SEQ_ONNX_REASON
from kdlab.eval.latency import clamp_threads, machine_info, versions
from kdlab.eval.paths import portable_path, portable_text
from kdlab.search.card import card_metadata, dataset_name, hub_id
from kdlab.search.registry import register_export
from kdlab.search.seq2seq_gate import generation_batches
from kdlab.search.targets import GateRow
from kdlab.search.timing import measure_candidates, target_profile
from kdlab.train.model_dir import check_model_dir, prepare_model
from kdlab.train.seq2seq import generate_texts, generation_kwargs, load_seq2seq, prepare, score
from kdlab.train.seq2seq_data import make_seq2seq_loader


def register(cfg: Config, dest: Path, manifest: dict, card) -> dict:
    """Register the finished export in MLflow (when asked) and rewrite its card and manifest to say so."""
    if cfg.export.register and cfg.tracking.enabled:
        manifest["mlflow"] = register_export(cfg, dest, manifest)
        (dest / "README.md").write_text(card(manifest))
        manifest = write_manifest(dest, manifest)
    return manifest


def run_seq2seq_export(cfg: Config, choice, dest: Path, console=None) -> dict:
    if choice.recipe.startswith("onnx"):
        raise ConfigError(f"export: {choice.label} is served as {choice.recipe}, which seq2seq cannot export: "
                          f"{SEQ2SEQ_ONNX_REASON}")
    say = console.print if console is not None else print
    say(f"export: {choice.label}, recipe {choice.recipe} -> {dest}")
    threads, _ = clamp_threads(cfg.target.threads)
    torch.set_num_threads(threads)
    # What search/export.py's export_data does for seq2seq (export.py imports this module, not the other way):
    # the dev set without an Accelerator; a model folder (--model DIR) brings its own tokenizer.
    prep = prepare_model(cfg, check_model_dir(cfg, choice.source)) if choice.kind == "model" else prepare(cfg)
    gen = generation_kwargs(cfg)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = load_seq2seq(str(choice.source), cfg, prep.tokenizer).eval()
        write_model(model, prep.tokenizer, staging)
        save_config(cfg, staging / "training_config.yaml")
        manifest = {
            "format": "kdlab-export/1", "name": cfg.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "task": {"type": "seq2seq", "metric": cfg.task.metric}, "labels": [],
            "max_length": cfg.data.max_length, "source_prefix": cfg.data.source_prefix, "generation": gen,
            "text_column": cfg.data.source_column, "text_pair_column": None,
            "lowercase_scoring": prep.lowercase, "example_input": prep.data.eval[0]["source"],
            "served": seq2seq_served_entry(choice.recipe, cfg.target.device),
            # Paths as kdlab.eval.paths writes them: relative to the repository, <data>/..., <run>/...
            "teacher": {"source": portable_path(cfg.teacher.source), "hub_id": hub_id(cfg.teacher.source)},
            "onnx": f"not exported: {SEQ2SEQ_ONNX_REASON}",
            "data": {**{k: getattr(cfg.data, k) for k in ("dataset", "dataset_config", "eval_split",
                                                          "max_train_samples")},
                     **{k: portable_path(getattr(cfg.data, k)) for k in ("train_file", "train_target_file",
                                                                         "eval_file", "eval_target_file")},
                     "name": dataset_name(cfg.data.dataset, cfg.data.eval_file)},
            "choice": {"kind": choice.kind, "label": portable_text(choice.label, run=cfg.run_dir),
                       "recipe": choice.recipe, "trial": choice.trial,
                       "study": cfg.search.study_name or cfg.name,
                       "source": portable_path(choice.source, run=cfg.run_dir),
                       "mlflow_run_id": choice.mlflow_run_id, "search_figures": choice.figures},
            "versions": versions(), "machine": machine_info(),
        }
        write_manifest(staging, manifest)
        served = load_served(staging, threads=threads)  # the folder exactly as a user loads it
        loader = make_seq2seq_loader(prep.eval_ds, prep.tokenizer, cfg.train.eval_batch_size, shuffle=False)
        references = list(prep.data.eval["target"])
        served_texts, _ = generate_texts(served.artefact.module, loader, prep.tokenizer, gen)
        fp32_texts, _ = generate_texts(model, loader, prep.tokenizer, gen)
        metric = cfg.task.metric
        agreement = {"rows": len(references),
                     "identical_outputs": sum(a == b for a, b in zip(served_texts, fp32_texts)) / len(references),
                     "served_quality": score(served_texts, references, prep.lowercase)[metric],
                     "reference_quality": score(fp32_texts, references, prep.lowercase)[metric],
                     "served_vs_fp32_bleu": score(served_texts, fp32_texts, prep.lowercase)["bleu"],
                     "bound": cfg.export.max_quality_drop}
        drop = agreement["reference_quality"] - agreement["served_quality"]
        if drop > cfg.export.max_quality_drop:
            raise ExportError(f"parity: the {choice.recipe} artefact scores {agreement['served_quality']:.2f} {metric} "
                              f"on the dev set, {drop:.2f} below the fp32 model's {agreement['reference_quality']:.2f}, "
                              f"more than export.max_quality_drop {cfg.export.max_quality_drop:g}; nothing exported")
        say(f"export: parity on {len(references)} dev rows: {agreement['identical_outputs']:.1%} identical outputs, "
            f"{metric} {agreement['served_quality']:.2f} vs fp32 {agreement['reference_quality']:.2f}; measuring "
            f"generation latency at batch {', '.join(map(str, cfg.export.latency_batch_sizes))}")
        latency = []
        for bs in cfg.export.latency_batch_sizes:
            batches, lengths = generation_batches(prep, bs, seed=cfg.train.seed)
            artefact = served.artefact  # what a user loads from the folder, built once
            profile = dataclasses.replace(target_profile(cfg.target, threads, lengths["seq_len_median"]), batch_size=bs)
            row = measure_candidates([(GateRow(choice.recipe), artefact)], batches, profile)[0]
            tokens = sum(int((artefact.predict(b)[:, 1:] != prep.tokenizer.pad_token_id).sum()) for b in batches[:8])
            per_call = tokens / min(8, len(batches))
            latency.append({"batch_size": bs, "p50_ms": row.p50_ms, "p95_ms": row.p95_ms, "p99_ms": row.p99_ms,
                            "mean_ms": row.mean_ms,
                            "throughput": row.throughput, "tokens_per_s": per_call / (row.p50_ms / 1e3), "cv": row.cv,
                            "stable": row.stable, "source_len_median": lengths["seq_len_median"]})
        manifest.update(parity=agreement, latency=latency,
                        measured={"quality": agreement["served_quality"], "size_mb": served.artefact.size_mb,
                                  "params": sum(p.numel() for p in model.parameters())},
                        conditions={"device": cfg.target.device, "threads": threads, "cpu": machine_info()["cpu"],
                                    "torch": versions()["torch"]})
        (staging / "README.md").write_text(seq2seq_card(manifest))
        manifest = write_manifest(staging, manifest)
        move_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return register(cfg, dest, manifest, seq2seq_card)


def seq2seq_card(m: dict) -> str:
    """README.md of a seq2seq export, from its manifest, opening with its Hugging Face metadata (search/card.py)."""
    c, p, metric = m["choice"], m["parity"], m["task"]["metric"]
    g, cond = m["generation"], m["conditions"]
    lines = [card_metadata(m, "text2text-generation"), f"# {m['name']}: {c['label']} ({c['recipe']})", "",
             f"Seq2seq model exported by kdlab from {c['kind']} `{c['source']}` (teacher `{m['teacher']['source']}`).", "",
             "## Measured", "",
             f"- Dev {metric} of the served artefact: {p['served_quality']:.2f} (fp32 weights: "
             f"{p['reference_quality']:.2f}; {p['identical_outputs']:.1%} of {p['rows']} outputs identical)",
             f"- Size of the served artefact: {m['measured']['size_mb']:.1f} MB; parameters: {m['measured']['params']:,}",
             f"- Decoding: {g['num_beams']} beam(s), at most {g['max_new_tokens']} new tokens"
             + ("; scored lower-cased" if m.get("lowercase_scoring") else ""), "",
             f"Latency of a whole `generate` call on {cond['device']}, {cond['threads']} thread(s), real dev sources "
             f"({cond['cpu']}, torch {cond['torch']}):", "",
             "| batch | p50 ms | p95 ms | requests/s | tokens/s |", "|---|---|---|---|---|"]
    for r in m["latency"]:
        lines.append(f"| {r['batch_size']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['throughput']:.1f} | "
                     f"{r['tokens_per_s']:.0f} |")
    lines += ["", "## Loading", "", "```python", "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
              "model = AutoModelForSeq2SeqLM.from_pretrained(\"<this folder>\")  # fp32",
              "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")", "",
              "from kdlab.distill.export import load_served  # the served artefact, as measured",
              f"load_served(\"<this folder>\").generate_texts([{m['example_input']!r}])", "```", "",
              f"Serving recipe `{c['recipe']}`: {m['served']['how']}. ONNX: {m['onnx']}."]
    if m.get("mlflow"):
        ml = m["mlflow"]
        lines += ["", f"MLflow: `mlflow.pyfunc.load_model(\"models:/{ml['model_name']}@{ml['alias']}\")` "
                      f"(version {ml['version']}) returns generated texts."]
    lines += ["", "The resolved config is `training_config.yaml`; `manifest.json` lists every file with its sha256.", ""]
    return "\n".join(lines)


def seq2seq_summary_line(manifest: dict, dest: Path) -> str:
    p, lat, reg = manifest["parity"], manifest["latency"][0], manifest.get("mlflow")
    return (f"exported {manifest['choice']['label']} ({manifest['served']['recipe']}) to {dest}: "
            f"{manifest['task']['metric']} {p['served_quality']:.2f}, p95 {lat['p95_ms']:.1f} ms per generate at batch "
            f"{lat['batch_size']}, {manifest['measured']['size_mb']:.1f} MB, {p['identical_outputs']:.1%} outputs as fp32"
            + (f"; registered models:/{reg['model_name']}@{reg['alias']} (version {reg['version']})" if reg else ""))
