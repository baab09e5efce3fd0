"""One distillation run: data → teacher (fine-tuned once) → student → distil → best student on disk.

Everything a user can get wrong (config, files, columns, teacher, student shape, vocabulary) is
checked by `prepare` before the run folder is created, so a bad config leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from kdlab.distill.adapter import Signals, run_model
from kdlab.distill.config import Config, ConfigError, save_config
from kdlab.distill.losses import DistillLoss
from kdlab.distill.students import build_student, check_vocab, count_params, student_config
from kdlab.train.data import TaskData, load_task_data, make_loader, tokenize
from kdlab.train.loop import atomic_dir, evaluate_classifier, fit
from kdlab.train.teacher import ensure_teacher, load_teacher_config, load_tokenizer, weights_digest
from kdlab.train.tracking import check_reachable, mlflow_run


@dataclass
class Prepared:
    data: TaskData
    tokenizer: object
    train_ds: object
    eval_ds: object


def check_launch(cfg: Config, accelerator: Accelerator | None) -> None:
    """What the launcher and the tracking server must allow, checked before any data or model is read.

    `accelerator` None: a measurement or export in this one process (no launcher to check).
    """
    if accelerator is not None and accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("train.mixed_precision: fp16 needs a GPU; valid on CPU: no, bf16")
    if accelerator is None or accelerator.is_main_process:
        check_reachable(cfg)  # an unreachable tracking server: one line now, not after the teacher trained


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
    if cfg.student.pretrained:
        try:
            vocab = AutoConfig.from_pretrained(cfg.student.pretrained).vocab_size
        except (OSError, ValueError):
            raise ConfigError(f"student.pretrained: cannot load a model config from {cfg.student.pretrained}") from None
        if vocab != teacher_config.vocab_size:
            raise ConfigError(f"student.pretrained: {cfg.student.pretrained} has a vocabulary of {vocab} tokens "
                              f"but the teacher ({cfg.teacher.source}) has {teacher_config.vocab_size}; "
                              "the student must use the teacher's tokenizer")
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        train_ds = tokenize(data.train, tokenizer, cfg.data, data.label_names)
        eval_ds = tokenize(data.eval, tokenizer, cfg.data, data.label_names)
    return Prepared(data, tokenizer, train_ds, eval_ds)


@torch.no_grad()
def cached_teacher_logits(teacher, train_ds, tokenizer, cfg: Config, accelerator: Accelerator) -> torch.Tensor:
    """Teacher logits for every train row, in `idx` order, computed once and kept on disk.

    The cache key covers the teacher's weights, the tokenized data and the length limit, so a
    changed teacher or data set never reads stale logits.
    """
    digest = hashlib.sha256(weights_digest(teacher).encode())
    digest.update(f"{train_ds._fingerprint}:{cfg.data.max_length}".encode())
    path = cfg.run_dir / "cache" / f"teacher_logits-{digest.hexdigest()[:16]}.safetensors"
    if not path.is_file():
        loader = accelerator.prepare(make_loader(train_ds, tokenizer, cfg.train.eval_batch_size, shuffle=False))
        teacher.eval()
        idx_all, logits_all = [], []
        for batch in loader:
            logits = run_model(teacher, batch).logits.float()
            idx, logits = accelerator.gather_for_metrics((batch["idx"], logits))
            idx_all.append(idx.cpu())
            logits_all.append(logits.cpu())
        if accelerator.is_main_process:
            order = torch.cat(idx_all).argsort()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # workers sharing a run folder may write at once
            save_file({"logits": torch.cat(logits_all)[order].contiguous()}, str(tmp))
            tmp.rename(path)
        accelerator.wait_for_everyone()
    return load_file(str(path))["logits"]


def make_distill_loss(cfg: Config, teacher, student, logits_cache: torch.Tensor | None):
    """`compute_loss(student, batch)` for the loop, and the loss module (its projections train too)."""
    loss_mod = DistillLoss(cfg.distill, student.config.num_hidden_layers, teacher.config.num_hidden_layers,
                           student.config.hidden_size, teacher.config.hidden_size)
    hard_only = cfg.distill.alpha == 0 and loss_mod.logits_only
    if logits_cache is not None and not loss_mod.logits_only:
        raise ValueError("cached teacher logits serve only logit KD; this loss needs teacher hidden states")

    def compute_loss(model, batch):
        if hard_only:  # the hard-label control: no teacher signal at all
            logits = run_model(model, batch).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
            return loss, {"ce": float(loss.detach())}
        s = run_model(model, batch, hidden=loss_mod.needs_hidden, attentions=loss_mod.needs_attentions,
                      values=loss_mod.needs_values)
        if logits_cache is not None:
            t = Signals(logits=logits_cache[batch["idx"].cpu()].to(s.logits.device))
        else:
            with torch.no_grad():
                t = run_model(teacher, batch, hidden=loss_mod.needs_hidden,
                              attentions=loss_mod.needs_attentions, values=loss_mod.needs_values)
        return loss_mod(s, t, batch["labels"])

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


def _run(cfg: Config, accelerator: Accelerator, prep: Prepared) -> dict:
    run_dir = cfg.run_dir
    attn = "eager" if cfg.distill.attention_weight > 0 and cfg.distill.attention_loss == "tinybert" else None
    teacher, teacher_dev = ensure_teacher(cfg, accelerator, prep.data, prep.tokenizer,
                                          prep.train_ds, prep.eval_ds, attn=attn)
    teacher.to(accelerator.device).eval()
    student = build_student(teacher, cfg.student, seed=cfg.train.seed)
    if attn:
        student.config._attn_implementation = attn
    check_vocab(teacher, student, cfg.student.pretrained or "student")

    logits_only = cfg.distill.hidden_weight == 0 and cfg.distill.attention_weight == 0
    use_cache = cfg.distill.cache_teacher_logits and logits_only and cfg.distill.alpha > 0
    logits_cache = cached_teacher_logits(teacher, prep.train_ds, prep.tokenizer, cfg, accelerator) if use_cache else None
    compute_loss, loss_mod, hard_only = make_distill_loss(cfg, teacher, student, logits_cache)

    out = run_dir / "student"
    eval_loader = accelerator.prepare(make_loader(prep.eval_ds, prep.tokenizer, cfg.train.eval_batch_size, shuffle=False))
    train_loader = make_loader(prep.train_ds, prep.tokenizer, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)

    def save_best(model):
        with atomic_dir(out) as tmp:  # a kill mid-save never leaves a half-written best checkpoint
            model.save_pretrained(tmp)
            prep.tokenizer.save_pretrained(tmp)

    tags = {"kdlab.teacher_source": cfg.teacher.source, "kdlab.student_init": cfg.student.init,
            "kdlab.hard_label_control": hard_only}
    with mlflow_run(cfg, "distill", accelerator.is_main_process, tags=tags) as tracker:
        tracker.log_metrics({f"teacher_dev_{k}": v for k, v in teacher_dev.items()})
        tracker.log_params({"student.params": count_params(student), "teacher.params": count_params(teacher)})
        result = fit(accelerator, student, train_loader, cfg=cfg.train, compute_loss=compute_loss,
                     evaluate=lambda m: evaluate_classifier(m, eval_loader, accelerator), save_best=save_best,
                     out_dir=run_dir / "student_run", tracker=tracker, metric=cfg.task.metric,
                     extra_modules=[loss_mod], desc="distill")
        summary = {
            "name": cfg.name, "teacher_source": cfg.teacher.source, "teacher_dev": teacher_dev,
            "teacher_params": count_params(teacher), "student_params": count_params(student),
            "student": {"num_layers": student.config.num_hidden_layers, "hidden_size": student.config.hidden_size,
                        "num_heads": student.config.num_attention_heads,
                        "intermediate_size": student.config.intermediate_size, "init": cfg.student.init},
            "best_dev": {cfg.task.metric: result.best_metric}, "best_step": result.best_step,
            "steps": result.steps, "train_seconds": round(result.train_seconds, 2),
            "samples_per_second": round(result.samples_per_second, 2), "teacher_logits_cached": logits_cache is not None,
            "hard_label_control": hard_only, "checkpoint": str(out), "mlflow_run_id": tracker.run_id,
            "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
            "num_processes": accelerator.num_processes,
        }
        close_run(cfg, accelerator, tracker, result, summary, out)
    accelerator.wait_for_everyone()
    summary["step_times"] = result.step_times
    return summary
