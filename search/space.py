"""The student search space: the config's `search:` section bound to the teacher's shape.

Library module for search/study.py; nothing to launch. Typical use:

    space = SearchSpace.from_config(cfg, teacher.config)   # ConfigError before any work starts
    candidate = space.suggest(trial)                       # inside an Optuna objective
    study.enqueue_trial(space.params_of(space.seeds(3)[0]))

The config loader already refused static mistakes (empty lists, min above max, unknown recipe,
head counts that divide no hidden size). Here the rest is checked against the teacher: shapes a
teacher initialisation cannot produce when `search.init` allows no random init.

Conditional parameters keep every Optuna distribution fixed for the life of a study: the head
count is drawn from `num_heads_h<hidden>` (only the counts that divide that hidden size), and
`init` is drawn only when both a teacher and a random initialisation are possible for the widths.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from kdlab.distill.config import Config, ConfigError, Range, StudentConfig, search_ranges, search_recipes

# Recipes tried by the seed trials, in order of preference: the cheapest change that usually pays on the device.
SEED_RECIPES = ("dynamic-int8", "onnx-int8", "fp16", "bf16", "fp32", "onnx-int8-ffn", "onnx-fp32", "bnb-int8",
                "bnb-nf4")
SEED_LAYER_FRACTIONS = (1 / 2, 1 / 3, 2 / 3, 1 / 4, 1.0)  # half the teacher first (DistilBERT's choice)
TEACHER_FAMILY = "teacher"
SHAPE_PARAMS = ("num_layers", "hidden_size", "intermediate_size", "init")  # and num_heads_h<hidden>


@dataclass(frozen=True)
class Candidate:
    """One point of the space: a student architecture, its initialisation, serving recipe and training knobs."""
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    init: str
    recipe: str
    learning_rate: float
    temperature: float
    alpha: float
    family: str = "teacher"  # search.families: `teacher` (cut from the teacher) or the pretrained source it is cut from

    def student(self) -> StudentConfig:
        return StudentConfig(num_layers=self.num_layers, hidden_size=self.hidden_size, num_heads=self.num_heads,
                             intermediate_size=self.intermediate_size, init=self.init)

    def label(self) -> str:
        family = "" if self.family == TEACHER_FAMILY else f" of {self.family}"
        return (f"{self.num_layers}L x {self.hidden_size} ({self.num_heads} heads, ffn {self.intermediate_size}), "
                f"{self.init}{family}, {self.recipe}")

    def to_dict(self) -> dict:
        return asdict(self)


def first_fitting(options: list, fits=None):
    """The first of `options` (one student under recipes in order of preference) that `fits`, else the first."""
    return next((c for c in options if fits is not None and fits(c)), options[0])


@dataclass(frozen=True)
class TeacherShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def of(cls, config) -> "TeacherShape":
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size)


def draw(trial, name: str, rng: Range):
    """One value of `rng` from the trial; a single choice is a constant, not an Optuna parameter."""
    if rng.choices is not None:
        return rng.choices[0] if len(rng.choices) == 1 else trial.suggest_categorical(name, list(rng.choices))
    if rng.step is not None:
        return trial.suggest_int(name, int(rng.low), int(rng.high), step=int(rng.step))
    return trial.suggest_float(name, rng.low, rng.high, log=rng.log)


def nearest(rng: Range, value):
    """The value of `rng` nearest to `value` (the lower one on a tie)."""
    if rng.choices is not None:
        return min(rng.choices, key=lambda v: (abs(v - value), v))
    value = min(max(value, rng.low), rng.high)
    if rng.step is not None:
        return int(rng.low + round((value - rng.low) / rng.step) * rng.step)
    return value


def described(r: Range | None) -> dict | None:
    """A range as plain data (its set fields), for a space's `describe`."""
    return None if r is None else {k: v for k, v in asdict(r).items() if v is not None and v is not False}


class Knobs:
    """`search.recipes` and the training knobs (learning rate, temperature, alpha) as every task's space draws them,
    after its own shape parameters; the base of SearchSpace and of a task's own space (seq2seq's)."""

    def __init__(self, cfg: Config, recipes: list[str] | None = None):
        ranges = search_ranges(cfg)
        self.recipes = Range(choices=tuple(search_recipes(cfg) if recipes is None else recipes))
        self.learning_rate = ranges["learning_rate"] or Range(choices=(cfg.train.learning_rate,))
        self.temperature = ranges["temperature"] or Range(choices=(cfg.distill.temperature,))
        self.alpha = ranges["alpha"] or Range(choices=(cfg.distill.alpha,))
        # What a seed trial trains with: the train/distill sections' values, moved into the searched ranges.
        self.defaults = (cfg.train.learning_rate, cfg.distill.temperature, cfg.distill.alpha)

    def draw_knobs(self, trial) -> tuple[str, float, float, float]:
        """(recipe, learning rate, temperature, alpha) drawn from the trial."""
        return (draw(trial, "recipe", self.recipes), float(draw(trial, "learning_rate", self.learning_rate)),
                float(draw(trial, "temperature", self.temperature)), float(draw(trial, "alpha", self.alpha)))

    def seed_knobs(self) -> tuple[float, float, float]:
        """(learning rate, temperature, alpha) of a seed trial: the config's values nearest inside the ranges."""
        return tuple(float(nearest(r, v)) for r, v in
                     zip((self.learning_rate, self.temperature, self.alpha), self.defaults))

    def knob_params(self, c) -> dict:
        """The Optuna parameters of candidate `c`'s recipe and knobs (for `study.enqueue_trial`)."""
        return {"recipe": c.recipe, "learning_rate": c.learning_rate, "temperature": c.temperature, "alpha": c.alpha}

    def describe_knobs(self) -> dict:
        return {"recipes": list(self.recipes.choices), "learning_rate": described(self.learning_rate),
                "temperature": described(self.temperature), "alpha": described(self.alpha)}


class SearchSpace(Knobs):
    """The config's `search:` ranges with the teacher's defaults filled in and checked against the teacher."""

    def __init__(self, cfg: Config, teacher: TeacherShape, family: str = TEACHER_FAMILY, prefix: str = ""):
        """`teacher`: the shape students are cut from (the teacher's, or a pretrained family's); `prefix` goes in
        front of the shape parameters' names when several families share a study (FamilySpace)."""
        super().__init__(cfg)
        self.teacher = teacher
        self.family, self.prefix = family, prefix
        ranges = search_ranges(cfg)
        self.layers = ranges["num_layers"] or Range(low=1, high=teacher.num_layers, step=1)
        self.hidden = ranges["hidden_size"] or Range(choices=(teacher.hidden_size,))
        self.ffn = ranges["intermediate_size"]  # None: the teacher's FFN/hidden ratio, as student_config does
        allowed = set(cfg.search.init)
        self.random_ok = "random" in allowed
        self.teacher_ok = bool(allowed & {"teacher-layers", "teacher-slice"})
        self.slice_ok = "teacher-slice" in allowed
        self._check_teacher_caps()
        heads = ranges["num_heads"]
        self.heads_for = {}
        for hidden in self.hidden.values():
            tried = heads.values() if heads else [max(1, hidden // teacher.head_dim)]
            valid = [n for n in tried if hidden % n == 0 and (self.random_ok or self._heads_fit(hidden, n))]
            if not valid:
                if not any(hidden % n == 0 for n in tried):  # only reachable with the default (teacher head size)
                    why = f"the teacher's head size {teacher.head_dim} gives {tried[0]} heads, which do not divide it"
                else:
                    why = (f"teacher initialisation allows at most {teacher.num_heads} heads of at most "
                           f"{teacher.head_dim} dims; add random to search.init to lift this")
                raise ConfigError(f"search.num_heads: none of {tried} fits search.hidden_size {hidden}: {why}")
            self.heads_for[hidden] = valid
        self._check_teacher_init()

    @classmethod
    def from_config(cls, cfg: Config, teacher_config) -> "SearchSpace":
        return cls(cfg, TeacherShape.of(teacher_config))

    def _p(self, name: str) -> str:
        """A shape parameter's Optuna name (the family's prefix in a FamilySpace)."""
        return self.prefix + name

    # ------------------------------------------------------------ shape rules

    def _heads_fit(self, hidden: int, heads: int) -> bool:
        t = self.teacher
        return heads <= t.num_heads and hidden // heads <= t.head_dim

    def ffn_of(self, hidden: int) -> list[int]:
        return self.ffn.values() if self.ffn else [self.teacher.intermediate_size * hidden // self.teacher.hidden_size]

    def teacher_init(self, layers: int, hidden: int, heads: int, ffn: int) -> str | None:
        """teacher-layers at the teacher's widths, teacher-slice when narrower, None when teacher weights cannot fit."""
        t = self.teacher
        if not self.teacher_ok or layers > t.num_layers or hidden > t.hidden_size or ffn > t.intermediate_size:
            return None
        if not self._heads_fit(hidden, heads):
            return None
        if (hidden, heads, ffn) == (t.hidden_size, t.num_heads, t.intermediate_size):
            return "teacher-layers"
        return "teacher-slice" if self.slice_ok else None

    def _check_teacher_caps(self) -> None:
        """Without random init every depth and width in the space must be reachable from the teacher's weights."""
        if self.random_ok:
            return
        t = self.teacher
        checks = [("num_layers", max(self.layers.values()), t.num_layers, "layers"),
                  ("hidden_size", max(self.hidden.values()), t.hidden_size, "hidden size")]
        if self.ffn is not None:
            checks.append(("intermediate_size", max(self.ffn.values()), t.intermediate_size, "FFN width"))
        for key, biggest, limit, what in checks:
            if biggest > limit:
                raise ConfigError(f"search.{key}: {biggest} exceeds the teacher's {what} {limit}, which teacher "
                                  f"initialisation cannot grow; valid: <= {limit}, or add random to search.init")

    def _check_teacher_init(self) -> None:
        """teacher-layers alone (no slice, no random) admits only the teacher's own widths."""
        t = self.teacher
        if self.random_ok or self.slice_ok:
            return
        widths = {(h, n, f) for h in self.hidden.values() for n in self.heads_for[h] for f in self.ffn_of(h)}
        if widths != {(t.hidden_size, t.num_heads, t.intermediate_size)}:
            raise ConfigError(f"search.init: teacher-layers alone needs the teacher's widths (hidden {t.hidden_size}, "
                              f"{t.num_heads} heads, ffn {t.intermediate_size}); add teacher-slice or random")

    # ------------------------------------------------------------ sampling

    def suggest(self, trial) -> Candidate:
        """Draw one candidate; every parameter name keeps one distribution for the whole study."""
        layers = draw(trial, self._p("num_layers"), self.layers)
        hidden = draw(trial, self._p("hidden_size"), self.hidden)
        heads = draw(trial, self._p(f"num_heads_h{hidden}"), Range(choices=tuple(self.heads_for[hidden])))
        ffn = draw(trial, self._p("intermediate_size"), self.ffn) if self.ffn else self.ffn_of(hidden)[0]
        from_teacher = self.teacher_init(layers, hidden, heads, ffn)
        if from_teacher and self.random_ok:
            kind = trial.suggest_categorical(self._p("init"), ["teacher", "random"])
            init = from_teacher if kind == "teacher" else "random"
        else:
            init = from_teacher or "random"
        return Candidate(layers, hidden, heads, ffn, init, *self.draw_knobs(trial), self.family)

    def params_of(self, c: Candidate) -> dict:
        """The Optuna parameters that make `suggest` return `c` (for `study.enqueue_trial`)."""
        params = {"num_layers": c.num_layers, "hidden_size": c.hidden_size, f"num_heads_h{c.hidden_size}": c.num_heads,
                  "intermediate_size": c.intermediate_size, **self.knob_params(c),
                  "init": "random" if c.init == "random" else "teacher"}
        if self.ffn is None:
            params.pop("intermediate_size")
        return {(self._p(k) if k in SHAPE_PARAMS or k.startswith("num_heads_h") else k): v for k, v in params.items()}

    def seeds(self, n: int, device: str = "cpu", fits=None) -> list[Candidate]:
        """Up to n teacher-layer subsets at (or nearest to) the teacher's width, each with the first preferred
        recipe that `fits` (candidate -> bool: the latency model predicts it within the budget), else the first.

        Half the teacher's layers at full width, dynamic-int8 on CPU, is DistilBERT's recipe made
        servable; a third and two thirds bracket it. They give the sampler known-good points first, and
        under a tight budget the same student served by a faster recipe is a better first point than one
        the latency model would rule out unbuilt.
        """
        t = self.teacher
        hidden = nearest(self.hidden, t.hidden_size)
        heads = min(self.heads_for[hidden], key=lambda h: (abs(h - t.num_heads), h))
        ratio_ffn = t.intermediate_size * hidden // t.hidden_size
        ffn = nearest(self.ffn, ratio_ffn) if self.ffn else ratio_ffn
        lr, temperature, alpha = self.seed_knobs()
        preferred = [r for r in SEED_RECIPES if r in self.recipes.choices and not (device == "cuda" and r == "fp32")]
        out = []
        for fraction in SEED_LAYER_FRACTIONS:
            layers = nearest(self.layers, max(1, round(t.num_layers * fraction)))
            init = self.teacher_init(layers, hidden, heads, ffn) or "random"
            c = first_fitting([Candidate(layers, hidden, heads, ffn, init, recipe, lr, temperature, alpha, self.family)
                               for recipe in preferred or list(self.recipes.choices)], fits)
            if c not in out:
                out.append(c)
        return out[:n]

    def architectures(self) -> list[tuple]:
        """Every (family, layers, hidden, heads, ffn, recipe) the space can draw: what latency depends on (the
        initialisation and the training knobs do not change it)."""
        return [(self.family, n, h, k, f, r) for n in self.layers.values() for h in self.hidden.values()
                for k in self.heads_for[h] for f in self.ffn_of(h) for r in self.recipes.values()]

    def describe(self) -> dict:
        """The space as plain data: stored with the study, so a resumed study can refuse a changed space."""
        return {"num_layers": described(self.layers), "hidden_size": described(self.hidden),
                "num_heads": {str(h): v for h, v in self.heads_for.items()},
                "intermediate_size": described(self.ffn), **self.describe_knobs(),
                "init": {"teacher": self.teacher_ok, "slice": self.slice_ok, "random": self.random_ok}}



class FamilySpace:
    """Several student families in one study (search.families): the family is drawn first (parameter `family`),
    then that family's own SearchSpace, bound to the shape students are cut from there (the teacher's, or a
    pretrained model's). Shape parameters carry the family's name (`minilm-l6:num_layers`), so each keeps one
    distribution for the life of the study however the families' shapes differ; the recipe and the training knobs
    are shared, so the sampler learns about them from every family's trials."""

    def __init__(self, spaces: dict[str, SearchSpace]):
        if len(spaces) < 2:
            raise ValueError("FamilySpace needs two families or more; one family is a plain SearchSpace")
        self.spaces = spaces
        self.names = list(spaces)

    def suggest(self, trial) -> Candidate:
        return self.spaces[trial.suggest_categorical("family", self.names)].suggest(trial)

    def params_of(self, c: Candidate) -> dict:
        return {"family": c.family, **self.spaces[c.family].params_of(c)}

    def seeds(self, n: int, device: str = "cpu", fits=None) -> list[Candidate]:
        """Each family's seeds in turn (its half-depth student first), up to n in all."""
        per_family = [space.seeds(n, device, fits) for space in self.spaces.values()]
        out = [c for rank in range(n) for seeds in per_family if rank < len(seeds) for c in [seeds[rank]]]
        return out[:n]

    def architectures(self) -> list[tuple]:
        return [a for space in self.spaces.values() for a in space.architectures()]

    def describe(self) -> dict:
        return {"families": {name: space.describe() for name, space in self.spaces.items()}}
