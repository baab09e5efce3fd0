"""One seq2seq distillation run: pairs → teacher (fine-tuned once) → shrunk student → distil → best student.

The seq2seq counterpart of train/pipeline.py, through the same `fit` loop, MLflow logging and run
folder. Teachers are any `AutoModelForSeq2SeqLM` (T5, flan-T5, mT5, BART, Marian, a saved
`EncoderDecoderModel`), or an encoder-only checkpoint warm-started into an encoder-decoder
(`teacher.encoder_decoder: true`, Rothe et al. 2020). Quality is measured on generated text
(sacreBLEU, chrF, ROUGE, exact match), never on teacher-forced logits.

Sequence-level KD (Kim & Rush 2016) replaces or joins the references with the teacher's beam-search
outputs, generated once per (teacher, data, decoding settings) and cached in runs/<name>/cache/.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, EncoderDecoderModel

from kdlab.distill.adapter import run_seq2seq
from kdlab.distill.config import Config, ConfigError
from kdlab.distill.losses import DistillLoss
from kdlab.distill.seq2seq import build_seq2seq_student, layer_depths
from kdlab.distill.students import count_params
from kdlab.eval.metrics import generation_metrics
from kdlab.train.data import make_loader
from kdlab.train.loop import checkpoint_saver, fit
from kdlab.train.pipeline import check_launch, close_run, in_run_folder
from kdlab.train.seq2seq_data import (Seq2SeqData, check_tokenizer, end_token_id, load_seq2seq_data, pad_pairs,
                                      tokenize_pairs)
from kdlab.train.teacher import (TeacherParts, check_weights, data_digest, ensure_task_teacher, load_teacher_config,
                                 load_tokenizer, load_weights, weights_digest)
from kdlab.train.tracking import mlflow_run

ENCODER_INPUTS = ("input_ids", "attention_mask")


@dataclass
class Prepared:
    data: Seq2SeqData
    tokenizer: object
    train_ds: datasets.Dataset
    eval_ds: datasets.Dataset
    teacher_config: object
    lowercase: bool


def check_teacher_kind(model_config, cfg: Config) -> None:
    """A seq2seq task needs a model that generates: an encoder-decoder, or an encoder to warm-start one."""
    kind = getattr(model_config, "model_type", type(model_config).__name__)
    seq2seq = bool(getattr(model_config, "is_encoder_decoder", False))
    if not seq2seq and not cfg.teacher.encoder_decoder:
        raise ConfigError(f"teacher.source: '{cfg.teacher.source}' is a {kind} model (encoder only) and cannot generate; "
                          f"task.type=seq2seq needs a seq2seq model (T5, BART, Marian, an encoder-decoder), or "
                          f"teacher.encoder_decoder=true to warm-start one from it")
    if seq2seq and cfg.teacher.encoder_decoder:
        raise ConfigError(f"teacher.encoder_decoder: '{cfg.teacher.source}' is already a seq2seq model ({kind}); "
                          f"drop teacher.encoder_decoder")


def tokenizer_lowercases(tokenizer) -> bool:
    ids = tokenizer("Ab", add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids).strip() == "ab"


def decoder_start_id(model_config, tokenizer) -> int | None:
    start = getattr(model_config, "decoder_start_token_id", None)
    if start is None and getattr(model_config, "is_encoder_decoder", False) is False:
        start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    return start


def check_student(cfg: Config, teacher_config) -> None:
    """Depths a teacher-layer copy cannot produce, before anything is trained (the student section is distill's)."""
    if cfg.student.pretrained is not None:
        return
    enc_t, dec_t = (layer_depths(teacher_config) if teacher_config.is_encoder_decoder
                    else (teacher_config.num_hidden_layers,) * 2)
    for key, n, most in (("encoder_layers", cfg.student.encoder_layers or enc_t, enc_t),
                         ("decoder_layers", cfg.student.decoder_layers or cfg.student.num_layers, dec_t)):
        if cfg.student.init != "random" and n > most:
            raise ConfigError(f"student.{key}: {n} exceeds the teacher's {most} layers for teacher "
                              f"initialisation; valid: 1..{most} (or student.init=random)")


def prepare(cfg: Config, accelerator: Accelerator | None = None) -> Prepared:
    """Validate data, tokenizer and teacher kind against the real files, without writing anything.

    Measurement and export pass no accelerator (train/accel.py says why); training passes its own.
    """
    check_launch(cfg, accelerator)
    data = load_seq2seq_data(cfg.data, cfg.train.seed)
    teacher_config = load_teacher_config(cfg)
    check_teacher_kind(teacher_config, cfg)
    tokenizer = load_tokenizer(cfg)
    check_tokenizer(tokenizer, cfg.teacher.source)
    start = decoder_start_id(teacher_config, tokenizer)
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        train_ds = tokenize_pairs(data.train, tokenizer, cfg.data, start)
        eval_ds = tokenize_pairs(data.eval, tokenizer, cfg.data, start)
    lowercase = cfg.generation.lowercase if cfg.generation.lowercase is not None else tokenizer_lowercases(tokenizer)
    return Prepared(data, tokenizer, train_ds, eval_ds, teacher_config, lowercase)


# ---------------------------------------------------------------- generation and scoring


def generation_kwargs(cfg: Config, num_beams: int | None = None) -> dict:
    return {"num_beams": num_beams or cfg.generation.num_beams, "max_new_tokens": cfg.generation.max_new_tokens,
            "do_sample": False}


def encoder_inputs(batch: dict, device) -> dict:
    # token_type_ids must never reach generate (T5 rejects them); labels would make it compute a loss.
    return {k: batch[k].to(device) for k in ENCODER_INPUTS if k in batch}


@torch.no_grad()
def generate_texts(model, loader, tokenizer, gen: dict, accelerator: Accelerator | None = None,
                   desc: str | None = None) -> tuple[list[str], int]:
    """Decoded outputs for every row of `loader` in row (`idx`) order, and the generated token count."""
    net = accelerator.unwrap_model(model) if accelerator is not None else model
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    rows, tokens = [], 0
    show = desc is not None and (accelerator is None or accelerator.is_local_main_process)
    for batch in tqdm(loader, desc=desc, disable=not show, dynamic_ncols=True):
        out = net.generate(**encoder_inputs(batch, device), **gen)
        texts = tokenizer.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        pad = net.generation_config.pad_token_id
        tokens += int((out[:, 1:] != pad).sum()) if pad is not None else out[:, 1:].numel()
        rows.extend(zip(batch["idx"].tolist(), (t.strip() for t in texts)))
    if accelerator is not None and accelerator.num_processes > 1:
        rows = accelerator.gather_for_metrics(rows, use_gather_object=True)
    if was_training:
        net.train()
    return [text for _, text in sorted(dict(rows).items())], tokens


def score(hypotheses: list[str], references: list[str], lowercase: bool) -> dict:
    if lowercase:
        hypotheses, references = [h.lower() for h in hypotheses], [r.lower() for r in references]
    return generation_metrics(hypotheses, references)


def evaluate_seq2seq(model, loader, tokenizer, references: list[str], cfg: Config, lowercase: bool,
                     accelerator: Accelerator | None = None) -> dict:
    """BLEU, chrF, ROUGE and exact match of the model's generated dev outputs (config's decoding)."""
    texts, tokens = generate_texts(model, loader, tokenizer, generation_kwargs(cfg), accelerator)
    return {**score(texts, references, lowercase), "gen_tokens_mean": tokens / max(1, len(texts))}


# ---------------------------------------------------------------- the teacher


def configure_generation(model, tokenizer) -> None:
    """Start, end and pad tokens on both the model config and its generation config."""
    cfg, gen = model.config, model.generation_config
    if getattr(cfg, "decoder_start_token_id", None) is None:
        cfg.decoder_start_token_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = tokenizer.pad_token_id
    if getattr(cfg, "eos_token_id", None) is None:
        cfg.eos_token_id = end_token_id(tokenizer)
    for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
        if getattr(gen, name, None) is None:
            setattr(gen, name, getattr(cfg, name))


def load_seq2seq(source: str, cfg: Config, tokenizer):
    """An `AutoModelForSeq2SeqLM` from a folder or Hub id (`load_weights`: safetensors only unless
    teacher.allow_pickle), its start, end and pad tokens set."""
    model = load_weights(AutoModelForSeq2SeqLM, source, cfg)
    configure_generation(model, tokenizer)
    return model


def warm_start(source: str, cfg: Config, tokenizer):
    """An encoder-decoder whose halves both start from the encoder-only `source` (cross-attention random)."""
    safetensors = check_weights(source, cfg)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(
        source, source, encoder_use_safetensors=safetensors, decoder_use_safetensors=safetensors)
    model.config.decoder_start_token_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None \
        else tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = end_token_id(tokenizer)
    model.config.vocab_size = model.config.decoder.vocab_size
    configure_generation(model, tokenizer)
    return model


def ensure_seq2seq_teacher(cfg: Config, accelerator: Accelerator | None, prep: Prepared):
    """The task-ready encoder-decoder and its dev metrics (`ensure_task_teacher`); under teacher.fine_tune=auto it
    is fine-tuned only when warm-started from an encoder (teacher.encoder_decoder), a seq2seq checkpoint is used as
    it is. Every process scores every dev row (generate_texts gathers them by row)."""
    references = list(prep.data.eval["target"])
    warm = cfg.teacher.encoder_decoder
    return ensure_task_teacher(cfg, accelerator, TeacherParts(
        prep.data, prep.tokenizer, prep.train_ds, prep.eval_ds,
        load=lambda folder: load_seq2seq(folder, cfg, prep.tokenizer),
        start=(lambda source: warm_start(source, cfg, prep.tokenizer)) if warm else None,
        ready=lambda source: None if warm else "it is a seq2seq checkpoint (teacher.fine_tune=auto)",
        evaluate=lambda model, loader, acc: evaluate_seq2seq(model, loader, prep.tokenizer, references, cfg,
                                                             prep.lowercase, acc),
        collator=pad_pairs, shard_eval=False))


# ---------------------------------------------------------------- sequence-level KD


def seq_kd_path(cfg: Config, teacher, data: Seq2SeqData):
    recipe = {"teacher": weights_digest(teacher), "data": data_digest(cfg, data), "rows": len(data.train),
              "prefix": cfg.data.source_prefix, "max_length": cfg.data.max_length,
              "beams": cfg.distill.seq_kd_num_beams, "max_new_tokens": cfg.generation.max_new_tokens}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return cfg.run_dir / "cache" / f"seq_kd-{key}.json"


def seq_kd_targets(teacher, prep: Prepared, cfg: Config, accelerator: Accelerator) -> list[str]:
    """The teacher's beam-search output for every train source, generated once and kept on disk."""
    path = seq_kd_path(cfg, teacher, prep.data)
    if path.is_file():
        targets = json.loads(path.read_text())["targets"]
        if len(targets) == len(prep.data.train):
            accelerator.print(f"sequence-level KD: reusing {len(targets)} teacher outputs from {path}")
            return targets
    loader = make_loader(prep.train_ds, prep.tokenizer, cfg.train.eval_batch_size, shuffle=False, collator=pad_pairs)
    if accelerator.num_processes > 1:
        loader = accelerator.prepare(loader)
    texts, _ = generate_texts(teacher, loader, prep.tokenizer, generation_kwargs(cfg, cfg.distill.seq_kd_num_beams),
                              accelerator, desc=f"teacher beam-{cfg.distill.seq_kd_num_beams} outputs")
    empty = sum(1 for t in texts if not t)
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # workers sharing a run folder may write at once
        tmp.write_text(json.dumps({"beams": cfg.distill.seq_kd_num_beams, "empty": empty, "targets": texts}))
        tmp.rename(path)
    accelerator.wait_for_everyone()
    return texts


def seq_kd_train_set(prep: Prepared, targets: list[str], cfg: Config) -> datasets.Dataset:
    """Train rows for distill.seq_kd: teacher outputs only, or references followed by teacher outputs."""
    start = decoder_start_id(prep.teacher_config, prep.tokenizer)
    usable = [i for i, t in enumerate(targets) if t]  # an empty teacher output teaches nothing
    pseudo = tokenize_pairs(prep.data.train.select(usable), prep.tokenizer, cfg.data, start,
                            targets=[targets[i] for i in usable])
    if cfg.distill.seq_kd == "only":
        return pseudo
    return datasets.concatenate_datasets([prep.train_ds, pseudo])


# ---------------------------------------------------------------- distillation


def student_shape(cfg: Config, teacher) -> dict:
    enc_t, dec_t = layer_depths(teacher.config)
    s = cfg.student
    widths = {k: v for k, v in (("d_model", s.hidden_size), ("d_ff", s.intermediate_size),
                                ("num_heads", s.num_heads)) if v is not None}
    return {"encoder_layers": s.encoder_layers or enc_t, "decoder_layers": s.decoder_layers or s.num_layers,
            "encoder_layer_map": s.encoder_layer_map, "decoder_layer_map": s.decoder_layer_map, **widths}


def width_of(config) -> int:
    enc = getattr(config, "encoder", config)
    return getattr(enc, "d_model", None) or enc.hidden_size


def make_seq2seq_loss(cfg: Config, teacher, student):
    """`compute_loss(model, batch)` for the loop, and the loss module (its projections train too)."""
    (s_enc, s_dec), (t_enc, t_dec) = layer_depths(student.config), layer_depths(teacher.config)
    loss_mod = DistillLoss(cfg.distill, {"encoder_hidden_states": (s_enc, t_enc), "hidden_states": (s_dec, t_dec)},
                           width_of(student.config), width_of(teacher.config))

    def compute_loss(model, batch):
        net = model.module if hasattr(model, "module") else model
        # The student's shift feeds both models, so the teacher is read at exactly the student's positions.
        decoder_input_ids = net.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        s = run_seq2seq(model, batch, decoder_input_ids, hidden=loss_mod.needs_hidden)
        t = None
        if loss_mod.needs_teacher:
            with torch.no_grad():
                t = run_seq2seq(teacher, batch, decoder_input_ids, hidden=loss_mod.needs_hidden)
        return loss_mod(s, t, batch["labels"])

    return compute_loss, loss_mod


def run(cfg: Config, accelerator: Accelerator) -> dict:
    """Fine-tune the teacher if needed, distil the student, write runs/<name>/student/. Returns the summary."""
    set_seed(cfg.train.seed)
    prep = prepare(cfg, accelerator)
    check_student(cfg, prep.teacher_config)
    return in_run_folder(cfg, accelerator, lambda: _run(cfg, accelerator, prep))


def _run(cfg: Config, accelerator: Accelerator, prep: Prepared) -> dict:
    run_dir = cfg.run_dir
    teacher, teacher_dev = ensure_seq2seq_teacher(cfg, accelerator, prep)
    teacher.to(accelerator.device).eval()
    shape = student_shape(cfg, teacher)
    if cfg.student.pretrained:
        student = load_seq2seq(cfg.student.pretrained, cfg, prep.tokenizer)
    else:
        student = build_seq2seq_student(teacher, init=cfg.student.init, seed=cfg.train.seed, **shape)
    configure_generation(student, prep.tokenizer)

    train_ds = prep.train_ds
    if cfg.distill.seq_kd != "none":
        train_ds = seq_kd_train_set(prep, seq_kd_targets(teacher, prep, cfg, accelerator), cfg)
    compute_loss, loss_mod = make_seq2seq_loss(cfg, teacher, student)
    if not loss_mod.needs_teacher:
        teacher.to("cpu")  # references or teacher outputs alone: the teacher is not called while training

    out = run_dir / "student"
    eval_loader = accelerator.prepare(make_loader(prep.eval_ds, prep.tokenizer, cfg.train.eval_batch_size,
                                                  shuffle=False, collator=pad_pairs))
    train_loader = make_loader(train_ds, prep.tokenizer, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                               collator=pad_pairs)
    references = list(prep.data.eval["target"])

    training = "seq-kd" if cfg.distill.seq_kd != "none" else ("word-kd" if cfg.distill.alpha > 0 else "references")
    tags = {"kdlab.teacher_source": cfg.teacher.source, "kdlab.task": "seq2seq", "kdlab.training": training}
    with mlflow_run(cfg, "distill", accelerator.is_main_process, tags=tags) as tracker:
        tracker.log_metrics({f"teacher_dev_{k}": v for k, v in teacher_dev.items()})
        tracker.log_params({"student.params": count_params(student), "teacher.params": count_params(teacher)})
        result = fit(accelerator, student, train_loader, cfg=cfg.train, compute_loss=compute_loss,
                     evaluate=lambda m: evaluate_seq2seq(m, eval_loader, prep.tokenizer, references, cfg,
                                                         prep.lowercase, accelerator),
                     save_best=checkpoint_saver(out, prep.tokenizer), out_dir=run_dir / "student_run", tracker=tracker,
                     metric=cfg.task.metric, extra_modules=[loss_mod], desc="distill")
        enc, dec = layer_depths(student.config)
        summary = {
            "name": cfg.name, "task": "seq2seq", "teacher_source": cfg.teacher.source, "teacher_dev": teacher_dev,
            "teacher_params": count_params(teacher), "student_params": count_params(student),
            "student": {"encoder_layers": enc, "decoder_layers": dec, "width": width_of(student.config),
                        "init": cfg.student.init},
            "training": training, "train_rows": len(train_ds), "lowercase_scoring": prep.lowercase,
            "generation": generation_kwargs(cfg),
            "best_dev": {cfg.task.metric: result.best_metric}, "best_step": result.best_step,
            "steps": result.steps, "train_seconds": round(result.train_seconds, 2),
            "samples_per_second": round(result.samples_per_second, 2), "checkpoint": str(out),
            "mlflow_run_id": tracker.run_id, "mixed_precision": accelerator.mixed_precision,
            "device": str(accelerator.device), "num_processes": accelerator.num_processes,
        }
        close_run(cfg, accelerator, tracker, result, summary, out)
    accelerator.wait_for_everyone()
    summary["step_times"] = result.step_times
    return summary
