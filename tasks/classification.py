"""Sequence classification (SST-2-like: a text or a text pair -> one of K labels), as a kdlab task.

Library module, loaded by the task registry (kdlab.distill.task) for task.type=classification; nothing
to launch. The class attributes are what a config check reads, so they load no torch; each method
imports the layer that does the work when it is called (the registry loads this module while a config
is checked, before torch may load).
"""
from __future__ import annotations

from kdlab.distill.task import Task

# Settings only seq2seq reads: a classification config that sets one would have it silently ignored.
SEQ2SEQ_ONLY = ("generation", "data.source_column", "data.target_column", "data.train_target_file",
                "data.eval_target_file", "data.source_prefix", "data.max_target_length", "student.encoder_layers",
                "student.decoder_layers", "student.encoder_layer_map", "student.decoder_layer_map", "distill.seq_kd",
                "distill.seq_kd_num_beams", "search.encoder_layers", "search.decoder_layers",
                "export.max_quality_drop")


class ClassificationTask(Task):
    """One forward pass per request; quality is accuracy or macro F1 of the argmax label (a fraction)."""

    name = "classification"
    metrics = ("accuracy", "f1")
    quality_scale = 1.0
    unused_keys = SEQ2SEQ_ONLY

    def check_teacher_fits(self, cfg) -> None:
        from kdlab.search.timing import check_seq_len  # noqa: PLC0415 - heavy: see the module docstring
        from kdlab.train.teacher import load_teacher_config  # noqa: PLC0415
        check_seq_len(cfg.target, load_teacher_config(cfg), "the teacher's")

    def prepare(self, cfg, accelerator=None):
        from kdlab.train.pipeline import prepare  # noqa: PLC0415
        return prepare(cfg, accelerator)

    def ensure_teacher(self, cfg, accelerator, prep):
        from kdlab.train.teacher import ensure_teacher  # noqa: PLC0415
        return ensure_teacher(cfg, accelerator, prep.data, prep.tokenizer, prep.train_ds, prep.eval_ds)

    def measure(self, cfg, model, prep, threads, recipes, workdir, reference_only=()):
        from kdlab.search.classification_gate import measure_classifier  # noqa: PLC0415
        return measure_classifier(cfg, model, prep, threads, recipes, workdir, reference_only=reference_only)

    def distil(self, cfg, accelerator) -> dict:
        from kdlab.train.pipeline import run  # noqa: PLC0415
        return run(cfg, accelerator)

    def search_space(self, cfg):
        from kdlab.search.classification_search import build_space  # noqa: PLC0415
        return build_space(cfg)

    def search_setup(self, cfg, accelerator, space, console, threads: int):
        from kdlab.search.classification_search import setup  # noqa: PLC0415
        return setup(cfg, accelerator, space, console, threads)

    def trial_objective(self, trial, ctx):
        from kdlab.search.objective import objective  # noqa: PLC0415
        return objective(trial, ctx)

    def check_model_folder(self, cfg, path, config) -> None:
        from kdlab.train.model_dir import check_classifier_folder  # noqa: PLC0415
        check_classifier_folder(cfg, path, config)

    def prepare_model(self, cfg, model):
        from kdlab.train.model_dir import prepare_classifier  # noqa: PLC0415
        return prepare_classifier(cfg, model)

    def load_network(self, cfg, model, tokenizer):
        from kdlab.train.model_dir import load_classifier  # noqa: PLC0415
        return load_classifier(model)

    def check_test_split(self, cfg) -> None:
        from kdlab.train.data import load_task_data, load_test_split  # noqa: PLC0415
        load_test_split(cfg.data, load_task_data(cfg.data, cfg.train.seed))

    def export(self, cfg, choice, dest, console=None) -> dict:
        from kdlab.search.classification_export import export_classifier  # noqa: PLC0415
        return export_classifier(cfg, choice, dest, console)

    def export_summary(self, manifest: dict, dest) -> str:
        from kdlab.search.classification_export import classifier_summary_line  # noqa: PLC0415
        return classifier_summary_line(manifest, dest)

    def load_artefact(self, folder, manifest: dict, tokenizer, *, recipe: str, device: str, threads: int):
        """The export's served artefact: its ONNX graph, or the safetensors classifier under `recipe`."""
        from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

        from kdlab.distill.export import ONNX_SERVED  # noqa: PLC0415
        from kdlab.distill.quantize import apply_recipe, serve_onnx  # noqa: PLC0415
        if recipe in ONNX_SERVED:
            return serve_onnx(recipe, folder / manifest["served"]["file"], threads)
        model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True).eval()
        example = dict(tokenizer(["a"], return_tensors="pt"))
        return apply_recipe(recipe, model, example_batch=example, device=device, threads=threads, allow_cpu_half=True)

    def predict_records(self, served, texts: list[str], pairs=None) -> list[dict]:
        """{"label", "probs": {label: probability}} per text, from the served artefact's logits."""
        if not texts:
            return []
        labels, probs = served.predict_texts(texts, pairs)
        return [{"label": label, "probs": dict(zip(served.labels, map(float, row)))}
                for label, row in zip(labels, probs.tolist())]

    def capacity_unit(self, cfg) -> str:
        return "one forward pass of the classifier over the request's texts"

    def serving_latency(self, cfg, models: dict, threads: int, batch_sizes: list[int]) -> dict:
        from kdlab.search.classification_export import serving_latency  # noqa: PLC0415
        return serving_latency(cfg, models, threads, batch_sizes)
