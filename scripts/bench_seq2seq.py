"""Benchmark: seq2seq distillation on Multi30k (German → English), test2016, with the real kdlab pipeline.

    python scripts/bench_seq2seq.py                       # make bench-seq2seq (hours on a 2-core CPU)
    python scripts/bench_seq2seq.py --quick               # every code path on a few hundred rows (minutes)
    python scripts/bench_seq2seq.py --teacher DIR --data DIR --out DIR    # e.g. on a GPU machine

1. The teacher of configs/multi30k_t5.yaml: an encoder-decoder warm-started from MiniLM-L6 on both
   sides and fine-tuned on the 29,000 training pairs (train/seq2seq.py; reused when already trained).
2. Six students sharing the teacher's 6-layer encoder, with 1 or 2 decoder layers copied from spread-out
   teacher layers, each trained three ways for the same number of steps:
   references (cross-entropy on the human translations, no teacher), word-kd (alpha 0.5 of per-token
   KL to the teacher at T=2, Kim & Rush 2016 word-level KD), seq-kd (cross-entropy on the teacher's
   beam-4 translations of the training sources, Kim & Rush 2016 sequence-level KD).
3. BLEU/chrF of every model on test2016 (sacreBLEU, greedy, lower-cased: the MiniLM vocabulary is
   uncased), and the p95 of a whole greedy `generate` call at batch 1 over real test sources, all models
   timed interleaved on the CPU (`--threads`, default 2) so the speed-ups are ratios from one run.

Writes benchmarks/results/seq2seq_multi30k.json (or OUT/seq2seq_multi30k.json) after every stage, so
an interrupted run keeps what it measured, and the seq2seq section of benchmarks/README.md at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import AutoModelForSeq2SeqLM  # noqa: E402

from kdlab.distill.config import load_config  # noqa: E402
from kdlab.distill.quantize import apply_generation_recipe  # noqa: E402
from kdlab.distill.seq2seq import build_seq2seq_student  # noqa: E402
from kdlab.distill.students import count_params  # noqa: E402
from kdlab.eval.latency import machine_info, versions  # noqa: E402
from kdlab.eval.paths import portable_record  # noqa: E402
from kdlab.scripts.bench_gpu import fp32_copy  # noqa: E402
from kdlab.scripts.bench_readme import write_readme_section, write_result  # noqa: E402
from kdlab.search.seq2seq_gate import generation_batches  # noqa: E402
from kdlab.search.targets import GateRow  # noqa: E402
from kdlab.search.timing import measure_candidates, target_profile  # noqa: E402
from kdlab.train.seq2seq import (ensure_seq2seq_teacher, generate_texts, generation_kwargs, prepare,  # noqa: E402
                                 resolve_source, run, score, warm_start)
from kdlab.train.data import make_loader  # noqa: E402
from kdlab.train.seq2seq_data import pad_pairs  # noqa: E402

CONFIG = "configs/multi30k_t5.yaml"
TRAININGS = {
    "references": ["distill.alpha=0.0", "distill.seq_kd=none"],
    "word-kd": ["distill.alpha=0.5", "distill.seq_kd=none"],
    "seq-kd": ["distill.alpha=0.0", "distill.seq_kd=only"],
}


def overrides_for(args) -> list[str]:
    out = [f"output_dir={args.work}", "tracking.enabled=false" if args.no_tracking else f"tracking.uri=sqlite:///{args.work}/mlflow.db"]
    if args.teacher:
        out.append(f"teacher.source={args.teacher}")
    if args.data:
        d = Path(args.data)
        out += [f"data.train_file={d / 'train.de'}", f"data.train_target_file={d / 'train.en'}",
                f"data.eval_file={d / 'test.de'}", f"data.eval_target_file={d / 'test.en'}"]
    if args.quick:
        out += ["data.max_train_samples=256", "data.max_eval_samples=64", "teacher.num_epochs=1",
                "train.max_steps=8", "generation.max_new_tokens=24"]
    if args.teacher_epochs:
        out.append(f"teacher.num_epochs={args.teacher_epochs}")
    if args.batch_size:
        out += [f"train.batch_size={args.batch_size}"]
    return out + list(args.overrides)


def student_dir(work: Path, name: str) -> Path:
    """A run folder per student that shares the teacher and the caches (links), so nothing is trained twice."""
    run = work / "students" / name
    run.mkdir(parents=True, exist_ok=True)
    for shared in ("teacher", "cache"):
        (work / shared).mkdir(parents=True, exist_ok=True)
        link = run / shared
        if not link.exists():
            link.symlink_to((work / shared).resolve(), target_is_directory=True)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--teacher", help="teacher.source override (a local MiniLM folder on a machine without it)")
    parser.add_argument("--data", help="folder with train/test .de/.en (default: the config's files)")
    parser.add_argument("--work", default="runs/bench_seq2seq", help="run folder (teacher, caches, students)")
    parser.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    parser.add_argument("--decoder-layers", default="1,2")
    parser.add_argument("--student-epochs", type=float, default=2.0)
    parser.add_argument("--teacher-epochs", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the latency measurement")
    parser.add_argument("--quick", action="store_true", help="a few hundred rows and steps: checks the code paths")
    parser.add_argument("--no-tracking", action="store_true")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the CPU latency, on architecture-identical models forced to --output-tokens "
                             "(for students trained elsewhere, e.g. on a GPU machine): updates the JSON in place")
    parser.add_argument("--output-tokens", type=int, default=14,
                        help="--latency-only: tokens every model generates (the teacher's mean greedy output length)")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    started = time.perf_counter()
    work = Path(args.work)
    out_dir = Path(args.out) if args.out else (work if args.quick else ROOT / "benchmarks" / "results")
    out_path = out_dir / "seq2seq_multi30k.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.teacher and Path(args.teacher, "model.safetensors").is_file():
        # A copy carried with fp16 weights (to fit a transfer limit) trains from fp32 weights here.
        fp32_copy(Path(args.teacher), work / "teacher_source")
        args.teacher = str(work / "teacher_source")
    overrides = overrides_for(args)
    cfg = load_config(args.config, overrides)
    if args.latency_only:
        return latency_only(args, cfg, out_path)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no")
    result = {"benchmark": "seq2seq_multi30k", "quick": args.quick, "machine": machine_info(), "versions": versions(),
              "train_device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision,
              "gpu": torch.cuda.get_device_name(0) if cuda else None, "config": args.config, "overrides": overrides,
              "data": {"train": cfg.data.train_file, "eval": cfg.data.eval_file}, "students": []}

    def save():
        result["seconds"] = round(time.perf_counter() - started, 1)
        write_result(out_path, result, work=work)  # checkpoints and the teacher copy as <work>/...

    # 1. the teacher
    prep = prepare(cfg, accelerator)
    teacher, teacher_dev = ensure_seq2seq_teacher(cfg, accelerator, prep)
    marker = json.loads((cfg.run_dir / "teacher" / "kdlab_teacher.json").read_text()) \
        if (cfg.run_dir / "teacher" / "kdlab_teacher.json").is_file() else {}
    result["teacher"] = {"source": args.teacher or cfg.teacher.source, "params": count_params(teacher),
                         "bleu": teacher_dev["bleu"], "chrf": teacher_dev["chrf"],
                         "train_seconds": marker.get("train_seconds"), "train_steps": marker.get("steps"),
                         "epochs": cfg.teacher.num_epochs, "dev": teacher_dev}
    result["conditions"] = {"eval_rows": len(prep.eval_ds), "train_rows": len(prep.train_ds),
                            "generation": generation_kwargs(cfg), "lowercase_scoring": prep.lowercase,
                            "batch_size": cfg.train.batch_size, "student_epochs": args.student_epochs,
                            "latency": {"device": "cpu", "threads": args.threads, "batch_size": 1,
                                        "decoding": "greedy", "sources": "test2016, real lengths"}}
    save()
    print(f"teacher: BLEU {teacher_dev['bleu']:.2f} chrF {teacher_dev['chrf']:.2f}, "
          f"{count_params(teacher) / 1e6:.1f}M params, trained {marker.get('train_seconds') or 0:.0f} s", flush=True)

    # 2. the students
    epochs = [] if args.quick else [f"train.num_epochs={args.student_epochs}"]
    for layers in [int(x) for x in args.decoder_layers.split(",")]:
        for training, extra in TRAININGS.items():
            name = f"dec{layers}-{training}"
            run_dir = student_dir(work, name)
            scfg = load_config(args.config, overrides + epochs + extra + [
                f"output_dir={run_dir}", f"student.decoder_layers={layers}", "student.init=teacher-layers"])
            summary = run(scfg, accelerator)
            row = {"name": name, "encoder_layers": summary["student"]["encoder_layers"],
                   "decoder_layers": summary["student"]["decoder_layers"], "training": training,
                   "params": summary["student_params"], "steps": summary["steps"], "train_rows": summary["train_rows"],
                   "train_seconds": summary["train_seconds"], "best_step": summary["best_step"],
                   "checkpoint": summary["checkpoint"]}
            model = AutoModelForSeq2SeqLM.from_pretrained(summary["checkpoint"]).to(accelerator.device)
            loader = make_loader(prep.eval_ds, prep.tokenizer, cfg.train.eval_batch_size, shuffle=False,
                                 collator=pad_pairs)
            texts, _ = generate_texts(model, loader, prep.tokenizer, generation_kwargs(cfg))
            metrics = score(texts, list(prep.data.eval["target"]), prep.lowercase)
            row.update(bleu=metrics["bleu"], chrf=metrics["chrf"],
                       retention=metrics["bleu"] / teacher_dev["bleu"] if teacher_dev["bleu"] else None)
            result["students"].append(row)
            save()
            print(f"{name}: BLEU {metrics['bleu']:.2f} ({100 * (row['retention'] or 0):.1f} % of the teacher), "
                  f"{row['steps']} steps in {row['train_seconds']:.0f} s", flush=True)

    # 3. generation latency on the CPU, every model interleaved in one measurement
    threads = min(args.threads, os.cpu_count() or 1)
    models = {"teacher": teacher.to("cpu").float().eval()}
    for row in result["students"]:
        models[row["name"]] = AutoModelForSeq2SeqLM.from_pretrained(row["checkpoint"]).eval()
    batches, lengths = generation_batches(prep, 1, seed=cfg.train.seed)
    gen = generation_kwargs(cfg, num_beams=1)
    built = []
    for name, model in models.items():
        served = apply_generation_recipe("fp32", model, example_batch=batches[0], generate_kwargs=gen, threads=threads)
        built.append((GateRow(name), served))
    cpu_target = load_config(args.config, overrides + ["target.device=cpu"]).target
    profile = target_profile(cpu_target, threads, lengths["seq_len_median"])
    rows = {r.recipe: r for r in measure_candidates(built, batches, profile)}
    result["conditions"]["latency"].update(seq_len_median=lengths["seq_len_median"], min_iters=profile.min_iters,
                                           min_seconds=profile.min_seconds, repeats=profile.repeats)
    t = rows["teacher"]
    result["teacher"].update(p95_ms=t.p95_ms, p50_ms=t.p50_ms, cv=t.cv)
    for row in result["students"]:
        r = rows[row["name"]]
        row.update(p95_ms=r.p95_ms, p50_ms=r.p50_ms, cv=r.cv, speedup=t.p95_ms / r.p95_ms)
    save()
    text = render(portable_record(result, work=work))
    if not args.quick and args.out is None:
        write_readme_section("seq2seq", "Seq2seq distillation on Multi30k (bench_seq2seq)", text)
    print(text)
    print(f"bench_seq2seq: wrote {out_path} in {result['seconds']:.0f} s")
    return 0


def latency_only(args, cfg, out_path: Path) -> int:
    """p95 of a whole greedy `generate` at batch 1 on this CPU, for the teacher's and each student's architecture.

    Latency depends on the architecture and on how many tokens are generated, not on what the weights
    say: every model is built here with the trained models' shapes (teacher warm-started from MiniLM,
    students shrunk from it) and forced to emit exactly `--output-tokens` tokens, the trained teacher's
    mean greedy output length on test2016 (the trained students' means were within 3 % of it).
    """
    result = json.loads(out_path.read_text())
    started = time.perf_counter()
    prep = prepare(cfg, Accelerator(cpu=True))
    teacher = warm_start(resolve_source(cfg.teacher.source), cfg, prep.tokenizer).eval()
    models = {"teacher": teacher}
    for layers in sorted({s["decoder_layers"] for s in result["students"]}):
        models[f"dec{layers}"] = build_seq2seq_student(teacher, 6, layers).eval()
    threads = min(args.threads, os.cpu_count() or 1)
    batches, lengths = generation_batches(prep, 1, seed=cfg.train.seed)
    gen = {"num_beams": 1, "do_sample": False, "max_new_tokens": args.output_tokens,
           "min_new_tokens": args.output_tokens}
    built = [(GateRow(name), apply_generation_recipe("fp32", m, example_batch=batches[0], generate_kwargs=gen,
                                                     threads=threads)) for name, m in models.items()]
    profile = target_profile(load_config(args.config, ["target.device=cpu"]).target, threads, lengths["seq_len_median"])
    with torch.inference_mode():
        rows = {r.recipe: r for r in measure_candidates(built, batches, profile)}
    t = rows["teacher"]
    result["teacher"].update(p95_ms=t.p95_ms, p50_ms=t.p50_ms, cv=t.cv)
    for s in result["students"]:
        r = rows[f"dec{s['decoder_layers']}"]
        s.update(p95_ms=r.p95_ms, p50_ms=r.p50_ms, cv=r.cv, speedup=t.p95_ms / r.p95_ms)
    result["conditions"]["latency"].update(
        method=f"architecture-identical models forced to {args.output_tokens} output tokens (greedy), timed on "
               f"this machine's CPU; BLEU from the trained models on {result.get('gpu') or result['train_device']}",
        output_tokens=args.output_tokens, seq_len_median=lengths["seq_len_median"], min_iters=profile.min_iters,
        min_seconds=profile.min_seconds, repeats=profile.repeats, threads=threads,
        machine=machine_info(), versions=versions(), seconds=round(time.perf_counter() - started, 1))
    write_result(out_path, result, work=Path(args.work))
    text = render(portable_record(result, work=Path(args.work)))
    if args.out is None:
        write_readme_section("seq2seq", "Seq2seq distillation on Multi30k (bench_seq2seq)", text)
    print(text)
    return 0


def render(result: dict) -> str:
    t, c = result["teacher"], result["conditions"]
    lines = [f"Teacher: {t['source']} warm-started encoder-decoder, {t['params'] / 1e6:.1f}M parameters, "
             f"BLEU {t['bleu']:.2f}, chrF {t['chrf']:.2f}, p95 {t.get('p95_ms') or 0:.1f} ms; trained on "
             f"{result['train_device']} ({result.get('gpu') or result['machine']['cpu']}, {result['mixed_precision']}) "
             f"in {t.get('train_seconds') or 0:.0f} s.",
             "",
             "| student | decoder layers | training | BLEU | % of teacher | p95 ms | speed-up | params |",
             "|---|---|---|---|---|---|---|---|"]
    for s in result["students"]:
        lines.append(f"| {s['name']} | {s['decoder_layers']} | {s['training']} | {s['bleu']:.2f} | "
                     f"{100 * (s['retention'] or 0):.1f} % | {s.get('p95_ms') or 0:.1f} | {s.get('speedup') or 0:.2f}x | "
                     f"{s['params'] / 1e6:.1f}M |")
    lat = c["latency"]
    where = lat.get("machine", result["machine"])["cpu"]
    torch_version = lat.get("versions", result["versions"])["torch"]
    lines += ["", f"Conditions: Multi30k test2016 ({c['eval_rows']} sentences), {c['train_rows']} training pairs; "
                  f"greedy decoding, max {c['generation']['max_new_tokens']} new tokens, lower-cased sacreBLEU; "
                  f"students trained {c['student_epochs']:g} epochs at batch {c['batch_size']}; latency: whole "
                  f"`generate` per request, batch 1, {lat['threads']} CPU threads, real test2016 source lengths "
                  f"(median {lat.get('seq_len_median', 0):g} tokens), all models interleaved in one run on "
                  f"{where}; torch {torch_version}."]
    if lat.get("method"):
        lines.append(f"Latency method: {lat['method']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
