"""What a search leaves behind: one row per trial, the front, pareto.csv / .png / .html and the rich table.

Library module for search/study.py (and `kdlab report`, which rebuilds all of it from the stored
study); nothing to launch. Every plot and table carries its conditions (device, threads, batch,
sequence length): a latency without them is not a result.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import plotly.graph_objects as go
# matplotlib's Figure itself, not pyplot: writing a PNG needs no backend chosen for the whole process (a
# notebook's stays as it is) and no pyplot figure to close.
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from kdlab.search.pareto import Point, front_steps, pareto_front

ROW_FIELDS = ("trial", "state", "feasible", "screened_out", "is_pareto", "quality", "p50_ms", "p95_ms", "p99_ms",
              "throughput", "size_mb", "params", "train_seconds", "steps", "pre_p95_ms", "pre_size_mb",
              "label_agreement", "p95_low_ms", "p95_high_ms", "p95_verdict", "violates", "num_layers",
              "hidden_size", "num_heads", "intermediate_size", "init", "recipe", "drawn_recipe", "label", "learning_rate", "temperature",
              "alpha", "family", "encoder_layers", "decoder_layers", "error", "duplicate_of", "stopped_early",
              "stop_reason", "ruled_out", "predicted_p95_ms", "checkpoint", "mlflow_run_id")
SHAPE_FIELDS = ("num_layers", "encoder_layers", "decoder_layers", "hidden_size", "num_heads", "intermediate_size",
                "family")
FIGURES = ("quality", "p50_ms", "p95_ms", "p99_ms", "throughput", "size_mb", "params", "train_seconds", "steps",
           "pre_p95_ms", "pre_size_mb", "label_agreement")


def trial_rows(trials, run_dir: Path | None = None) -> list[dict]:
    """One plain dict per Optuna trial (any state), with `feasible` and `is_pareto` decided here.

    feasible: COMPLETE and every constraint <= 0 (Optuna's convention); `violates`: the constraints > 0, by name
    (p95_ms, size_mb, quality, agreement). The front is `pareto_front` over feasible trials' (quality, p95_ms),
    the same set as `study.best_trials`.
    """
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        u = t.user_attrs
        complete = t.state.name == "COMPLETE"
        row = {k: u.get(k) for k in ROW_FIELDS}
        row.update(trial=t.number, state=t.state.name, screened_out=bool(u.get("screened_out", False)),
                   feasible=complete and all(v <= 0 for v in t.constraints.values()), is_pareto=False,
                   violates=" ".join(k for k, v in sorted(t.constraints.items()) if v > 0))
        if complete:  # the objectives Optuna holds are the ones the front is computed on
            row["quality"], row["p95_ms"] = t.values
        checkpoint = run_dir / "trials" / str(t.number) if run_dir is not None else None
        row["checkpoint"] = str(checkpoint) if checkpoint is not None and checkpoint.is_dir() else ""
        rows.append(row)
    points = [Point(r["quality"], r["p95_ms"], r["feasible"]) if r["state"] == "COMPLETE"
              else Point(math.nan, math.nan, False) for r in rows]
    for i in pareto_front(points):
        rows[i]["is_pareto"] = True
    return rows


def arch_text(row: dict) -> str:
    """The trial's candidate as its task's space labels it (`label`, stored when it was drawn); for a trial recorded
    without one, the shape it was drawn with, as recorded."""
    if row.get("label"):
        return row["label"]
    if row.get("recipe") is None:  # every drawn candidate has a recipe; its shape keys are its space's own
        return "(not drawn)"
    shape = ", ".join(f"{k.replace('_', ' ')} {row[k]}" for k in SHAPE_FIELDS if row.get(k) is not None)
    return ", ".join(filter(None, (shape, row.get("init"), row["recipe"])))


def conditions_text(conditions: dict) -> str:
    seq = (f"seq len from dev data (median {conditions['seq_len_median']:g})" if conditions["seq_len"] == "data"
           else f"seq len {conditions['seq_len']}")
    return f"{conditions['device']}, {conditions['threads']} thread(s), batch {conditions['batch_size']}, {seq}"


def time_text(spent: dict) -> str:
    """Where the study's time went (search/study.py time_accounting), largest share first."""
    parts = {k[:-2]: v for k, v in spent.items() if k.endswith("_s") and k != "wall_s" and v > 0}
    wall = spent["wall_s"] or 1.0
    shares = ", ".join(f"{k} {v:.0f} s ({v / wall:.0%})" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
    return f"time: {spent['wall_s']:.0f} s over {spent['calls']} search call(s): {shares or 'nothing yet'}"


def targets_text(targets: dict) -> str:
    parts = []
    for key, label, fmt in (("p95_ms", "p95 ≤", "{:.2f} ms"), ("min_quality", "quality ≥", "{:.4f}"),
                            ("max_size_mb", "size ≤", "{:.1f} MB")):
        if targets.get(key) is not None:
            spec = str(targets.get("spec", {}).get(key, ""))
            parts.append(f"{label} {fmt.format(targets[key])}" + (f" ({spec})" if spec.startswith("teacher") else ""))
    return "targets: " + ("; ".join(parts) if parts else "none set")


def write_csv(rows: list[dict], path: Path, conditions: dict) -> None:
    fields = ROW_FIELDS + ("device", "threads", "batch_size", "seq_len")
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            out = {**row, **{k: conditions.get(k) for k in ("device", "threads", "batch_size", "seq_len")}}
            writer.writerow({k: "" if out.get(k) is None else out[k] for k in fields})


def _groups(rows: list[dict]):
    measured = [r for r in rows if r.get("p95_ms") is not None]
    trained = [r for r in measured if r["state"] == "COMPLETE" and not r["screened_out"]]
    return ([r for r in trained if r["feasible"]], [r for r in trained if not r["feasible"]],
            [r for r in measured if r["screened_out"]])


def _front_line(rows: list[dict]) -> list[tuple[float, float]]:
    return front_steps([Point(r["quality"], r["p95_ms"], r["feasible"]) for r in rows
                        if r["state"] == "COMPLETE"])


def plot_png(rows: list[dict], path: Path, meta: dict) -> None:
    """Matplotlib: all measured trials, feasible highlighted, the front as a step line, references, budgets."""
    feasible, infeasible, screened = _groups(rows)
    targets, metric = meta["targets"], meta["metric"]
    fig = Figure(figsize=(9, 6), dpi=110)
    ax = fig.subplots()
    if infeasible:
        ax.scatter([r["p95_ms"] for r in infeasible], [r["quality"] for r in infeasible], marker="x", color="0.55",
                   label="trained, infeasible (misses a target)")
    if feasible:
        ax.scatter([r["p95_ms"] for r in feasible], [r["quality"] for r in feasible], color="tab:blue", zorder=3,
                   label="trained, feasible")
    line = _front_line(rows)
    if line:
        ax.step([p for p, _ in line], [q for _, q in line], where="post", color="tab:blue", lw=1.5,
                label="Pareto front")
        for r in rows:
            if r["is_pareto"]:
                ax.annotate(f"#{r['trial']}", (r["p95_ms"], r["quality"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
    for ref, marker in zip(meta.get("references", []), ("*", "D", "P")):
        ax.scatter([ref["p95_ms"]], [ref["quality"]], marker=marker, s=110, color="tab:orange", zorder=4,
                   edgecolor="black", label=ref["label"])
    if targets.get("p95_ms") is not None:
        measured = [r["p95_ms"] for r in feasible + infeasible + screened + meta.get("references", [])]
        far = bool(measured) and targets["p95_ms"] > 3 * max(measured)
        if far:  # a loose budget far right of every point would squash them against the y axis
            ax.set_xlim(0, 1.15 * max(measured))
        ax.axvline(targets["p95_ms"], color="tab:red", ls="--", lw=1,
                   label=f"p95 budget {targets['p95_ms']:.2f} ms" + (" (off the right edge)" if far else ""))
    if targets.get("min_quality") is not None:
        ax.axhline(targets["min_quality"], color="tab:green", ls=":", lw=1,
                   label=f"quality floor {targets['min_quality']:.4f}")
    if screened:
        # Screened-out candidates were never trained (quality 0 by convention): a strip at the bottom
        # keeps them visible without squashing the trained points into the top of the axis.
        if not (feasible or infeasible or meta.get("references")):
            ax.set_ylim(-0.05, 1.05)  # nothing was trained: show the whole quality scale
        bottom = ax.get_ylim()[0] if (feasible or infeasible or meta.get("references")) else 0.0
        ax.scatter([r["p95_ms"] for r in screened], [bottom] * len(screened), marker="v", facecolor="none",
                   edgecolor="tab:red", clip_on=False, zorder=3,
                   label="screened out untrained (p95 measured before training)")
    ax.set_xlabel(f"p95 latency per request (ms) — {conditions_text(meta['conditions'])}")
    ax.set_ylabel(f"dev {metric} of the served (quantized) artefact")
    ax.set_title(f"search '{meta['study']}': {metric} vs p95 latency; {targets_text(targets)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)


def _hover(row: dict) -> str:
    figures = [f"{k} {row[k]:.4g}" for k in ("quality", "p50_ms", "p95_ms", "size_mb", "train_seconds",
                                             "label_agreement") if row.get(k) is not None]
    state = "screened out" if row["screened_out"] else ("feasible" if row["feasible"] else
                                                        f"infeasible: {row['violates']}")
    return f"trial {row['trial']} ({state})<br>{arch_text(row)}<br>{', '.join(figures)}"


def plot_html(rows: list[dict], path: Path, meta: dict) -> None:
    """Plotly, self-contained (plotly.js embedded: no CDN is reachable offline); hover names the architecture."""
    feasible, infeasible, screened = _groups(rows)
    targets = meta["targets"]
    fig = go.Figure()
    for group, name, marker in ((feasible, "trained, feasible", dict(color="royalblue", size=10)),
                                (infeasible, "trained, infeasible", dict(color="gray", symbol="x", size=9)),
                                (screened, "screened out untrained (quality 0)",
                                 dict(color="firebrick", symbol="triangle-down-open", size=9))):
        if group:
            fig.add_trace(go.Scatter(x=[r["p95_ms"] for r in group], y=[r["quality"] or 0.0 for r in group],
                                     mode="markers", name=name, marker=marker, hoverinfo="text",
                                     hovertext=[_hover(r) for r in group]))
    line = _front_line(rows)
    if line:
        fig.add_trace(go.Scatter(x=[p for p, _ in line], y=[q for _, q in line], mode="lines", name="Pareto front",
                                 line=dict(shape="hv", color="royalblue"), hoverinfo="skip"))
    for ref in meta.get("references", []):
        fig.add_trace(go.Scatter(x=[ref["p95_ms"]], y=[ref["quality"]], mode="markers", name=ref["label"],
                                 marker=dict(symbol="star", size=14, color="orange"), hoverinfo="text",
                                 hovertext=[f"{ref['label']}<br>quality {ref['quality']:.4f}, "
                                            f"p95 {ref['p95_ms']:.2f} ms"]))
    if targets.get("p95_ms") is not None:
        fig.add_vline(x=targets["p95_ms"], line_dash="dash", line_color="red",
                      annotation_text=f"p95 budget {targets['p95_ms']:.2f} ms")
    if targets.get("min_quality") is not None:
        fig.add_hline(y=targets["min_quality"], line_dash="dot", line_color="green",
                      annotation_text=f"floor {targets['min_quality']:.4f}")
    fig.update_layout(title=f"search '{meta['study']}': {meta['metric']} vs p95 latency ({targets_text(targets)})",
                      xaxis_title=f"p95 latency per request (ms) — {conditions_text(meta['conditions'])}",
                      yaxis_title=f"dev {meta['metric']} of the served (quantized) artefact", template="plotly_white")
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def write_report(rows: list[dict], out_dir: Path, meta: dict) -> dict[str, Path]:
    """pareto.csv, pareto.png and pareto.html under out_dir; returns their paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("pareto.csv", "pareto.png", "pareto.html")}
    # Several workers of one study refresh the same folder: each file is written aside and renamed into place,
    # so a reader (or another worker) never sees half of one.
    for name, write in (("pareto.csv", lambda p: write_csv(rows, p, meta["conditions"])),
                        ("pareto.png", lambda p: plot_png(rows, p, meta)),
                        ("pareto.html", lambda p: plot_html(rows, p, meta))):
        tmp = out_dir / f".{name}.{os.getpid()}.tmp{paths[name].suffix}"
        try:
            write(tmp)
            os.replace(tmp, paths[name])
        finally:
            tmp.unlink(missing_ok=True)
    return paths


def _num(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def print_front(rows: list[dict], meta: dict, console=None) -> None:
    """The front as a rich table (all trials when none is feasible), with conditions and targets below."""
    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal:  # piped or captured: rich would squeeze the table into 80 columns
            console.width = 200
    front = [r for r in rows if r["is_pareto"]]
    shown = front or rows
    title = (f"search '{meta['study']}': Pareto front ({len(front)} of {len(rows)} trials; quality ↑, p95 ↓)" if front
             else f"search '{meta['study']}': no feasible trial ({len(rows)} trials)")
    table = Table(title=title, caption=conditions_text(meta["conditions"]), caption_justify="left")
    headers = ["trial", "student", meta["metric"], "p50 ms", "p95 ms", "size MB", "params M", "train s", "agree %",
               "state"]
    for h in headers:
        table.add_column(h, justify="left" if h in ("student", "state") else "right")
    for r in sorted(shown, key=lambda r: (r["p95_ms"] is None, r["p95_ms"] or 0.0)):
        state = "screened out" if r["screened_out"] else f"stopped early ({r['stopped_early']})" if r.get(
            "stopped_early") else "ruled out" if r.get("ruled_out") else (r["state"].lower() if r["state"] != "COMPLETE" else
                                                          ("feasible" if r["feasible"] else
                                                           f"infeasible ({r['violates']})"))
        table.add_row(str(r["trial"]), arch_text(r), _num(r["quality"], "{:.4f}"), _num(r["p50_ms"], "{:.2f}"), _num(r["p95_ms"], "{:.2f}"),
                      _num(r["size_mb"], "{:.1f}"), _num(r["params"] and r["params"] / 1e6, "{:.2f}"),
                      _num(r["train_seconds"], "{:.0f}"),
                      _num(None if r.get("label_agreement") is None else 100 * r["label_agreement"], "{:.2f}"), state)
    console.print(table)
    console.print(targets_text(meta["targets"]))
    if meta.get("time"):
        console.print(time_text(meta["time"]))
