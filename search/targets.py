"""Targets and the verdict: budgets resolved to numbers, measured rows checked against them, PASS or MISS.

Library module for the gates (search/gate.py, search/seq2seq_gate.py, search/model_gate.py) and the study
(search/study.py); nothing to launch. Pure: a `GateRow` is what one recipe measured on the target, `Targets`
the budgets in absolute numbers (`teacher*f` resolved against the fp32 teacher's row), `judge` checks every
row and says the one-line verdict.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kdlab.distill.config import Config, ConfigError, TargetConfig, parse_budget

EXIT_PASS, EXIT_MISS = 0, 3


@dataclass
class Targets:
    """Targets resolved to absolute numbers; `spec` keeps what the config said (e.g. 'teacher*0.25')."""
    p95_ms: float | None = None
    min_quality: float | None = None
    max_size_mb: float | None = None
    spec: dict = field(default_factory=dict)

    def is_set(self) -> bool:
        return any(v is not None for v in (self.p95_ms, self.min_quality, self.max_size_mb))


@dataclass
class GateRow:
    """One recipe on the target: what it scored, how fast and big it is, and whether it fits."""
    recipe: str
    status: str = "ok"  # ok | skipped
    reason: str = ""
    candidate: bool = True  # False: fp32 measured only as the reference of relative targets
    quality: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    cv: float | None = None
    stable: bool | None = None
    throughput: float | None = None
    tokens_per_s: float | None = None  # seq2seq: generated tokens per second at p50
    size_mb: float | None = None
    peak_pct: float | None = None
    meets: bool = False
    misses: list = field(default_factory=list)
    p95_low_ms: float | None = None  # 95 % bootstrap interval of p95 across the timing rounds
    p95_high_ms: float | None = None
    rounds: int | None = None
    verdict: str | None = None  # the p95 against the budget it was measured for: meets | misses | uncertain


@dataclass
class GateResult:
    rows: list
    targets: Targets
    conditions: dict
    passed: GateRow | None
    gaps: dict
    message: str
    report_dir: Path | None = None
    subject: str = "teacher"  # what was measured: the teacher, or `model DIR` (kdlab gate --model DIR)

    @property
    def exit_code(self) -> int:
        return EXIT_PASS if self.passed is not None else EXIT_MISS


# ---------------------------------------------------------------- targets and verdict


def resolve_targets(target: TargetConfig, reference: GateRow | None) -> Targets:
    """Absolute targets; `teacher*f` is f times the fp32 teacher (`reference`) measured in this run."""
    out = Targets()
    for key, ref_attr in (("p95_ms", "p95_ms"), ("min_quality", "quality"), ("max_size_mb", "size_mb")):
        parsed = parse_budget(getattr(target, key), key)
        if parsed is None:
            continue
        kind, number = parsed
        out.spec[key] = str(getattr(target, key))
        if kind == "abs":
            setattr(out, key, number)
            continue
        base = getattr(reference, ref_attr) if reference is not None and reference.status == "ok" else None
        if base is None:
            why = f" ({reference.reason})" if reference is not None and reference.reason else ""
            raise ConfigError(f"target.{key}: {getattr(target, key)!r} is relative to the fp32 teacher, which was "
                              f"not measured on this target{why}; give an absolute value")
        setattr(out, key, number * base)
    return out


def is_relative(target: TargetConfig) -> bool:
    """Whether any target is given as `teacher*f` (so the fp32 teacher must be measured)."""
    return any((parse_budget(getattr(target, k), k) or ("abs",))[0] == "teacher"
               for k in ("p95_ms", "min_quality", "max_size_mb"))


def check_row(row: GateRow, targets: Targets) -> list[str]:
    """Names of the targets a measured row misses (empty: it meets every target that is set)."""
    misses = []
    if targets.p95_ms is not None and row.p95_ms > targets.p95_ms:
        misses.append("p95")
    if targets.min_quality is not None and row.quality < targets.min_quality:
        misses.append("quality")
    if targets.max_size_mb is not None and row.size_mb > targets.max_size_mb:
        misses.append("size")
    return misses


def target_gaps(rows: list[GateRow], targets: Targets) -> dict:
    """Per target: the best any candidate reached, which one, the limit, and the gap (> 0: missed by).

    gap = best p95 - budget; floor - best quality; best size - max size.
    """
    ok = [r for r in rows if r.status == "ok" and r.candidate]
    gaps = {}
    if not ok:
        return gaps
    for key, attr, pick, sign in (("p95_ms", "p95_ms", min, 1), ("min_quality", "quality", max, -1),
                                  ("max_size_mb", "size_mb", min, 1)):
        limit = getattr(targets, key)
        if limit is None:
            continue
        best = pick(ok, key=lambda r: getattr(r, attr))
        value = getattr(best, attr)
        gaps[key] = {"best": value, "recipe": best.recipe, "limit": limit, "gap": sign * (value - limit)}
    return gaps


_LABELS = {"p95_ms": ("p95", "≤", "budget", "{:.2f} ms"), "min_quality": ("quality", "≥", "floor", "{:.4f}"),
           "max_size_mb": ("size", "≤", "max", "{:.1f} MB")}
_ROW_ATTR = {"p95_ms": "p95_ms", "min_quality": "quality", "max_size_mb": "size_mb"}


def verdict(rows: list[GateRow], targets: Targets, config_path: str | None,
            model: str | None = None) -> tuple[GateRow | None, str]:
    """The first candidate in ladder order that meets every target, and the one-line PASS/MISS message.

    `model`: the folder of a `kdlab gate --model` run; its PASS line names the export of that folder.
    """
    config = config_path or "<config>"
    which = f" --model {model}" if model is not None else ""
    passed = next((r for r in rows if r.status == "ok" and r.candidate and r.meets), None)
    if passed is not None:
        parts = []
        for key, (name, op, _, fmt) in _LABELS.items():
            limit = getattr(targets, key)
            if limit is not None:
                parts.append(f"{name} {op} {fmt.format(limit)} ({fmt.format(getattr(passed, _ROW_ATTR[key]))})")
        what = " and ".join(parts) if parts else "every target (none set in target.p95_ms/min_quality/max_size_mb)"
        unstable = ("" if passed.stable or passed.p95_low_ms is None else
                    f" [p95 not repeatable: {passed.p95_low_ms:.2f}-{passed.p95_high_ms:.2f} ms across "
                    f"{passed.rounds} rounds; re-run on a quieter machine]")
        return passed, (f"PASS: {passed.recipe} meets {what}{unstable}; "
                        f"export it with: kdlab export --config {config}{which} --recipe {passed.recipe}")
    ok = [r for r in rows if r.status == "ok" and r.candidate]
    needed = ("distillation needed" if model is None
              else f"{model} cannot serve within the targets (kdlab search --config {config} looks for a student "
                   f"that can)")
    if not ok:
        reasons = "; ".join(f"{r.recipe}: {r.reason}" for r in rows if r.candidate)
        return None, f"MISS: no recipe ran on the target ({reasons}): {needed}"
    parts = []
    for key, gap in target_gaps(rows, targets).items():
        name, _, limit_word, fmt = _LABELS[key]
        state = f"missed by {fmt.format(gap['gap'])}" if gap["gap"] > 0 else "met"
        parts.append(f"best {name} {fmt.format(gap['best'])} ({gap['recipe']}) vs {limit_word} "
                     f"{fmt.format(gap['limit'])}: {state}")
    if all(g["gap"] <= 0 for g in target_gaps(rows, targets).values()):
        parts.append("no single recipe meets every target at once")
    if model is not None:
        return None, f"MISS: {'; '.join(parts)}: {needed}"
    return None, f"MISS: {'; '.join(parts)}: distillation needed (kdlab search --config {config})"


def judge(rows: list[GateRow], cfg: Config, model: str | None = None,
          reference: GateRow | None = None) -> tuple[Targets, GateRow | None, str]:
    """Targets resolved against the fp32 teacher, each row checked, and the verdict.

    The fp32 teacher is this run's fp32 row; for a `--model` gate (`model` given) it is `reference`, the
    teacher's row as its own gate stored it (None: no target is relative).
    """
    if model is None:
        reference = next((r for r in rows if r.recipe == "fp32"), None)
    targets = resolve_targets(cfg.target, reference)
    for row in rows:
        if row.status == "ok":
            row.misses = check_row(row, targets)
            row.meets = not row.misses
    passed, message = verdict(rows, targets, cfg.config_path, model)
    return targets, passed, message


def ladder(cfg: Config) -> tuple[list[str], tuple]:
    """quantization.recipes, with fp32 first as a reference only when a relative target needs it."""
    recipes = list(cfg.quantization.recipes)
    if is_relative(cfg.target) and "fp32" not in recipes:
        return ["fp32", *recipes], ("fp32",)
    return recipes, ()
