"""A third task that lives only in the tests: token tagging (is each word capitalised?) on a tiny BERT.

The proof of issue 16's seam: this module, given to kdlab as `task.type: token_task:TokenTagTask`, goes
through `kdlab gate`, `kdlab search`, `kdlab export` and `kdlab predict` with no change to any stage module
(tests/test_token_task.py). It is built from kdlab's shared pieces (quantization recipes, timing, the
trial machinery of search/objective.py, the accelerate loop) and its own data, teacher, loss and metric.

Data: data.train_file and data.eval_file are plain text, one sentence per line; a word's tag is 1 when
it starts with a capital letter. The tag of a word sits on its first word piece; the other pieces,
[CLS] and [SEP] are -100 (not scored, not trained). Quality is `token_accuracy`, the share of tagged words
whose argmax tag is right. The teacher is a BERT folder with a token-classification head fine-tuned here
(cached in <run>/teacher/); students keep its first `num_layers` layers and distil its per-token logits.
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification

from kdlab.distill.config import ConfigError, search_ranges, search_recipes
from kdlab.distill.export import move_into_place, served_entry, write_manifest, write_model
from kdlab.distill.quantize import RecipeUnavailable, apply_recipe
from kdlab.distill.task import Task
from kdlab.search.capacity import measure_latencies, p50_p95
from kdlab.search.objective import Context, record_screened, record_trained, run_trial, screened_out
from kdlab.search.study_tracking import StudyTracking
from kdlab.search.targets import GateRow, Targets
from kdlab.search.timing import measure_candidates, target_profile, timing_batches
from kdlab.train.loop import fit

TAGS = ("lower", "capital")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def word_tags(sentence: str) -> tuple[list[str], list[int]]:
    words = sentence.split()
    return words, [int(w[:1].isupper()) for w in words]


@dataclass
class Prepared:
    tokenizer: object
    train_ds: datasets.Dataset
    eval_ds: datasets.Dataset


def encode(lines: list[str], tokenizer, max_length: int) -> datasets.Dataset:
    rows = {k: [] for k in (*INPUTS, "labels")}
    for line in lines:
        words, tags = word_tags(line)
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        seen, labels = set(), []
        for w in enc.word_ids():
            labels.append(-100 if w is None or w in seen else tags[w])
            seen.add(w)
        for k in INPUTS:
            rows[k].append(enc[k])
        rows["labels"].append(labels)
    return datasets.Dataset.from_dict(rows)


def loader(ds: datasets.Dataset, tokenizer, batch_size: int, shuffle: bool = False, seed: int = 0):
    collate = DataCollatorForTokenClassification(tokenizer, return_tensors="pt")
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader([dict(r) for r in ds], batch_size=batch_size, shuffle=shuffle,
                                       collate_fn=collate, generator=g)


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in INPUTS}


@torch.no_grad()
def token_accuracy(predict, batches) -> float:
    """Share of tagged words (labels != -100) whose argmax tag is right."""
    right = total = 0
    for batch in batches:
        tags = predict(batch).argmax(-1)
        mask = batch["labels"] != -100
        right += int((tags[mask] == batch["labels"][mask]).sum())
        total += int(mask.sum())
    return right / total


def keep_layers(teacher, n: int):
    """The teacher's embeddings, first `n` layers and head: a student cut from it."""
    student = copy.deepcopy(teacher).to("cpu")
    student.bert.encoder.layer = torch.nn.ModuleList(student.bert.encoder.layer[:n])
    student.config.num_hidden_layers = n
    return student


@dataclass
class TagCandidate:
    num_layers: int
    recipe: str
    learning_rate: float
    hidden_size: int
    num_heads: int
    intermediate_size: int
    init: str = "teacher-layers"
    family: str = "teacher"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TagSpace:
    """Student depth (search.num_layers, default 1..the teacher's), recipe and learning rate."""

    def __init__(self, cfg, teacher_config):
        ranges = search_ranges(cfg)
        self.layers = ranges["num_layers"].values() if ranges["num_layers"] else list(
            range(1, teacher_config.num_hidden_layers + 1))
        self.rates = list(ranges["learning_rate"].choices) if ranges["learning_rate"] else [cfg.train.learning_rate]
        self.recipes = search_recipes(cfg)
        self.shape = (teacher_config.hidden_size, teacher_config.num_attention_heads, teacher_config.intermediate_size)

    def suggest(self, trial) -> TagCandidate:
        return TagCandidate(trial.suggest_categorical("num_layers", self.layers),
                            trial.suggest_categorical("recipe", self.recipes),
                            trial.suggest_categorical("learning_rate", self.rates), *self.shape)

    def describe(self) -> dict:
        return {"num_layers": self.layers, "recipes": self.recipes, "learning_rate": self.rates}

    def seeds(self, n: int, device: str) -> list:
        return []

    def params_of(self, c: TagCandidate) -> dict:
        return {"num_layers": c.num_layers, "recipe": c.recipe, "learning_rate": c.learning_rate}


class TokenTagTask(Task):
    name = "token-tags"
    metrics = ("token_accuracy",)
    quality_scale = 1.0
    unused_keys = ("generation",)

    # ------------------------------------------------------------ data and teacher

    def prepare(self, cfg, accelerator=None) -> Prepared:
        tokenizer = AutoTokenizer.from_pretrained(cfg.teacher.source)
        read = [Path(p).read_text(encoding="utf-8").splitlines() for p in (cfg.data.train_file, cfg.data.eval_file)]
        train, dev = ([line for line in lines if line.strip()] for lines in read)
        return Prepared(tokenizer, encode(train, tokenizer, cfg.data.max_length),
                        encode(dev, tokenizer, cfg.data.max_length))

    def ensure_teacher(self, cfg, accelerator, prep: Prepared):
        folder = cfg.run_dir / "teacher"
        dev = list(loader(prep.eval_ds, prep.tokenizer, cfg.train.eval_batch_size))
        if not (folder / "config.json").is_file():
            torch.manual_seed(cfg.train.seed)
            model = AutoModelForTokenClassification.from_pretrained(cfg.teacher.source, num_labels=len(TAGS))
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.teacher.learning_rate)
            model.train()
            for _ in range(int(cfg.teacher.num_epochs)):
                for batch in loader(prep.train_ds, prep.tokenizer, cfg.train.batch_size, True, cfg.train.seed):
                    model(**batch).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
            write_model(model.eval(), prep.tokenizer, folder)
        teacher = AutoModelForTokenClassification.from_pretrained(folder).eval()
        return teacher, {"token_accuracy": token_accuracy(lambda b: teacher(**inputs(b)).logits, dev)}

    # ------------------------------------------------------------ measuring (gate, search, export)

    def served(self, cfg, model, recipe: str, example: dict, threads: int, workdir: Path):
        return apply_recipe(recipe, model.to("cpu").eval(), example_batch=example, device=cfg.target.device,
                            workdir=workdir, allow_cpu_half=cfg.quantization.allow_cpu_bf16, threads=threads)

    def batches(self, cfg, prep: Prepared, threads: int):
        dev = list(loader(prep.eval_ds, prep.tokenizer, cfg.train.eval_batch_size))
        timing, lengths = timing_batches(prep.eval_ds, prep.tokenizer, cfg.target.batch_size, cfg.target.seq_len,
                                         vocab_size=len(prep.tokenizer), seed=cfg.train.seed)
        return dev, timing, lengths, target_profile(cfg.target, threads, lengths["seq_len_median"])

    def conditions(self, cfg, prep, threads: int, lengths: dict) -> dict:
        return {"device": cfg.target.device, "threads": threads, "threads_requested": cfg.target.threads,
                "batch_size": cfg.target.batch_size, "seq_len": cfg.target.seq_len, **lengths,
                "metric": cfg.task.metric, "dev_rows": len(prep.eval_ds), "teacher": cfg.teacher.source,
                "cpu": "test", "torch": torch.__version__}

    def measure(self, cfg, model, prep, threads, recipes, workdir, reference_only=()):
        dev, timing, lengths, profile = self.batches(cfg, prep, threads)
        candidates = []
        for name in recipes:
            row = GateRow(name, candidate=name not in reference_only)
            try:
                served = self.served(cfg, model, name, dev[0], threads, workdir / name)
                row.size_mb, row.quality = served.size_mb, token_accuracy(served.predict, dev)
            except RecipeUnavailable as exc:
                row.status, row.reason, served = "skipped", str(exc), None
            candidates.append((row, served))
        return measure_candidates(candidates, timing, profile), self.conditions(cfg, prep, threads, lengths)

    def check_model_folder(self, cfg, path, config) -> None:
        if not any(a.endswith("ForTokenClassification") for a in getattr(config, "architectures", None) or []):
            raise ConfigError(f"--model: {path} is not a token classifier")

    def prepare_model(self, cfg, model) -> Prepared:
        tokenizer = AutoTokenizer.from_pretrained(model.path)
        dev = [line for line in Path(cfg.data.eval_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        return Prepared(tokenizer, None, encode(dev, tokenizer, cfg.data.max_length))

    def load_network(self, cfg, model, tokenizer):
        return AutoModelForTokenClassification.from_pretrained(model.path, use_safetensors=True).eval()

    def distil(self, cfg, accelerator) -> dict:
        raise ConfigError("task.type: the test task token_task distils inside kdlab search only")

    # ------------------------------------------------------------ search

    def search_space(self, cfg) -> TagSpace:
        return TagSpace(cfg, AutoConfig.from_pretrained(cfg.teacher.source))

    def search_setup(self, cfg, accelerator, space, console, threads: int) -> Context:
        prep = self.prepare(cfg, accelerator)
        tracking = StudyTracking(cfg)
        tracking.ensure_experiment()
        teacher, teacher_dev = self.ensure_teacher(cfg, accelerator, prep)
        dev, timing, lengths, profile = self.batches(cfg, prep, threads)
        ctx = Context(cfg, accelerator, prep, teacher, space, Targets(), profile, timing, dev, None, None, None,
                      threads, tracking, {}, console)
        ctx.agreement_constraint = False
        ctx.meta = {"conditions": {**self.conditions(cfg, prep, threads, lengths), "teacher_dev": teacher_dev}}
        return ctx

    def trial_objective(self, trial, ctx: Context):
        return run_trial(trial, ctx, self.evaluate_trial)

    def time(self, served, ctx: Context) -> GateRow:
        return measure_candidates([(GateRow(served.recipe, size_mb=served.size_mb), served)], ctx.batches,
                                  ctx.profile)[0]

    def evaluate_trial(self, trial, c: TagCandidate, ctx: Context, tracker):
        cfg = ctx.cfg
        student = keep_layers(ctx.teacher, c.num_layers)
        params = sum(p.numel() for p in student.parameters())
        work = cfg.run_dir / "trial_artefacts" / str(trial.number)
        pre = self.time(self.served(cfg, student, c.recipe, ctx.quality_batches[0], ctx.threads, work / "pre"), ctx)
        misses = screened_out(ctx.targets, pre.p95_ms, pre.size_mb, cfg.search.screen_margin)
        if misses:
            return record_screened(trial, tracker, ctx, pre, params, misses)
        trial_dir = cfg.run_dir / "trials" / str(trial.number)
        train_cfg = dataclasses.replace(cfg.train, learning_rate=c.learning_rate, max_steps=cfg.search.train_steps,
                                        num_epochs=cfg.search.train_epochs, resume_from=None,
                                        save_state_every_steps=None)
        t, alpha = cfg.distill.temperature, cfg.distill.alpha

        def compute_loss(model, batch):
            """alpha x T^2 KL(teacher || student) over tagged tokens + (1 - alpha) x cross-entropy
            (Hinton et al. 2015)."""
            logits = model(**inputs(batch)).logits
            with torch.no_grad():
                target = ctx.teacher(**inputs(batch)).logits
            mask = batch["labels"] != -100
            kd = F.kl_div(F.log_softmax(logits[mask] / t, -1), F.softmax(target[mask] / t, -1),
                          reduction="batchmean") * t * t
            ce = F.cross_entropy(logits.view(-1, len(TAGS)), batch["labels"].view(-1), ignore_index=-100)
            return alpha * kd + (1 - alpha) * ce, {"kd": kd.detach(), "ce": ce.detach()}

        def save_best(model):
            write_model(model, ctx.prep.tokenizer, trial_dir)

        result = fit(ctx.accelerator, student, loader(ctx.prep.train_ds, ctx.prep.tokenizer, cfg.train.batch_size,
                                                      True, cfg.train.seed),
                     cfg=train_cfg, compute_loss=compute_loss,
                     evaluate=lambda m: {"token_accuracy": token_accuracy(lambda b: m(**inputs(b)).logits,
                                                                          ctx.quality_batches)},
                     save_best=save_best, out_dir=trial_dir, tracker=tracker, metric=cfg.task.metric, desc="distill")
        trained = AutoModelForTokenClassification.from_pretrained(trial_dir).eval()
        served = self.served(cfg, trained, c.recipe, ctx.quality_batches[0], ctx.threads, work / "post")
        quality = token_accuracy(served.predict, ctx.quality_batches)
        post = self.time(served, ctx)
        shutil.rmtree(work, ignore_errors=True)
        return record_trained(trial, tracker, ctx, c, trial_dir, quality, pre, post, params, result)

    # ------------------------------------------------------------ export

    def check_test_split(self, cfg) -> None:
        if cfg.data.test_file or cfg.data.test_split:
            raise ConfigError("data.test_file: the test task token_task reads no held-out split")

    def export(self, cfg, choice, dest: Path, console=None) -> dict:
        prep = self.prepare(cfg)
        model = AutoModelForTokenClassification.from_pretrained(choice.source).eval()
        staging = dest.with_name(f".{dest.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        write_model(model, prep.tokenizer, staging)
        dev, timing, lengths, profile = self.batches(cfg, prep, 1)
        served = self.served(cfg, model, choice.recipe, dev[0], 1, staging / "artefact")
        row = measure_candidates([(GateRow(choice.recipe, size_mb=served.size_mb), served)], timing, profile)[0]
        shutil.rmtree(staging / "artefact", ignore_errors=True)
        manifest = {"format": "kdlab-export/1", "name": cfg.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "task": {"type": cfg.task.type, "metric": cfg.task.metric}, "labels": list(TAGS),
                    "max_length": cfg.data.max_length, "served": served_entry(choice.recipe, cfg.target.device),
                    "choice": {"kind": choice.kind, "label": choice.label, "recipe": choice.recipe,
                               "trial": choice.trial, "source": str(choice.source)},
                    "measured": {"quality": token_accuracy(served.predict, dev), "size_mb": served.size_mb,
                                 "p95_ms": row.p95_ms}}
        manifest = write_manifest(staging, manifest)
        move_into_place(staging, dest)
        return manifest

    # ------------------------------------------------------------ serving (kdlab predict, kdlab serve, the API)

    def load_artefact(self, folder, manifest: dict, tokenizer, *, recipe: str, device: str, threads: int):
        model = AutoModelForTokenClassification.from_pretrained(folder, use_safetensors=True).eval()
        example = dict(tokenizer([["A"]], is_split_into_words=True, return_tensors="pt"))
        return apply_recipe(recipe, model, example_batch=example, device=device, threads=threads, allow_cpu_half=True)

    def predict_records(self, served, texts: list[str], pairs=None) -> list[dict]:
        """{"tags": the tag of each whitespace-separated word} per text."""
        if not texts:
            return []
        words = [text.split() for text in texts]
        enc = served.tokenizer(words, is_split_into_words=True, truncation=True,
                               max_length=served.manifest["max_length"], padding=True, return_tensors="pt")
        tags = served.artefact.predict(dict(enc)).argmax(-1)
        out = []
        for i, sentence in enumerate(words):
            first = {}
            for position, word in enumerate(enc.word_ids(i)):
                if word is not None:
                    first.setdefault(word, position)
            out.append({"tags": [served.labels[int(tags[i, first[w]])] for w in sorted(first)]})
        return out

    def export_summary(self, manifest: dict, dest) -> str:
        m = manifest["measured"]
        return (f"exported {manifest['choice']['label']} ({manifest['served']['recipe']}) to {dest}: "
                f"token_accuracy {m['quality']:.4f}, p95 {m['p95_ms']:.2f} ms")

    def capacity_unit(self, cfg) -> str:
        return "one forward pass tagging every word of the request's texts"

    def serving_latency(self, cfg, models: dict, threads: int, batch_sizes: list[int]) -> dict:
        prep = self.prepare(cfg)
        dev = list(loader(prep.eval_ds, prep.tokenizer, cfg.train.eval_batch_size))
        served = {label: self.served(cfg, AutoModelForTokenClassification.from_pretrained(folder, use_safetensors=True),
                                     recipe, dev[0], threads, workdir)
                  for label, (folder, recipe, workdir) in models.items()}
        # the stage's interleaved timing at each batch size, on this task's request batches
        reports, _ = measure_latencies(served, cfg, threads, batch_sizes,
                                       lambda bs: timing_batches(prep.eval_ds, prep.tokenizer, bs, cfg.target.seq_len,
                                                                 vocab_size=len(prep.tokenizer), seed=cfg.train.seed))
        return {label: p50_p95(r) for label, r in reports.items()}
