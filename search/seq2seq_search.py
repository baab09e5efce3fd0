"""The student search for seq2seq: encoder depth × decoder depth × recipe, BLEU ↑ and generation p95 ↓.

Library module for the seq2seq task (kdlab.tasks.seq2seq calls it; search/study.py calls the task); the
study, sampler, constraints, MLflow parent/child runs, Pareto report, resume logic and the trial's steps
(search/objective.py) are shared. What differs: a candidate is (encoder layers, decoder layers, recipe, optional learning rate /
temperature / alpha) of a student that copies spread-out teacher layers at the teacher's width; a
served call is one greedy (or `generation.num_beams`) `generate` on real dev sources; quality is
task.metric (BLEU by default) of the served artefact's generated text. Latency is measured before
training with the decoder forced to the trained teacher's mean output length (an untrained student
would stop at a random length), and again after training on its own outputs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from kdlab.distill.config import Config, ConfigError, Range, search_ranges, search_recipes
from kdlab.distill.quantize import apply_generation_recipe
from kdlab.distill.seq2seq import build_seq2seq_student, layer_depths, model_width
from kdlab.search.objective import Context, Training
from kdlab.search.seq2seq_gate import generation_batches
from kdlab.search.space import Knobs, described, draw, first_fitting
from kdlab.search.targets import Targets
from kdlab.search.timing import target_profile
from kdlab.train.seq2seq import (configure_generation, ensure_seq2seq_teacher, evaluate_seq2seq, generate_texts,
                           generation_kwargs, load_seq2seq, make_seq2seq_loss, prepare, score)
from kdlab.train.data import make_loader
from kdlab.train.seq2seq_data import pad_pairs


@dataclass(frozen=True)
class Seq2SeqCandidate:
    encoder_layers: int
    decoder_layers: int
    recipe: str
    learning_rate: float
    temperature: float
    alpha: float
    hidden_size: int
    init: str = "teacher-layers"

    def label(self) -> str:
        return (f"{self.encoder_layers}+{self.decoder_layers} layers (encoder+decoder) x {self.hidden_size}, "
                f"{self.init}, {self.recipe}")

    def to_dict(self) -> dict:
        return asdict(self)


class Seq2SeqSpace(Knobs):
    """`search.encoder_layers`, `decoder_layers`, `recipes` and the training knobs, bound to the teacher."""

    def __init__(self, cfg: Config, teacher_config):
        enc_t, dec_t = (layer_depths(teacher_config) if getattr(teacher_config, "is_encoder_decoder", False)
                        else (teacher_config.num_hidden_layers,) * 2)
        self.teacher_depths = (enc_t, dec_t)
        self.width = model_width(teacher_config) if teacher_config.is_encoder_decoder else teacher_config.hidden_size
        ranges = search_ranges(cfg)
        self.encoder = ranges["encoder_layers"] or Range(choices=(enc_t,))
        self.decoder = ranges["decoder_layers"] or Range(low=1, high=dec_t, step=1)
        for key, rng, most in (("encoder_layers", self.encoder, enc_t), ("decoder_layers", self.decoder, dec_t)):
            if max(rng.values()) > most:
                raise ConfigError(f"search.{key}: {max(rng.values())} exceeds the teacher's {most} layers; "
                                  f"valid: 1..{most} (students copy teacher layers)")
        recipes = search_recipes(cfg)
        onnx = [r for r in recipes if r.startswith("onnx")]
        if onnx:
            raise ConfigError(f"search.recipes: {onnx[0]} cannot serve seq2seq generation yet; valid for seq2seq: "
                              "fp32, dynamic-int8 (cpu), fp16, bf16, bnb-int8, bnb-nf4")
        super().__init__(cfg, recipes)

    @classmethod
    def from_config(cls, cfg: Config, teacher_config) -> "Seq2SeqSpace":
        return cls(cfg, teacher_config)

    def suggest(self, trial) -> Seq2SeqCandidate:
        return Seq2SeqCandidate(int(draw(trial, "encoder_layers", self.encoder)),
                                int(draw(trial, "decoder_layers", self.decoder)), *self.draw_knobs(trial), self.width)

    def params_of(self, c: Seq2SeqCandidate) -> dict:
        return {"encoder_layers": c.encoder_layers, "decoder_layers": c.decoder_layers, **self.knob_params(c)}

    def seeds(self, n: int, device: str = "cpu", fits=None) -> list[Seq2SeqCandidate]:
        """The deepest encoder with 1, 2, ... decoder layers: decoding steps dominate generation time. Each takes
        the first preferred recipe that `fits` (candidate -> bool), else the first."""
        recipes = [r for r in ("dynamic-int8", "fp16", "fp32") if r in self.recipes.choices] or [
            self.recipes.choices[0]]
        lr, temperature, alpha = self.seed_knobs()
        encoder = max(self.encoder.values())
        out = []
        for layers in self.decoder.values():
            c = first_fitting([Seq2SeqCandidate(encoder, int(layers), recipe, lr, temperature, alpha, self.width)
                               for recipe in recipes], fits)
            if c not in out:
                out.append(c)
        return out[:n]

    def describe(self) -> dict:
        return {"encoder_layers": described(self.encoder), "decoder_layers": described(self.decoder),
                **self.describe_knobs()}


# ---------------------------------------------------------------- study setup


def setup(cfg: Config, accelerator, space: Seq2SeqSpace, console, tracking, threads: int) -> Context:
    prep = prepare(cfg, accelerator)
    teacher, teacher_dev = ensure_seq2seq_teacher(cfg, accelerator, prep)
    teacher = teacher.to(accelerator.device).eval()
    batches, lengths = generation_batches(prep, cfg.target.batch_size, seed=cfg.train.seed)
    profile = target_profile(cfg.target, threads, lengths["seq_len_median"])
    eval_loader = accelerator.prepare(make_loader(prep.eval_ds, prep.tokenizer, cfg.train.eval_batch_size,
                                                  shuffle=False, collator=pad_pairs))
    # Untrained students stop at random lengths; screen them at the trained teacher's mean output length.
    parts = GeneratorTrial(max(1, round(teacher_dev.get("gen_tokens_mean") or cfg.generation.max_new_tokens)))
    ctx = Context(cfg, accelerator, prep, teacher, space, Targets(), profile, batches, [batches[0]], eval_loader,
                  None, None, threads, tracking, {}, console, parts=parts)
    ctx.agreement_constraint = False  # a generator's served artefact is judged by its score, not label agreement
    ctx.meta = {"conditions": {"device": cfg.target.device, "threads": threads, "batch_size": cfg.target.batch_size,
                               "seq_len": "data", **lengths, "metric": cfg.task.metric, "dev_rows": len(prep.eval_ds),
                               "teacher": cfg.teacher.source, "teacher_dev": teacher_dev,
                               "generation": generation_kwargs(cfg), "screen_output_tokens": parts.screen_tokens}}
    return ctx


# ---------------------------------------------------------------- one trial


@dataclass
class GeneratorTrial:
    """A seq2seq trial's parts (search/objective.py TrialParts): a student copying spread-out teacher layers, served
    as one `generate` call per request, distilled on per-token logits (and states, sequence-level KD), scored by
    task.metric of its own generated dev outputs (no label agreement: a generator has no labels to agree on)."""

    screen_tokens: int  # output tokens an untrained student is forced to generate while it is screened

    def student(self, c: Seq2SeqCandidate, ctx: Context):
        student = build_seq2seq_student(ctx.teacher, c.encoder_layers, c.decoder_layers, seed=ctx.cfg.train.seed)
        configure_generation(student, ctx.prep.tokenizer)
        return student

    def served(self, recipe: str, model, ctx: Context, workdir, screening: bool = False):
        cfg = ctx.cfg
        gen = generation_kwargs(cfg)
        if screening:
            gen = {**gen, "max_new_tokens": self.screen_tokens, "min_new_tokens": self.screen_tokens}
        return apply_generation_recipe(recipe, model.to("cpu") if cfg.target.device == "cpu" else model,
                                       example_batch=ctx.batches[0], generate_kwargs=gen, device=cfg.target.device,
                                       allow_cpu_half=cfg.quantization.allow_cpu_bf16, threads=ctx.threads)

    def training(self, trial_cfg: Config, ctx: Context, student) -> Training:
        student.to(ctx.accelerator.device)
        compute_loss, loss_mod = make_seq2seq_loss(trial_cfg, ctx.teacher, student)
        loader = make_loader(ctx.prep.train_ds, ctx.prep.tokenizer, trial_cfg.train.batch_size, shuffle=True,
                             seed=trial_cfg.train.seed, collator=pad_pairs)
        references = list(ctx.prep.data.eval["target"])
        return Training(compute_loss, [loss_mod], loader,
                        lambda model: evaluate_seq2seq(model, ctx.eval_loader, ctx.prep.tokenizer, references, ctx.cfg,
                                                       ctx.prep.lowercase, ctx.accelerator),
                        ctx.prep.tokenizer)

    def trained(self, trial_dir, ctx: Context):
        return load_seq2seq(str(trial_dir), ctx.cfg, ctx.prep.tokenizer).eval()

    def quality(self, served, trained, candidate, ctx: Context) -> tuple[float, None]:
        loader = make_loader(ctx.prep.eval_ds, ctx.prep.tokenizer, ctx.cfg.train.eval_batch_size, shuffle=False,
                             collator=pad_pairs)
        texts, _ = generate_texts(served.module, loader, ctx.prep.tokenizer, generation_kwargs(ctx.cfg))
        return score(texts, list(ctx.prep.data.eval["target"]), ctx.prep.lowercase)[ctx.cfg.task.metric], None
