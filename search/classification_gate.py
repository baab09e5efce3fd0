"""The classification task's gate measurement: each recipe's artefact scored by its own dev predictions (accuracy
or F1), then one forward pass per request timed interleaved on the target profile, with its FLOPs against the
machine's matmul peak.

Library module for the classification task (kdlab.tasks.classification measures a gate's recipes, and the
search its fp32 teacher reference, with `measure_classifier`); search/gate.py is the stage that calls it,
search/seq2seq_gate.py the seq2seq counterpart. `dev_quality` is also the search's and the export's score of
a served classifier.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kdlab.distill.adapter import MODEL_INPUTS
from kdlab.distill.config import Config
from kdlab.distill.quantize import Quantized, apply_recipe
from kdlab.eval.latency import count_flops, matmul_peak_gflops
from kdlab.eval.metrics import classification_metrics
from kdlab.search.gate import build_rows
from kdlab.search.targets import GateRow
from kdlab.search.timing import measure_candidates, target_profile, timing_batches
from kdlab.train.data import make_loader

FLOP_SAMPLE_BATCHES = 8  # batches whose FLOPs are counted to estimate the mean per call


def quality_score(labels, preds, metric: str, num_labels: int) -> float:
    """`metric` (accuracy or F1) of the predictions, as `eval.metrics` defines it for every stage."""
    return classification_metrics(labels, preds, num_labels)[metric]


def dev_quality(served: Quantized, batches: list, metric: str, num_labels: int) -> float:
    """The artefact's own quality: its predictions on every dev batch, not the fp32 model's."""
    preds, labels = [], []
    for batch in batches:
        preds.append(served.predict(batch).argmax(-1))
        labels.append(batch["labels"])
    return quality_score(torch.cat(labels).numpy(), torch.cat(preds).numpy(), metric, num_labels)


def mean_flops(teacher, batches: list) -> float:
    """Mean fp32 FLOPs per request over a few evenly spaced timing batches (count_flops)."""
    step = max(1, len(batches) // FLOP_SAMPLE_BATCHES)
    sample = batches[::step][:FLOP_SAMPLE_BATCHES]
    return sum(count_flops(teacher, {k: v for k, v in b.items() if k in MODEL_INPUTS}) for b in sample) / len(sample)


def build_candidates(teacher, recipes: list[str], *, example_batch: dict, quality_batches: list, metric: str,
                     num_labels: int, device: str, threads: int, allow_cpu_bf16: bool, workdir: Path,
                     reference_only: tuple = ()) -> list[tuple[GateRow, Quantized | None]]:
    """A classifier under each recipe, scored by `metric` of its own dev predictions (build_rows)."""
    return build_rows(recipes, lambda name: apply_recipe(name, teacher, example_batch=example_batch, device=device,
                                                         workdir=workdir / name, allow_cpu_half=allow_cpu_bf16,
                                                         threads=threads),
                      lambda served: dev_quality(served, quality_batches, metric, num_labels), reference_only)


def measure_classifier(cfg: Config, model, prep, threads: int, recipes: list[str], workdir: Path,
                       reference_only: tuple = ()) -> tuple[list[GateRow], dict]:
    """`model` (on the CPU, eval mode) under each recipe: dev quality of each artefact, then interleaved timing on
    cfg.target. Returns the rows and the measurement's own conditions. `prep` holds the tokenizer and the dev set."""
    seq_len = cfg.target.seq_len
    quality_batches = list(make_loader(prep.eval_ds, prep.tokenizer, cfg.train.eval_batch_size, shuffle=False))
    batches, lengths = timing_batches(prep.eval_ds, prep.tokenizer, cfg.target.batch_size, seq_len,
                                      vocab_size=model.config.vocab_size, seed=cfg.train.seed)
    candidates = build_candidates(
        model, recipes, example_batch=quality_batches[0], quality_batches=quality_batches,
        metric=cfg.task.metric, num_labels=prep.data.num_labels, device=cfg.target.device, threads=threads,
        allow_cpu_bf16=cfg.quantization.allow_cpu_bf16, workdir=workdir, reference_only=reference_only)
    profile = target_profile(cfg.target, threads, lengths["seq_len_median"])
    peak = matmul_peak_gflops(cfg.target.device, threads)
    flops = mean_flops(model, batches)
    rows = measure_candidates(candidates, batches, profile, flops=flops, peak_gflops=peak)
    # The target profile, metric, machine and versions are added by the stage (timing.complete_conditions).
    conditions = {**lengths, "dev_rows": len(prep.eval_ds), "flops_per_request": flops, "matmul_peak_gflops": peak}
    return rows, conditions
