"""A latency model of the search space, fitted before the first trial, so the search trains only students
that can meet the p95 budget.

Library module for search/study.py and search/objective.py; nothing to launch. Latency depends on the
architecture and the serving recipe, not on the weights. Before the first trial, `calibrate` times a
sample of the space's (layers, hidden, heads, ffn, recipe) points untrained on the target profile (up to
`search.latency_samples`: each recipe's smallest and largest point first, then a seeded random draw) and
fits, per (family, recipe), a non-negative least-squares model of the relative error

    p95 ~ c0 + c1 * L + c2 * L * h + c3 * L * (4 h^2 + 2 h f)

(per call, per layer, per-layer work linear in the width over a fixed sequence length: attention and
layer norms, and the dense matmuls). Its error is the 90th percentile of the leave-one-out relative
errors, never below MIN_ERROR. A draw predicted slower than the screening bound even at the low edge
(p95 * (1 - error) > budget * (1 + search.screen_margin)) is ruled out before anything is built: it is
recorded PRUNED with `ruled_out` and `predicted_p95_ms`, costs no measurement and no trial of
search.n_trials. Screening still measures every candidate the model lets through. A (family, recipe) with
fewer than MIN_POINTS measured points gets no model and rules nothing out.

The measured table is cached per machine and target profile (<cache>/latency/<key>.json; key: CPU model,
cores, torch and onnxruntime versions, the recipes' revision, device, threads, batch, sequence length setting and
timing settings) and reused across studies: a point is timed once per machine and profile. Rows also carry the student's
model type and the median dev length its tokenizer gives, which change the cost. A shared machine's speed
drifts, so a study that reads the table first re-times a few of its points (`search.latency_recheck`) and
scales each recipe's cached points by how much slower or faster they time now, when that is beyond
MIN_ERROR (`recheck`): here the same untrained points timed 1.15-1.6x their cached p95 a day later, and a
model fitted on the stale table let through students that then missed the budget.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import nnls
from tqdm.auto import tqdm

from kdlab.distill.config import StudentConfig
from kdlab.distill.quantize import RECIPE_REVISION, apply_recipe
from kdlab.distill.students import build_student
from kdlab.eval.latency import cache_dir, machine_info, versions
from kdlab.search.targets import GateRow
from kdlab.search.timing import measure_candidates

MIN_POINTS = 5  # measured points a (family, recipe) needs before its model may rule anything out
MIN_ERROR = 0.10  # the model's error is never taken as smaller than this (a relative margin)
GROUP = 6  # points timed together, interleaved (one measure call)
TABLE_VERSION = 1


def features(layers: int, hidden: int, ffn: int) -> list[float]:
    return [1.0, float(layers), layers * hidden / 1e3, layers * (4 * hidden * hidden + 2 * hidden * ffn) / 1e6]


@dataclass
class LatencyModel:
    """Per (family, recipe): NNLS coefficients of `features`; `error`: the relative margin predictions carry."""
    coefs: dict = field(default_factory=dict)
    error: float = MIN_ERROR
    points: int = 0
    cached: int = 0  # of `points`, how many came from the cache instead of being timed now
    drift: dict = field(default_factory=dict)  # "family/recipe" -> now / cached p95 of the re-timed points
    fastest: dict | None = None  # the fastest measured point (for "nothing can meet the budget")

    def predict(self, family: str, recipe: str, layers: int, hidden: int, ffn: int) -> float | None:
        coef = self.coefs.get((family, recipe))
        if coef is None:
            return None
        return float(np.dot(coef, features(layers, hidden, ffn)))

    def rules_out(self, predicted: float | None, bound_ms: float | None) -> bool:
        return predicted is not None and bound_ms is not None and predicted * (1.0 - self.error) > bound_ms

    def summary(self) -> dict:
        return {"points": self.points, "cached": self.cached, "error": round(self.error, 4), "drift": self.drift,
                "models": sorted(f"{f}/{r}" for f, r in self.coefs), "fastest": self.fastest}


def fit(rows: list[dict]) -> LatencyModel:
    """The model of measured rows ({family, recipe, num_layers, hidden_size, intermediate_size, p95_ms})."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["family"], r["recipe"]), []).append(r)
    model, residuals = LatencyModel(points=len(rows)), []
    for key, group in groups.items():
        if len(group) < MIN_POINTS:
            continue
        a = np.array([features(r["num_layers"], r["hidden_size"], r["intermediate_size"]) for r in group])
        y = np.array([r["p95_ms"] for r in group])
        model.coefs[key] = _nnls_relative(a, y)
        for i in range(len(group)):  # leave-one-out: the error a prediction for an unmeasured point carries
            keep = np.arange(len(group)) != i
            coef = _nnls_relative(a[keep], y[keep])
            residuals.append(abs(float(np.dot(coef, a[i])) - y[i]) / y[i])
    if residuals:
        model.error = max(MIN_ERROR, float(np.percentile(residuals, 90)))
    if rows:
        best = min(rows, key=lambda r: r["p95_ms"])
        model.fastest = {k: best[k] for k in ("family", "num_layers", "hidden_size", "num_heads",
                                              "intermediate_size", "recipe", "p95_ms")}
    return model


def _nnls_relative(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the squared relative error (rows weighted by 1 / p95)."""
    coef, _ = nnls(a / y[:, None], np.ones_like(y))
    return coef


# ---------------------------------------------------------------- the measured table


def table_path(cfg, threads: int) -> Path:
    t, v = cfg.target, versions()
    key = {"machine": {k: machine_info().get(k) for k in ("cpu", "cpus", "gpu")},
           "versions": {k: v.get(k) for k in ("torch", "onnxruntime")}, "recipes": RECIPE_REVISION,
           "profile": {"device": t.device, "threads": threads, "batch_size": t.batch_size, "seq_len": str(t.seq_len),
                       "warmup_iters": t.warmup_iters, "min_iters": t.min_iters, "min_seconds": t.min_seconds,
                       "repeats": t.repeats}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "latency" / f"{digest}.json"


def _read(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return data.get("rows", []) if data.get("version") == TABLE_VERSION else []


def _write(path: Path, rows: list[dict]) -> None:
    """Merge `rows` into the table on disk (another worker may have added its own) and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {_row_key(r): r for r in _read(path)} | {_row_key(r): r for r in rows}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump({"version": TABLE_VERSION, "rows": list(merged.values())}, fh, indent=1)
    os.replace(tmp, path)


def _row_key(r: dict) -> tuple:
    return (r["model_type"], r["seq_len_median"], r["num_layers"], r["hidden_size"], r["num_heads"],
            r["intermediate_size"], r["recipe"])


def sample(architectures: list[tuple], n: int, seed: int) -> list[tuple]:
    """Up to n points: each (family, recipe)'s smallest and largest first, then a seeded random draw."""
    if len(architectures) <= n:
        return list(architectures)
    chosen, groups = [], {}
    for a in architectures:
        groups.setdefault((a[0], a[5]), []).append(a)
    size = lambda a: a[1] * (4 * a[2] * a[2] + 2 * a[2] * a[4])  # noqa: E731 (layers x matmul work)
    for group in groups.values():
        for a in (min(group, key=size), max(group, key=size)):
            if a not in chosen:
                chosen.append(a)
    rest = [a for a in architectures if a not in chosen]
    random.Random(seed).shuffle(rest)
    return (chosen + rest)[:max(n, len(chosen))]


def calibrate(ctx, architectures: list[tuple], n: int, say=print, recheck_points: int = 0) -> LatencyModel:
    """Time a sample of `architectures` (or read it from the cache, re-timing `recheck_points` of the cached ones
    first: `recheck`) and fit the model. `ctx`: the search Context."""
    cfg = ctx.cfg
    path = table_path(cfg, ctx.threads)
    table = {_row_key(r): r for r in _read(path)}
    wanted, todo, rows = sample(architectures, n, cfg.train.seed), [], []
    for a in wanted:
        fctx = ctx.of(a[0])
        key = (_model_type(fctx), fctx.profile.seq_len, a[1], a[2], a[3], a[4], a[5])
        if key in table:
            rows.append({**table[key], "family": a[0]})
        else:
            todo.append((a, key))
    cached, drift = len(rows), {}
    if cached and recheck_points:
        rows, drift = recheck(ctx, rows, recheck_points, path, say)
    if todo:
        say(f"latency model: timing {len(todo)} untrained candidates of the space ({cached} cached for this machine "
            f"and profile in {path})")
        fresh = []
        for start in tqdm(range(0, len(todo), GROUP), desc="latency model", unit="group"):
            fresh += _time_group(ctx, todo[start:start + GROUP])
        _write(path, fresh)
        rows += fresh
    model = fit(rows)
    model.cached, model.drift = cached, drift
    return model


def probes(rows: list[dict], n: int) -> list[dict]:
    """Up to n cached rows to re-time, the (family, recipe) groups in turn: each group's row at its median p95
    first, then its slowest, its fastest, and the rest outward from the median."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["family"], r["recipe"]), []).append(r)
    orders = []
    for g in groups.values():
        ranked, mid = sorted(g, key=lambda r: r["p95_ms"]), len(g) // 2
        first = [ranked[mid], ranked[-1], ranked[0]]
        rest = sorted(range(len(ranked)), key=lambda i: abs(i - mid))
        orders.append(list({id(r): r for r in first + [ranked[i] for i in rest]}.values()))
    picks = [order[k] for k in range(max(map(len, orders), default=0)) for order in orders if k < len(order)]
    return picks[:n]


def drift_of(pairs: list[tuple[dict, float]]) -> dict:
    """(family, recipe) -> median of now / cached p95 over its re-timed rows, and None -> the median over all."""
    ratios: dict = {}
    for row, now in pairs:
        ratios.setdefault((row["family"], row["recipe"]), []).append(now / row["p95_ms"])
    out = {key: float(np.median(v)) for key, v in ratios.items()}
    if pairs:
        out[None] = float(np.median([now / row["p95_ms"] for row, now in pairs]))
    return out


def drifted(ratio: float) -> bool:
    """Now / cached beyond MIN_ERROR either way: the machine moved; within it, timing noise."""
    return abs(ratio - 1.0) > MIN_ERROR


def rescaled(rows: list[dict], drift: dict) -> list[dict]:
    """The rows with each (family, recipe)'s p95 scaled by its drift (the overall one where it has none) when that
    is beyond MIN_ERROR either way; within it, timing noise: the cached figure stands."""
    out = []
    for r in rows:
        ratio = drift.get((r["family"], r["recipe"]), drift.get(None, 1.0))
        out.append({**r, "p95_ms": r["p95_ms"] * ratio} if drifted(ratio) else r)
    return out


def recheck(ctx, rows: list[dict], n: int, path: Path, say=print) -> tuple[list[dict], dict]:
    """Re-time `n` cached rows (`probes`) now and scale the cached table by how far they drifted (`rescaled`); the
    re-timed rows replace theirs in the cache. Returns (rows, {"family/recipe": ratio})."""
    picked = probes(rows, n)
    items = [((r["family"], r["num_layers"], r["hidden_size"], r["num_heads"], r["intermediate_size"], r["recipe"]),
              _row_key(r)) for r in picked]
    fresh = []
    for start in range(0, len(items), GROUP):
        fresh += _time_group(ctx, items[start:start + GROUP])
    now = {_row_key(r): r["p95_ms"] for r in fresh}
    drift = drift_of([(r, now[_row_key(r)]) for r in picked if _row_key(r) in now])
    if not fresh:
        return rows, {}
    _write(path, fresh)
    out = [{**r, "p95_ms": now[_row_key(r)]} if _row_key(r) in now else r for r in rescaled(rows, drift)]
    shown = {f"{k[0]}/{k[1]}": round(v, 3) for k, v in drift.items() if k is not None}
    # A recipe's points scale by its own probes' drift, or by the overall one where no probe timed it (rescaled).
    ratios = {f"{f}/{r}": drift.get((f, r), drift[None]) for f, r in sorted({(r["family"], r["recipe"]) for r in rows})}
    moved = [key for key, ratio in ratios.items() if drifted(ratio)]
    say(f"latency model: re-timed {len(fresh)} cached points: now / cached p95 " +
        ", ".join(f"{k} {v:.2f}x" for k, v in shown.items()) +
        (f"; scaled (beyond ±10 %): {', '.join(moved)}" if moved else "; within ±10 %, the cache stands") +
        ("; the rest stand" if moved and len(moved) < len(ratios) else ""))
    return out, shown


def _model_type(ctx) -> str:
    return (ctx.base if ctx.base is not None else ctx.teacher).config.model_type


def _time_group(ctx, group: list) -> list[dict]:
    cfg, built, out = ctx.cfg, [], []
    # One family per group keeps one set of timing batches; mixed groups are split here.
    by_family: dict = {}
    for a, key in group:
        by_family.setdefault(a[0], []).append((a, key))
    for family, items in by_family.items():
        fctx = ctx.of(family)
        with tempfile.TemporaryDirectory(prefix="kdlab-latency-") as tmp:
            built = []
            for i, (a, key) in enumerate(items):
                _, layers, hidden, heads, ffn, recipe = a
                spec = StudentConfig(num_layers=layers, hidden_size=hidden, num_heads=heads, intermediate_size=ffn,
                                     init="random")
                student = build_student(ctx.teacher, spec, seed=cfg.train.seed, base=fctx.base)
                try:
                    served = apply_recipe(recipe, student, example_batch=fctx.quality_batches[0],
                                          device=cfg.target.device, workdir=Path(tmp) / str(i),
                                          allow_cpu_half=cfg.quantization.allow_cpu_bf16, threads=ctx.threads)
                except Exception as exc:  # the trial drawing it fails the same way and says why; the model goes on
                    print(f"kdlab: warning: latency model: {recipe} of {layers}L x {hidden} could not be built "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})")
                    served = None
                built.append((GateRow(f"{i}:{recipe}", size_mb=served.size_mb if served else 0.0), served))
            rows = measure_candidates(built, fctx.batches, fctx.profile)
        for (a, key), row, (_, served) in zip(items, rows, built):
            if served is None or row.p95_ms is None or not math.isfinite(row.p95_ms):
                continue
            out.append({"model_type": key[0], "seq_len_median": key[1], "num_layers": key[2], "hidden_size": key[3],
                        "num_heads": key[4], "intermediate_size": key[5], "recipe": key[6], "family": family,
                        "p95_ms": row.p95_ms})
    return out


def predicted_errors(rows: list[dict]) -> dict | None:
    """The model's error on trials it let through: predicted vs measured untrained p95 (what it predicts), and vs
    the trained artefact's p95; None before any such trial."""
    pairs = [(r["predicted_p95_ms"], r["pre_p95_ms"], r.get("p95_ms"), bool(r.get("steps")))
             for r in rows if r.get("predicted_p95_ms") and r.get("pre_p95_ms")]
    if not pairs:
        return None
    pre = [abs(p - m) / m for p, m, _, _ in pairs]
    post = [abs(p - m) / m for p, _, m, trained in pairs if trained and m]
    out = {"trials": len(pairs), "median_error_untrained": float(np.median(pre)), "max_error_untrained": max(pre)}
    if post:
        out |= {"trained": len(post), "median_error_trained": float(np.median(post)), "max_error_trained": max(post)}
    return out
