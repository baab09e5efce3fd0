"""The Pareto front of a search: quality up, p95 latency down, infeasible points excluded.

Library module, nothing to launch. Typical use:

    from kdlab.search.pareto import Point, pareto_front
    front = pareto_front([Point(0.84, 3.1), Point(0.86, 5.0), Point(0.80, 4.0), Point(0.9, 1.0, feasible=False)])
    # -> [0, 1]: point 2 is dominated by point 0, point 3 breaks a constraint

Pure functions over plain numbers, so the front is tested against hand-made point sets and does not
depend on Optuna. (Optuna's `study.best_trials` computes the same set for COMPLETE trials;
we need it also for points read back from a CSV or a stored study, and to draw the step line.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Point:
    """One evaluated candidate: its quality (higher is better), p95 latency in ms (lower is better)."""
    quality: float
    p95_ms: float
    feasible: bool = True


def dominates(a: Point, b: Point) -> bool:
    """a dominates b: a is at least as good in both objectives and strictly better in one.

        a ≻ b  ⇔  q_a ≥ q_b  ∧  t_a ≤ t_b  ∧  (q_a > q_b  ∨  t_a < t_b)

    with q the quality and t the p95 latency (Deb et al. 2002, NSGA-II, definition of dominance
    for maximising q and minimising t). Equal points do not dominate each other.
    """
    return (a.quality >= b.quality and a.p95_ms <= b.p95_ms
            and (a.quality > b.quality or a.p95_ms < b.p95_ms))


def _usable(p: Point) -> bool:
    return p.feasible and all(isinstance(v, (int, float)) and math.isfinite(v) for v in (p.quality, p.p95_ms))


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices (ascending) of the feasible points that no other feasible point dominates.

    Front = { i feasible : there is no feasible j with p_j ≻ p_i }.

    - Infeasible points (a violated constraint: p95, size or quality floor) are never on the front,
      and never push a feasible point off it: a fast model that misses the floor is no answer.
    - Ties: points with identical (quality, p95_ms) do not dominate one another, so all of them are
      on the front when one is (as in Optuna's `best_trials`).
    - A point with a missing or non-finite objective is left out (it was not measured).
    """
    usable = [i for i, p in enumerate(points) if _usable(p)]
    return [i for i in usable if not any(dominates(points[j], points[i]) for j in usable if j != i)]


def front_steps(points: Sequence[Point]) -> list[tuple[float, float]]:
    """The front as (p95_ms, quality) pairs sorted by latency, for a step line (matplotlib `where="post"`).

    Along a front sorted by rising p95 the quality rises too (else a point would be dominated).
    """
    front = [points[i] for i in pareto_front(points)]
    return sorted({(p.p95_ms, p.quality) for p in front})
