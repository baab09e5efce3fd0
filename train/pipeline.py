"""One distillation run: data → teacher (fine-tuned once) → student → distil → best student on disk.

Everything a user can get wrong (config, files, columns, teacher, student shape, vocabulary) is
checked by `prepare` before the run folder is created, so a bad config leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from kdlab.distill.adapter import Signals, run_model
from kdlab.distill.config import Config, ConfigError, save_config
from kdlab.distill.losses import DistillLoss
from kdlab.distill.students import build_student, count_params, same_vocabulary, student_config
from kdlab.train.data import TaskData, load_splits, load_task_data, make_loader, subset_seed, tokenize
from kdlab.train.loop import checkpoint_saver, evaluate_classifier, fit
from kdlab.train.soft_labels import LabelReport, teacher_soft_labels
from kdlab.train.teacher import (TOKENIZER_FILES, ensure_teacher, load_teacher_config, load_tokenizer, resolve_source,
                                 weights_digest)
from kdlab.train.tracking import check_reachable, mlflow_run
from kdlab.train.transfer import TransferSet, build_transfer_set, read_texts, unlabelled_rows


@dataclass
class Prepared:
    """The checked data of a run, tokenized for the teacher and for the student.

    `tokenizer`, `train_ds`, `eval_ds`: the teacher's view (fine-tuning, the gate). `student_*`: the
    student's own tokenizer and its distillation set (the labelled rows, then the transfer set's rows
    with label -100) and dev set; the same objects as the teacher's when the student shares the teacher's
    tokenizer and there is no transfer set. Row `idx` of the distillation set is its position in `texts`,
    the inputs the teacher labels (teacher_soft_labels).
    """
    data: TaskData
    tokenizer: object
    train_ds: object
    eval_ds: object
    student_tokenizer: object = None
    student_train_ds: object = None
    student_eval_ds: object = None
    texts: list = field(default_factory=list)
    pairs: list | None = None
    n_labelled: int = 0
    transfer: TransferSet | None = None

    def segments(self) -> list[list[str]]:
        """`texts` cut by source (labelled rows, then each transfer source): each is labelled and cached on its own."""
        out, at = [self.texts[:self.n_labelled]], self.n_labelled
        for rows in (self.transfer.sources.values() if self.transfer else ()):
            if rows:
                out.append(self.texts[at:at + rows])
                at += rows
        assert at == len(self.texts), "transfer sources do not add up to the transfer set"
        return out

    @property
    def shared_vocabulary(self) -> bool:
        return same_vocabulary(self.tokenizer, self.student_tokenizer)

    def training_data(self, cfg: Config, label_report: LabelReport | None) -> dict:
        """How the student's training data was made (the summary, the card)."""
        tr = cfg.distill.transfer
        return {"labelled_rows": self.n_labelled,
                "transfer": dict(self.transfer.sources) if self.transfer else {},
                "transfer_dropped": dict(self.transfer.dropped) if self.transfer else {},
                "augment": (dataclasses.asdict(tr.augment) if tr.augment.copies else None),
                "teacher_labels": label_report.describe() if label_report else None}


def check_launch(cfg: Config, accelerator: Accelerator | None) -> None:
    """What the launcher and the tracking server must allow, checked before any data or model is read.

    `accelerator` None: a measurement or export in this one process (no launcher to check).
    """
    if accelerator is not None and accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("train.mixed_precision: fp16 needs a GPU; valid on CPU: no, bf16")
    if accelerator is None or accelerator.is_main_process:
        check_reachable(cfg)  # an unreachable tracking server: one line now, not after the teacher trained


def load_student_tokenizer(cfg: Config, teacher_tokenizer):
    """The student's own tokenizer: student.pretrained's, else the teacher's."""
    if not cfg.student.pretrained:
        return teacher_tokenizer
    source = resolve_source(cfg.student.pretrained, key="student.pretrained")
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"student.pretrained: {source} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                          f"a student of another family tokenizes with its own: save its tokenizer beside the weights")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"student.pretrained: cannot load a tokenizer from '{cfg.student.pretrained}' "
                          f"({str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__})"
                          ) from None


def check_student_source(cfg: Config, teacher_tokenizer, student_tokenizer) -> None:
    """A pretrained student's config loads; teacher-signal terms other than logits need one vocabulary."""
    if cfg.student.pretrained:
        source = resolve_source(cfg.student.pretrained, key="student.pretrained")
        try:
            base_config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError):
            raise ConfigError(f"student.pretrained: cannot load a model config from {cfg.student.pretrained}") from None
        student_config(base_config, cfg.student)  # raises on impossible shapes
    if not same_vocabulary(teacher_tokenizer, student_tokenizer):
        d = cfg.distill
        for key, weight in (("hidden_weight", d.hidden_weight), ("attention_weight", d.attention_weight)):
            if weight > 0:
                raise ConfigError(
                    f"distill.{key}: {weight:g} needs teacher and student to read the same tokens, but "
                    f"student.pretrained ({cfg.student.pretrained}, {len(student_tokenizer)} tokens) and the teacher "
                    f"({cfg.teacher.source}, {len(teacher_tokenizer)} tokens) tokenize differently; valid: 0 "
                    f"(logit KD works across tokenizers, from teacher outputs per text)")


def eval_and_test_texts(cfg: Config, data: TaskData) -> list[str]:
    """Texts no transfer row may equal: the dev texts, and the test file's when there is one."""
    texts = [str(t) for t in data.eval[cfg.data.text_column]]
    if cfg.data.test_file:
        texts += read_texts(cfg.data.test_file, cfg.data.text_column, "data.test_file")
    return texts


def collect_transfer(cfg: Config, data: TaskData, mask_token: str | None, say=print) -> TransferSet | None:
    """The transfer set's texts (read and checked before any tokenizing), or None without distill.transfer."""
    d, tr = cfg.data, cfg.distill.transfer
    if not tr.enabled:
        return None
    if d.text_pair_column:
        raise ConfigError("distill.transfer: sentence pairs (data.text_pair_column) have no transfer set yet; "
                          "valid: remove distill.transfer, or use single-text data")
    unlabelled = []
    if tr.unlabelled_train:
        full, _ = load_splits(d)
        unlabelled = unlabelled_rows(full, d.max_train_samples, subset_seed(d, cfg.train.seed), d.text_column)
    labelled = [str(t) for t in data.train[d.text_column]]
    transfer = build_transfer_set(tr, labelled, unlabelled, eval_and_test_texts(cfg, data), mask_token or "[MASK]",
                                  d.text_column)
    if not transfer.texts:
        raise ConfigError("distill.transfer: the transfer set is empty after dropping texts equal to dev, test or "
                          f"labelled texts ({transfer.dropped}); valid: sources with other texts")
    say(f"transfer set: {len(transfer.texts):,} rows ({', '.join(f'{k} {v:,}' for k, v in transfer.sources.items())}; "
        f"dropped {', '.join(f'{k} {v:,}' for k, v in transfer.dropped.items() if v) or 'none'})")
    return transfer


def build_distillation_set(cfg: Config, data: TaskData, student_tokenizer, labelled_ds, transfer: TransferSet | None):
    """(texts, pairs, distillation dataset): the labelled rows, then the transfer rows (label -100)."""
    d = cfg.data
    texts = [str(t) for t in data.train[d.text_column]]
    pairs = [str(t) for t in data.train[d.text_pair_column]] if d.text_pair_column else None
    if transfer is None:
        return texts, pairs, labelled_ds
    offset = len(texts)

    def encode(batch, indices):
        out = student_tokenizer(batch["text"], truncation=True, max_length=d.max_length)
        out["labels"] = [-100] * len(indices)
        out["idx"] = [offset + i for i in indices]
        return out

    rows = datasets.Dataset.from_dict({"text": transfer.texts}).map(
        encode, batched=True, with_indices=True, remove_columns=["text"], desc="tokenizing transfer set")
    columns = [c for c in labelled_ds.column_names if c in rows.column_names]
    joined = datasets.concatenate_datasets([labelled_ds.select_columns(columns), rows.select_columns(columns)])
    return texts + transfer.texts, None, joined


def prepare(cfg: Config, accelerator: Accelerator | None = None) -> Prepared:
    """Validate everything against the real files and teacher, without writing anything.

    Measurement and export pass no accelerator (train/accel.py says why); training passes its own.
    """
    check_launch(cfg, accelerator)
    data = load_task_data(cfg.data, cfg.train.seed)
    teacher_config = load_teacher_config(cfg)
    tokenizer = load_tokenizer(cfg)
    if cfg.student.pretrained is None:
        student_config(teacher_config, cfg.student)  # raises on impossible shapes
    if len(tokenizer) > teacher_config.vocab_size:
        raise ConfigError(f"teacher.source: tokenizer has {len(tokenizer)} tokens but the model only "
                          f"{teacher_config.vocab_size} embeddings")
    student_tokenizer = load_student_tokenizer(cfg, tokenizer)
    check_student_source(cfg, tokenizer, student_tokenizer)
    say = accelerator.print if accelerator is not None else print
    transfer = collect_transfer(cfg, data, student_tokenizer.mask_token, say)
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        train_ds = tokenize(data.train, tokenizer, cfg.data, data.label_names)
        eval_ds = tokenize(data.eval, tokenizer, cfg.data, data.label_names)
        shared = same_vocabulary(tokenizer, student_tokenizer)
        s_train = train_ds if shared else tokenize(data.train, student_tokenizer, cfg.data, data.label_names)
        s_eval = eval_ds if shared else tokenize(data.eval, student_tokenizer, cfg.data, data.label_names)
        texts, pairs, s_train = build_distillation_set(cfg, data, student_tokenizer, s_train, transfer)
    return Prepared(data, tokenizer, train_ds, eval_ds, student_tokenizer, s_train, s_eval, texts, pairs,
                    len(data.train), transfer)


def teacher_dev_batches(prep: Prepared, cfg: Config) -> list[dict]:
    """Dev batches as the teacher reads them (for the fast labelling form's check)."""
    return [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            for b in make_loader(prep.eval_ds, prep.tokenizer, cfg.train.eval_batch_size, shuffle=False)]


def distillation_logits(teacher, prep: Prepared, cfg: Config, accelerator: Accelerator | None,
                        say=print) -> tuple[torch.Tensor, LabelReport]:
    """The teacher's logits for every row of the distillation set (prep.texts), from the shared cache.

    With several processes the main one labels first and the others read its cache entry.
    """
    tr = cfg.distill.transfer
    form = tr.label_with if tr.enabled else "fp32"  # labelled rows alone: too few to be worth a checked fast form
    ctx = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with ctx:
        was = next(teacher.parameters()).device
        teacher.to("cpu")
        try:
            logits, report = teacher_soft_labels(
                teacher, prep.tokenizer, prep.segments(), pairs=[prep.pairs] + [None] * (len(prep.segments()) - 1),
                weights=weights_digest(teacher),
                max_length=cfg.data.max_length, batch_size=tr.batch_size, form=form,
                dev_batches=teacher_dev_batches(prep, cfg) if form != "fp32" else None,
                min_agreement=tr.min_agreement, temperature=cfg.distill.temperature, say=say)
        finally:
            teacher.to(was)
    return logits, report


def make_distill_loss(cfg: Config, teacher, student, logits_cache: torch.Tensor | None):
    """`compute_loss(student, batch)` for the loop, and the loss module (its projections train too).

    `compute_loss.terms(student, batch)` gives each weighted term as a tensor (for gradient norms).
    Rows labelled -100 (the transfer set) have no hard label: cross-entropy averages over the others.
    """
    loss_mod = DistillLoss(cfg.distill, {"hidden_states": (student.config.num_hidden_layers,
                                                           teacher.config.num_hidden_layers)},
                           student.config.hidden_size, teacher.config.hidden_size)
    hard_only = not loss_mod.needs_teacher
    if logits_cache is not None and not loss_mod.logits_only:
        raise ValueError("cached teacher logits serve only logit KD; this loss needs teacher hidden states")

    def signals(model, batch):
        s = run_model(model, batch, hidden=loss_mod.needs_hidden, attentions=loss_mod.needs_attentions,
                      values=loss_mod.needs_values)
        if logits_cache is not None:
            t = Signals(logits=logits_cache[batch["idx"].cpu()].to(s.logits.device))
        else:
            with torch.no_grad():
                t = run_model(teacher, batch, hidden=loss_mod.needs_hidden,
                              attentions=loss_mod.needs_attentions, values=loss_mod.needs_values)
        return s, t

    def compute_terms(model, batch):
        if hard_only:
            logits = run_model(model, batch).logits
            return {"ce": torch.nn.functional.cross_entropy(logits.float(), batch["labels"])}
        s, t = signals(model, batch)
        return loss_mod.terms(s, t, batch["labels"])

    def compute_loss(model, batch):
        if hard_only:  # the hard-label control: no teacher signal at all
            logits = run_model(model, batch).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
            return loss, {"ce": float(loss.detach())}
        s, t = signals(model, batch)
        return loss_mod(s, t, batch["labels"])

    compute_loss.terms = compute_terms
    return compute_loss, loss_mod, hard_only


def run(cfg: Config, accelerator: Accelerator) -> dict:
    """Fine-tune the teacher if needed, distil the student, write runs/<name>/student/. Returns the summary."""
    set_seed(cfg.train.seed)
    prep = prepare(cfg, accelerator)
    return in_run_folder(cfg, accelerator, lambda: _run(cfg, accelerator, prep))


def close_run(cfg: Config, accelerator: Accelerator, tracker, result, summary: dict, out) -> None:
    """The best metric, time and throughput in MLflow, and kdlab_summary.json beside the best checkpoint."""
    tracker.log_metrics({"best_dev_" + cfg.task.metric: result.best_metric,
                         "train_seconds": result.train_seconds, "samples_per_second": result.samples_per_second})
    tracker.set_tags({"kdlab.checkpoint": str(out)})
    if accelerator.is_main_process:
        (out / "kdlab_summary.json").write_text(json.dumps(summary, indent=2))
        tracker.log_artifact(cfg.run_dir / "config.yaml")


def in_run_folder(cfg: Config, accelerator: Accelerator, body):
    """Create runs/<name>/ with its config.yaml and run `body`; a ConfigError found late (a bad teacher
    file, say) removes a run folder this call created, so a bad config leaves nothing behind."""
    created = not cfg.run_dir.exists()
    if accelerator.is_main_process:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    try:
        return body()
    except ConfigError:
        if created and accelerator.is_main_process:
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
        raise


def load_base(cfg: Config, num_labels: int):
    """The pretrained model a student of another family starts from (student.pretrained), or None."""
    if not cfg.student.pretrained:
        return None
    source = resolve_source(cfg.student.pretrained, key="student.pretrained")
    try:
        return AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, use_safetensors=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"student.pretrained: cannot load the weights of '{cfg.student.pretrained}' ({first}); "
                          f"kdlab reads safetensors") from None


def student_source_config(cfg: Config):
    """The config students are shaped from: student.pretrained's, else the teacher's."""
    if not cfg.student.pretrained:
        return load_teacher_config(cfg)
    source = resolve_source(cfg.student.pretrained, key="student.pretrained")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        raise ConfigError(f"student.pretrained: cannot load a model config from {cfg.student.pretrained}") from None


def grad_norms(compute_terms, model, batch) -> dict:
    """Gradient norm of each loss term on one batch, so a term that swamps the others shows at step 0."""
    terms = compute_terms(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for name, value in terms.items():
        if not value.requires_grad:
            continue
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        out[name] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    model.zero_grad(set_to_none=True)
    return out


def _run(cfg: Config, accelerator: Accelerator, prep: Prepared) -> dict:
    run_dir = cfg.run_dir
    attn = "eager" if cfg.distill.attention_weight > 0 and cfg.distill.attention_loss == "tinybert" else None
    teacher, teacher_dev = ensure_teacher(cfg, accelerator, prep.data, prep.tokenizer,
                                          prep.train_ds, prep.eval_ds, attn=attn)
    teacher.to(accelerator.device).eval()
    base = load_base(cfg, prep.data.num_labels)
    student = build_student(teacher, cfg.student, seed=cfg.train.seed, base=base)
    if attn:
        student.config._attn_implementation = attn

    logits_only = cfg.distill.hidden_weight == 0 and cfg.distill.attention_weight == 0
    # Across tokenizers, or over a transfer set, the teacher's outputs per text are the only signal there is.
    use_cache = cfg.distill.alpha > 0 and (not prep.shared_vocabulary or cfg.distill.transfer.enabled
                                           or (cfg.distill.cache_teacher_logits and logits_only))
    logits_cache, label_report = (distillation_logits(teacher, prep, cfg, accelerator, say=accelerator.print)
                                  if use_cache else (None, None))
    compute_loss, loss_mod, hard_only = make_distill_loss(cfg, teacher, student, logits_cache)

    out = run_dir / "student"
    tokenizer = prep.student_tokenizer
    eval_loader = accelerator.prepare(make_loader(prep.student_eval_ds, tokenizer, cfg.train.eval_batch_size,
                                                  shuffle=False))
    train_loader = make_loader(prep.student_train_ds, tokenizer, cfg.train.batch_size, shuffle=True,
                               seed=cfg.train.seed)

    tags = {"kdlab.teacher_source": cfg.teacher.source, "kdlab.student_init": cfg.student.init,
            "kdlab.student_family": cfg.student.pretrained or "teacher", "kdlab.hard_label_control": hard_only}
    training_data = prep.training_data(cfg, label_report)
    with mlflow_run(cfg, "distill", accelerator.is_main_process, tags=tags) as tracker:
        tracker.log_metrics({f"teacher_dev_{k}": v for k, v in teacher_dev.items()})
        tracker.log_params({"student.params": count_params(student), "teacher.params": count_params(teacher),
                            "data.labelled_rows": prep.n_labelled, "data.distill_rows": len(prep.student_train_ds)})
        if label_report is not None and not label_report.reused:
            tracker.log_metrics({"teacher_labels_rows_per_second": label_report.rows_per_second,
                                 **({"teacher_labels_agreement": label_report.check["label_agreement"],
                                     "teacher_labels_mean_kl": label_report.check["mean_kl"]}
                                    if label_report.check else {})})
        first = next(iter(make_loader(prep.student_train_ds, tokenizer, cfg.train.batch_size, shuffle=True,
                                      seed=cfg.train.seed)))
        student.to(accelerator.device)
        norms = grad_norms(compute_loss.terms, student, {k: v.to(accelerator.device) for k, v in first.items()})
        accelerator.print("loss terms, gradient norm at the start: "
                          + ", ".join(f"{k} {v:.3g}" for k, v in norms.items()))
        tracker.log_metrics({f"grad_norm_start/{k}": v for k, v in norms.items()})
        result = fit(accelerator, student, train_loader, cfg=cfg.train, compute_loss=compute_loss,
                     evaluate=lambda m: evaluate_classifier(m, eval_loader, accelerator),
                     save_best=checkpoint_saver(out, tokenizer), out_dir=run_dir / "student_run", tracker=tracker,
                     metric=cfg.task.metric,
                     extra_modules=[loss_mod], desc="distill")
        summary = {
            "name": cfg.name, "teacher_source": cfg.teacher.source, "teacher_dev": teacher_dev,
            "teacher_params": count_params(teacher), "student_params": count_params(student),
            "student": {"num_layers": student.config.num_hidden_layers, "hidden_size": student.config.hidden_size,
                        "num_heads": student.config.num_attention_heads,
                        "intermediate_size": student.config.intermediate_size, "init": cfg.student.init,
                        "family": cfg.student.pretrained or "teacher"},
            "best_dev": {cfg.task.metric: result.best_metric}, "best_step": result.best_step,
            "steps": result.steps, "train_seconds": round(result.train_seconds, 2),
            "samples_per_second": round(result.samples_per_second, 2), "teacher_logits_cached": logits_cache is not None,
            "hard_label_control": hard_only, "checkpoint": str(out), "mlflow_run_id": tracker.run_id,
            "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
            "num_processes": accelerator.num_processes, "training_data": training_data,
            "teacher_labels": dataclasses.asdict(label_report) if label_report else None,
            "grad_norm_start": norms,
        }
        close_run(cfg, accelerator, tracker, result, summary, out)
    accelerator.wait_for_everyone()
    summary["step_times"] = result.step_times
    return summary
