"""The gate: can the teacher itself, under some quantization recipe, meet the target?

    kdlab gate --config configs/sst2_minilm.yaml
    kdlab gate --config configs/sst2_minilm.yaml target.p95_ms=teacher*0.25 target.min_quality=teacher*0.97

Takes the task-ready teacher (fine-tuned once, reused from runs/<name>/teacher/), builds every
recipe of `quantization.recipes` in ladder order (cheapest change first), scores each artefact
itself on the full dev set, times them interleaved on the target profile, and checks the targets.
Writes runs/<name>/report/gate.csv and gate.md and one MLflow run per recipe under a parent `gate`
run. Exit code 0 (PASS: a recipe meets every target), 3 (MISS: distillation needed), 2 (config error).

Latency is of the model call on already-tokenized batches (tokenization is not timed). With
`target.seq_len: data` the batches are real dev rows, `batch_size` at a time, padded per batch,
cycled through while timing; with a fixed length they are random token ids of that length.
"""
from __future__ import annotations

import itertools
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import DataCollatorWithPadding

from kdlab.distill.config import Config, ConfigError, TargetConfig, parse_budget
from kdlab.distill.quantize import Quantized, RecipeUnavailable, apply_recipe
from kdlab.eval.metrics import classification_metrics
from kdlab.eval.latency import (TargetProfile, clamp_threads, count_flops, machine_info, matmul_peak_gflops, measure,
                          versions)
from kdlab.train.data import make_loader

EXIT_PASS, EXIT_MISS = 0, 3
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_TIMING_BATCHES = 512  # enough distinct real batches to cycle through; holding more costs memory only
FLOP_SAMPLE_BATCHES = 8  # batches whose FLOPs are counted to estimate the mean per call


@dataclass
class Targets:
    """Targets resolved to absolute numbers; `spec` keeps what the config said (e.g. 'teacher*0.25')."""
    p95_ms: float | None = None
    min_quality: float | None = None
    max_size_mb: float | None = None
    spec: dict = field(default_factory=dict)

    def is_set(self) -> bool:
        return any(v is not None for v in (self.p95_ms, self.min_quality, self.max_size_mb))


@dataclass
class GateRow:
    """One recipe on the target: what it scored, how fast and big it is, and whether it fits."""
    recipe: str
    status: str = "ok"  # ok | skipped
    reason: str = ""
    candidate: bool = True  # False: fp32 measured only as the reference of relative targets
    quality: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    cv: float | None = None
    stable: bool | None = None
    throughput: float | None = None
    tokens_per_s: float | None = None  # seq2seq: generated tokens per second at p50
    size_mb: float | None = None
    peak_pct: float | None = None
    meets: bool = False
    misses: list = field(default_factory=list)


@dataclass
class GateResult:
    rows: list
    targets: Targets
    conditions: dict
    passed: GateRow | None
    gaps: dict
    message: str
    report_dir: Path | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_PASS if self.passed is not None else EXIT_MISS


# ---------------------------------------------------------------- targets and verdict (pure)


def resolve_targets(target: TargetConfig, reference: GateRow | None) -> Targets:
    """Absolute targets; `teacher*f` is f times the fp32 teacher (`reference`) measured in this run."""
    out = Targets()
    for key, ref_attr in (("p95_ms", "p95_ms"), ("min_quality", "quality"), ("max_size_mb", "size_mb")):
        parsed = parse_budget(getattr(target, key), key)
        if parsed is None:
            continue
        kind, number = parsed
        out.spec[key] = str(getattr(target, key))
        if kind == "abs":
            setattr(out, key, number)
            continue
        base = getattr(reference, ref_attr) if reference is not None and reference.status == "ok" else None
        if base is None:
            why = f" ({reference.reason})" if reference is not None and reference.reason else ""
            raise ConfigError(f"target.{key}: {getattr(target, key)!r} is relative to the fp32 teacher, which was "
                              f"not measured on this target{why}; give an absolute value")
        setattr(out, key, number * base)
    return out


def is_relative(target: TargetConfig) -> bool:
    """Whether any target is given as `teacher*f` (so the fp32 teacher must be measured)."""
    return any((parse_budget(getattr(target, k), k) or ("abs",))[0] == "teacher"
               for k in ("p95_ms", "min_quality", "max_size_mb"))


def check_row(row: GateRow, targets: Targets) -> list[str]:
    """Names of the targets a measured row misses (empty: it meets every target that is set)."""
    misses = []
    if targets.p95_ms is not None and row.p95_ms > targets.p95_ms:
        misses.append("p95")
    if targets.min_quality is not None and row.quality < targets.min_quality:
        misses.append("quality")
    if targets.max_size_mb is not None and row.size_mb > targets.max_size_mb:
        misses.append("size")
    return misses


def target_gaps(rows: list[GateRow], targets: Targets) -> dict:
    """Per target: the best any candidate reached, which one, the limit, and the gap (> 0: missed by).

    gap = best p95 - budget; floor - best quality; best size - max size.
    """
    ok = [r for r in rows if r.status == "ok" and r.candidate]
    gaps = {}
    if not ok:
        return gaps
    for key, attr, pick, sign in (("p95_ms", "p95_ms", min, 1), ("min_quality", "quality", max, -1),
                                  ("max_size_mb", "size_mb", min, 1)):
        limit = getattr(targets, key)
        if limit is None:
            continue
        best = pick(ok, key=lambda r: getattr(r, attr))
        value = getattr(best, attr)
        gaps[key] = {"best": value, "recipe": best.recipe, "limit": limit, "gap": sign * (value - limit)}
    return gaps


_LABELS = {"p95_ms": ("p95", "≤", "budget", "{:.2f} ms"), "min_quality": ("quality", "≥", "floor", "{:.4f}"),
           "max_size_mb": ("size", "≤", "max", "{:.1f} MB")}
_ROW_ATTR = {"p95_ms": "p95_ms", "min_quality": "quality", "max_size_mb": "size_mb"}


def verdict(rows: list[GateRow], targets: Targets, config_path: str | None) -> tuple[GateRow | None, str]:
    """The first candidate in ladder order that meets every target, and the one-line PASS/MISS message."""
    config = config_path or "<config>"
    passed = next((r for r in rows if r.status == "ok" and r.candidate and r.meets), None)
    if passed is not None:
        parts = []
        for key, (name, op, _, fmt) in _LABELS.items():
            limit = getattr(targets, key)
            if limit is not None:
                parts.append(f"{name} {op} {fmt.format(limit)} ({fmt.format(getattr(passed, _ROW_ATTR[key]))})")
        what = " and ".join(parts) if parts else "every target (none set in target.p95_ms/min_quality/max_size_mb)"
        unstable = "" if passed.stable else f" [latency unstable: cv {passed.cv:.2f}; re-run on a quieter machine]"
        return passed, (f"PASS: {passed.recipe} meets {what}{unstable}; "
                        f"export it with: kdlab export --config {config} --recipe {passed.recipe}")
    ok = [r for r in rows if r.status == "ok" and r.candidate]
    if not ok:
        reasons = "; ".join(f"{r.recipe}: {r.reason}" for r in rows if r.candidate)
        return None, f"MISS: no recipe ran on the target ({reasons}): distillation needed"
    parts = []
    for key, gap in target_gaps(rows, targets).items():
        name, _, limit_word, fmt = _LABELS[key]
        state = f"missed by {fmt.format(gap['gap'])}" if gap["gap"] > 0 else "met"
        parts.append(f"best {name} {fmt.format(gap['best'])} ({gap['recipe']}) vs {limit_word} "
                     f"{fmt.format(gap['limit'])}: {state}")
    if all(g["gap"] <= 0 for g in target_gaps(rows, targets).values()):
        parts.append("no single recipe meets every target at once")
    return None, f"MISS: {'; '.join(parts)}: distillation needed (kdlab search --config {config})"


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


def _cycling(served: Quantized, batches: list):
    it = itertools.cycle(batches)
    return lambda: served.predict(next(it))


def mean_flops(teacher, batches: list) -> float:
    """Mean fp32 FLOPs per request over a few evenly spaced timing batches (count_flops)."""
    step = max(1, len(batches) // FLOP_SAMPLE_BATCHES)
    sample = batches[::step][:FLOP_SAMPLE_BATCHES]
    return sum(count_flops(teacher, {k: v for k, v in b.items() if k in MODEL_INPUTS}) for b in sample) / len(sample)


# ---------------------------------------------------------------- building and measuring


def build_candidates(teacher, recipes: list[str], *, example_batch: dict, quality_batches: list, metric: str,
                     num_labels: int, device: str, threads: int, allow_cpu_bf16: bool, workdir: Path,
                     reference_only: tuple = ()) -> list[tuple[GateRow, Quantized | None]]:
    """Apply each recipe and score its artefact on the dev set; one that cannot run is a skipped row."""
    out = []
    for name in recipes:
        row = GateRow(name, candidate=name not in reference_only)
        try:
            served = apply_recipe(name, teacher, example_batch=example_batch, device=device,
                                  workdir=workdir / name, allow_cpu_half=allow_cpu_bf16, threads=threads)
            row.size_mb = served.size_mb
            row.quality = dev_quality(served, quality_batches, metric, num_labels)
        except RecipeUnavailable as exc:
            row.status, row.reason, served = "skipped", str(exc), None
        except Exception as exc:  # a kernel that rejects a dev-set shape: skip the recipe, say why
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            row.status, row.reason, served = "skipped", f"failed on the dev set: {type(exc).__name__}: {first}", None
        out.append((row, served))
    return out


def measure_candidates(candidates: list, batches: list, profile: TargetProfile, flops: float | None = None,
                       peak_gflops: float | None = None) -> list[GateRow]:
    """Time every built candidate interleaved under `profile`; fills the latency fields of their rows."""
    live = {row.recipe: (row, served) for row, served in candidates if served is not None}
    if live:
        reports = measure({name: _cycling(served, batches) for name, (_, served) in live.items()}, profile)
        for name, (row, _) in live.items():
            r = reports[name]
            row.p50_ms, row.p95_ms, row.p99_ms, row.mean_ms = r.p50_ms, r.p95_ms, r.p99_ms, r.mean_ms
            row.cv, row.stable, row.throughput = r.cv, r.stable, r.throughput
            if flops and peak_gflops:
                # FLOPs are the fp32 model's; int8 kernels do the same multiply-adds, so > 100 % is possible.
                row.peak_pct = 100.0 * flops / (r.mean_ms / 1e3) / (peak_gflops * 1e9)
    return [row for row, _ in candidates]


def target_profile(target: TargetConfig, threads: int, seq_len_median) -> TargetProfile:
    return TargetProfile(device=target.device, threads=threads, batch_size=target.batch_size,
                         seq_len=max(1, int(round(seq_len_median))), warmup_iters=target.warmup_iters,
                         min_iters=target.min_iters, min_seconds=target.min_seconds, repeats=target.repeats,
                         max_cv=target.max_cv)


def check_device(target: TargetConfig) -> None:
    if target.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("target.device: 'cuda' but this machine has no CUDA device "
                          "(torch.cuda.is_available() is False); valid here: cpu")


# ---------------------------------------------------------------- the stage


def run_gate(cfg: Config, accelerator, console=None) -> GateResult:
    """Measure the teacher under every recipe on cfg.target; write the report and MLflow runs."""
    if cfg.task.type == "seq2seq":
        from kdlab.search.seq2seq_gate import run_seq2seq_gate
        return run_seq2seq_gate(cfg, accelerator, console)
    from kdlab.train.pipeline import prepare
    from kdlab.train.teacher import ensure_teacher, load_teacher_config

    check_device(cfg.target)
    set_seed(cfg.train.seed)  # a head the teacher lacks is initialised at random: make it the same each run
    threads, warning = clamp_threads(cfg.target.threads)
    if warning:
        print(f"kdlab: warning: target.threads: {warning}", file=sys.stderr)
    seq_len = cfg.target.seq_len
    max_positions = getattr(load_teacher_config(cfg), "max_position_embeddings", None)
    if seq_len != "data" and max_positions and seq_len > max_positions:
        raise ConfigError(f"target.seq_len: {seq_len} exceeds the teacher's max_position_embeddings "
                          f"{max_positions}; valid: 1..{max_positions} or 'data'")
    prep = prepare(cfg, accelerator)
    teacher, teacher_dev = ensure_teacher(cfg, accelerator, prep.data, prep.tokenizer, prep.train_ds, prep.eval_ds)
    teacher = teacher.to("cpu").eval()

    quality_batches = list(make_loader(prep.eval_ds, prep.tokenizer, cfg.train.eval_batch_size, shuffle=False))
    batches, lengths = timing_batches(prep.eval_ds, prep.tokenizer, cfg.target.batch_size, seq_len,
                                      vocab_size=teacher.config.vocab_size, seed=cfg.train.seed)
    recipes = list(cfg.quantization.recipes)
    reference_only = ()
    if is_relative(cfg.target) and "fp32" not in recipes:
        recipes, reference_only = ["fp32", *recipes], ("fp32",)
    candidates = build_candidates(
        teacher, recipes, example_batch=quality_batches[0], quality_batches=quality_batches,
        metric=cfg.task.metric, num_labels=prep.data.num_labels, device=cfg.target.device, threads=threads,
        allow_cpu_bf16=cfg.quantization.allow_cpu_bf16, workdir=cfg.run_dir / "gate", reference_only=reference_only)
    profile = target_profile(cfg.target, threads, lengths["seq_len_median"])
    peak = matmul_peak_gflops(cfg.target.device, threads)
    flops = mean_flops(teacher, batches)
    rows = measure_candidates(candidates, batches, profile, flops=flops, peak_gflops=peak)

    targets, passed, message = judge(rows, cfg)
    conditions = {
        "device": cfg.target.device, "threads": threads, "threads_requested": cfg.target.threads,
        "batch_size": cfg.target.batch_size, "seq_len": seq_len, **lengths,
        "warmup_iters": cfg.target.warmup_iters, "min_iters": cfg.target.min_iters,
        "min_seconds": cfg.target.min_seconds, "repeats": cfg.target.repeats, "max_cv": cfg.target.max_cv,
        "metric": cfg.task.metric, "dev_rows": len(prep.eval_ds), "teacher": cfg.teacher.source,
        "teacher_dev": teacher_dev, "flops_per_request": flops, "matmul_peak_gflops": peak,
        "machine": machine_info(), "versions": versions(),
    }
    return publish(cfg, GateResult(rows, targets, conditions, passed, target_gaps(rows, targets), message),
                   accelerator, console)


def judge(rows: list[GateRow], cfg: Config) -> tuple[Targets, GateRow | None, str]:
    """Targets resolved against the measured fp32 row, each row checked, and the verdict."""
    reference = next((r for r in rows if r.recipe == "fp32"), None)
    targets = resolve_targets(cfg.target, reference)
    for row in rows:
        if row.status == "ok":
            row.misses = check_row(row, targets)
            row.meets = not row.misses
    passed, message = verdict(rows, targets, cfg.config_path)
    return targets, passed, message


def publish(cfg: Config, result: GateResult, accelerator, console=None) -> GateResult:
    """gate.csv / gate.md, the table on the console and the MLflow runs (main process only)."""
    from kdlab.search.gate_report import log_gate, print_table, write_reports
    if accelerator.is_main_process:
        result.report_dir = write_reports(cfg, result)
        print_table(result, console)
        log_gate(cfg, result)
    return result
