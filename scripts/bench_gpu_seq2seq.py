"""Benchmark: the seq2seq gate on a CUDA device (fp32, fp16, bf16, bitsandbytes) with CUDA-event timing.

    python scripts/bench_gpu_seq2seq.py --data DIR --out DIR [--device cuda]

Builds a T5 from a T5Config with a Unigram tokenizer trained on Multi30k (scripts/build_t5.py), fine-tunes
it German -> English on 8,000 pairs through kdlab's own teacher fine-tuning (bf16 autocast on GPU), then
runs `kdlab gate`'s seq2seq path: every recipe generates 200 test2016 sentences (BLEU of its own outputs)
and whole greedy `generate` calls are timed at batch 1. Writes OUT/gpu_seq2seq_gate.json. A check of the
CUDA paths of seq2seq serving, not a quality claim (the teacher trains for a minute).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdlab.distill.config import load_config  # noqa: E402
from kdlab.eval.latency import machine_info, versions  # noqa: E402
from kdlab.scripts.bench_readme import write_result  # noqa: E402
from kdlab.scripts.build_t5 import build_t5  # noqa: E402
from kdlab.search.gate import run_gate  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/multi30k")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--epochs", type=float, default=3.0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [line for lang in ("de", "en") for line in (data / f"train.{lang}").read_text().splitlines()[:args.rows]]
    t5 = build_t5(Path("/tmp/kdlab_t5_gate"), lines, vocab_size=2000, d_model=256, layers=3, heads=4)
    cuda = args.device == "cuda"
    recipes = "[fp32,fp16,bf16,bnb-int8,bnb-nf4]" if cuda else "[fp32,dynamic-int8,onnx-int8]"
    cfg = load_config(str(ROOT / "configs" / "multi30k_t5.yaml"), [
        f"teacher.source={t5}", "teacher.encoder_decoder=false", "teacher.fine_tune=always",
        f"teacher.num_epochs={args.epochs}", "teacher.learning_rate=1e-3", f"data.train_file={data / 'train.de'}",
        f"data.train_target_file={data / 'train.en'}", f"data.eval_file={data / 'test.de'}",
        f"data.eval_target_file={data / 'test.en'}", f"data.max_train_samples={args.rows}", "data.max_eval_samples=200",
        f"target.device={args.device}", f"quantization.recipes={recipes}", "target.p95_ms=teacher*0.5",
        "target.min_quality=teacher*0.95", "search.recipes=[fp32,fp16]" if cuda else "search.recipes=[fp32]",
        "tracking.enabled=false", "output_dir=/tmp/kdlab_gpu_gate", "train.batch_size=64",
        "generation.max_new_tokens=32", "target.min_iters=20", "target.min_seconds=1", "target.repeats=3"])
    result = run_gate(cfg, Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda))
    rows = [dataclasses.asdict(r) for r in result.rows]
    report = {"benchmark": "gpu_seq2seq_gate", "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "machine": machine_info(), "versions": versions(), "teacher": "T5 3+3 x 256 from T5Config, Unigram 2k",
              "teacher_dev": result.conditions["teacher_dev"], "conditions": {
                  k: v for k, v in result.conditions.items() if k not in ("machine", "versions", "teacher_dev")},
              "rows": rows, "verdict": result.message, "seconds": round(time.perf_counter() - started, 1)}
    write_result(out / "gpu_seq2seq_gate.json", report)
    for r in rows:
        print(f"{r['recipe']:>12} {r['status']:>8} quality {r['quality']} p95 {r['p95_ms']} ms tokens/s "
              f"{r['tokens_per_s']} size {r['size_mb']} {r['reason'][:100]}")
    print(result.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
