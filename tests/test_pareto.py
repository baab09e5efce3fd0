"""The Pareto front (search/pareto.py) against hand-made point sets, and against Optuna's own front.

Run: .venv/bin/python -m pytest -q tests/test_pareto.py
"""
from __future__ import annotations

import math

import optuna
import pytest

from kdlab.search.pareto import Point, dominates, front_steps, pareto_front


def P(quality, p95_ms, feasible=True):
    return Point(quality, p95_ms, feasible)


def test_dominance_needs_at_least_as_good_in_both_and_better_in_one():
    assert dominates(P(0.9, 2.0), P(0.8, 3.0))      # better in both
    assert dominates(P(0.9, 2.0), P(0.9, 3.0))      # equal quality, faster
    assert dominates(P(0.9, 2.0), P(0.8, 2.0))      # equal latency, more accurate
    assert not dominates(P(0.9, 2.0), P(0.9, 2.0))  # identical: neither dominates
    assert not dominates(P(0.9, 3.0), P(0.8, 2.0))  # a trade-off: neither dominates
    assert not dominates(P(0.8, 2.0), P(0.9, 3.0))


def test_front_of_a_hand_made_set():
    points = [P(0.80, 1.0),   # 0 fastest: front
              P(0.85, 2.0),   # 1 front
              P(0.84, 2.5),   # 2 dominated by 1 (slower and worse)
              P(0.90, 4.0),   # 3 most accurate: front
              P(0.85, 3.0),   # 4 dominated by 1 (same quality, slower)
              P(0.79, 1.0)]   # 5 dominated by 0 (same latency, worse)
    assert pareto_front(points) == [0, 1, 3]
    assert front_steps(points) == [(1.0, 0.80), (2.0, 0.85), (4.0, 0.90)]


def test_ties_are_all_on_the_front():
    points = [P(0.85, 2.0), P(0.85, 2.0), P(0.80, 3.0), P(0.90, 5.0)]
    assert pareto_front(points) == [0, 1, 3]  # two identical points: both kept, as Optuna's best_trials does
    assert front_steps(points) == [(2.0, 0.85), (5.0, 0.90)]  # the step line draws a tied point once


def test_infeasible_points_are_excluded_and_dominate_nothing():
    points = [P(0.95, 0.5, feasible=False),  # best in both objectives, but misses a constraint
              P(0.85, 2.0), P(0.80, 3.0), P(0.90, 1.0, feasible=False)]
    # Had 0 counted, it would dominate everything; the front is computed among feasible points only.
    assert pareto_front(points) == [1]
    assert pareto_front([P(0.9, 1.0, False), P(0.8, 2.0, False)]) == []
    assert pareto_front([]) == [] and front_steps([]) == []


def test_unmeasured_points_are_left_out():
    points = [P(math.nan, math.nan), P(0.8, 2.0), P(0.9, math.inf), P(None, 1.0)]
    assert pareto_front(points) == [1]


def test_a_single_feasible_point_is_its_own_front():
    assert pareto_front([P(0.5, 10.0, False), P(0.1, 99.0)]) == [1]


def test_agrees_with_optunas_best_trials_under_constraints():
    # 40 random (quality, p95) points, about a third infeasible: the same set as study.best_trials.
    import random
    rng = random.Random(0)
    data = [(round(rng.uniform(0.5, 0.95), 2), round(rng.uniform(1, 20), 1), rng.random() < 0.35) for _ in range(40)]
    data += [data[3][:2] + (False,), data[5]]  # an exact tie, and an infeasible twin of a point
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for quality, p95_ms, infeasible in data:
        trial = study.ask()
        trial.set_constraint("p95_ms", 1.0 if infeasible else -1.0)
        study.tell(trial, (quality, p95_ms))
    ours = pareto_front([P(q, t, not bad) for q, t, bad in data])
    assert ours == sorted(t.number for t in study.best_trials)
    assert len(ours) >= 3


@pytest.mark.parametrize("points,expected", [
    ([P(0.7, 1.0), P(0.7, 1.0, False)], [0]),
    ([P(0.7, 3.0), P(0.8, 2.0), P(0.9, 1.0)], [2]),  # one point dominates the rest
])
def test_small_cases(points, expected):
    assert pareto_front(points) == expected
