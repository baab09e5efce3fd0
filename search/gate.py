"""The gate: can the teacher itself, under some quantization recipe, meet the target?

    kdlab gate --config configs/sst2_minilm.yaml
    kdlab gate --config configs/sst2_minilm.yaml target.p95_ms=teacher*0.25 target.min_quality=teacher*0.97

Takes the task-ready teacher (fine-tuned once, reused from runs/<name>/teacher/), builds every
recipe of `quantization.recipes` in ladder order (cheapest change first), scores each artefact
itself on the full dev set, times them interleaved on the target profile, and checks the targets.
Writes runs/<name>/report/gate.csv and gate.md and one MLflow run per recipe under a parent `gate`
run. Exit code 0 (PASS: a recipe meets every target), 3 (MISS: distillation needed), 2 (config error).

This module is the stage, which calls the task (kdlab.distill.task) for data, teacher and measurement,
and the loop over recipes every task's measurement may use (`build_rows`; search/classification_gate.py and
search/seq2seq_gate.py are the two built-in measurements). What every gate shares sits below them: search/targets.py (rows, targets, the verdict), search/timing.py (request
batches, interleaved timing, the measurement conditions) and search/gate_report.py (the table, gate.csv /
gate.md, MLflow runs).
"""
from __future__ import annotations

from accelerate.utils import set_seed

from kdlab.distill.config import Config
from kdlab.distill.quantize import RecipeUnavailable
from kdlab.distill.task import task_of
from kdlab.search.gate_report import publish
from kdlab.search.targets import GateResult, GateRow, judge, ladder, target_gaps
from kdlab.search.timing import check_device, complete_conditions, target_threads


# ---------------------------------------------------------------- building and measuring


def build_rows(recipes: list[str], serve, score, reference_only: tuple = ()) -> list[tuple[GateRow, object | None]]:
    """Each recipe's served artefact (`serve(recipe)`) scored on the dev set (`score(served)`), one row each: the
    gate's loop for every task; a recipe that cannot run, or fails on the dev set, is a skipped row saying why."""
    out = []
    for name in recipes:
        row = GateRow(name, candidate=name not in reference_only)
        try:
            served = serve(name)
            row.size_mb = served.size_mb
            row.quality = score(served)
        except RecipeUnavailable as exc:
            row.status, row.reason, served = "skipped", str(exc), None
        except Exception as exc:  # a kernel that rejects a dev-set shape: skip the recipe, say why
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            row.status, row.reason, served = "skipped", f"failed on the dev set: {type(exc).__name__}: {first}", None
        out.append((row, served))
    return out


# ---------------------------------------------------------------- the stage


def run_gate(cfg: Config, accelerator=None, console=None) -> GateResult:
    """Measure the teacher under every recipe on cfg.target; write the report and MLflow runs.

    The task (kdlab.distill.task) reads the data, makes the teacher task-ready and measures each recipe's
    artefact; the ladder, the verdict and the report are the stage's. Measuring needs no Accelerator: with
    `accelerator` None one is built (train/accel.py) only when the teacher must be fine-tuned first.
    """
    task = task_of(cfg)
    check_device(cfg.target)
    set_seed(cfg.train.seed)  # a head the teacher lacks is initialised at random: make it the same each run
    threads = target_threads(cfg.target)
    task.check_teacher_fits(cfg)
    prep = task.prepare(cfg, accelerator)
    teacher, teacher_dev = task.ensure_teacher(cfg, accelerator, prep)
    teacher = teacher.to("cpu").eval()

    recipes, reference_only = ladder(cfg)
    rows, conditions = task.measure(cfg, teacher, prep, threads, recipes, cfg.run_dir / "gate",
                                    reference_only=reference_only)
    conditions = complete_conditions(conditions, cfg, threads)
    conditions["teacher_dev"] = teacher_dev
    targets, passed, message = judge(rows, cfg)
    return publish(cfg, GateResult(rows, targets, conditions, passed, target_gaps(rows, targets), message),
                   accelerator, console)
