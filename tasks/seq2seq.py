"""Sequence to sequence (translation, summarisation: source text -> generated text), as a kdlab task.

Library module, loaded by the task registry (kdlab.distill.task) for task.type=seq2seq; nothing to
launch. The class attributes and `check_config` are what a config check reads, so they load no torch;
each other method imports the layer that does the work when it is called.
"""
from __future__ import annotations

from kdlab.distill.task import Task

# Settings only classification reads (the transfer set and student families have their own messages in
# `check_config`).
CLASSIFICATION_ONLY = ("data.text_pair_column", "data.label_names")


class Seq2SeqTask(Task):
    """One whole `generate` call per request; quality is a score of the generated text in points (0..100)."""

    name = "seq2seq"
    metrics = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match")
    quality_scale = 100.0
    unused_keys = CLASSIFICATION_ONLY

    def check_config(self, cfg, c) -> None:
        """What seq2seq adds to, or forbids in, the data, student, distill, generation and search sections."""
        d, s, g, k = cfg.data, cfg.student, cfg.generation, cfg.distill
        c(not (d.train_target_file and not d.train_file), "data.train_target_file",
          "needs data.train_file (the source side)")
        c(bool(d.train_target_file) == bool(d.eval_target_file) or not d.train_file, "data.eval_target_file",
          "give both data.train_target_file and data.eval_target_file (line-aligned pairs), or neither (columns)")
        c(d.max_target_length > 0, "data.max_target_length", f"must be a positive integer, got {d.max_target_length}")
        for key in ("encoder_layers", "decoder_layers"):
            v = getattr(s, key)
            c(v is None or v >= 1, f"student.{key}", f"must be >= 1, got {v}")
        for key, n in (("encoder_layer_map", s.encoder_layers),
                       ("decoder_layer_map", s.decoder_layers or s.num_layers)):
            m = getattr(s, key)
            c(m is None or n is None or len(m) == n, f"student.{key}",
              f"needs one teacher layer per student layer ({n}), got {m}")
        c(s.init in ("teacher-layers", "random"), "student.init",
          f"'{s.init}' for task.type=seq2seq; valid: teacher-layers (copy spread-out teacher layers), random")
        c(k.seq_kd in ("none", "only", "mix"), "distill.seq_kd", f"'{k.seq_kd}'; valid: none, only, mix")
        c(k.seq_kd_num_beams >= 1, "distill.seq_kd_num_beams", f"must be >= 1, got {k.seq_kd_num_beams}")
        c(k.attention_weight == 0, "distill.attention_weight", "attention KD is for classification; for seq2seq use "
                                                                "distill.hidden_weight (encoder and decoder states)")
        c(g.num_beams >= 1, "generation.num_beams", f"must be >= 1, got {g.num_beams}")
        c(g.max_new_tokens >= 1, "generation.max_new_tokens", f"must be >= 1, got {g.max_new_tokens}")
        c(not k.transfer.enabled, "distill.transfer", "is for classification (seq2seq: distill.seq_kd)")
        c(cfg.search.families is None or cfg.search.families == ["teacher"], "search.families",
          "seq2seq students are cut from the teacher only; valid: [teacher] or unset")

    def prepare(self, cfg, accelerator=None):
        from kdlab.train.seq2seq import prepare  # noqa: PLC0415 - heavy: see the module docstring
        return prepare(cfg, accelerator)

    def ensure_teacher(self, cfg, accelerator, prep):
        from kdlab.train.seq2seq import ensure_seq2seq_teacher  # noqa: PLC0415
        return ensure_seq2seq_teacher(cfg, accelerator, prep)

    def measure(self, cfg, model, prep, threads, recipes, workdir, reference_only=()):
        from kdlab.search.seq2seq_gate import measure_generator  # noqa: PLC0415
        return measure_generator(cfg, model, prep, threads, recipes, reference_only)

    def distil(self, cfg, accelerator) -> dict:
        from kdlab.train.seq2seq import run  # noqa: PLC0415
        return run(cfg, accelerator)

    def search_space(self, cfg):
        from kdlab.search.seq2seq_search import Seq2SeqSpace  # noqa: PLC0415
        from kdlab.train.teacher import load_teacher_config  # noqa: PLC0415
        return Seq2SeqSpace.from_config(cfg, load_teacher_config(cfg))

    def search_setup(self, cfg, accelerator, space, console, threads: int):
        from kdlab.search.seq2seq_search import setup  # noqa: PLC0415
        from kdlab.search.study_tracking import StudyTracking  # noqa: PLC0415
        tracking = StudyTracking(cfg)
        tracking.ensure_experiment()
        return setup(cfg, accelerator, space, console, tracking, threads)

    def trial_objective(self, trial, ctx):
        from kdlab.search.objective import objective  # noqa: PLC0415
        return objective(trial, ctx)

    def check_model_folder(self, cfg, path, config) -> None:
        from kdlab.train.model_dir import check_seq2seq_folder  # noqa: PLC0415
        check_seq2seq_folder(cfg, path, config)

    def prepare_model(self, cfg, model):
        from kdlab.train.model_dir import prepare_seq2seq_model  # noqa: PLC0415
        return prepare_seq2seq_model(cfg, model)

    def load_network(self, cfg, model, tokenizer):
        from kdlab.train.model_dir import load_seq2seq_model  # noqa: PLC0415
        return load_seq2seq_model(cfg, model, tokenizer)

    def check_test_split(self, cfg) -> None:
        from kdlab.train.seq2seq_data import load_seq2seq_test  # noqa: PLC0415
        load_seq2seq_test(cfg.data)

    def export(self, cfg, choice, dest, console=None) -> dict:
        from kdlab.search.seq2seq_export import run_seq2seq_export  # noqa: PLC0415
        return run_seq2seq_export(cfg, choice, dest, console)

    def export_summary(self, manifest: dict, dest) -> str:
        from kdlab.search.seq2seq_export import seq2seq_summary_line  # noqa: PLC0415
        return seq2seq_summary_line(manifest, dest)

    def load_artefact(self, folder, manifest: dict, tokenizer, *, recipe: str, device: str, threads: int):
        """The export's served generator: the safetensors model under `recipe`, decoding as its manifest says."""
        from transformers import AutoModelForSeq2SeqLM  # noqa: PLC0415

        from kdlab.distill.quantize import apply_generation_recipe  # noqa: PLC0415
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, use_safetensors=True).eval()
        example = dict(tokenizer(["a"], return_tensors="pt", return_token_type_ids=False))
        return apply_generation_recipe(recipe, model, example_batch=example, generate_kwargs=manifest["generation"],
                                       device=device, threads=threads, allow_cpu_half=True)

    def predict_records(self, served, texts: list[str], pairs=None) -> list[dict]:
        """{"output": generated text} per source text."""
        return [{"output": text} for text in served.generate_texts(texts)] if texts else []

    def capacity_unit(self, cfg) -> str:
        g = cfg.generation
        return f"one whole generate call ({g.num_beams} beam(s), at most {g.max_new_tokens} new tokens)"

    def serving_latency(self, cfg, models: dict, threads: int, batch_sizes: list[int]) -> dict:
        from kdlab.search.seq2seq_export import serving_latency  # noqa: PLC0415
        return serving_latency(cfg, models, threads, batch_sizes)
