"""The task interface and its registry: what differs between classification, seq2seq and a task of your own.

Library module; nothing to launch. Every stage (config checks, teacher, gate, distillation, export, ...)
asks `task_of(cfg)` for the task and calls it; no stage compares task names. A task is a class with the
parts of `REQUIRED_PARTS` (`Task` below documents each and supplies the optional ones); the registry maps
`task.type` to one:

- the built-in tasks of `BUILTIN` (classification, seq2seq: kdlab/tasks/, installed as kdlab.tasks);
- a task installed by another package under the entry-point group `kdlab.tasks`
  (`[project.entry-points."kdlab.tasks"] ner = "mypkg.ner:NerTask"`);
- a `module:Class` path given as task.type itself (`task.type: mypkg.ner:NerTask`).

Implementations are loaded by their dotted path when first asked for, so this module imports none of
them (a stage never imports a task module) and checking a config loads no torch: a task module keeps
its heavy imports inside the methods that need them. What a user can get wrong (an unknown name, a
path that does not import, a class that lacks a part, a config key the task does not read) is a
one-line `ConfigError` naming it.
"""
from __future__ import annotations

import dataclasses
import importlib
from functools import lru_cache
from importlib import metadata

from kdlab.distill.errors import ConfigError

ENTRY_POINT_GROUP = "kdlab.tasks"
DEFAULT_TASK = "classification"
BUILTIN = {"classification": "kdlab.tasks.classification:ClassificationTask",
           "seq2seq": "kdlab.tasks.seq2seq:Seq2SeqTask"}

# The parts every task must have: the config's facts (read before torch loads), then what each stage calls.
REQUIRED_PARTS = (
    "name", "metrics", "quality_scale", "unused_keys", "check_config",                  # config
    "check_teacher_fits", "prepare", "ensure_teacher",                                  # teacher
    "measure", "check_model_folder", "prepare_model", "load_network",                  # gate (and --model DIR)
    "distil",                                                                            # one distillation
    "search_space", "search_setup", "trial_objective",                                  # search
    "check_test_split", "export", "export_summary", "capacity_unit", "serving_latency", # export, capacity
    "load_artefact", "predict_records",                                                 # serve
)


class Task:
    """Base class of a task: the optional parts with their defaults, and each part's contract.

    A plug-in need not derive from it; it must have every name of REQUIRED_PARTS.

    - `name`: the task's name in messages and manifests.
    - `metrics`: the task.metric values it can score, the default first; `quality_scale`: their largest value
      (1 for fractions, 100 for BLEU-like points).
    - `unused_keys`: dotted config keys the task never reads; a config that sets one away from its default is
      refused (`check_unused`), since the setting would be silently ignored.
    - `check_config(cfg, c)`: the task's own range checks; `c(ok, key, message)` raises the one-line error.
    - `check_teacher_fits(cfg)`: what must hold of the teacher before anything is built (e.g. its positions
      cover target.seq_len); raises ConfigError.
    - `prepare(cfg, accelerator)`: data read and tokenized (an object with `.tokenizer`, `.eval_ds`).
    - `ensure_teacher(cfg, accelerator, prep)`: the task-ready teacher and its dev metrics (fine-tuned once).
    - `measure(cfg, model, prep, threads, recipes, workdir, reference_only)`: the gate's rows (one per recipe:
      the artefact's own dev quality, then interleaved timing of one request on cfg.target) and the conditions
      that are the task's own (the stage adds the target profile, metric, machine and versions:
      kdlab.search.timing.complete_conditions); the search measures its fp32 teacher reference with it too
      (`prep`: the search setup's `ctx.prep`).
    - `check_model_folder(cfg, path, config)`, `prepare_model(cfg, model)`, `load_network(cfg, model, tokenizer)`:
      a trained model folder given as `--model DIR` (kdlab.train.model_dir): is it this task's kind of model, its
      dev set under its own tokenizer, the fp32 network on the CPU.
    - `distil(cfg, accelerator)`: one distillation run; returns its kdlab_summary.json.
    - `search_space(cfg)`: the study's space (draws a student per trial; `describe()` for the fingerprint).
    - `search_setup(cfg, accelerator, space, console, threads)`: what the study prepares once (data, teacher,
      batches, tracking): a kdlab.search.objective.Context.
    - `trial_objective(trial, ctx)`: one Optuna trial: build, screen, distil, serve, score, time.
    - `check_test_split(cfg)`: read the held-out split and check it against the training data, scoring nothing.
    - `export(cfg, choice, dest, console)`: build, check (parity), time and describe the chosen model's export
      folder at `dest`; returns its manifest (whose task.type names the task again when it is read back).
    - `export_summary(manifest, dest)`: one line on a finished export.
    - `capacity_unit(cfg)`: what one request of the capacity plan is (one forward pass, one whole `generate`).
    - `serving_latency(cfg, models, threads, batch_sizes)`: `{label: {batch: (p50_ms, p95_ms)}}` of one request
      served by each model folder under its recipe (`models`: label -> (folder, recipe, workdir)), timed
      interleaved on cfg.target at each batch size (kdlab report --capacity plans from it).
    - `load_artefact(folder, manifest, tokenizer, recipe=, device=, threads=)`: an export folder's served artefact
      (kdlab.distill.export.load_served; also inside the MLflow pyfunc, so it may import only kdlab.distill
      and kdlab.eval).
    - `predict_records(served, texts, pairs)`: one JSON-able record per text (kdlab predict, kdlab serve, the API).
    """

    name = "task"
    metrics: tuple = ()
    quality_scale = 1.0
    unused_keys: tuple = ()

    def check_config(self, cfg, c) -> None:
        """No checks beyond the shared ones."""

    def check_teacher_fits(self, cfg) -> None:
        """Nothing to check."""


def _load_path(path: str, where: str):
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{where}: '{path}' is not a registered task or a module:Class path; "
                          f"valid: {', '.join(registered())}, or module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module '{module_name}' of '{path}' ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{where}: module '{module_name}' has no '{attr}' (from '{path}')") from None


def registered() -> dict[str, str]:
    """task.type -> `module:Class`: the built-in tasks, then those installed under the entry-point group."""
    out = dict(BUILTIN)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        out.setdefault(ep.name, ep.value)
    return out


@lru_cache(maxsize=None)
def load_task(type_: str, where: str = "task.type"):
    """The task instance for a task.type value (a registered name or a module:Class path); one-line errors."""
    known = registered()
    if type_ in known:
        path = known[type_]
    elif ":" in str(type_):
        path = type_
    else:
        raise ConfigError(f"{where}: '{type_}' is not a registered task; valid: {', '.join(known)}, or a "
                          f"module:Class path")
    cls = _load_path(path, where)
    missing = [part for part in REQUIRED_PARTS if not hasattr(cls, part)]
    if missing:
        raise ConfigError(f"{where}: task '{path}' lacks {', '.join(missing)}; valid: a class with every part of "
                          f"kdlab.distill.task.REQUIRED_PARTS")
    return cls() if isinstance(cls, type) else cls


def task_of(cfg):
    """The task `cfg.task.type` names."""
    return load_task(cfg.task.type)


def check_unused(cfg, task, c) -> None:
    """Refuse a key the task never reads when it is set away from its default (it would be silently ignored).

    A section in `task.unused_keys` (`generation`) stands for each of its fields; the first one set is named.
    """
    defaults = type(cfg)()
    for dotted in task.unused_keys:
        value, default = cfg, defaults
        for part in dotted.split("."):
            value, default = getattr(value, part), getattr(default, part)
        if dataclasses.is_dataclass(value):
            fields = [(f"{dotted}.{f.name}", getattr(value, f.name), getattr(default, f.name))
                      for f in dataclasses.fields(value)]
        else:
            fields = [(dotted, value, default)]
        for key, v, d in fields:
            c(v == d, key, f"{v!r} is not used by task.type={cfg.task.type}; remove it (default {d!r})")
