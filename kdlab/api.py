"""The Python API of kdlab, for notebooks and scripts; the `kdlab` command is a thin layer over it.

    import kdlab
    cfg = kdlab.load_config("configs/smoke.yaml", ["train.max_steps=50"])
    summary = kdlab.run_distill(cfg)                                   # runs/smoke/student + its summary
    gate = kdlab.run_gate(cfg, model=summary["checkpoint"])            # that student x the recipe ladder
    manifest = kdlab.run_export(cfg, model=summary["checkpoint"], out="runs/smoke/student_export")
    kdlab.predict("runs/smoke/student_export", ["a gripping film"])    # [{'label': '1', 'probs': {...}}]

Each function takes a loaded Config and returns what the matching command prints from: run_distill the
run summary (kdlab_summary.json), run_gate a GateResult, run_search a SearchResult, run_export the export's
manifest, run a RunResult. A user error raises ConfigError or ExportError carrying the one-line message the
command prints; a run that finds nothing feasible is a result (exit_code 3), not an exception.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kdlab.distill.config import Config, load_config
from kdlab.distill.export import Served, load_served
from kdlab.search.export import check_test_split, export_dir, run_export as _export, summary_line
from kdlab.search.gate import GateResult, run_gate as _gate
from kdlab.search.model_gate import run_model_gate
from kdlab.search.study import SearchResult, run_report, trained_trials, run_search as _search
from kdlab.train.accel import training_accelerator
from kdlab.train.distill import distil

__all__ = ["load_config", "run_distill", "run_gate", "run_search", "run_export", "run", "load_export", "predict"]


def run_distill(cfg: Config) -> dict:
    """One distillation in this process (the teacher is fine-tuned first when it has no head for the task)."""
    return distil(cfg, training_accelerator(cfg))


def run_gate(cfg: Config, model: str | Path | None = None) -> GateResult:
    """The teacher (or the trained model folder `model`) under each quantization recipe, against the targets."""
    return _gate(cfg) if model is None else run_model_gate(cfg, str(model))


def run_search(cfg: Config, n_trials: int | None = None, timeout_s: float | None = None,
               remeasure: bool = False) -> SearchResult:
    """Run or resume the config's Optuna study; trials train on the device accelerate gives them.

    A new study's relative targets resolve against the gate's fp32 teacher figure for this config and target
    profile (or one measurement when there is none); `remeasure` measures anew instead (a new study only)."""
    return _search(cfg, training_accelerator(cfg), n_trials=n_trials, timeout_s=timeout_s, remeasure=remeasure)


def run_export(cfg: Config, *, trial: int | None = None, pick: str | None = None, recipe: str | None = None,
               model: str | Path | None = None, out: str | Path | None = None, force: bool = False) -> dict:
    """Export the chosen model (default: the most accurate feasible one) and return its manifest."""
    return _export(cfg, trial=trial, pick_text=pick, out=None if out is None else str(out), force=force,
                   recipe=recipe, model=None if model is None else str(model))


@dataclass
class RunResult:
    """What `kdlab run` did: the gate, the search (None on a PASS), the export manifest (None when none)."""

    gate: GateResult
    search: SearchResult | None = None
    manifest: dict | None = None
    exit_code: int = 0
    lines: list[str] = field(default_factory=list)


def run(cfg: Config, n_trials: int | None = None, timeout_s: float | None = None, say=print) -> RunResult:
    """teacher -> gate -> search (only when the gate misses) -> export, stopping at the stage that fails.

    The study is topped up to search.n_trials (`n_trials` adds that many more), so running again exports
    from the finished study instead of searching all over. `say` gets each stage's summary line.
    """
    check_test_split(cfg)  # only the export scores it; a bad test file is one line now, not after the search
    gate = _gate(cfg)  # fine-tunes the teacher first when needed
    result = RunResult(gate)
    say(gate.message)
    if gate.passed is None:
        todo = n_trials if n_trials is not None else cfg.search.n_trials - trained_trials(cfg)
        if todo > 0:
            result.search = run_search(cfg, n_trials=todo, timeout_s=timeout_s)
        else:
            say(f"search: the study already has {cfg.search.n_trials} or more trained trials (--n-trials N adds more)")
            result.search = run_report(cfg)
        say(result.search.message)
        if result.search.exit_code != 0:
            result.exit_code = result.search.exit_code
            return result
    result.manifest = _export(cfg, force=True)  # `run` owns runs/<name>/export: a re-run replaces it when complete
    say(summary_line(result.manifest, export_dir(cfg, None)))
    return result


def load_export(folder: str | Path) -> Served:
    """An export folder's served artefact (the quantized one the card measured), checked against its manifest."""
    return load_served(folder)


def predict(export: str | Path | Served, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
    """The served artefact's prediction record per text, as kdlab predict writes them: {"label", "probs"}
    (classification), {"output"} (seq2seq), or what the export's task predicts."""
    served = export if isinstance(export, Served) else load_served(export)
    return served.predict_records(list(texts), pairs)
