"""The classification task's export (kdlab.tasks.classification calls it): its parts of the export folder that
search/export.py `write_export` builds for every task, its model card and its summary line.

Library module; nothing to launch. What is its own: the fp32 `AutoModelForSequenceClassification` and, for the
ONNX recipes, the graph beside it (distill/export.py build_served); parity is label agreement of the served
artefact with the fp32 model on the dev set (at least export.min_label_agreement); the held-out test scored by
accuracy or F1 of the served artefact; the latency table at each export.latency_batch_sizes on the target's
sequence length; the card's account of the student's architecture and training data, its front position and
the gate's fp32 teacher beside it.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdlab.distill.config import Config
from kdlab.distill.export import ExportError, build_served, parity, served_entry
from kdlab.distill.quantize import apply_recipe
from kdlab.distill.students import same_vocabulary
from kdlab.eval.paths import portable_path
from kdlab.search.capacity import capacity_card, measure_latencies, p50_p95
from kdlab.search.card import card_metadata
from kdlab.search.export import (Choice, front_position, summary_tail, teacher_reference, training_data_of,
                                 write_export)
from kdlab.search.classification_gate import dev_quality
from kdlab.search.timing import timing_batches
from kdlab.train.data import load_test_split, make_loader, tokenize
from kdlab.train.model_dir import check_model_dir, prepare_model
from kdlab.train.pipeline import prepare


def export_classifier(cfg: Config, choice: Choice, dest: Path, console=None) -> dict:
    """The classification task's export of `choice` to `dest`: search/export.py's folder with ClassifierExport."""
    return write_export(cfg, choice, dest, console, ClassifierExport)


class ClassifierExport:
    """A classifier's parts of an export folder (search/export.py ExportParts)."""

    def __init__(self, cfg: Config, choice: Choice):
        self.cfg, self.choice = cfg, choice
        self.prep = export_data(cfg, choice)
        self.test_ds = load_test_split(cfg.data, self.prep.data)  # a bad test file: one line, nothing written
        self.batches = list(make_loader(self.prep.eval_ds, self.prep.tokenizer, cfg.train.eval_batch_size,
                                        shuffle=False))

    def load_model(self):
        return AutoModelForSequenceClassification.from_pretrained(self.choice.source, use_safetensors=True).eval()

    def build(self, staging: Path, model, threads: int) -> None:
        build_served(staging, self.choice.recipe, example_batch=self.batches[0], device=self.cfg.target.device,
                     threads=threads, allow_cpu_half=self.cfg.quantization.allow_cpu_bf16)

    def entries(self, model) -> dict:
        cfg, data = self.cfg, self.prep.data
        return {"labels": data.label_names, "text_column": cfg.data.text_column,
                "text_pair_column": cfg.data.text_pair_column,
                "served": served_entry(self.choice.recipe, cfg.target.device),
                "data": {"labelled_rows": len(data.train)},  # the config's labelled subset, as read now
                "choice": {"architecture": self.choice.architecture}}

    def check(self, served, model, threads: int, manifest: dict, say) -> dict:
        cfg, prep, batches = self.cfg, self.prep, self.batches
        reference = apply_recipe("fp32", model, example_batch=batches[0], device="cpu", threads=threads)
        agreement = parity(served.artefact, reference, batches)
        metric, n = cfg.task.metric, prep.data.num_labels
        agreement.update(served_quality=dev_quality(served.artefact, batches, metric, n),
                         reference_quality=dev_quality(reference, batches, metric, n),
                         bound=cfg.export.min_label_agreement)
        if agreement["label_agreement"] < cfg.export.min_label_agreement:
            raise ExportError(f"parity: the {self.choice.recipe} artefact agrees with the fp32 model on "
                              f"{agreement['label_agreement']:.2%} of {agreement['rows']} dev labels, below "
                              f"export.min_label_agreement {cfg.export.min_label_agreement:.2%}; nothing exported")
        if self.test_ds is not None:  # scored once, here, for the chosen model only
            test_batches = list(make_loader(tokenize(self.test_ds, prep.tokenizer, cfg.data, prep.data.label_names),
                                            prep.tokenizer, cfg.train.eval_batch_size, shuffle=False))
            manifest["test"] = {"source": portable_path(cfg.data.test_file) if cfg.data.test_file
                                else f"{cfg.data.dataset}[{cfg.data.test_split}]", "rows": len(self.test_ds),
                                "metric": metric, "quality": dev_quality(served.artefact, test_batches, metric, n)}
            say(f"export: held-out test {manifest['test']['source']}: {metric} {manifest['test']['quality']:.4f} "
                f"on {len(self.test_ds)} rows (served artefact)")
        manifest["training_data"] = training_data_of(self.choice)
        say(f"export: parity on {agreement['rows']} dev rows: label agreement {agreement['label_agreement']:.2%}, "
            f"max |diff| {agreement['max_abs_diff']:.4f}; measuring latency at batch "
            f"{', '.join(map(str, cfg.export.latency_batch_sizes))}")
        return agreement

    def latency(self, served, model, threads: int, planning: bool):
        cfg = self.cfg
        sizes = [*cfg.export.latency_batch_sizes, *(cfg.serving.batch_sizes if planning else [])]
        reports, lengths = measure_latencies({"export": served.artefact}, cfg, threads, sizes,
                                             request_batches(cfg, self.prep, model.config.vocab_size))
        latency = latency_rows(reports["export"], lengths, cfg.export.latency_batch_sizes)
        planned = p50_p95({b: reports["export"][b] for b in cfg.serving.batch_sizes}) if planning else None
        return latency, planned, {}

    def finish(self) -> dict:
        cfg = self.cfg
        return {"teacher_reference": teacher_reference(cfg), "front_position": front_position(cfg, self.choice),
                "conditions": {"batch_size": cfg.target.batch_size, "seq_len": cfg.target.seq_len}}

    @staticmethod
    def card(manifest: dict) -> str:
        return model_card(manifest)


def request_batches(cfg: Config, prep, vocab_size: int, dataset=None, tokenizer=None):
    """batch size -> (request batches, lengths) of one forward pass over dev texts at target.seq_len; the teacher's
    tokenization (`prep`) unless a model's own dev set and tokenizer are given."""
    ds, tok = (prep.eval_ds, prep.tokenizer) if dataset is None else (dataset, tokenizer)
    return lambda bs: timing_batches(ds, tok, bs, cfg.target.seq_len, vocab_size=vocab_size, seed=cfg.train.seed)


def serving_latency(cfg: Config, models: dict, threads: int, batch_sizes: list[int]) -> dict:
    """{label: {batch: (p50_ms, p95_ms)}} of one forward pass of each classifier folder under its recipe
    (`models`: label -> (folder, recipe, workdir)), timed interleaved (kdlab report --capacity). Each model reads
    dev texts through its own folder's tokenizer: a student of another family than the teacher (MiniLM under
    MPNet) has other ids and other lengths. A folder without a tokenizer reads the teacher's."""
    prep = prepare(cfg)  # measuring needs no Accelerator (train/accel.py)
    served, batches_of = {}, {}
    for label, (folder, recipe, workdir) in models.items():
        model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True).eval()
        tok = (AutoTokenizer.from_pretrained(folder) if (Path(folder) / "tokenizer_config.json").is_file()
               else prep.tokenizer)
        ds = (prep.eval_ds if same_vocabulary(prep.tokenizer, tok)
              else tokenize(prep.data.eval, tok, cfg.data, prep.data.label_names))
        example = next(iter(make_loader(ds, tok, 8, shuffle=False)))
        served[label] = apply_recipe(recipe, model, example_batch=example, threads=threads, workdir=workdir)
        batches_of[label] = request_batches(cfg, prep, model.config.vocab_size, ds, tok)
    reports, _ = measure_latencies(served, cfg, threads, batch_sizes, batches_of)
    return {label: p50_p95(r) for label, r in reports.items()}


def export_data(cfg: Config, choice: Choice):
    """The dev set the export is checked and timed on, without an Accelerator (train/accel.py says why):
    tokenized by the teacher's tokenizer, or by a model folder's own (`--model DIR`)."""
    if choice.kind == "model":
        return prepare_model(cfg, check_model_dir(cfg, choice.source))
    if choice.kind == "trial":  # a student tokenizes with its own tokenizer (saved in its trial folder)
        return prepare_model(cfg, check_model_dir(cfg, choice.source))
    return prepare(cfg)


def latency_rows(reports: dict, lengths: dict, batch_sizes: list[int]) -> list[dict]:
    """The model card's latency table: p50/p95 and throughput of the served artefact at each batch size."""
    return [{"batch_size": bs, "p50_ms": reports[bs].p50_ms, "p95_ms": reports[bs].p95_ms,
             "p99_ms": reports[bs].p99_ms, "throughput": reports[bs].throughput, "cv": reports[bs].cv,
             "stable": reports[bs].stable, "padded_len_median": lengths[bs]["padded_len_median"]}
            for bs in batch_sizes]


def _f(value, fmt: str, none: str = "—") -> str:
    return none if value is None else fmt.format(value)


def model_card(m: dict) -> str:
    """README.md of the export folder, from its manifest: every number in it is one the manifest holds.

    It opens with the Hugging Face metadata (search/card.py): pipeline tag, base model, tags, and the
    dev quality in `model-index`.
    """
    c, fig, par, ref = m["choice"], m["measured"], m["parity"], m.get("teacher_reference") or {}
    arch = c.get("architecture") or {}
    arch_line = (f"{arch['num_layers']} layers x {arch['hidden_size']} hidden, {arch['num_heads']} heads, FFN "
                 f"{arch['intermediate_size']}" + (f", initialised {arch['init']}" if arch.get("init") else "")
                 if arch.get("num_layers") else "the teacher itself")
    # A model folder (--model DIR) was distilled when train/distill.py wrote it (its summary names the init).
    origin = ("Distilled from" if c["kind"] == "trial" or (c["kind"] == "model" and arch.get("init"))
              else "Trained outside kdlab; compared with" if c["kind"] == "model" else "Quantized from")
    tokenizer_of = "the teacher's tokenizer" if c["kind"] == "teacher" else "the model's own tokenizer"
    q, tq = fig["quality"], ref.get("quality")
    cond = m["conditions"]
    lines = [
        card_metadata(m, "text-classification"),
        f"# {m['name']}: {m['task']['type']} on {m['data']['train_file'] or m['data']['dataset']}", "",
        f"Exported by kdlab on {m['created']} from {c['label']} (recipe `{c['recipe']}`). "
        f"{origin} the teacher `{m['teacher']['source']}`.",
        "", "## Figures", "",
        f"- Quality ({m['task']['metric']} on {par['rows']} dev rows, measured on the served artefact): **{q:.4f}**"
        + (f", {q / tq:.1%} of the teacher's {tq:.4f}" if tq else ""),
        f"- Size of the served artefact: {fig['size_mb']:.1f} MB; parameters: {_f(fig.get('params'), '{:,}')}",
        f"- Parity with the fp32 PyTorch model on the same rows: label agreement {par['label_agreement']:.2%}, "
        f"max |logit difference| {par['max_abs_diff']:.4f} (fp32 model quality {par['reference_quality']:.4f})",
    ]
    if m.get("test"):
        t = m["test"]
        lines.append(f"- Held-out test ({t['source']}, {t['rows']} rows, scored once at export and never read by the "
                     f"gate, the search or the choice): {t['metric']} **{t['quality']:.4f}**")
    if m.get("front_position"):
        lines.append(f"- On the search's Pareto front: {m['front_position']}")
    lines += ["", f"Latency on {cond['device']}, {cond['threads']} thread(s), sequence length "
              f"{cond['seq_len']} ({cond['cpu']}, torch {cond['torch']}):", "",
              "| batch | p50 ms | p95 ms | rows/s |", "|---|---|---|---|"]
    for r in m["latency"]:
        lines.append(f"| {r['batch_size']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['throughput']:.1f} |")
    if ref.get("p95_ms"):
        lines += ["", f"The fp32 teacher measured p95 {ref['p95_ms']:.2f} ms at batch {cond['batch_size']} under "
                      f"the same profile ({ref['p95_ms'] / m['latency'][0]['p95_ms']:.1f}x slower than this model "
                      f"at batch {m['latency'][0]['batch_size']})." if m['latency'] else ""]
    lines += capacity_card(m.get("capacity"))
    lines += ["", "## Model", "", f"- Architecture: {arch_line}", f"- Serving recipe: `{c['recipe']}`: "
              f"{m['served']['how']}", f"- Labels: {', '.join(m['labels'])}",
              f"- Tokenization: max length {m['max_length']}, {tokenizer_of}", "",
              "## Data", "", f"- Training rows: {m['data']['train_file'] or m['data']['dataset']}"
              f" (max {m['data']['max_train_samples'] or 'all'} rows)",
              f"- Evaluation rows: {m['data']['eval_file'] or m['data']['eval_split']}",
              *([f"- Held-out test rows: {m['test']['source']} ({m['test']['rows']} rows), read only by the export"]
                if m.get("test") else []),
              *training_data_lines(m.get("training_data"), c["kind"], m["data"].get("labelled_rows"),
                                   c["kind"] == "trial" or bool(arch.get("init"))), "",
              "## Loading", "", "```python",
              "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
              "model = AutoModelForSequenceClassification.from_pretrained(\"<this folder>\")  # fp32",
              "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")", "",
              "from kdlab.distill.export import load_served  # the served artefact, as measured",
              "labels, probs = load_served(\"<this folder>\").predict_texts([\"a gripping film\"])", "```", "",
              "Batch predictions: `kdlab predict --model <this folder> --input FILE --output OUT.jsonl`.", "",
              "An HTTP service (Ray Serve, settings from the capacity plan): `kdlab serve --model <this folder>`, or "
              "`serve run serve_config.yaml` from this folder; `Dockerfile` builds a CPU image of it (its first "
              "lines say how)."]
    if m.get("mlflow"):
        ml = m["mlflow"]
        lines += [f"MLflow: `mlflow.pyfunc.load_model(\"models:/{ml['model_name']}@{ml['alias']}\")` "
                  f"(version {ml['version']}); its `predict(texts)` returns a DataFrame with `label` and "
                  f"{', '.join(f'`prob_{name}`' for name in m['labels'])}, the figures of `kdlab predict`."]
    lines += ["", "## Training configuration", "", "The resolved config is `training_config.yaml` in this folder; "
              "`manifest.json` lists every file with its sha256.", ""]
    return "\n".join(lines)


def training_data_lines(data: dict | None, kind: str, labelled_rows: int | None, distilled: bool) -> list[str]:
    """The card's account of the student's training data (labelled rows, transfer sources, teacher labels).

    `data`: the `training_data` its summary or trial record holds (None: not recorded there); `labelled_rows`:
    the labelled rows the config gives, said when nothing else was recorded; `distilled`: made by kdlab."""
    if kind == "teacher":
        return []  # no student: the teacher itself is served
    if not data and not distilled:
        return ["- Training data of the model: not recorded (it was trained outside kdlab)"]
    if not data:
        return ["- Student training data: the labelled rows only"
                + (f" ({labelled_rows:,} rows)" if labelled_rows is not None else "")]
    transfer = {k: v for k, v in (data.get("transfer") or {}).items() if v}
    lines = [f"- Student training data: {data['labelled_rows']:,} labelled rows (KD + cross-entropy)"
             + (", and a transfer set labelled by the teacher (KD only): "
                + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in transfer.items()) if transfer else "")]
    if data.get("augment"):
        a = data["augment"]
        lines.append(f"- Augmented copies: {a['copies']} per labelled row (mask {a['mask_prob']}, word replacement "
                     f"{a['replace_prob']}, n-gram {a['ngram_prob']} up to {a['ngram_max']} words, seed {a['seed']})")
    if data.get("teacher_labels"):
        lines.append(f"- Teacher labels computed with: {data['teacher_labels']}")
    return lines


def classifier_summary_line(manifest: dict, dest: Path) -> str:
    p, lat = manifest["parity"], manifest["latency"][0]
    return (f"exported {manifest['choice']['label']} ({manifest['served']['recipe']}) to {dest}: quality "
            f"{manifest['measured']['quality']:.4f}, p95 {lat['p95_ms']:.2f} ms at batch {lat['batch_size']}, "
            f"{manifest['measured']['size_mb']:.1f} MB, parity {p['label_agreement']:.2%}" + summary_tail(manifest, 4))
