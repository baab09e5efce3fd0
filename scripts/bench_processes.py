"""Benchmark: one CPU process against two real DDP processes (gloo) on the same distillation.

    make bench-processes        # or: .venv/bin/python scripts/bench_processes.py [--seeds 3]

Runs `accelerate launch train/distill.py --config configs/smoke.yaml` with 1 process and with 2
(`ACCELERATE_USE_CPU=true --multi_gpu`, each rank half the batches), for several seeds, all
distilling from the same fine-tuned smoke teacher. Same data, same per-process batch size, so two
processes take half the optimizer steps at twice the global batch. Reports dev accuracy per run
and the mean/spread per process count, to `benchmarks/results/processes_smoke.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdlab.eval.latency import machine_info, versions  # noqa: E402
from kdlab.scripts.bench_readme import write_readme_section, write_result  # noqa: E402

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
CONFIG = "configs/smoke.yaml"


def launch(processes: int, overrides: list[str]) -> tuple[dict, float]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if processes == 1:
        cmd = [ACCELERATE, "launch", "--config_file", "configs/accelerate/cpu_1proc.yaml"]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--main_process_port", "29541"]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "train/distill.py", "--config", CONFIG, *overrides], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    return json.loads((ROOT / out_dir / "student" / "kdlab_summary.json").read_text()), seconds


def markdown(result: dict) -> str:
    s = result["dev_accuracy"]
    lines = [f"`configs/smoke.yaml` (2,000 SST-2 rows, 2-layer student from teacher layers, 2 epochs, batch 32 per "
             f"process), one shared fine-tuned teacher (dev {result['teacher_dev_accuracy']:.4f}), "
             f"{result['machine']['cpus']} CPU cores; 2 processes = DDP over gloo, half the steps at twice the "
             "global batch.", "",
             "| processes | seed | steps | dev accuracy | train s |", "|---|---|---|---|---|"]
    lines += [f"| {r['processes']} | {r['seed']} | {r['steps']} | {r['dev_accuracy']:.4f} | {r['train_seconds']:.0f} |"
              for r in result["runs"]]
    lines += ["", f"Mean dev accuracy: 1 process {s['1']['mean']:.4f} (sd {s['1']['stdev']:.4f}), 2 processes "
                  f"{s['2']['mean']:.4f} (sd {s['2']['stdev']:.4f}); difference {result['difference_of_means']:+.4f}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/processes_smoke.json")
    args = parser.parse_args()
    # The teacher is fine-tuned once (by the 1-process smoke run) and shared by every run below.
    launch(1, ["output_dir=runs/bench_processes/teacher_run", "train.max_steps=1"])
    teacher = "runs/bench_processes/teacher_run/teacher"
    rows = []
    for seed in range(args.seeds):
        for processes in (1, 2):
            summary, seconds = launch(processes, [
                f"teacher.source={teacher}", f"train.seed={seed}", "tracking.experiment=bench_processes",
                f"output_dir=runs/bench_processes/p{processes}_s{seed}"])
            rows.append({"processes": processes, "seed": seed, "dev_accuracy": summary["best_dev"]["accuracy"],
                         "steps": summary["steps"], "train_seconds": summary["train_seconds"],
                         "wall_seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
    by = {p: [r["dev_accuracy"] for r in rows if r["processes"] == p] for p in (1, 2)}
    stats = {str(p): {"mean": round(statistics.mean(v), 4), "stdev": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0,
                      "min": min(v), "max": max(v)} for p, v in by.items()}
    result = {"machine": machine_info(), "versions": versions(), "config": CONFIG,
              "teacher_dev_accuracy": summary["teacher_dev"]["accuracy"], "runs": rows, "dev_accuracy": stats,
              "difference_of_means": round(stats["2"]["mean"] - stats["1"]["mean"], 4)}
    write_result(Path(args.out), result)
    write_readme_section("processes", "One vs two CPU processes (`make bench-processes`)", markdown(result))
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
