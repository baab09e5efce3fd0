"""Stopping a trial's training early: students that cannot make the floor, or that the front already beats.

Library module for search/objective.py and search/seq2seq_search.py; nothing to launch. Optuna's
pruners do not apply: `trial.report` raises in a multi-objective study, and a pruner ranks one value,
not (quality, p95). kdlab decides itself, at fixed fractions of a trial's steps (`search.stop_at`),
from the learning curves trials keep in the study (user attr `curve`: [[fraction, fp32 dev quality],
...], one pair per evaluation), so every worker sharing a study judges against the same curves.

A trial is stopped at fraction f when either rule holds:

1. **floor**: best_so_far + headroom(f) + allowance < floor. headroom(f) is the largest rise from f to
   the end among the study's trials that trained to the end (never less than `search.stop_headroom`);
   allowance (`search.stop_allowance`) is how much the served artefact may score above the fp32
   weights evaluated during training (quantization noise goes both ways). With fewer than MIN_CURVES
   finished curves (the study's first trials) the rule waits: one curve is one architecture's rise.
2. **dominated**: a feasible front member scored at least `search.stop_margin` more at the same
   fraction, and is no slower (its measured p95 <= this candidate's p95, measured untrained: latency
   depends on the architecture) and no larger.

A stopped trial ends PRUNED (off the front, like a repeat), keeps its partial curve, steps and
training time, and records `stopped_early` (the rule) and `stop_reason` (the numbers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import optuna

from kdlab.search.pareto import Point, pareto_front

EPS = 1e-9
MIN_CURVES = 2  # finished curves the floor rule needs before it judges by their rise


@dataclass
class Stopped:
    """What `_evaluate` returns for a trial stopped early: run_trial raises TrialPruned with `why`."""
    rule: str
    why: str


def best_until(curve: list, fraction: float) -> float | None:
    """The best quality a curve reached by `fraction` of its steps (None: no evaluation that early)."""
    values = [q for f, q in curve if f <= fraction + EPS]
    return max(values) if values else None


def rise_after(curves: list[list], fraction: float) -> float | None:
    """The largest gain from `fraction` to the end among complete curves (None: no curve reached `fraction`)."""
    rises = []
    for curve in curves:
        before = best_until(curve, fraction)
        if before is not None and curve:
            rises.append(max(q for _, q in curve) - before)
    return max(rises) if rises else None


def _finished_curves(trials) -> list[list]:
    return [t.user_attrs["curve"] for t in trials
            if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("curve")
            and not t.user_attrs.get("screened_out")]


def _front(trials) -> list:
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.values is not None]
    points = [Point(t.values[0], t.values[1], all(v <= 0 for v in t.constraints.values())) for t in complete]
    return [complete[i] for i in pareto_front(points)]


def decide(curve: list, fraction: float, *, floor: float | None, pre_p95_ms: float, size_mb: float, trials,
           headroom: float, allowance: float, margin: float) -> Stopped | None:
    """Whether a trial whose curve so far is `curve` stops at `fraction` (rules in the module docstring)."""
    best = best_until(curve, fraction)
    if best is None:
        return None
    curves = _finished_curves(trials)
    if floor is not None and len(curves) >= MIN_CURVES:
        rise = rise_after(curves, fraction)
        if rise is not None:
            reach = best + max(headroom, rise) + allowance
            if reach < floor:
                return Stopped("floor", f"at {fraction:.0%} of its steps: best {best:.4f} + headroom "
                                        f"{max(headroom, rise):.4f} + quantization allowance {allowance:.4f} = "
                                        f"{reach:.4f} < floor {floor:.4f}")
    for rival in _front(trials):
        theirs = best_until(rival.user_attrs.get("curve") or [], fraction)
        p95, size = rival.values[1], rival.user_attrs.get("size_mb", math.inf)
        if theirs is not None and theirs >= best + margin and p95 <= pre_p95_ms and size <= size_mb:
            return Stopped("dominated", f"at {fraction:.0%} of its steps: {best:.4f}, while front trial "
                                        f"{rival.number} had {theirs:.4f} there and serves at p95 {p95:.2f} ms "
                                        f"(this one: {pre_p95_ms:.2f} ms untrained)")
    return None


class StopCheck:
    """`fit(stop_check=...)` for one trial: records the curve in the study and applies `decide` at
    `search.stop_at` fractions. `stopped` holds the decision once made."""

    def __init__(self, trial, cfg, targets, pre_p95_ms: float, size_mb: float, metric: str):
        self.trial, self.cfg, self.metric = trial, cfg, metric
        self.floor, self.pre_p95_ms, self.size_mb = targets.min_quality, pre_p95_ms, size_mb
        self.fractions = sorted(cfg.search.stop_at or [])
        self.curve: list = []
        self.stopped: Stopped | None = None

    def __call__(self, step: int, total_steps: int, metrics: dict) -> bool:
        fraction = step / total_steps
        self.curve.append([round(fraction, 6), float(metrics[self.metric])])
        self.trial.set_user_attr("curve", self.curve)
        if step >= total_steps or not any(abs(fraction - f) < 0.5 / total_steps for f in self.fractions):
            return False
        s = self.cfg.search
        trials = self.trial.study.get_trials(deepcopy=False)
        self.stopped = decide(self.curve, fraction, floor=self.floor, pre_p95_ms=self.pre_p95_ms,
                              size_mb=self.size_mb, trials=trials, headroom=s.stop_headroom,
                              allowance=s.stop_allowance, margin=s.stop_margin)
        return self.stopped is not None

    def steps_at(self, total_steps: int) -> list[int]:
        """The optimizer steps at which fit must evaluate so the rules are applied at `stop_at`."""
        return sorted({max(1, round(f * total_steps)) for f in self.fractions if 0 < f < 1})
