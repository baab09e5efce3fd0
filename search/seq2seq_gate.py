"""The gate for seq2seq teachers: each recipe's artefact generates the dev set, and whole `generate` calls are timed.

Library module for the seq2seq task (kdlab.tasks.seq2seq measures a gate's recipes with it). The verdict,
targets, reports and MLflow runs are the classification gate's; what differs is what a served call
is. A request is one `generate` call with the config's decoding settings (generation.num_beams,
max_new_tokens) on `target.batch_size` real dev sources, so the measured latency includes every
decoder step the model chooses to take. Quality is task.metric (BLEU by default) of the artefact's
own outputs on the dev set. ONNX recipes are reported as skipped with the reason.
"""
from __future__ import annotations

from kdlab.distill.config import Config
from kdlab.distill.quantize import apply_generation_recipe
from kdlab.eval.latency import matmul_peak_gflops
from kdlab.search.gate import build_rows
from kdlab.search.targets import GateRow
from kdlab.search.timing import measure_candidates, target_profile, timing_batches
from kdlab.train.seq2seq import Prepared, generate_texts, generation_kwargs, score
from kdlab.train.data import make_loader
from kdlab.train.seq2seq_data import pad_pairs


def generation_batches(prep: Prepared, batch_size: int, seed: int = 0) -> tuple[list, dict]:
    """Request batches of real dev sources (shuffled, padded per batch) and their source lengths.

    The classification gate's `timing_batches` on the tokenized dev pairs: it keeps only the encoder
    inputs, which is exactly what one `generate` call takes.
    """
    return timing_batches(prep.eval_ds, prep.tokenizer, batch_size, "data", vocab_size=len(prep.tokenizer), seed=seed)


def build_generators(teacher, recipes: list[str], *, prep: Prepared, cfg: Config, example_batch: dict, threads: int,
                     reference_only: tuple = ()) -> list[tuple[GateRow, object]]:
    """A generator under each recipe, scored by task.metric of its own outputs on the whole dev set (build_rows)."""
    loader = make_loader(prep.eval_ds, prep.tokenizer, cfg.train.eval_batch_size, shuffle=False, collator=pad_pairs)
    references = list(prep.data.eval["target"])
    gen = generation_kwargs(cfg)

    def serve(name: str):
        return apply_generation_recipe(name, teacher, example_batch=example_batch, generate_kwargs=gen,
                                       device=cfg.target.device, allow_cpu_half=cfg.quantization.allow_cpu_bf16,
                                       threads=threads)

    def score_outputs(served) -> float:
        texts, tokens = generate_texts(served.module, loader, prep.tokenizer, gen, desc=f"gate {served.recipe}")
        served.tokens_per_row = tokens / max(1, len(texts))
        return score(texts, references, prep.lowercase)[cfg.task.metric]

    return build_rows(recipes, serve, score_outputs, reference_only)


def fill_tokens_per_s(candidates: list, batch_size: int) -> None:
    """Generated tokens per second at p50: mean output tokens per row x rows per call / p50."""
    for row, served in candidates:
        if served is not None and row.p50_ms:
            row.tokens_per_s = served.tokens_per_row * batch_size / (row.p50_ms / 1e3)


def measure_generator(cfg: Config, model, prep: Prepared, threads: int, recipes: list[str],
                      reference_only: tuple = ()) -> tuple[list[GateRow], dict]:
    """`model` (on the CPU, eval mode) under each recipe: dev quality of each artefact's own outputs, then whole
    `generate` calls timed on cfg.target. Returns the rows and the measurement's own conditions."""
    batches, lengths = generation_batches(prep, cfg.target.batch_size, seed=cfg.train.seed)
    candidates = build_generators(model, recipes, prep=prep, cfg=cfg, example_batch=batches[0], threads=threads,
                                  reference_only=reference_only)
    profile = target_profile(cfg.target, threads, lengths["seq_len_median"])
    peak = matmul_peak_gflops(cfg.target.device, threads)
    rows = measure_candidates(candidates, batches, profile)
    fill_tokens_per_s(candidates, cfg.target.batch_size)
    # The target profile, metric, machine and versions are added by the stage (timing.complete_conditions).
    conditions = {"seq_len": "data", **lengths, "dev_rows": len(prep.eval_ds), "generation": generation_kwargs(cfg),
                  "lowercase_scoring": prep.lowercase, "matmul_peak_gflops": peak}
    return rows, conditions
