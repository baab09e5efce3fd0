"""Export folders: a trained classifier and its serving recipe, written once, loaded back to serve.

Library module, nothing to launch (`kdlab export` chooses what to export: search/export.py).

An export folder holds
- the Hugging Face folder: config.json, model.safetensors, tokenizer files
  (`AutoModelForSequenceClassification.from_pretrained(folder)` loads it);
- model.onnx, the fp32 ONNX graph, and for the onnx-int8 recipe model.int8.onnx (onnx-int8-ffn:
  model.int8-ffn.onnx), the served file;
- manifest.json: recipe, what is served and how it is rebuilt, labels, tokenization, every file's sha256.

    from kdlab.distill.export import load_served
    served = load_served("runs/sst2_minilm/export")
    served.predict_texts(["a gripping film"])   # -> (labels, probabilities)

PyTorch recipes (fp32, fp16, bf16, dynamic-int8, bnb-*) are not files of their own: they are rebuilt
from model.safetensors by the same `apply_recipe` the gate and the search measured, which is also
how a user rebuilds them (the manifest's `served.how` says it in words).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdlab.distill.errors import ConfigError
from kdlab.distill.errors import ExportError  # noqa: F401  (re-exported: raised by load_served and verify)
from kdlab.distill.quantize import ONNX_INT8_FFN_FILE, Quantized, apply_recipe
from kdlab.distill.task import DEFAULT_TASK, load_task

MANIFEST = "manifest.json"
ONNX_SERVED = {"onnx-fp32": "model.onnx", "onnx-int8-ffn": ONNX_INT8_FFN_FILE, "onnx-int8": "model.int8.onnx"}
HOW = {
    "fp32": "AutoModelForSequenceClassification.from_pretrained(folder) on {device}",
    "fp16": "from_pretrained(folder, dtype=torch.float16) on {device}",
    "bf16": "from_pretrained(folder, dtype=torch.bfloat16) on {device}",
    "dynamic-int8": "from_pretrained(folder), then torch.ao.quantization.quantize_dynamic(model, "
                    "{{nn.Linear: per_channel_dynamic_qconfig}}, dtype=torch.qint8) on CPU",
    "bnb-int8": "from_pretrained(folder), Linear layers replaced by bitsandbytes Linear8bitLt (head kept)",
    "bnb-nf4": "from_pretrained(folder), Linear layers replaced by bitsandbytes Linear4bit nf4 (head kept)",
    "onnx-fp32": "onnxruntime.InferenceSession('model.onnx')",
    "onnx-int8-ffn": f"onnxruntime.InferenceSession('{ONNX_INT8_FFN_FILE}') (QInt8 per-channel weights except the "
                     "attention projections, which stay fp32; dynamic quantization)",
    "onnx-int8": "onnxruntime.InferenceSession('model.int8.onnx') (QInt8 per-channel weights, dynamic quantization)",
}


SEQ2SEQ_HOW = {
    "fp32": "AutoModelForSeq2SeqLM.from_pretrained(folder), model.generate(**inputs, **manifest['generation']) "
            "on {device}",
    "fp16": "from_pretrained(folder, dtype=torch.float16), then generate, on {device}",
    "bf16": "from_pretrained(folder, dtype=torch.bfloat16), then generate, on {device}",
    "dynamic-int8": "AutoModelForSeq2SeqLM.from_pretrained(folder), then torch.ao.quantization.quantize_dynamic("
                    "model, {{nn.Linear: per_channel_dynamic_qconfig}}, dtype=torch.qint8), then generate, on CPU",
    "bnb-int8": "from_pretrained(folder), Linear layers replaced by bitsandbytes Linear8bitLt, then generate",
    "bnb-nf4": "from_pretrained(folder), Linear layers replaced by bitsandbytes Linear4bit nf4, then generate",
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_model(model, tokenizer, folder: Path) -> None:
    """The Hugging Face part of an export: safetensors weights, config and tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def build_served(folder: Path, recipe: str, *, example_batch: dict, device: str = "cpu",
                 threads: int = 1, allow_cpu_half: bool = False) -> Quantized:
    """Build the recipe's artefact inside `folder` (ONNX files land there) and return it, ready to predict.

    model.onnx (fp32) is always written: it is the portable form of the model whatever the recipe.
    """
    model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True).eval()
    onnx = apply_recipe(recipe if recipe in ONNX_SERVED else "onnx-fp32", model,
                        example_batch=example_batch, device="cpu", workdir=folder, threads=threads)
    if recipe in ONNX_SERVED:
        return onnx
    return apply_recipe(recipe, model, example_batch=example_batch, device=device, workdir=folder,
                        allow_cpu_half=allow_cpu_half, threads=threads)


def file_table(folder: Path) -> dict:
    """name -> {bytes, sha256} for every file of the folder except the manifest itself."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def served_entry(recipe: str, device: str) -> dict:
    if recipe not in HOW:
        raise ExportError(f"recipe '{recipe}' cannot be exported; valid: {', '.join(HOW)}")
    return {"recipe": recipe, "device": "cpu" if recipe in ONNX_SERVED else device,
            "file": ONNX_SERVED.get(recipe, "model.safetensors"), "how": HOW[recipe].format(device=device)}


def seq2seq_served_entry(recipe: str, device: str) -> dict:
    if recipe not in SEQ2SEQ_HOW:
        raise ExportError(f"recipe '{recipe}' cannot be exported for seq2seq; valid: {', '.join(SEQ2SEQ_HOW)}")
    return {"recipe": recipe, "device": device, "file": "model.safetensors",
            "how": SEQ2SEQ_HOW[recipe].format(device=device)}


def write_manifest(folder: Path, manifest: dict) -> dict:
    manifest = {**manifest, "files": file_table(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def move_into_place(staging: Path, out: Path) -> None:
    """Replace `out` by the complete `staging` folder; an earlier export is removed only afterwards."""
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    if old.exists():
        shutil.rmtree(old)


# ---------------------------------------------------------------- loading an export to serve


@dataclass
class Served:
    folder: Path
    manifest: dict
    tokenizer: object
    artefact: Quantized

    @property
    def labels(self) -> list[str]:
        return self.manifest["labels"]

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> dict:
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.manifest["max_length"], padding=True,
                             return_tensors="pt")
        return dict(enc)

    @property
    def task(self):
        """The task the export was made for (its manifest's task.type, through the registry)."""
        return task_of_export(self.folder, self.manifest)

    def predict_records(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        """One record per text, in the task's terms ({"label", "probs"}; {"output"} for a generator)."""
        return self.task.predict_records(self, texts, pairs)

    def generate_texts(self, texts: list[str]) -> list[str]:
        """Seq2seq exports: the served artefact's outputs, decoded, with the manifest's prefix and decoding."""
        prefix = self.manifest.get("source_prefix", "")
        enc = self.tokenizer([prefix + t for t in texts], truncation=True, max_length=self.manifest["max_length"],
                             padding=True, return_tensors="pt", return_token_type_ids=False)
        ids = self.artefact.predict(dict(enc))
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True,
                                                               clean_up_tokenization_spaces=True)]

    def predict_texts(self, texts: list[str], pairs: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
        """Labels and class probabilities (float32, rows sum to 1) of the served artefact."""
        logits = self.artefact.predict(self.encode(texts, pairs))
        probs = torch.softmax(logits.float(), dim=-1)
        return [self.labels[i] for i in probs.argmax(-1).tolist()], probs


def verify(folder: Path, manifest: dict) -> None:
    """Every file the manifest lists is there with its recorded size and sha256."""
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{folder}: {name} listed in {MANIFEST} is missing")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ExportError(f"{folder}: {name} does not match its sha256 in {MANIFEST} (altered or truncated)")


def task_of_export(folder: Path, manifest: dict):
    """The task an export folder's manifest names (an export without one is a classifier: kdlab's first task);
    one that is not installed here is an ExportError naming it."""
    try:
        return load_task(manifest.get("task", {}).get("type") or DEFAULT_TASK,
                         where=f"{folder / MANIFEST}: task.type")
    except ConfigError as exc:
        raise ExportError(str(exc)) from None


def load_served(folder: str | Path, *, device: str | None = None, threads: int = 1, check: bool = True) -> Served:
    """The served artefact of an export folder (not the fp32 model, unless the recipe is fp32)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ExportError(f"{folder}: no {MANIFEST}; not an export folder (make one with kdlab export)")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{folder / MANIFEST}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if check:
        verify(folder, manifest)
    served = manifest["served"]
    recipe, device = served["recipe"], device or served["device"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    artefact = task_of_export(folder, manifest).load_artefact(folder, manifest, tokenizer, recipe=recipe,
                                                              device=device, threads=threads)
    return Served(folder, manifest, tokenizer, artefact)


def parity(served: Quantized, reference: Quantized, batches: list) -> dict:
    """The served artefact against the fp32 PyTorch model on the same batches: logits and labels."""
    max_diff, agree, total = 0.0, 0, 0
    for batch in batches:
        a, b = served.predict(batch).float(), reference.predict(batch).float()
        max_diff = max(max_diff, float((a - b).abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return {"rows": total, "max_abs_diff": max_diff, "label_agreement": agree / total if total else float("nan")}
