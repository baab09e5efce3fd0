"""The two small languages inside a config: budgets (`teacher*0.25`) and search ranges (`{min: 2, max: 6}`).

Library module for distill/config.py, which checks every value with these parsers when a config is
loaded, and for the stages that read the parsed form (the gate resolves budgets, the search space
draws from ranges). Pure functions; each bad value is a one-line ConfigError naming the key.

    parse_budget("teacher*0.25", "p95_ms")                      # ('teacher', 0.25)
    parse_range({"min": 2, "max": 6, "step": 2}, "num_layers", integer=True, minimum=1)
                                                                # Range(low=2, high=6, step=2)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from kdlab.distill.errors import ConfigError

# ---------------------------------------------------------------- budgets: a number, or relative to the teacher

TEACHER_RELATIVE = re.compile(r"^\s*teacher\s*\*\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")


def parse_budget(value, key: str) -> tuple[str, float] | None:
    """A target value as ('abs', x) or ('teacher', factor); None when unset. Raises ConfigError.

    The relative form `teacher*f` means f times the fp32 teacher measured in the same run.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "5e1" (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value > 0:
            raise ConfigError(f"target.{key}: must be > 0, got {value}; valid: a positive number or 'teacher*<factor>'")
        return "abs", float(value)
    if isinstance(value, str):
        match = TEACHER_RELATIVE.match(value)
        if match is None:
            raise ConfigError(f"target.{key}: cannot read {value!r}; valid: a positive number or 'teacher*<factor>' "
                              "(e.g. teacher*0.25)")
        factor = float(match.group(1))
        if not factor > 0:
            raise ConfigError(f"target.{key}: factor in {value!r} must be > 0")
        return "teacher", factor
    raise ConfigError(f"target.{key}: expected a number or 'teacher*<factor>', got {value!r}")


# ---------------------------------------------------------------- search ranges: fixed, choices, or min..max


@dataclass(frozen=True)
class Range:
    """One searched dimension: `choices` (categorical), or `low..high` (with `step` for ints, `log`)."""
    choices: Optional[tuple] = None
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[int] = None
    log: bool = False

    def values(self) -> list:
        """Every value an integer range can take (choices as given)."""
        if self.choices is not None:
            return list(self.choices)
        return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))


def _number(v, integer: bool) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, int) if integer else isinstance(v, (int, float))


def parse_range(value, key: str, integer: bool, minimum: float, inclusive: bool = True,
                maximum: Optional[float] = None) -> Optional[Range]:
    """A `search.<key>` value as a Range (None when unset). Raises a one-line ConfigError naming the key.

    Forms: a number (fixed), a list (choices), or {min, max[, step][, log]}.
    """
    kind = "an integer" if integer else "a number"
    where = f"search.{key}"
    if isinstance(value, str) and not integer:
        try:
            value = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        except ValueError:
            pass
    bound = f"{'>=' if inclusive else '>'} {minimum:g}" + ("" if maximum is None else f" and <= {maximum:g}")

    def ok(v) -> bool:
        if isinstance(v, str) and not integer:
            try:
                v = float(v)
            except ValueError:
                return False
        above = v >= minimum if inclusive else v > minimum
        return _number(v, integer) and above and (maximum is None or v <= maximum)

    if value is None:
        return None
    if _number(value, integer) or (isinstance(value, str) and not integer):
        if not ok(value):
            raise ConfigError(f"{where}: {value!r} must be {kind} {bound}")
        return Range(choices=(value if integer else float(value),))
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: empty list; valid: {kind}, a non-empty list, or {{min, max}}")
        bad = [v for v in value if not ok(v)]
        if bad:
            raise ConfigError(f"{where}: {bad[0]!r} must be {kind} {bound}")
        values = [v if integer else float(v) for v in value]
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}: lists a value twice: {value}")
        return Range(choices=tuple(values))
    if isinstance(value, dict):
        allowed = {"min", "max", "step"} if integer else {"min", "max", "log"}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown key '{unknown[0]}'; valid: {', '.join(sorted(allowed))}")
        if "min" not in value or "max" not in value:
            raise ConfigError(f"{where}: a range needs both min and max")
        lo, hi = value["min"], value["max"]
        for name, v in (("min", lo), ("max", hi)):
            if not ok(v):
                raise ConfigError(f"{where}.{name}: {v!r} must be {kind} {bound}")
        lo, hi = (lo, hi) if integer else (float(lo), float(hi))
        if lo > hi:
            raise ConfigError(f"{where}: min {lo} is above max {hi}")
        step = value.get("step", 1)
        if integer and not (_number(step, True) and step >= 1):
            raise ConfigError(f"{where}.step: {step!r} must be an integer >= 1")
        log = value.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
        if log and lo <= 0:
            raise ConfigError(f"{where}: log scale needs min > 0, got {lo}")
        if integer and (hi - lo) % step:
            raise ConfigError(f"{where}: max {hi} is not min {lo} plus a multiple of step {step}")
        return Range(low=lo, high=hi, step=step if integer else None, log=log)
    raise ConfigError(f"{where}: expected {kind}, a list, or {{min, max}}, got {value!r}")
