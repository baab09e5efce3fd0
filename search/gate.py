"""The gate: can the teacher itself, under some quantization recipe, meet the target?

    kdlab gate --config configs/sst2_minilm.yaml
    kdlab gate --config configs/sst2_minilm.yaml target.p95_ms=teacher*0.25 target.min_quality=teacher*0.97

Takes the task-ready teacher (fine-tuned once, reused from runs/<name>/teacher/), builds every
recipe of `quantization.recipes` in ladder order (cheapest change first), scores each artefact
itself on the full dev set, times them interleaved on the target profile, and checks the targets.
Writes runs/<name>/report/gate.csv and gate.md and one MLflow run per recipe under a parent `gate`
run. Exit code 0 (PASS: a recipe meets every target), 3 (MISS: distillation needed), 2 (config error).

This module is the stage, which calls the task (kdlab.distill.task) for data, teacher and measurement,
and the classification teacher's measurement (search/seq2seq_gate.py is the seq2seq one). What every
gate shares sits below both: search/targets.py (rows, targets, the verdict), search/timing.py (request
batches, interleaved timing, the measurement conditions) and search/gate_report.py (the table, gate.csv /
gate.md, MLflow runs).
"""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import set_seed

from kdlab.distill.adapter import MODEL_INPUTS
from kdlab.distill.config import Config
from kdlab.distill.quantize import Quantized, RecipeUnavailable, apply_recipe
from kdlab.distill.task import task_of
from kdlab.eval.latency import count_flops, matmul_peak_gflops
from kdlab.eval.metrics import classification_metrics
from kdlab.search.gate_report import publish
from kdlab.search.targets import GateResult, GateRow, judge, ladder, target_gaps
from kdlab.search.timing import (check_device, complete_conditions, measure_candidates, target_profile, target_threads,
                                 timing_batches)
from kdlab.train.data import make_loader

FLOP_SAMPLE_BATCHES = 8  # batches whose FLOPs are counted to estimate the mean per call


# ---------------------------------------------------------------- inputs


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


# ---------------------------------------------------------------- building and measuring


def build_rows(recipes: list[str], serve, score, reference_only: tuple = ()) -> list[tuple[GateRow, object | None]]:
    """Each recipe's served artefact (`serve(recipe)`) scored on the dev set (`score(served)`), one row each: the
    gate's loop for every task; a recipe that cannot run, or fails on the dev set, is a skipped row saying why."""
    out = []
    for name in recipes:
        row = GateRow(name, candidate=name not in reference_only)
        try:
            served = serve(name)
            row.size_mb = served.size_mb
            row.quality = score(served)
        except RecipeUnavailable as exc:
            row.status, row.reason, served = "skipped", str(exc), None
        except Exception as exc:  # a kernel that rejects a dev-set shape: skip the recipe, say why
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            row.status, row.reason, served = "skipped", f"failed on the dev set: {type(exc).__name__}: {first}", None
        out.append((row, served))
    return out


def build_candidates(teacher, recipes: list[str], *, example_batch: dict, quality_batches: list, metric: str,
                     num_labels: int, device: str, threads: int, allow_cpu_bf16: bool, workdir: Path,
                     reference_only: tuple = ()) -> list[tuple[GateRow, Quantized | None]]:
    """A classifier under each recipe, scored by `metric` of its own dev predictions (build_rows)."""
    return build_rows(recipes, lambda name: apply_recipe(name, teacher, example_batch=example_batch, device=device,
                                                         workdir=workdir / name, allow_cpu_half=allow_cpu_bf16,
                                                         threads=threads),
                      lambda served: dev_quality(served, quality_batches, metric, num_labels), reference_only)


# ---------------------------------------------------------------- the stage


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


def run_gate(cfg: Config, accelerator=None, console=None) -> GateResult:
    """Measure the teacher under every recipe on cfg.target; write the report and MLflow runs.

    The task (kdlab.distill.task) reads the data, makes the teacher task-ready and measures each recipe's
    artefact; the ladder, the verdict and the report are the stage's. Measuring needs no Accelerator: with
    `accelerator` None one is built (train/accel.py) only when the teacher must be fine-tuned first.
    """
    task = task_of(cfg)
    check_device(cfg.target)
    set_seed(cfg.train.seed)  # a head the teacher lacks is initialised at random: make it the same each run
    threads = target_threads(cfg.target)
    task.check_teacher_fits(cfg)
    prep = task.prepare(cfg, accelerator)
    teacher, teacher_dev = task.ensure_teacher(cfg, accelerator, prep)
    teacher = teacher.to("cpu").eval()

    recipes, reference_only = ladder(cfg)
    rows, conditions = task.measure(cfg, teacher, prep, threads, recipes, cfg.run_dir / "gate",
                                    reference_only=reference_only)
    conditions = complete_conditions(conditions, cfg, threads)
    conditions["teacher_dev"] = teacher_dev
    targets, passed, message = judge(rows, cfg)
    return publish(cfg, GateResult(rows, targets, conditions, passed, target_gaps(rows, targets), message),
                   accelerator, console)
