"""Benchmark: kdlab's CUDA paths on a GPU machine, measured with the real entry points.

    python scripts/bench_gpu.py --teacher DIR --train-file F --eval-file F --out DIR

Needs a CUDA device, the fine-tuned SST-2 teacher (runs/sst2_minilm/teacher/, or a copy) and the
SST-2 files. MLflow and Optuna are not needed: tracking is switched off (tracking.enabled=false).

1. Distillation: student (a) of configs/sst2_minilm.yaml (3 x 384 from teacher layers, logit + hidden KD),
   one epoch of 25,000 rows through `accelerate launch train/distill.py`, once with bf16 autocast
   (configs/accelerate/gpu_1.yaml) and once in fp32, same seed, rows and steps: dev accuracy and
   training throughput of each.
2. The gate on target.device=cuda (CUDA-event timing): fp32, fp16, bf16, bitsandbytes int8 and nf4, at
   batch 1 with real dev lengths and at batch 32 with sequence length 128.

Writes OUT/gpu_<device>.json with the machine, versions and every figure, and the gate tables
(OUT/gate_b1.csv, OUT/gate_b32.csv). `scripts/gpu_prepare.sh` packs what a bare GPU machine lacks.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdlab.eval.latency import machine_info, versions  # noqa: E402
from kdlab.scripts.bench_readme import write_readme_section, write_result  # noqa: E402

CONFIG = "configs/sst2_minilm.yaml"
GPU_RECIPES = "[fp32,fp16,bf16,bnb-int8,bnb-nf4]"  # the config refuses CPU-only recipes on cuda


def fp32_copy(src: Path, dst: Path) -> str:
    """The teacher with float32 weights (a copy carried as fp16 to fit a transfer limit is upcast)."""
    weights = load_file(src / "model.safetensors")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()})
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy(f, dst / f.name)
    save_file({k: v.float().contiguous() if v.is_floating_point() else v for k, v in weights.items()},
              dst / "model.safetensors", metadata={"format": "pt"})
    return ",".join(dtypes)


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    return proc.returncode, time.perf_counter() - started


def accelerate_cmd() -> list[str]:
    exe = shutil.which("accelerate")
    return [exe, "launch"] if exe else [sys.executable, "-m", "accelerate.commands.launch"]


def distill(common: list[str], work: Path, precision: str, log: Path) -> dict:
    run_dir = work / f"distill_{precision}"
    cmd = [*accelerate_cmd(), "--config_file", "configs/accelerate/gpu_1.yaml", "--mixed_precision", precision,
           "train/distill.py", "--config", CONFIG, *common, f"output_dir={run_dir}"]
    code, seconds = run(cmd, log)
    summary_file = run_dir / "student" / "kdlab_summary.json"
    if code != 0 or not summary_file.is_file():
        return {"precision": precision, "status": f"failed (exit {code}); see the log", "wall_seconds": seconds}
    s = json.loads(summary_file.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # weights are not results; keep the disk small
    return {"precision": precision, "status": "ok", "wall_seconds": round(seconds, 1), "dev": s["best_dev"],
            "teacher_dev": s["teacher_dev"], "steps": s["steps"], "train_seconds": s["train_seconds"],
            "samples_per_second": s["samples_per_second"], "student": s["student"],
            "student_params": s["student_params"], "mixed_precision_used": s.get("mixed_precision"),
            "device": s.get("device")}


def gate(common: list[str], work: Path, out: Path, batch: int, seq_len: str, log: Path) -> dict:
    run_dir = work / f"gate_b{batch}"
    cmd = [sys.executable, "-m", "kdlab", "gate", "--config", CONFIG, *common, f"output_dir={run_dir}",
           "target.device=cuda", f"target.batch_size={batch}", f"target.seq_len={seq_len}",
           f"quantization.recipes={GPU_RECIPES}", f"search.recipes={GPU_RECIPES}"]
    code, seconds = run(cmd, log)
    table = run_dir / "report" / "gate.csv"
    if code not in (0, 3) or not table.is_file():
        return {"batch_size": batch, "status": f"failed (exit {code}); see the log", "wall_seconds": seconds}
    shutil.copy(table, out / f"gate_b{batch}.csv")
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = ("recipe", "status", "reason", "quality", "p50_ms", "p95_ms", "p99_ms", "cv", "stable", "throughput",
            "size_mb", "peak_pct", "meets_targets", "misses", "seq_len_median", "padded_len_median")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"batch_size": batch, "seq_len": seq_len, "status": "ok", "exit_code": code,
            "wall_seconds": round(seconds, 1), "rows": [{k: r.get(k) for k in keep if k in r} for r in rows]}


def _n(value, fmt: str) -> str:
    try:
        return fmt.format(float(value))
    except (TypeError, ValueError):
        return "—"


def markdown(result: dict) -> str:
    """The benchmarks/README.md section for a result file (rendered here, where there is no GPU)."""
    v = result["versions"]
    lines = [f"{result['device']}, torch {v['torch']}, transformers {v['transformers']}, accelerate "
             f"{v['accelerate']}, bitsandbytes {v['bitsandbytes']}; {result['machine']['cpu']} host. "
             f"Teacher: the fine-tuned MiniLM-L6 (CPU dev accuracy {result['teacher']['dev_accuracy_on_cpu']:.4f}), "
             f"carried as {result['teacher']['weights_carried_as']} weights and upcast to fp32. "
             "Run: `scripts/gpu_prepare.sh` here, then `scripts/bench_gpu.py` on the GPU machine.", "",
             "Distillation of student (a), 3 x 384 from teacher layers, logit + hidden-state KD, 25,000 rows, "
             "batch 32, 2 epochs, same seed (`accelerate launch` with configs/accelerate/gpu_1.yaml):", "",
             "| precision (as applied) | dev accuracy | % of teacher | train s | samples/s |", "|---|---|---|---|---|"]
    for d in result.get("distill", []):
        if d["status"] != "ok":
            lines.append(f"| {d['precision']} | {d['status']} | | | |")
            continue
        acc, teacher = d["dev"]["accuracy"], d["teacher_dev"]["accuracy"]
        lines.append(f"| {d['mixed_precision_used']} | {acc:.4f} | {acc / teacher:.1%} | {d['train_seconds']:.0f} | "
                     f"{d['samples_per_second']:.0f} |")
    for g in result.get("gate", []):
        if g["status"] != "ok":
            continue
        seq = "real dev lengths" if g["seq_len"] == "data" else f"sequence length {g['seq_len']}"
        lines += ["", f"The gate on `target.device=cuda` (CUDA-event timing), batch {g['batch_size']}, {seq}:", "",
                  "| recipe | quality | p50 ms | p95 ms | cv | rows/s | size MB |", "|---|---|---|---|---|---|---|"]
        for r in g["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['recipe']} | skipped: {r['reason']} | | | | | |")
                continue
            lines.append(f"| {r['recipe']} | {_n(r['quality'], '{:.4f}')} | {_n(r['p50_ms'], '{:.2f}')} | "
                         f"{_n(r['p95_ms'], '{:.2f}')} | {_n(r['cv'], '{:.2f}')} | {_n(r['throughput'], '{:.0f}')} | "
                         f"{_n(r['size_mb'], '{:.1f}')} |")
    if result.get("notes"):
        lines += ["", result["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="only write the benchmarks/README.md section of an earlier result file")
    parser.add_argument("--teacher", help="folder of the fine-tuned SST-2 teacher")
    parser.add_argument("--train-file")
    parser.add_argument("--eval-file")
    parser.add_argument("--out")
    parser.add_argument("--skip-distill", action="store_true")
    parser.add_argument("--skip-gate", action="store_true")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        write_readme_section("gpu", f"kdlab on a GPU: {result['device']} (`scripts/bench_gpu.py`)", markdown(result),
                             path=ROOT / "benchmarks" / "README.md")
        print(markdown(result))
        return 0
    if not (args.teacher and args.train_file and args.eval_file and args.out):
        parser.error("--teacher, --train-file, --eval-file and --out are required (or --render JSON)")
    if not torch.cuda.is_available():
        print("bench_gpu: error: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench_gpu.log"
    work = Path(tempfile.mkdtemp(prefix="kdlab-gpu-"))  # checkpoints and copies: not results, not sent back
    teacher = work / "teacher_fp32"
    carried = fp32_copy(Path(args.teacher), teacher)
    record = json.loads((Path(args.teacher) / "kdlab_teacher.json").read_text()) \
        if (Path(args.teacher) / "kdlab_teacher.json").is_file() else {}
    common = [f"teacher.source={teacher}", "teacher.fine_tune=never", "tracking.enabled=false",
              f"data.train_file={args.train_file}", f"data.eval_file={args.eval_file}"]
    device = torch.cuda.get_device_name()
    started = time.time()
    result = {"benchmark": "gpu", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device,
              "machine": machine_info(), "versions": versions(), "config": CONFIG,
              "teacher": {"weights_carried_as": carried, "dev_accuracy_on_cpu": (record.get("dev") or {}).get(
                  "accuracy"), "note": "weights upcast to float32 before every run"}}
    if not args.skip_distill:
        result["distill"] = [distill(common, work, p, log) for p in ("bf16", "no")]
    if not args.skip_gate:
        result["gate"] = [gate(common, work, out, 1, "data", log), gate(common, work, out, 32, "128", log)]
    result["seconds"] = round(time.time() - started, 1)
    shutil.rmtree(work, ignore_errors=True)
    name = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    path = out / f"gpu_{name}.json"
    write_result(path, result, work=work, out=out)
    print(path.read_text()[:6000])
    print(f"bench_gpu: wrote {path} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
