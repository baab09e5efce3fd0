"""Benchmark: distil MiniLM-L6 students on real SST-2 and measure what the training loop costs.

    make bench-distill                       # or: .venv/bin/python scripts/bench_distill.py
    .venv/bin/python scripts/bench_distill.py --quick   # minutes-long smoke version, not for claims

1. The teacher: configs/sst2_minilm.yaml's fine-tuned MiniLM-L6 (trained once, then reused).
2. Students, each distilled (logit KD + hidden-state KD) and trained on hard labels only as the
   control, on the same rows, steps and seed:
   (a) 3 x 384 from teacher layers; (b) 4 x 256 and (c) 2 x 256 by teacher-slice and from random.
   Each is evaluated on the full 872-row dev set.
3. Loop overhead: our `fit` against a minimal hand-written PyTorch KD loop (same student,
   batches, optimizer, cached teacher logits), interleaved in rounds; and the speed-up of cached
   teacher logits over a teacher forward pass every step.

Writes benchmarks/results/distill_sst2.json and the distill table in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
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
import yaml  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from kdlab.scripts.bench_readme import write_readme_section, write_result  # noqa: E402
from kdlab.distill.config import load_config, to_dict  # noqa: E402
from kdlab.eval.latency import machine_info, versions  # noqa: E402
from kdlab.distill.losses import kd_ce_loss  # noqa: E402
from kdlab.distill.students import build_student, count_params  # noqa: E402
from kdlab.train.data import make_loader  # noqa: E402
from kdlab.train.loop import fit  # noqa: E402
from kdlab.train.pipeline import distillation_logits, make_distill_loss, prepare, run  # noqa: E402
from kdlab.train.teacher import ensure_teacher  # noqa: E402
from kdlab.train.tracking import Tracker  # noqa: E402

STUDENTS = [  # name, layers, hidden, init
    ("a-3x384-teacher-layers", 3, 384, "teacher-layers"),
    ("b-4x256-teacher-slice", 4, 256, "teacher-slice"),
    ("b-4x256-random", 4, 256, "random"),
    ("c-2x256-teacher-slice", 2, 256, "teacher-slice"),
    ("c-2x256-random", 2, 256, "random"),
]
KD = ["distill.alpha=0.7", "distill.temperature=2.0", "distill.hidden_weight=1.0"]
CONTROL = ["distill.alpha=0.0", "distill.hidden_weight=0.0"]


def hand_loop_step_times(student, teacher_logits, loader, steps: int, lr: float, temperature: float,
                         alpha: float) -> list[float]:
    """The minimal KD loop a person would write by hand: the reference for our loop's overhead."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    student.train()
    times, it = [], iter(loader)
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch.get("token_type_ids")).logits
        loss = kd_ce_loss(logits, teacher_logits[batch["idx"]], batch["labels"], temperature, alpha)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return times


def loop_costs(cfg_path: str, teacher_dir: str, rounds: int, steps: int, extra: list[str]) -> dict:
    """Median step time: our loop vs the hand loop; cached logits vs a teacher forward each step."""
    cfg = load_config(cfg_path, [f"teacher.source={teacher_dir}", "name=bench_loop",
                                 "output_dir=runs/bench_distill/loop", "tracking.enabled=false",
                                 "student.num_layers=3", "train.eval_every_steps=100000", *KD[:2],
                                 "distill.hidden_weight=0.0", *extra])
    acc = Accelerator(cpu=True)
    prep = prepare(cfg, acc)
    teacher, _ = ensure_teacher(cfg, acc, prep.data, prep.tokenizer, prep.train_ds, prep.eval_ds)
    teacher.eval()
    logits, _ = distillation_logits(teacher, prep, cfg, acc)
    base = build_student(teacher, cfg.student, seed=cfg.train.seed)
    ours, hand, uncached = [], [], []
    orders = [("ours", "hand", "uncached"), ("hand", "uncached", "ours"), ("uncached", "ours", "hand")]
    for r in range(rounds):
        # The same batches, in the same order, for all three loops of a round: a fixed random subset
        # read in order. The order of the loops rotates so drift and warm caches favour none.
        rows = torch.randperm(len(prep.train_ds), generator=torch.Generator().manual_seed(r))[:steps * cfg.train.batch_size]
        loader = make_loader(prep.train_ds.select(rows.tolist()), prep.tokenizer, cfg.train.batch_size, shuffle=False)
        tcfg = dataclasses.replace(cfg.train, max_steps=steps, log_every_steps=10)
        for which in orders[r % len(orders)]:
            student = copy.deepcopy(base)
            if which == "hand":
                hand.append(hand_loop_step_times(student, logits, loader, steps, cfg.train.learning_rate,
                                                 cfg.distill.temperature, cfg.distill.alpha))
                continue
            compute_loss, loss_mod, _ = make_distill_loss(cfg, teacher, student, logits if which == "ours" else None)
            res = fit(acc, student, loader, cfg=tcfg, compute_loss=compute_loss, evaluate=lambda m: {"accuracy": 0.0},
                      save_best=lambda m: None, out_dir=Path("runs/bench_distill/loop"), tracker=Tracker(False),
                      extra_modules=[loss_mod], desc=which)
            (ours if which == "ours" else uncached).append(res.step_times)
    med = statistics.median
    # Pair step i of one loop with step i of the other (same batch): the ratio cancels batch-length noise.
    # The first step of each run (allocations, lazy init) is left out.
    paired = lambda a, b: [x / y for ra, rb in zip(a, b) for x, y in zip(ra[1:], rb[1:])]  # noqa: E731
    flat = lambda runs: [t for run in runs for t in run[1:]]  # noqa: E731
    overhead = paired(ours, hand)
    return {"rounds": rounds, "steps_per_round": steps, "batch_size": cfg.train.batch_size,
            "ours_step_ms": round(1000 * med(flat(ours)), 2), "hand_step_ms": round(1000 * med(flat(hand)), 2),
            "uncached_step_ms": round(1000 * med(flat(uncached)), 2),
            "ours_step_ms_iqr": _iqr_ms(flat(ours)), "hand_step_ms_iqr": _iqr_ms(flat(hand)),
            "loop_overhead": round(med(overhead) - 1, 4),
            "loop_overhead_iqr": [round(q - 1, 4) for q in statistics.quantiles(overhead, n=4)[::2]],
            "cached_logits_speedup": round(med(paired(uncached, ours)), 3)}


def _iqr_ms(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4)
    return [round(1000 * q[0], 2), round(1000 * q[2], 2)]


def _same_run(cfg, run_dir: Path) -> bool:
    """A finished run in `run_dir` trained exactly what `cfg` asks (so its result can be reused)."""
    saved, summary = run_dir / "config.yaml", run_dir / "student" / "kdlab_summary.json"
    if not (saved.is_file() and summary.is_file()):
        return False
    old, new = yaml.safe_load(saved.read_text()), to_dict(cfg)
    return all(old.get(k) == new.get(k) for k in ("data", "teacher", "student", "distill", "train"))


def train_students(cfg_path: str, teacher_dir: str, extra: list[str], resume: bool) -> list[dict]:
    rows = []
    for name, layers, hidden, init in STUDENTS:
        row = {"name": name, "num_layers": layers, "hidden_size": hidden, "init": init}
        for kind, overrides in (("kd", KD), ("control", CONTROL)):
            cfg = load_config(cfg_path, [f"teacher.source={teacher_dir}", "name=bench_distill",
                                         f"output_dir=runs/bench_distill/{name}-{kind}", f"student.num_layers={layers}",
                                         f"student.hidden_size={hidden}", f"student.init={init}",
                                         "tracking.experiment=bench_distill", *overrides, *extra])
            if resume and _same_run(cfg, cfg.run_dir):
                print(f"== {name} [{kind}]: reusing the finished run in {cfg.run_dir}", flush=True)
                summary = json.loads((cfg.run_dir / "student" / "kdlab_summary.json").read_text())
            else:
                print(f"== {name} [{kind}]", flush=True)
                summary = run(cfg, Accelerator(cpu=True))
            row.update({f"{kind}_dev_accuracy": summary["best_dev"]["accuracy"],
                        f"{kind}_train_seconds": summary["train_seconds"],
                        f"{kind}_samples_per_second": summary["samples_per_second"]})
            row["params"] = summary["student_params"]
            row["teacher_dev_accuracy"] = summary["teacher_dev"]["accuracy"]
            row["steps"] = summary["steps"]
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    t = result["teacher"]
    lines = [f"Teacher: MiniLM-L6 fine-tuned, dev accuracy **{t['dev_accuracy']:.4f}**, {t['params'] / 1e6:.1f}M params. "
             f"Conditions: {result['conditions']['train_rows']} SST-2 train rows, {result['conditions']['epochs']} epoch(s), "
             f"batch {result['conditions']['batch_size']}, max length {result['conditions']['max_length']}, "
             f"{result['machine']['cpus']} CPU cores ({result['machine']['cpu']}), full 872-row dev set.", "",
             "| student | init | params | KD dev acc | % of teacher | hard-label control | KD train s | samples/s |",
             "|---|---|---|---|---|---|---|---|"]
    for s in result["students"]:
        lines.append(f"| {s['num_layers']} x {s['hidden_size']} | {s['init']} | {s['params'] / 1e6:.1f}M | "
                     f"{s['dev_accuracy']:.4f} | {100 * s['retention']:.1f} % | {s['control_dev_accuracy']:.4f} | "
                     f"{s['train_seconds']:.0f} | {s['samples_per_second']:.0f} |")
    lc = result["loop"]
    lines += ["", f"Loop overhead vs a hand-written KD loop ({lc['rounds']} interleaved rounds x {lc['steps_per_round']} "
                  f"steps on the same batches, batch {lc['batch_size']}; median of paired per-step ratios): median step "
                  f"ours {lc['ours_step_ms']} ms, hand {lc['hand_step_ms']} ms, **loop_overhead "
                  f"{lc['loop_overhead']:+.1%}** (IQR {lc.get('loop_overhead_iqr', ['?', '?'])}). Cached teacher logits "
                  f"vs a teacher forward each step: {lc['uncached_step_ms']} ms -> {lc['ours_step_ms']} ms, "
                  f"**{lc['cached_logits_speedup']:.2f}x**."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sst2_minilm.yaml")
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (not for claims)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--out", default="benchmarks/results/distill_sst2.json")
    parser.add_argument("--loop-only", action="store_true",
                        help="re-measure only the loop overhead and cached-logit speed-up into an existing --out file")
    parser.add_argument("--resume", action="store_true",
                        help="reuse student runs already finished under runs/bench_distill/ with the same config")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    os.chdir(ROOT)
    # Snapshot the config: every run below reads this copy, so editing the file meanwhile is harmless.
    snapshot = Path(tempfile.mkdtemp(prefix="bench_distill_")) / Path(args.config).name
    shutil.copy(args.config, snapshot)
    args.config = str(snapshot)
    base = load_config(args.config)
    extra = [f"train.num_epochs={args.epochs}", "train.early_stopping_patience=null"]
    if args.quick:
        extra += ["data.max_train_samples=600", "train.max_steps=10", "train.eval_every_steps=10"]
        base = load_config(args.config, ["data.max_train_samples=600", "teacher.num_epochs=0.2",
                                         "name=bench_quick", "output_dir=runs/bench_quick/teacher_run"])
    # The teacher is fine-tuned once by the config's own run folder and reused from there.
    acc = Accelerator(cpu=True)
    prep = prepare(base, acc)
    teacher, teacher_dev = ensure_teacher(base, acc, prep.data, prep.tokenizer, prep.train_ds, prep.eval_ds)
    teacher_dir = str(base.run_dir / "teacher")
    t0 = time.perf_counter()
    if args.loop_only:
        result = json.loads(Path(args.out).read_text())
        result["loop"] = loop_costs(args.config, teacher_dir, rounds=6, steps=20, extra=[])
        result["loop_overhead"] = result["loop"]["loop_overhead"]
        result["cached_logits_speedup"] = result["loop"]["cached_logits_speedup"]
        write_result(Path(args.out), result)
        write_readme_section("distill", "Distillation on SST-2 (`make bench-distill`)", markdown(result))
        print(json.dumps(result["loop"], indent=2))
        return
    loop = loop_costs(args.config, teacher_dir, rounds=2 if args.quick else 6, steps=5 if args.quick else 20,
                      extra=["data.max_train_samples=600"] if args.quick else [])
    rows = train_students(args.config, teacher_dir, extra, args.resume)
    students = [{**{k: r[k] for k in ("name", "num_layers", "hidden_size", "init", "params", "steps")},
                 "dev_accuracy": r["kd_dev_accuracy"], "control_dev_accuracy": r["control_dev_accuracy"],
                 "retention": round(r["kd_dev_accuracy"] / teacher_dev["accuracy"], 4),
                 "beats_control": r["kd_dev_accuracy"] > r["control_dev_accuracy"],
                 "train_seconds": r["kd_train_seconds"], "samples_per_second": r["kd_samples_per_second"],
                 "control_train_seconds": r["control_train_seconds"]} for r in rows]
    result = {
        "machine": machine_info(), "versions": versions(),
        "conditions": {"config": "configs/" + Path(args.config).name, "train_rows": len(prep.train_ds), "dev_rows": len(prep.eval_ds),
                       "epochs": args.epochs, "batch_size": base.train.batch_size,
                       "max_length": base.data.max_length, "learning_rate": base.train.learning_rate,
                       "kd": KD, "control": CONTROL, "seed": base.train.seed, "quick": args.quick},
        "teacher": {"dev_accuracy": teacher_dev["accuracy"], "params": count_params(teacher), "source": base.teacher.source},
        "students": students, "loop": loop,
        "loop_overhead": loop["loop_overhead"], "cached_logits_speedup": loop["cached_logits_speedup"],
        "bench_seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out if not args.quick else "runs/bench_quick/distill_sst2.json")
    write_result(out, result)
    table = markdown(result)
    if not args.quick:
        write_readme_section("distill", "Distillation on SST-2 (`make bench-distill`)", table)
    print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
