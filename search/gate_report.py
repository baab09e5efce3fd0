"""What the gate leaves behind: the rich table, report/gate.csv and gate.md, and its MLflow runs.

Library module for the gates (search/gate.py, seq2seq_gate.py, model_gate.py: `publish` writes all of
it) and for the stages that read gate.csv back; nothing to launch. Every table carries its conditions
(device, threads, batch, sequence length, timing budget, machine, versions): a latency without
them is not a result.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kdlab.distill.config import Config, save_config
from kdlab.search.targets import GateResult
from kdlab.train.tracking import mlflow_run

CSV_FIELDS = ("recipe", "status", "reason", "candidate", "quality", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "cv",
              "stable", "p95_low_ms", "p95_high_ms", "rounds", "throughput", "tokens_per_s", "size_mb", "peak_pct", "meets_targets", "misses", "device", "threads",
              "batch_size", "seq_len", "seq_len_median", "padded_len_median")


def _num(value, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def meets_text(row) -> str:
    if row.status != "ok":
        return f"skipped: {row.reason}"
    text = "yes" if row.meets else "no: misses " + ", ".join(row.misses)
    if not row.candidate:
        text += " (reference only)"
    if row.stable is False and row.p95_low_ms is not None:
        text += f" [p95 not repeatable: {row.p95_low_ms:.2f}-{row.p95_high_ms:.2f} ms]"
    return text


def conditions_line(result) -> str:
    c = result.conditions
    seq = (f"seq len from dev data (median {c['seq_len_median']:g} tokens, padded median {c['padded_len_median']:g})"
           if c["seq_len"] == "data" else f"seq len {c['seq_len']} (random ids)")
    return (f"{c['device']}, {c['threads']} thread(s), batch {c['batch_size']}, {seq}; warm-up {c['warmup_iters']}, "
            f">= {c['min_iters']} calls and >= {c['min_seconds']:g} s in {c['repeats']} interleaved rounds; "
            f"quality = dev {c['metric']} on {c['dev_rows']} rows; peak = {c['matmul_peak_gflops']:.1f} GFLOP/s fp32 "
            f"matmul; {c['machine']['cpu']}, torch {c['versions']['torch']}, onnxruntime {c['versions']['onnxruntime']}")


def targets_line(targets) -> str:
    parts = []
    for key, label, fmt in (("p95_ms", "p95 ≤", "{:.2f} ms"), ("min_quality", "quality ≥", "{:.4f}"),
                            ("max_size_mb", "size ≤", "{:.1f} MB")):
        value = getattr(targets, key)
        if value is not None:
            spec = targets.spec.get(key, "")
            parts.append(f"{label} {fmt.format(value)}" + (f" ({spec})" if spec.startswith("teacher") else ""))
    return "targets: " + ("; ".join(parts) if parts else "none set")


def _cells(row) -> list[str]:
    name = row.recipe + ("" if row.candidate else " (ref)")
    return [name, _num(row.quality, "{:.4f}"), _num(row.p50_ms, "{:.2f}"), _num(row.p95_ms, "{:.2f}"),
            _num(row.cv, "{:.3f}"), _num(row.throughput, "{:.1f}"), _num(row.tokens_per_s, "{:.0f}"),
            _num(row.size_mb, "{:.1f}"),
            _num(row.peak_pct, "{:.1f}"), meets_text(row)]


HEADERS = ["recipe", "quality", "p50 ms", "p95 ms", "cv", "throughput /s", "tokens /s", "size MB", "% peak", "meets targets?"]


def print_table(result, console=None) -> None:
    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal:  # piped or captured: rich would squeeze the table into 80 columns
            console.width = 200
    table = Table(title=f"gate: {result.subject} × quantization recipes", caption=conditions_line(result),
                  caption_justify="left")
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i in (0, len(HEADERS) - 1) else "right")
    for row in result.rows:
        style = "green" if row.meets and row.candidate else ("dim" if row.status != "ok" else None)
        table.add_row(*_cells(row), style=style)
    console.print(table)
    console.print(targets_line(result.targets))


def _csv_row(row, conditions: dict) -> dict:
    out = {k: getattr(row, k, None) for k in CSV_FIELDS if hasattr(row, k)}
    out.update(meets_targets=row.meets if row.status == "ok" else "", misses=";".join(row.misses))
    out.update({k: conditions[k] for k in ("device", "threads", "batch_size", "seq_len", "seq_len_median",
                                            "padded_len_median")})
    return {k: ("" if out.get(k) is None else out[k]) for k in CSV_FIELDS}


def markdown(result) -> str:
    lines = [f"# Gate: {result.subject} × quantization recipes", "", conditions_line(result), "",
             targets_line(result.targets), "",
             "| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |" for row in result.rows]
    lines += ["", f"**{result.message}**", ""]
    return "\n".join(lines)


def write_reports(cfg: Config, result, out: Path | None = None) -> Path:
    """gate.csv, gate.md and the resolved config the gate ran with, in `out` (default runs/<name>/report)."""
    out = out or cfg.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gate.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(_csv_row(row, result.conditions) for row in result.rows)
    (out / "gate.md").write_text(markdown(result))
    save_config(cfg, out / "gate_config.yaml")
    return out


def log_gate(cfg: Config, result, run_name: str = "gate", tags: dict | None = None) -> None:
    """A parent MLflow run `run_name` (verdict, targets, reference) with one nested child run per recipe."""
    c = result.conditions
    tags = {"kdlab.gate": "PASS" if result.passed else "MISS", **(tags or {})}
    with mlflow_run(cfg, run_name, True, tags=tags) as tracker:
        if not tracker.active:
            return
        import mlflow  # only for an active run: train/tracking.py says why mlflow loads lazily

        targets = {f"target_{k}": getattr(result.targets, k) for k in ("p95_ms", "min_quality", "max_size_mb")}
        tracker.log_metrics({k: v for k, v in targets.items() if v is not None})
        tracker.log_metrics({f"gap_{k}": g["gap"] for k, g in result.gaps.items()})
        tracker.set_tags({"kdlab.gate_recipe": result.passed.recipe if result.passed else "",
                          "kdlab.gate_message": result.message[:4000], "kdlab.conditions": conditions_line(result)})
        for row in result.rows:
            with mlflow.start_run(run_name=row.recipe, nested=True):
                mlflow.log_params({"recipe": row.recipe, "threads": c["threads"], "batch_size": c["batch_size"],
                                   "seq_len": c["seq_len"], "seq_len_median": c["seq_len_median"],
                                   "device": c["device"]})
                if row.status == "ok":
                    mlflow.log_metrics({k: float(getattr(row, k)) for k in
                                        ("quality", "p50_ms", "p95_ms", "p99_ms", "cv", "throughput", "size_mb")})
                mlflow.set_tags({"status": row.status, "meets_targets": str(row.meets).lower(),
                                 "reason": row.reason, "misses": ",".join(row.misses),
                                 "role": "candidate" if row.candidate else "reference", "kdlab.stage": "gate-recipe"})
        if result.report_dir is not None:
            tracker.log_artifact(result.report_dir / "gate.csv")
            tracker.log_artifact(result.report_dir / "gate.md")


def publish(cfg: Config, result: GateResult, accelerator=None, console=None, out_dir: Path | None = None,
            run_name: str = "gate", tags: dict | None = None) -> GateResult:
    """gate.csv / gate.md (in `out_dir`, default runs/<name>/report), the table on the console and the MLflow
    runs (main process only; `accelerator` None: this is the only process)."""
    if accelerator is None or accelerator.is_main_process:
        result.report_dir = write_reports(cfg, result, out_dir)
        print_table(result, console)
        log_gate(cfg, result, run_name, tags)
    return result


# ---------------------------------------------------------------- reading the table back


def gate_table(run_dir: Path, path: Path | None = None) -> list[dict]:
    """The measured rows of `run_dir`/report/gate.csv (or of `path`) as written above ([] when the gate was not
    run)."""
    path = Path(path) if path is not None else Path(run_dir) / "report" / "gate.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["status"] == "ok" and r["p95_ms"] and r["quality"]]


def gate_references(run_dir: Path) -> tuple[dict | None, dict | None]:
    """(the fp32 teacher's row, the best quantized candidate's row: most accurate, then fastest) of gate.csv."""
    rows = gate_table(run_dir)
    fp32 = next((r for r in rows if r["recipe"] == "fp32"), None)
    quantized = [r for r in rows if r["recipe"] != "fp32" and r["candidate"] == "True"]
    best = max(quantized, key=lambda r: (float(r["quality"]), -float(r["p95_ms"]))) if quantized else None
    return fp32, best
