"""The classification search's own parts: its space, what a study prepares once, and what a trial builds, trains
and scores (`ClassifierTrial`, run by search/objective.py's shared trial).

Library module for the classification task (kdlab.tasks.classification calls it; search/study.py calls the
task); nothing to launch. seq2seq_search.py holds the seq2seq counterparts. A search over several families
(`search.families`) prepares each family once (`family_context`: its tokenizer's distillation set, dev and
timing batches, teacher logits, base weights) and draws its shape from that family's own space.
"""
from __future__ import annotations

import dataclasses

from transformers import AutoModelForSequenceClassification

from kdlab.distill.config import Config, ConfigError, search_families
from kdlab.distill.export import parity
from kdlab.distill.quantize import apply_recipe
from kdlab.distill.students import build_student
from kdlab.eval.latency import machine_info, versions
from kdlab.search.classification_gate import dev_quality
from kdlab.search.objective import Context, Family, Training
from kdlab.search.space import TEACHER_FAMILY, FamilySpace, SearchSpace, TeacherShape
from kdlab.search.study_tracking import StudyTracking
from kdlab.search.targets import Targets
from kdlab.search.timing import target_profile, timing_batches
from kdlab.train.data import make_loader
from kdlab.train.loop import evaluate_classifier
from kdlab.train.pipeline import distillation_logits, load_base, make_distill_loss, prepare, student_source_config
from kdlab.train.teacher import ensure_teacher


def family_config(cfg: Config, family: str) -> Config:
    """The config as a student of `family` reads it (search.families): student.pretrained set to it, or unset."""
    return dataclasses.replace(cfg, student=dataclasses.replace(
        cfg.student, pretrained=None if family == TEACHER_FAMILY else family))


def build_space(cfg: Config):
    """The classification search space: one SearchSpace, or a FamilySpace over search.families (errors name the
    family whose shape the ranges do not fit)."""
    families = search_families(cfg)
    if len(families) == 1:
        fcfg = family_config(cfg, families[0])
        return SearchSpace(fcfg, TeacherShape.of(student_source_config(fcfg)), family=families[0])
    spaces = {}
    for family in families:
        fcfg = family_config(cfg, family)
        try:
            spaces[family] = SearchSpace(fcfg, TeacherShape.of(student_source_config(fcfg)), family=family,
                                         prefix=f"{family}:")
        except ConfigError as exc:
            raise ConfigError(f"search.families: {family}: {exc}".replace("student.pretrained: ", "")) from None
    return FamilySpace(spaces)


def family_context(cfg: Config, accelerator, teacher, prep, threads: int) -> Family:
    """What the students of one family read: dev batches tokenized by their own tokenizer (scoring, timing),
    the distillation set's teacher logits, and the pretrained model they are cut from."""
    s_eval, s_tok = prep.student_eval_ds, prep.student_tokenizer
    quality_batches = list(make_loader(s_eval, s_tok, cfg.train.eval_batch_size, shuffle=False))
    batches, lengths = timing_batches(s_eval, s_tok, cfg.target.batch_size, cfg.target.seq_len,
                                      vocab_size=len(s_tok), seed=cfg.train.seed)
    logits_only = cfg.distill.hidden_weight == 0 and cfg.distill.attention_weight == 0
    needs_cache = not prep.shared_vocabulary or cfg.distill.transfer.enabled
    logits_cache, label_report = (distillation_logits(teacher, prep, cfg, accelerator, say=accelerator.print)
                                  if needs_cache or (cfg.distill.cache_teacher_logits and logits_only)
                                  else (None, None))
    eval_loader = accelerator.prepare(make_loader(s_eval, s_tok, cfg.train.eval_batch_size, shuffle=False))
    return Family(prep, load_base(cfg, prep.data.num_labels), batches, quality_batches, eval_loader, logits_cache,
                  target_profile(cfg.target, threads, lengths["seq_len_median"]), lengths, label_report)


def setup(cfg: Config, accelerator, space, console, threads: int) -> Context:
    """Every family's data and the teacher, prepared once for the whole study."""
    names = search_families(cfg)
    preps = {}
    for name in names:  # every family's files and tokenizer are checked before the teacher is touched
        try:
            preps[name] = prepare(family_config(cfg, name), accelerator)
        except ConfigError as exc:
            if len(names) == 1:
                raise
            raise ConfigError(f"search.families: {name}: {exc}") from None
    prep = preps[names[0]]
    tracking = StudyTracking(cfg)
    tracking.ensure_experiment()  # before the teacher's own MLflow run creates the experiment elsewhere
    attn = "eager" if cfg.distill.attention_weight > 0 and cfg.distill.attention_loss == "tinybert" else None
    teacher, teacher_dev = ensure_teacher(cfg, accelerator, prep.data, prep.tokenizer, prep.train_ds, prep.eval_ds,
                                          attn=attn)
    teacher = teacher.to(accelerator.device).eval()
    # Students read their own tokenizer's tokens (student.pretrained, search.families), in training, scoring and
    # timing alike; the teacher's reference point (search/study.py) reads the teacher's.
    families = {name: family_context(family_config(cfg, name), accelerator, teacher, p, threads)
                for name, p in preps.items()}
    first = families[names[0]]
    ctx = Context(cfg, accelerator, prep, teacher, space, Targets(), first.profile, first.batches,
                  first.quality_batches, first.eval_loader, first.logits_cache, attn, threads, tracking, {}, console,
                  first.base, families if len(names) > 1 else None, parts=ClassifierTrial())
    ctx.meta = {"conditions": {"device": cfg.target.device, "threads": threads, "batch_size": cfg.target.batch_size,
                               "seq_len": cfg.target.seq_len, **first.lengths, "metric": cfg.task.metric,
                               "dev_rows": len(prep.eval_ds), "teacher": cfg.teacher.source,
                               "teacher_dev": teacher_dev,
                               "training_data": prep.training_data(cfg, first.label_report),
                               "cpu": machine_info()["cpu"],
                               "torch": versions()["torch"]}}
    if len(names) > 1:  # each family's tokenizer makes its own dev lengths, so its own timing batches
        ctx.meta["conditions"]["families"] = {name: {"seq_len_median": f.lengths["seq_len_median"]}
                                              for name, f in families.items()}
    return ctx


class ClassifierTrial:
    """A classification trial's parts (search/objective.py TrialParts): a student cut from the teacher or its family's
    pretrained base, served by the recipes of distill/quantize.py, distilled on logits (and hidden states or
    attentions), scored by accuracy or F1 of the served artefact and by its label agreement with its fp32 weights."""

    def student(self, candidate, ctx: Context):
        return build_student(ctx.teacher, candidate.student(), seed=ctx.cfg.train.seed, base=ctx.base)

    def served(self, recipe: str, model, ctx: Context, workdir, screening: bool = False):
        cfg = ctx.cfg
        return apply_recipe(recipe, model, example_batch=ctx.quality_batches[0], device=cfg.target.device,
                            workdir=workdir, allow_cpu_half=cfg.quantization.allow_cpu_bf16, threads=ctx.threads)

    def training(self, trial_cfg: Config, ctx: Context, student) -> Training:
        if ctx.attn:
            student.config._attn_implementation = ctx.attn
        compute_loss, loss_mod, _ = make_distill_loss(trial_cfg, ctx.teacher, student, ctx.logits_cache)
        loader = make_loader(ctx.prep.student_train_ds, ctx.prep.student_tokenizer, trial_cfg.train.batch_size,
                             shuffle=True, seed=trial_cfg.train.seed)
        return Training(compute_loss, [loss_mod], loader,
                        lambda model: evaluate_classifier(model, ctx.eval_loader, ctx.accelerator),
                        ctx.prep.student_tokenizer)

    def trained(self, trial_dir, ctx: Context):
        return AutoModelForSequenceClassification.from_pretrained(trial_dir, use_safetensors=True).eval()

    def quality(self, served, trained, candidate, ctx: Context) -> tuple[float, float]:
        quality = dev_quality(served, ctx.quality_batches, ctx.cfg.task.metric, ctx.prep.data.num_labels)
        # What the export checks (search/export.py): the served artefact against the fp32 weights on the CPU, on
        # the same dev rows in the same batches (the student's tokenizer, train.eval_batch_size), so a trial
        # feasible here is never refused there. fp32 agrees with itself.
        agreement = 1.0 if candidate.recipe == "fp32" else parity(
            served, apply_recipe("fp32", trained, example_batch=ctx.quality_batches[0], device="cpu",
                                 threads=ctx.threads), ctx.quality_batches)["label_agreement"]
        return quality, agreement
