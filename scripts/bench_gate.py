"""Benchmark: the gate on the fine-tuned MiniLM-L6 teacher and the real SST-2 dev set.

    make bench-gate                       # or: .venv/bin/python scripts/bench_gate.py
    .venv/bin/python scripts/bench_gate.py --quick   # < 1 min smoke: un-fine-tuned MiniLM, 64 dev rows,
                                                     # 2 recipes, written to a temp folder; not for claims

1. The gate table (every recipe of the ladder: quality of the artefact on all 872 dev rows,
   p50/p95/p99, cv, throughput, size, whether it meets configs/sst2_minilm.yaml's targets) for
   batch 1 and batch 32, sequence lengths from the dev data, at 1 and 2 threads.
2. Profiler vs `torch.utils.benchmark.Timer`: the median of each recipe on one fixed real batch
   (batch 1, first thread count) by both; they should agree within 10 %.
3. Repeatability: the cv of the median over 5 fresh profiles of the same model and batches.

Needs runs/sst2_minilm/teacher/ fine-tuned for the config (train/distill.py or `kdlab gate` makes it;
`--allow-train` lets this script do so). Writes benchmarks/results/gate_sst2.json and the section
between `<!-- gate:start -->` and `<!-- gate:end -->` of benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402

from kdlab.scripts.bench_readme import publish  # noqa: E402
from kdlab.distill.config import ConfigError, load_config  # noqa: E402
from kdlab.eval.latency import clamp_threads, coefficient_of_variation, matmul_peak_gflops, measure_one  # noqa: E402
from kdlab.search.classification_gate import build_candidates, mean_flops  # noqa: E402
from kdlab.search.targets import check_row, resolve_targets  # noqa: E402
from kdlab.search.timing import measure_candidates, target_profile, timing_batches  # noqa: E402
from kdlab.eval.latency import machine_info, versions  # noqa: E402
from kdlab.train.data import make_loader  # noqa: E402
from kdlab.train.pipeline import prepare  # noqa: E402
from kdlab.train.teacher import ensure_teacher, require_fine_tuned  # noqa: E402

AGREEMENT_TOLERANCE = 0.10
ROW_KEYS = ("recipe", "threads", "batch_size", "quality", "p50_ms", "p95_ms", "p99_ms", "cv", "stable", "size_mb",
            "throughput", "peak_pct", "status", "reason", "meets_targets", "misses", "seq_len_median",
            "padded_len_median")
QUICK = ["teacher.fine_tune=never", "data.max_train_samples=64", "data.max_eval_samples=64",
         "quantization.recipes=[fp32,dynamic-int8]", "target.warmup_iters=2", "target.min_iters=10",
         "target.min_seconds=0.3", "target.repeats=2"]


def timer_median_ms(fn, threads: int, min_run_time: float) -> float:
    """Median per-call time by torch.utils.benchmark (blocked_autorange: blocks of calls, median of block means)."""
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time).median * 1e3


def gate_rows(cfg, teacher, candidates, threads: int, batch_size: int, prep, peak_gflops: float) -> list[dict]:
    """One gate table: every candidate timed interleaved at (threads, batch_size), judged on the targets."""
    batches, lengths = timing_batches(prep.eval_ds, prep.tokenizer, batch_size, "data",
                                      vocab_size=teacher.config.vocab_size, seed=cfg.train.seed)
    profile = target_profile(dataclasses.replace(cfg.target, batch_size=batch_size), threads,
                             lengths["seq_len_median"])
    fresh = [(dataclasses.replace(row, misses=[]), served) for row, served in candidates]
    rows = measure_candidates(fresh, batches, profile, flops=mean_flops(teacher, batches), peak_gflops=peak_gflops)
    reference = next((r for r in rows if r.recipe == "fp32"), None)
    targets = resolve_targets(cfg.target, reference)
    out = []
    for row in rows:
        meets, misses = None, []
        if row.status == "ok" and targets.is_set():
            misses = check_row(row, targets)
            meets = not misses
        record = {**dataclasses.asdict(row), "threads": threads, "batch_size": batch_size, **lengths,
                  "meets_targets": meets, "misses": misses}
        out.append({k: record.get(k) for k in ROW_KEYS})
    return out


def agreement_and_repeatability(cfg, teacher, candidates, threads: int, prep, repeats: int, min_seconds: float):
    """Profiler p50 vs Timer median on one fixed batch; cv of the p50 over `repeats` fresh profiles."""
    batches, lengths = timing_batches(prep.eval_ds, prep.tokenizer, 1, "data",
                                      vocab_size=teacher.config.vocab_size, seed=cfg.train.seed)
    fixed = batches[len(batches) // 2]
    profile = target_profile(dataclasses.replace(cfg.target, batch_size=1, min_seconds=min_seconds), threads,
                             fixed["input_ids"].shape[1])
    agreement, repeatability = [], []
    for row, served in candidates:
        if served is None:
            continue
        call = lambda: served.predict(fixed)  # noqa: E731
        ours = measure_one(call, profile).p50_ms
        theirs = timer_median_ms(call, threads, min_seconds)
        rel = abs(ours - theirs) / theirs
        agreement.append({"recipe": row.recipe, "threads": threads, "batch_size": 1,
                          "seq_len": int(fixed["input_ids"].shape[1]), "profiler_p50_ms": ours,
                          "timer_median_ms": theirs, "rel_diff": rel, "agree": rel <= AGREEMENT_TOLERANCE})
        medians = [measure_one(call, profile).p50_ms for _ in range(repeats)]
        repeatability.append({"recipe": row.recipe, "threads": threads, "batch_size": 1, "medians_ms": medians,
                              "cv_of_median": coefficient_of_variation(medians)})
    return agreement, repeatability


def _f(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def markdown(result: dict) -> str:
    c = result["conditions"]
    trained = "not fine-tuned (random head)" if result["quick"] else "fine-tuned on SST-2"
    lines = [f"Teacher `{c['teacher']}` {trained} (dev {c['metric']} {c['teacher_dev']:.4f}), "
             f"{c['dev_rows']} real dev rows; sequence lengths from the data (padded per batch); "
             f"{c['warmup_iters']} warm-up calls, >= {c['min_iters']} calls and >= {c['min_seconds']:g} s per recipe "
             f"in {c['repeats']} interleaved rounds. {result['machine']['cpu']}, {result['machine']['cpus']} CPUs; "
             f"torch {result['versions']['torch']}, onnxruntime {result['versions']['onnxruntime']}. "
             f"Targets: {c['targets']}. Regenerate: `make bench-gate`."
             + (" **Quick smoke run: not for claims.**" if result["quick"] else ""), "",
             "| threads | batch | recipe | quality | p50 ms | p95 ms | cv | samples/s | size MB | % peak | meets targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            verdict = f"skipped: {r['reason']}".replace("|", "\\|")
        else:
            verdict = ("—" if r["meets_targets"] is None else "yes" if r["meets_targets"]
                       else "no: " + ", ".join(r["misses"])) + ("" if r["stable"] else " (unstable)")
        lines.append(f"| {r['threads']} | {r['batch_size']} | {r['recipe']} | {_f(r['quality'], '{:.4f}')} | "
                     f"{_f(r['p50_ms'], '{:.2f}')} | {_f(r['p95_ms'], '{:.2f}')} | {_f(r['cv'], '{:.3f}')} | "
                     f"{_f(r['throughput'], '{:.1f}')} | {_f(r['size_mb'], '{:.1f}')} | "
                     f"{_f(r['peak_pct'], '{:.1f}')} | {verdict} |")
    lines += ["", "Profiler vs `torch.utils.benchmark.Timer` (same fixed batch) and repeatability "
              f"(cv of the median over {result['repeat_profiles']} fresh profiles):", "",
              "| recipe | threads | profiler p50 ms | Timer median ms | diff | within 10 % | cv of median |",
              "|---|---|---|---|---|---|---|"]
    cvs = {(r["recipe"], r["threads"]): r["cv_of_median"] for r in result["repeatability"]}
    for a in result["agreement"]:
        lines.append(f"| {a['recipe']} | {a['threads']} | {a['profiler_p50_ms']:.3f} | {a['timer_median_ms']:.3f} | "
                     f"{a['rel_diff']:+.1%} | {'yes' if a['agree'] else 'no'} | "
                     f"{cvs[(a['recipe'], a['threads'])]:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sst2_minilm.yaml")
    parser.add_argument("--quick", action="store_true", help="< 1 min smoke: un-fine-tuned teacher, 64 rows, 2 recipes")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="default 1 2 (quick: 1)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 32 (quick: 1 8)")
    parser.add_argument("--repeat-profiles", type=int, default=None, help="default 5 (quick: 2)")
    parser.add_argument("--allow-train", action="store_true", help="fine-tune the teacher if it is not there yet")
    parser.add_argument("--out", default=None, help="default benchmarks/results/gate_sst2.json (quick: a temp folder)")
    parser.add_argument("--readme", default=None, help="default benchmarks/README.md (quick: a temp folder)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    transformers.logging.set_verbosity_error()
    quick_dir = Path(tempfile.mkdtemp(prefix="kdlab-bench-gate-")) if args.quick else None
    overrides = [*QUICK, f"output_dir={quick_dir}"] if args.quick else []
    try:
        cfg = load_config(args.config, [*overrides, "tracking.enabled=false", *args.overrides])
        accelerator = Accelerator(cpu=True)
        set_seed(cfg.train.seed)
        prep = prepare(cfg, accelerator)
        if not (args.quick or args.allow_train):
            require_fine_tuned(cfg, prep.data, args.config)
        teacher, teacher_dev = ensure_teacher(cfg, accelerator, prep.data, prep.tokenizer, prep.train_ds, prep.eval_ds)
    except ConfigError as exc:
        print(f"bench_gate: error: {exc}", file=sys.stderr)
        return 2
    teacher = teacher.to("cpu").eval()
    thread_list = args.threads or ([1] if args.quick else [1, 2])
    batch_list = args.batch_sizes or ([1, 8] if args.quick else [1, 32])
    repeat_profiles = args.repeat_profiles or (2 if args.quick else 5)
    quality_batches = list(make_loader(prep.eval_ds, prep.tokenizer, cfg.train.eval_batch_size, shuffle=False))

    started = time.time()
    rows, agreement, repeatability, peaks = [], [], [], {}
    for requested in thread_list:
        threads, warning = clamp_threads(requested)
        if warning:
            print(f"bench_gate: warning: {warning}", file=sys.stderr)
        peaks[threads] = matmul_peak_gflops("cpu", threads)
        # ONNX Runtime fixes its thread pool when the session is made, so each thread count builds anew.
        candidates = build_candidates(
            teacher, list(cfg.quantization.recipes), example_batch=quality_batches[0], quality_batches=quality_batches,
            metric=cfg.task.metric, num_labels=prep.data.num_labels, device="cpu", threads=threads,
            allow_cpu_bf16=cfg.quantization.allow_cpu_bf16, workdir=cfg.run_dir / "bench_gate" / f"threads{threads}")
        for batch_size in batch_list:
            print(f"bench_gate: threads {threads}, batch {batch_size}", file=sys.stderr, flush=True)
            rows += gate_rows(cfg, teacher, candidates, threads, batch_size, prep, peaks[threads])
        if requested == thread_list[0]:
            a, r = agreement_and_repeatability(cfg, teacher, candidates, threads, prep, repeat_profiles,
                                               cfg.target.min_seconds)
            agreement, repeatability = agreement + a, repeatability + r
        del candidates

    targets = ", ".join(f"{k} {getattr(cfg.target, k)}" for k in ("p95_ms", "min_quality", "max_size_mb")
                        if getattr(cfg.target, k) is not None) or "none set"
    result = {
        "benchmark": "gate_sst2", "quick": args.quick, "config": args.config,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.time() - started, 1),
        "machine": {**machine_info(), "matmul_peak_gflops": {str(t): g for t, g in peaks.items()}},
        "versions": versions(),
        "conditions": {"teacher": cfg.teacher.source, "metric": cfg.task.metric,
                       "teacher_dev": teacher_dev[cfg.task.metric], "dev_rows": len(prep.eval_ds),
                       "seq_len": "data", "warmup_iters": cfg.target.warmup_iters, "min_iters": cfg.target.min_iters,
                       "min_seconds": cfg.target.min_seconds, "repeats": cfg.target.repeats,
                       "p95_tolerance": cfg.target.p95_tolerance, "targets": targets},
        "repeat_profiles": repeat_profiles, "rows": rows, "agreement": agreement, "repeatability": repeatability,
    }
    # A smoke run must not overwrite the real results: by default it writes next to its scratch run.
    out = Path(args.out or (quick_dir / "gate_sst2.json" if args.quick else "benchmarks/results/gate_sst2.json"))
    readme = Path(args.readme or (quick_dir / "README.md" if args.quick else "benchmarks/README.md"))
    publish(result, markdown(result), marker="gate", heading="The gate on SST-2 (`make bench-gate`)", out=out,
            readme=readme, script="bench_gate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
