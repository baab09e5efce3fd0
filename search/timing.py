"""Timing served candidates on the target profile: request batches, interleaved measurement, the profile.

Library module for the gates, the study, the capacity plan and the exports; nothing to launch. Latency
is of the model call on already-tokenized batches (tokenization is not timed). With `target.seq_len:
data` the batches are real dev rows, `batch_size` at a time, padded per batch, cycled through while
timing; with a fixed length they are random token ids of that length.
"""
from __future__ import annotations

import itertools
import statistics
import sys

import torch
from transformers import DataCollatorWithPadding

from kdlab.distill.adapter import MODEL_INPUTS
from kdlab.distill.config import ConfigError, TargetConfig
from kdlab.distill.quantize import Quantized
from kdlab.eval.latency import TargetProfile, clamp_threads, machine_info, matmul_peak_gflops, measure, versions
from kdlab.search.targets import GateRow

MAX_TIMING_BATCHES = 512  # enough distinct real batches to cycle through; holding more costs memory only


def timing_batches(eval_ds, tokenizer, batch_size: int, seq_len, *, vocab_size: int, seed: int = 0):
    """Request batches for timing and their lengths: (batches, {'seq_len_median', 'padded_len_median'}).

    'data': shuffled real dev rows, `batch_size` per batch, padded to the batch's longest row.
    An int: one batch of random token ids of exactly that length.
    """
    columns = [c for c in MODEL_INPUTS if c in eval_ds.column_names]
    g = torch.Generator().manual_seed(seed)
    if seq_len != "data":
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "token_type_ids" in columns:
            batch["token_type_ids"] = torch.zeros_like(ids)
        return [batch], {"seq_len_median": seq_len, "padded_len_median": seq_len}
    rows = eval_ds.select_columns(columns)[:]
    lengths = [len(ids) for ids in rows["input_ids"]]
    order = torch.randperm(len(lengths), generator=g).tolist()
    n_batches = min(max(1, len(order) // batch_size), MAX_TIMING_BATCHES)
    while len(order) < n_batches * batch_size:  # a dev set smaller than one request batch
        order = order + order
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    batches = [collate([{c: rows[c][i] for c in columns} for i in order[k * batch_size:(k + 1) * batch_size]])
               for k in range(n_batches)]
    return batches, {"seq_len_median": statistics.median(lengths),
                     "padded_len_median": statistics.median(b["input_ids"].shape[1] for b in batches)}


def cycling(served: Quantized, batches: list):
    """A call for the profiler: each call predicts the next of `batches`, round and round."""
    it = itertools.cycle(batches)
    return lambda: served.predict(next(it))


def measure_candidates(candidates: list, batches: list, profile: TargetProfile, flops: float | None = None,
                       peak_gflops: float | None = None, budget_ms: float | None = None) -> list[GateRow]:
    """Time every built candidate interleaved under `profile`; fills the latency fields of their rows.

    `budget_ms`: the p95 each is judged against; a candidate whose p95 interval straddles it is timed for more
    rounds (eval/latency.py measure) and its row's verdict says meets, misses or uncertain."""
    live = {row.recipe: (row, served) for row, served in candidates if served is not None}
    if live:
        reports = measure({name: cycling(served, batches) for name, (_, served) in live.items()}, profile,
                          budgets=dict.fromkeys(live, budget_ms) if budget_ms is not None else None)
        for name, (row, _) in live.items():
            r = reports[name]
            row.p50_ms, row.p95_ms, row.p99_ms, row.mean_ms = r.p50_ms, r.p95_ms, r.p99_ms, r.mean_ms
            row.cv, row.stable, row.throughput = r.cv, r.stable, r.throughput
            row.p95_low_ms, row.p95_high_ms, row.rounds, row.verdict = r.p95_low_ms, r.p95_high_ms, r.rounds, r.verdict
            if flops and peak_gflops:
                # FLOPs are the fp32 model's; int8 kernels do the same multiply-adds, so > 100 % is possible.
                row.peak_pct = 100.0 * flops / (r.mean_ms / 1e3) / (peak_gflops * 1e9)
    return [row for row, _ in candidates]


def target_profile(target: TargetConfig, threads: int, seq_len_median) -> TargetProfile:
    return TargetProfile(device=target.device, threads=threads, batch_size=target.batch_size,
                         seq_len=max(1, int(round(seq_len_median))), warmup_iters=target.warmup_iters,
                         min_iters=target.min_iters, min_seconds=target.min_seconds, repeats=target.repeats,
                         p95_tolerance=target.p95_tolerance, max_rounds=target.max_rounds)


def check_device(target: TargetConfig) -> None:
    if target.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("target.device: 'cuda' but this machine has no CUDA device "
                          "(torch.cuda.is_available() is False); valid here: cpu")


def target_threads(target: TargetConfig) -> int:
    """target.threads clamped to this machine's CPUs (a warning on stderr when it had to be)."""
    threads, warning = clamp_threads(target.threads)
    if warning:
        print(f"kdlab: warning: target.threads: {warning}", file=sys.stderr)
    return threads


def check_seq_len(target: TargetConfig, model_config, whose: str) -> None:
    """A fixed target.seq_len must fit the model's position embeddings (`whose`: "the teacher's", ...)."""
    seq_len = target.seq_len
    max_positions = getattr(model_config, "max_position_embeddings", None)
    if seq_len != "data" and max_positions and seq_len > max_positions:
        raise ConfigError(f"target.seq_len: {seq_len} exceeds {whose} max_position_embeddings "
                          f"{max_positions}; valid: 1..{max_positions} or 'data'")


def measurement_conditions(cfg, threads: int) -> dict:
    """What every measured row shares whatever the task: the target profile, the dev metric, the machine's
    matmul peak and the versions (gate reports, gate.json)."""
    t = cfg.target
    return {"device": t.device, "threads": threads, "threads_requested": t.threads, "batch_size": t.batch_size,
            "seq_len": t.seq_len, "warmup_iters": t.warmup_iters, "min_iters": t.min_iters,
            "min_seconds": t.min_seconds, "repeats": t.repeats, "p95_tolerance": t.p95_tolerance,
            "max_rounds": t.max_rounds, "metric": cfg.task.metric, "teacher": cfg.teacher.source,
            "matmul_peak_gflops": matmul_peak_gflops(t.device, threads), "machine": machine_info(),
            "versions": versions()}


def complete_conditions(conditions: dict, cfg, threads: int) -> dict:
    """A task's measurement conditions with what it left out of `measurement_conditions` added (its own kept)."""
    if all(k in conditions for k in ("device", "threads", "threads_requested", "batch_size", "seq_len", "warmup_iters",
                                     "min_iters", "min_seconds", "repeats", "p95_tolerance", "max_rounds", "metric",
                                     "teacher", "matmul_peak_gflops", "machine", "versions")):
        return conditions
    common = measurement_conditions(cfg, threads)
    return {**conditions, **{k: v for k, v in common.items() if k not in conditions}}
