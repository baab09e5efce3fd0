"""`kdlab export`: choose the model to ship, write its export folder, prove it, describe it, register it.

Library module for scripts/cli.py. The choice is made among what was measured:
- the search's feasible front members that kept their checkpoint (runs/<name>/trials/<n>/);
- the teacher under a recipe that met the targets in the gate (runs/<name>/report/gate.csv).
Without `--trial`, `--pick` or `--recipe` it takes the most accurate of those (lower p95 breaks ties);
`--recipe R` takes the teacher under the gate's measured recipe R (what the gate's PASS line prints).
`--model DIR` exports a trained model folder instead (a Choice of kind "model", see `model_choice`): under
`--recipe R`, which `kdlab gate --model DIR` must have measured; else under the most accurate recipe that its
gate found meeting the targets; fp32 (the folder as trained) when no gate was run for it, since every figure
of the export (quality, parity, latency) is measured by the export itself. The export is logged on the
distillation's MLflow run (DIR/kdlab_summary.json's mlflow_run_id), which is tagged with it.

The folder is written for every task by `write_export`, which asks the task's ExportParts for what is its
own (search/classification_export.py, search/seq2seq_export.py). It is built in a staging folder beside the
destination and moved into place only when complete: the parity check (served artefact against the fp32 model on the full dev set), the
latency table and the model card are all done before anything replaces an earlier export.

The held-out test split (data.test_file or data.test_split) is read here and nowhere before: its labels
are checked against the training labels before anything is written, and it is scored once, on the
served artefact of the chosen model, into the manifest (`test`), the card and the model's MLflow run
(`test_<metric>`). `kdlab run` checks its labels before the gate (`check_test_split`), and scores it only here.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdlab.distill.config import Config, ConfigError, save_config
from kdlab.distill.task import load_task, task_of
from kdlab.distill.deploy import write_deploy_files
from kdlab.distill.export import load_served, move_into_place, write_manifest, write_model
from kdlab.eval.latency import clamp_threads, machine_info, versions
from kdlab.eval.paths import portable_path, portable_text
from kdlab.search.capacity import capacity_section
from kdlab.search.card import dataset_name, hub_id
from kdlab.search.gate_report import gate_references, gate_table
from kdlab.search.model_gate import model_gate_rows
from kdlab.search.registry import register
from kdlab.search.study import stored_study
from kdlab.search.study_report import trial_rows
from kdlab.train.model_dir import architecture, check_model_dir
from kdlab.train.teacher import teacher_folder

NUMERIC = ("quality", "p50_ms", "p95_ms", "p99_ms", "size_mb", "params", "throughput", "train_seconds")
_PICK = re.compile(r"^\s*(max|min)\s+([a-z0-9_]+)\s*(?:s\.t\.\s*(.+?))?\s*$", re.IGNORECASE)
_COND = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|==|<|>)\s*([-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*$", re.IGNORECASE)
_OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b,
        "==": lambda a, b: a == b}


@dataclass
class Choice:
    """One exportable model: a trained trial's checkpoint, or the teacher under a gate recipe."""
    kind: str  # trial | teacher | model (a trained model folder: kdlab export --model DIR)
    label: str
    recipe: str
    source: Path
    figures: dict  # quality, p50_ms, p95_ms, size_mb, ... as measured by the search or the gate
    trial: int | None = None
    mlflow_run_id: str | None = None
    architecture: dict = field(default_factory=dict)


# ---------------------------------------------------------------- choosing


def parse_pick(text: str) -> tuple[str, str, list[tuple[str, str, float]]]:
    """'max quality s.t. p95_ms<=8, size_mb<50' -> ('max', 'quality', [('p95_ms', '<=', 8.0), ...])."""
    m = _PICK.match(text or "")
    valid = f"valid: 'max|min FIELD [s.t. FIELD<=NUMBER, ...]' with FIELD one of {', '.join(NUMERIC)}"
    if not m:
        raise ConfigError(f"--pick: cannot read '{text}'; {valid}")
    sense, key, rest = m.group(1).lower(), m.group(2).lower(), m.group(3)
    conds = []
    for part in re.split(r",|\band\b", rest or "") if rest else []:
        c = _COND.match(part)
        if not c:
            raise ConfigError(f"--pick: cannot read the condition '{part.strip()}'; {valid}")
        conds.append((c.group(1).lower(), c.group(2), float(c.group(3))))
    for name in [key, *(c[0] for c in conds)]:
        if name not in NUMERIC:
            raise ConfigError(f"--pick: unknown field '{name}'; {valid}")
    return sense, key, conds


def pick(choices: list[Choice], text: str) -> Choice:
    sense, key, conds = parse_pick(text)
    ok = [c for c in choices if c.figures.get(key) is not None
          and all(c.figures.get(f) is not None and _OPS[op](c.figures[f], v) for f, op, v in conds)]
    if not ok:
        seen = ", ".join(f"{c.label} ({key} {c.figures.get(key)})" for c in choices) or "none"
        raise ConfigError(f"--pick: no candidate satisfies '{text}'; candidates: {seen}")
    best = max if sense == "max" else min
    return best(ok, key=lambda c: (c.figures[key], -(c.figures.get("p95_ms") or 0.0)) if sense == "max"
                else (c.figures[key], -(c.figures.get("quality") or 0.0)))


def study_rows(cfg: Config) -> list[dict]:
    """Every trial of the config's study as search/study_report rows ([] when there is no study)."""
    study = stored_study(cfg)
    return [] if study is None else trial_rows(study.get_trials(deepcopy=False), cfg.run_dir)


def gate_rows(cfg: Config) -> list[dict]:
    """The gate's measured candidate recipes (report/gate.csv), [] when the gate was not run."""
    return [r for r in gate_table(cfg.run_dir) if r.get("candidate") == "True"]


def _num(value):
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def all_choices(cfg: Config) -> tuple[list[Choice], list[Choice]]:
    """(every exportable model, the default pool: feasible front members + gate recipes meeting the targets)."""
    choices, default_pool = [], []
    for r in study_rows(cfg):
        if r["state"] != "COMPLETE" or r["screened_out"] or not r["checkpoint"]:
            continue
        arch = {k: r.get(k) for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "init")}
        c = Choice("trial", f"trial {r['trial']}", r["recipe"], Path(r["checkpoint"]),
                   {k: r.get(k) for k in NUMERIC}, r["trial"], r.get("mlflow_run_id"), arch)
        choices.append(c)
        if r["feasible"] and r["is_pareto"]:
            default_pool.append(c)
    for r in gate_rows(cfg):
        c = Choice("teacher", f"teacher {r['recipe']}", r["recipe"], teacher_folder(cfg),
                   {k: _num(r.get(k)) for k in NUMERIC})
        choices.append(c)
        if r.get("meets_targets") == "True":
            default_pool.append(c)
    return choices, default_pool


def recipe_choice(cfg: Config, recipe: str) -> Choice:
    """`--recipe R`: the teacher under R, which the gate must have measured (what its PASS line names)."""
    where = cfg.config_path or "<config>"
    measured = [r["recipe"] for r in gate_rows(cfg)]
    if recipe not in measured:
        table = cfg.run_dir / "report" / "gate.csv"
        valid = (f"measured recipes in {table}: {', '.join(measured)}" if measured
                 else f"no recipe was measured ({table} is missing or lists none); run kdlab gate --config {where}")
        raise ConfigError(f"--recipe: '{recipe}' was not measured by the gate; {valid}")
    return teacher_choice(cfg, recipe)


def model_choice(cfg: Config, model_dir: str, recipe: str | None = None) -> Choice:
    """`--model DIR [--recipe R]`: the trained model folder under R (which its own gate must have measured), else
    under the most accurate recipe its gate found meeting the targets, else fp32 when no gate was run for it."""
    model = check_model_dir(cfg, model_dir)
    rows, table = model_gate_rows(cfg, model)
    where = cfg.config_path or "<config>"
    measured = [r["recipe"] for r in rows]
    row = None
    if recipe is not None:
        if recipe not in measured:
            valid = (f"measured: {', '.join(measured)}" if measured
                     else f"none was run for that folder yet: kdlab gate --config {where} --model {model.path}")
            raise ConfigError(f"--recipe: '{recipe}' was not measured by kdlab gate --model {model.path}; {valid}")
        row = next(r for r in rows if r["recipe"] == recipe)
    elif rows:
        meeting = [r for r in rows if r.get("meets_targets") == "True"]
        if not meeting:
            raise ConfigError(f"--model: no recipe that kdlab gate --model {model.path} measured meets the targets "
                              f"({table}: {', '.join(measured)}); choose one with --recipe R")
        row = max(meeting, key=lambda r: (_num(r["quality"]) or 0.0, -(_num(r["p95_ms"]) or math.inf)))
    figures = {k: _num(row.get(k)) for k in NUMERIC} if row else {}
    return Choice("model", f"model {model.path}", row["recipe"] if row else "fp32", model.path, figures,
                  None, model.mlflow_run_id, architecture(model))


def choose(cfg: Config, trial: int | None = None, pick_text: str | None = None, recipe: str | None = None,
           model: str | None = None) -> Choice:
    if model is not None:
        return model_choice(cfg, model, recipe)
    if recipe is not None:
        return recipe_choice(cfg, recipe)
    choices, pool = all_choices(cfg)
    where = cfg.config_path or "<config>"
    if trial is not None:
        found = next((c for c in choices if c.trial == trial), None)
        if found is None:
            have = ", ".join(str(c.trial) for c in choices if c.kind == "trial") or "none"
            raise ConfigError(f"--trial: trial {trial} has no trained checkpoint in {cfg.run_dir / 'trials'} "
                              f"(screened out, failed, pruned, or not on the front); exportable trials: {have}")
        return found
    if pick_text is not None:
        return pick(choices, pick_text)
    if not pool:
        raise ConfigError(f"nothing to export for {where}: no gate recipe met the targets and the search has no "
                          f"feasible front member with a checkpoint (run kdlab gate / kdlab search --config {where}, "
                          f"or choose with --trial N / --pick)")
    return max(pool, key=lambda c: (c.figures.get("quality") or 0.0, -(c.figures.get("p95_ms") or math.inf)))


# ---------------------------------------------------------------- measuring what is exported


# ---------------------------------------------------------------- the stage


def export_dir(cfg: Config, out: str | None) -> Path:
    return Path(out or cfg.export.out_dir or cfg.run_dir / "export")


def teacher_choice(cfg: Config, recipe: str) -> Choice:
    """The teacher under `recipe`, with the gate's figures when the gate measured it (benchmarks compare to it)."""
    row = next((r for r in gate_rows(cfg) if r["recipe"] == recipe), None)
    figures = {k: _num(row.get(k)) for k in NUMERIC} if row else {}
    return Choice("teacher", f"teacher {recipe}", recipe, teacher_folder(cfg), figures)


def run_export(cfg: Config, trial: int | None = None, pick_text: str | None = None, out: str | None = None,
               console=None, choice: Choice | None = None, force: bool = False, recipe: str | None = None,
               model: str | None = None) -> dict:
    """Choose (or take `choice`), then let the task build, check and describe the export; returns its manifest.

    `model`: a trained model folder to export (`--model DIR`, with `recipe` its gate measured, or none).
    An existing export folder is replaced only with `force` (and only once the new one is complete).
    """
    choice = choice or choose(cfg, trial, pick_text, recipe, model)
    dest = export_dir(cfg, out)
    if dest.exists() and not force:
        raise ConfigError(f"--out: {dest} exists; pass --force to replace it (the new export replaces it only once "
                          f"complete)")
    return task_of(cfg).export(cfg, choice, dest, console)


class ExportParts:
    """What an export folder needs from its task; `write_export` calls them in this order.

    - `__init__(cfg, choice)`: the dev set the export is checked and timed on (`.prep`: `.tokenizer`, `.eval_ds`),
      without an Accelerator (train/accel.py says why), and the held-out test split read and checked (a bad test
      file: one line, nothing written).
    - `load_model()`: the chosen fp32 network, in eval mode.
    - `build(staging, model, threads)`: the served artefact's files beyond the weights (classification: ONNX).
    - `entries(model)`: the task's manifest entries; its `data` and `choice` entries join the shared ones.
    - `check(served, model, threads, manifest, say)`: the served artefact (`load_served` of the folder) against the
      fp32 model on the dev set (ExportError past the task's bound) and the held-out test scored once into
      `manifest["test"]`; returns the `parity` entry, whose `served_quality` is the export's quality.
    - `latency(served, model, threads, planning)`: (the card's latency rows at export.latency_batch_sizes, the
      capacity plan's {batch: (p50_ms, p95_ms)} at serving.batch_sizes when `planning`, capacity_section extras).
    - `finish()`: entries known once everything is measured; `conditions` joins the shared conditions.
    - `card(manifest)`: README.md, from the manifest only (the registry writes it again once registered).
    """


def _joined(manifest: dict, entries: dict) -> dict:
    """`entries` added to `manifest`; a dict entry that both hold (data, choice, conditions) gets the keys of both."""
    for key, value in entries.items():
        both = isinstance(value, dict) and isinstance(manifest.get(key), dict)
        manifest[key] = {**manifest[key], **value} if both else value
    return manifest


def write_export(cfg: Config, choice: Choice, dest: Path, console, parts_of) -> dict:
    """The export folder of any task at `dest`: model, config, served artefact, manifest, parity, latency, capacity
    plan, card and deployment files, built in a staging folder moved into place only when complete, then
    registered. `parts_of(cfg, choice)`: the task's ExportParts. Returns the manifest."""
    say = console.print if console is not None else print
    say(f"export: {choice.label}, recipe {choice.recipe} -> {dest}")
    threads, _ = clamp_threads(cfg.target.threads)
    torch.set_num_threads(threads)
    parts = parts_of(cfg, choice)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = parts.load_model()
        write_model(model, parts.prep.tokenizer, staging)
        save_config(cfg, staging / "training_config.yaml")
        parts.build(staging, model, threads)
        manifest = _joined({
            "format": "kdlab-export/1", "name": cfg.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "task": {"type": cfg.task.type, "metric": cfg.task.metric}, "max_length": cfg.data.max_length,
            # Paths as kdlab.eval.paths writes them: relative to the repository, <data>/..., <run>/...
            "teacher": {"source": portable_path(cfg.teacher.source), "hub_id": hub_id(cfg.teacher.source)},
            "data": {**{k: getattr(cfg.data, k) for k in ("dataset", "dataset_config", "eval_split",
                                                          "max_train_samples")},
                     **{k: portable_path(getattr(cfg.data, k)) for k in ("train_file", "eval_file")},
                     "name": dataset_name(cfg.data.dataset, cfg.data.eval_file)},
            "choice": {"kind": choice.kind, "label": portable_text(choice.label, run=cfg.run_dir),
                       "recipe": choice.recipe, "trial": choice.trial,
                       "study": cfg.search.study_name or cfg.name,
                       "source": portable_path(choice.source, run=cfg.run_dir),
                       "mlflow_run_id": choice.mlflow_run_id, "search_figures": choice.figures},
            "versions": versions(), "machine": machine_info(),
        }, parts.entries(model))
        write_manifest(staging, manifest)  # load_served below reads the folder exactly as a user would
        served = load_served(staging, threads=threads)
        agreement = parts.check(served, model, threads, manifest, say)
        # One measurement serves the card's latency table and, with serving.target_rps, the capacity plan.
        planning = cfg.serving.target_rps is not None
        latency, planned, extras = parts.latency(served, model, threads, planning)
        manifest["capacity"] = (capacity_section(cfg, planned, threads, label="export",
                                                 unit=task_of(cfg).capacity_unit(cfg), **extras)
                                if planning else None)
        manifest.update(parity=agreement, latency=latency,
                        measured={"quality": agreement["served_quality"], "size_mb": served.artefact.size_mb,
                                  "params": sum(p.numel() for p in model.parameters())},
                        conditions={"device": cfg.target.device, "threads": threads, "cpu": machine_info()["cpu"],
                                    "torch": versions()["torch"]})
        _joined(manifest, parts.finish())
        (staging / "README.md").write_text(parts.card(manifest))
        write_deploy_files(staging, manifest)  # serve_config.yaml and Dockerfile, hashed with the rest
        manifest = write_manifest(staging, manifest)
        move_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return register(cfg, dest, manifest, parts.card)


def check_test_split(cfg: Config) -> None:
    """The held-out split read and its labels checked against the training labels, nothing scored: `kdlab run`
    calls it before the gate, so a bad test file is one line before the search, not after it."""
    if not (cfg.data.test_file or cfg.data.test_split):
        return
    task_of(cfg).check_test_split(cfg)


def training_data_of(choice: Choice) -> dict | None:
    """How the chosen student's training data was made: its distillation summary's or its trial record's."""
    folder = Path(choice.source)
    for name, read in (("kdlab_summary.json", lambda d: d.get("training_data")),
                       ("kdlab_trial.json", lambda d: (d.get("conditions") or {}).get("training_data"))):
        if (folder / name).is_file():
            found = read(json.loads((folder / name).read_text()))
            if found:
                return found
    return None


def teacher_reference(cfg: Config) -> dict | None:
    """The fp32 teacher's quality and p95 on the target, as the gate measured them."""
    fp32, _ = gate_references(cfg.run_dir)
    return {"quality": _num(fp32["quality"]), "p95_ms": _num(fp32["p95_ms"]), "from": "gate"} if fp32 else None


def front_position(cfg: Config, choice: Choice) -> str | None:
    rows = [r for r in study_rows(cfg) if r["is_pareto"]] if choice.kind == "trial" else []
    if not rows:
        return None
    front = sorted(rows, key=lambda r: r["p95_ms"])
    i = next((k for k, r in enumerate(front) if r["trial"] == choice.trial), None)
    if i is None:
        return "not a front member (chosen by hand)"
    return (f"member {i + 1} of {len(front)} in order of p95 (fastest first); "
            + ", ".join(f"trial {r['trial']}: {r['quality']:.4f} at {r['p95_ms']:.2f} ms" for r in front))


def summary_line(manifest: dict, dest: Path) -> str:
    """One line on a finished export, in the terms of its task."""
    return load_task(manifest["task"]["type"]).export_summary(manifest, dest)


def summary_tail(manifest: dict, decimals: int) -> str:
    """What every task's summary line ends with: the held-out test score (at `decimals`) and the registered model."""
    test, reg = manifest.get("test"), manifest.get("mlflow")
    return ((f"; held-out test {test['metric']} {test['quality']:.{decimals}f}" if test else "")
            + (f"; registered models:/{reg['model_name']}@{reg['alias']} (version {reg['version']})" if reg else ""))
