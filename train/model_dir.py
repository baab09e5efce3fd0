"""A trained model folder given as `--model DIR`, checked against the config's task and labels.

Library module for `kdlab gate --model DIR` and `kdlab export --model DIR` (search/model_gate.py,
search/export.py). DIR is the student `accelerate launch train/distill.py` wrote to runs/<name>/student, or any
model fine-tuned elsewhere for the config's task (a sequence classifier with the data's labels, in order; an
encoder-decoder under task.type=seq2seq). What a user can get wrong about the folder is a one-line
ConfigError before anything is measured or written. The model tokenizes with its own tokenizer (DIR's files),
not the teacher's: a student of another family (student.pretrained) may have another vocabulary.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from kdlab.distill.config import Config, ConfigError
from kdlab.distill.task import task_of
from kdlab.train.data import load_task_data, tokenize
from kdlab.train.pipeline import Prepared
from kdlab.train.seq2seq import Prepared as Seq2SeqPrepared, decoder_start_id, load_seq2seq, tokenizer_lowercases
from kdlab.train.seq2seq_data import end_token_id, load_seq2seq_data, tokenize_pairs
from kdlab.train.teacher import TOKENIZER_FILES
from kdlab.train.tracking import check_reachable

SUMMARY = "kdlab_summary.json"  # what train/distill.py writes beside the best student


@dataclass
class ModelDir:
    """A checked model folder: `path` as the user gave it, its transformers config, and train/distill.py's summary
    of the run that wrote it (None for a model trained elsewhere)."""
    path: Path
    config: object
    summary: dict | None

    @property
    def mlflow_run_id(self) -> str | None:
        """The distillation's MLflow run, which `kdlab export --model` logs the export on."""
        return (self.summary or {}).get("mlflow_run_id")


def config_where(cfg: Config) -> str:
    return cfg.config_path or "<config>"


def valid_model_folder(cfg: Config) -> str:
    return (f"valid: a folder a training saved (config.json, safetensors weights, tokenizer), e.g. "
            f"{cfg.run_dir / 'student'} after accelerate launch train/distill.py --config {config_where(cfg)}")


def check_model_dir(cfg: Config, model_dir: str | Path) -> ModelDir:
    """The folder's config, kind (what the task reads: check_model_folder), weights and tokenizer files."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"--model: folder not found: {path}; {valid_model_folder(cfg)}")
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model: {path} is not a trained model folder (no config.json); {valid_model_folder(cfg)}")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--model: cannot read {path / 'config.json'} ({first}); {valid_model_folder(cfg)}") from None
    task_of(cfg).check_model_folder(cfg, path, config)
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"--model: {path} has no safetensors weights; kdlab reads safetensors "
                          f"(model.save_pretrained(folder) writes them)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"--model: {path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); the model "
                          f"tokenizes with its own: save it beside the weights (tokenizer.save_pretrained(folder))")
    summary = None
    if (path / SUMMARY).is_file():
        try:
            summary = json.loads((path / SUMMARY).read_text())
        except ValueError:
            raise ConfigError(f"--model: {path / SUMMARY} is not valid JSON (train/distill.py writes it whole; "
                              f"was it edited?)") from None
    return ModelDir(path, config, summary)


def model_kind(config) -> tuple[str, list[str]]:
    """The model type and architectures a folder's config names, for messages."""
    kind = getattr(config, "model_type", None) or type(config).__name__
    return kind, list(getattr(config, "architectures", None) or [])


def check_classifier_folder(cfg: Config, path: Path, config) -> None:
    """A sequence classifier (not an encoder-decoder), with its classification head."""
    kind, archs = model_kind(config)
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"--model: {path} is a seq2seq model ({kind}) but task.type is {cfg.task.type} in "
                          f"{config_where(cfg)}; valid: a sequence-classification model folder (a seq2seq model needs "
                          f"a config with task.type: seq2seq)")
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"--model: {path} is not a trained sequence classifier (architectures: "
                          f"{', '.join(archs) or 'none'}; no classification head); {valid_model_folder(cfg)}")


def check_seq2seq_folder(cfg: Config, path: Path, config) -> None:
    """An encoder-decoder."""
    kind, archs = model_kind(config)
    if not getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"--model: {path} is a {kind} model ({', '.join(archs) or 'no architectures'}), not an "
                          f"encoder-decoder, but task.type is seq2seq in {config_where(cfg)}; valid: a seq2seq model "
                          f"folder (T5, BART, Marian, ...), such as a seq2seq student")


def model_labels(config) -> list[str]:
    return [str(config.id2label[i]) for i in range(config.num_labels)]


def check_labels(cfg: Config, model: ModelDir, label_names: list[str]) -> None:
    """A classifier's labels must be the data's, in the same order: its output i is the data's label i."""
    have = model_labels(model.config)
    if have != list(label_names):
        raise ConfigError(f"--model: {model.path} classifies {len(have)} labels ({', '.join(have)}) but the data of "
                          f"{config_where(cfg)} has {len(label_names)} ({', '.join(label_names)}); valid: a model "
                          f"trained on these labels, in this order (data.label_names)")


def load_model_tokenizer(model: ModelDir):
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--model: cannot load the tokenizer of {model.path} ({first})") from None
    vocab = getattr(model.config, "vocab_size", None)
    if vocab and len(tokenizer) > vocab:
        raise ConfigError(f"--model: the tokenizer of {model.path} has {len(tokenizer)} tokens but the model only "
                          f"{vocab} embeddings")
    return tokenizer


def prepare_model(cfg: Config, model: ModelDir):
    """The dev set, tokenized by the model's own tokenizer, for measuring or exporting it; writes nothing.

    Returns train/pipeline.py's Prepared (seq2seq: train/seq2seq.py's) with no tokenized training rows: neither
    measuring nor exporting reads them.
    """
    check_reachable(cfg)  # an unreachable tracking server: one line now, not after the measurement
    return task_of(cfg).prepare_model(cfg, model)


def prepare_classifier(cfg: Config, model: ModelDir) -> Prepared:
    data = load_task_data(cfg.data, cfg.train.seed)
    check_labels(cfg, model, data.label_names)
    tokenizer = load_model_tokenizer(model)
    return Prepared(data, tokenizer, None, tokenize(data.eval, tokenizer, cfg.data, data.label_names))


def prepare_seq2seq_model(cfg: Config, model: ModelDir) -> Seq2SeqPrepared:
    data = load_seq2seq_data(cfg.data, cfg.train.seed)
    tokenizer = load_model_tokenizer(model)
    if tokenizer.pad_token_id is None or end_token_id(tokenizer) is None:
        missing = "pad" if tokenizer.pad_token_id is None else "end-of-sequence (eos or sep)"
        raise ConfigError(f"--model: the tokenizer of {model.path} has no {missing} token; seq2seq batches and "
                          f"generation need one")
    eval_ds = tokenize_pairs(data.eval, tokenizer, cfg.data, decoder_start_id(model.config, tokenizer))
    lowercase = cfg.generation.lowercase if cfg.generation.lowercase is not None else tokenizer_lowercases(tokenizer)
    return Seq2SeqPrepared(data, tokenizer, None, eval_ds, model.config, lowercase)


def load_network(cfg: Config, model: ModelDir, tokenizer):
    """The model itself, fp32 on the CPU in eval mode, read from safetensors (as its task loads it)."""
    return task_of(cfg).load_network(cfg, model, tokenizer)


def load_classifier(model: ModelDir):
    return AutoModelForSequenceClassification.from_pretrained(model.path, use_safetensors=True).eval()


def load_seq2seq_model(cfg: Config, model: ModelDir, tokenizer):
    return load_seq2seq(str(model.path), cfg, tokenizer).eval()


def weights_sha256(path: Path) -> str:
    """One digest of every *.safetensors file of the folder (names and bytes): changes when it is trained again."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).glob("*.safetensors")):
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def architecture(model: ModelDir) -> dict:
    """Depth and widths for the model card: the distillation summary's, else read from the model's config."""
    student = (model.summary or {}).get("student")
    if student:
        return dict(student)
    c = model.config
    return {"num_layers": getattr(c, "num_hidden_layers", None), "hidden_size": getattr(c, "hidden_size", None),
            "num_heads": getattr(c, "num_attention_heads", None),
            "intermediate_size": getattr(c, "intermediate_size", None), "init": None}
