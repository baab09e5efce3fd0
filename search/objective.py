"""One trial of the student search: draw, measure untrained, screen, distil, quantize, score, measure.

Library module for search/study.py (which runs the study and says how a trial is judged); nothing to
launch. `objective(trial, ctx)` returns (quality, p95_ms) and sets the trial's constraints and user
attrs; `ctx` holds what every trial reuses (teacher, cached logits, data, timing batches, targets).
A screened-out candidate returns quality 0.0 with zero training steps (see search/study.py).

The trial's steps are the same for every task (`evaluate`); what a task builds, serves, trains and scores
comes from its `TrialParts`, which its `search_setup` puts in `ctx.parts`. A task may also run trials of
its own through `run_trial` (tests/token_task.py does).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch

from kdlab.distill.config import Config, search_recipes
from kdlab.distill.students import count_params
from kdlab.search.early_stop import StopCheck, Stopped
from kdlab.search.space import SEED_RECIPES, SearchSpace
from kdlab.search.study_report import FIGURES
from kdlab.search.study_tracking import StudyTracking
from kdlab.search.targets import GateRow, Targets
from kdlab.search.timing import measure_candidates
from kdlab.train.loop import fit

@dataclass
class Context:
    """Everything a trial reuses: data, teacher, logits, timing batches, targets, profile."""
    cfg: Config
    accelerator: object
    prep: object
    teacher: object
    space: SearchSpace
    targets: Targets
    profile: object
    batches: list
    quality_batches: list
    eval_loader: object
    logits_cache: torch.Tensor | None
    attn: str | None
    threads: int
    tracking: StudyTracking
    meta: dict
    console: object = None
    base: object = None  # student.pretrained: the pretrained model students are cut from instead of the teacher
    families: dict = None  # search.families with several: name -> Family (its own prep, batches, profile, base)
    clock: "PhaseClock" = None  # the running trial's seconds per phase (run_trial sets a fresh one)
    latency_model: object = None  # search/latency_model.py: draws it predicts too slow are ruled out unbuilt
    agreement_constraint: bool = True  # trials carry the served-artefact agreement constraint (classification)
    parts: object = None  # the task's TrialParts: what a trial of the shared `evaluate` builds, trains and scores

    def of(self, family: str | None) -> "Context":
        """The context a trial of `family` reads: that family's tokenizer's data, batches, logits and base."""
        if not self.families or family is None:
            return self
        f = self.families[family]
        return dataclasses.replace(self, prep=f.prep, base=f.base, batches=f.batches, quality_batches=f.quality_batches,
                                   eval_loader=f.eval_loader, logits_cache=f.logits_cache, profile=f.profile)


@dataclass
class Family:
    """One student family's share of a search (search.families): what its tokenizer makes of the data."""
    prep: object
    base: object
    batches: list
    quality_batches: list
    eval_loader: object
    logits_cache: torch.Tensor | None
    profile: object
    lengths: dict
    label_report: object = None


PHASES = ("screening", "training", "evaluation", "quantization", "measurement")


@dataclass
class PhaseClock:
    """Seconds one trial spent per phase (where a search's time went): `with clock("training"): ...`."""
    seconds: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:1000]


def _measure(served, ctx: Context, budget_ms: float | None = None) -> GateRow:
    row = GateRow(served.recipe, size_mb=served.size_mb)
    return measure_candidates([(row, served)], ctx.batches, ctx.profile, budget_ms=budget_ms)[0]


def constraint_values(targets: Targets, p95_ms: float, size_mb: float, quality: float,
                      agreement: float | None = None, min_agreement: float | None = None) -> dict:
    """Relative gaps, > 0 when violated: p95/budget - 1, size/max - 1, 1 - quality/floor (unset targets: none);
    with `min_agreement`, min_agreement - agreement (the served artefact's dev labels against its own fp32
    weights: below export.min_label_agreement the export would refuse it, so the study must not choose it)."""
    out = {}
    if min_agreement is not None and agreement is not None:
        out["agreement"] = min_agreement - agreement
    if targets.p95_ms is not None:
        out["p95_ms"] = p95_ms / targets.p95_ms - 1.0
    if targets.max_size_mb is not None:
        out["size_mb"] = size_mb / targets.max_size_mb - 1.0
    if targets.min_quality is not None:
        out["quality"] = 1.0 - quality / targets.min_quality
    return out


def screened_out(targets: Targets, p95_ms: float, size_mb: float, margin: float,
                 p95_low_ms: float | None = None) -> list[str]:
    """Budgets an untrained candidate already misses. Size does not change with training; latency is
    re-measured after, so only a p95 beyond the margin (timing noise) rejects it, and, given its bootstrap
    interval, only when the whole interval lies beyond (one that straddles is trained, not rejected)."""
    misses = []
    if targets.p95_ms is not None and (p95_ms if p95_low_ms is None else p95_low_ms) > targets.p95_ms * (1.0 + margin):
        misses.append("p95")
    if targets.max_size_mb is not None and size_mb > targets.max_size_mb:
        misses.append("size")
    return misses


def _record(trial, tracker, figures: dict, constraints: dict) -> None:
    for key, value in constraints.items():
        trial.set_constraint(key, value)
    for key, value in figures.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("feasible", all(v <= 0 for v in constraints.values()))
    tracker.log_metrics({k: v for k, v in figures.items() if k in FIGURES and v is not None})


def record_screened(trial, tracker, ctx: Context, pre: GateRow, params: int, misses: list[str],
                    agreement: float | None = None):
    """Record a candidate rejected untrained (quality 0.0, zero training) and return its objectives."""
    figures = {"quality": 0.0, "p50_ms": pre.p50_ms, "p95_ms": pre.p95_ms, "p99_ms": pre.p99_ms,
               "throughput": pre.throughput, "size_mb": pre.size_mb, "params": params, "train_seconds": 0.0,
               "steps": 0, "pre_p95_ms": pre.p95_ms, "pre_size_mb": pre.size_mb, "screened_out": True,
               "screen_misses": misses, "p95_low_ms": pre.p95_low_ms, "p95_high_ms": pre.p95_high_ms,
               "p95_rounds": pre.rounds, "p95_verdict": pre.verdict}
    # agreement (classification): a screened candidate has no served artefact to agree; 0 keeps every trial's
    # constraints the same set of keys.
    _record(trial, tracker, figures, constraint_values(ctx.targets, pre.p95_ms, pre.size_mb, 0.0, agreement,
                                                       ctx.cfg.export.min_label_agreement if agreement is not None
                                                       else None))
    return 0.0, pre.p95_ms


def record_trained(trial, tracker, ctx: Context, candidate, trial_dir: Path, quality: float, pre: GateRow,
                   post: GateRow, params: int, result, agreement: float | None = None):
    """Record a trained candidate (figures, constraints, kdlab_trial.json) and return its objectives.

    `agreement`: the served artefact's dev label agreement with the trial's fp32 weights (None: not measured)."""
    figures = {"quality": quality, "p50_ms": post.p50_ms, "p95_ms": post.p95_ms, "p99_ms": post.p99_ms,
               "throughput": post.throughput, "size_mb": post.size_mb, "params": params,
               "train_seconds": result.train_seconds, "steps": result.steps, "pre_p95_ms": pre.p95_ms,
               "pre_size_mb": pre.size_mb, "screened_out": False, "fp32_dev": result.best_metric,
               "stable": post.stable, "cv": post.cv, "label_agreement": agreement,
               "p95_low_ms": post.p95_low_ms, "p95_high_ms": post.p95_high_ms, "p95_rounds": post.rounds,
               "p95_verdict": post.verdict}
    constraints = constraint_values(ctx.targets, post.p95_ms, post.size_mb, quality, agreement,
                                    ctx.cfg.export.min_label_agreement if agreement is not None else None)
    _record(trial, tracker, figures, constraints)
    (trial_dir / "kdlab_trial.json").write_text(json.dumps({
        "trial": trial.number, "candidate": candidate.to_dict(), **figures, "constraints": constraints,
        "feasible": all(v <= 0 for v in constraints.values()), "targets": ctx.meta["targets"],
        "conditions": ctx.meta["conditions"]}, indent=2, default=str))
    return quality, post.p95_ms


def record_stopped(trial, tracker, ctx: Context, pre: GateRow, params: int, result, check: StopCheck,
                   agreement: float | None = None) -> Stopped:
    """Record a trial stopped early (search/early_stop.py): its partial curve stays, its checkpoint goes,
    and it ends PRUNED (run_trial raises); the figures are the fp32 quality reached and the untrained p95."""
    quality = max(q for _, q in check.curve)
    figures = {"quality": quality, "p50_ms": pre.p50_ms, "p95_ms": pre.p95_ms, "p99_ms": pre.p99_ms,
               "throughput": pre.throughput, "size_mb": pre.size_mb, "params": params,
               "train_seconds": result.train_seconds, "steps": result.steps, "pre_p95_ms": pre.p95_ms,
               "pre_size_mb": pre.size_mb, "screened_out": False, "fp32_dev": quality,
               "stopped_early": check.stopped.rule, "stop_reason": check.stopped.why}
    _record(trial, tracker, figures, constraint_values(
        ctx.targets, pre.p95_ms, pre.size_mb, quality, agreement,
        ctx.cfg.export.min_label_agreement if agreement is not None else None))
    trial.set_user_attr("feasible", False)
    tracker.set_tags({"stopped_early": check.stopped.rule})
    shutil.rmtree(ctx.cfg.run_dir / "trials" / str(trial.number), ignore_errors=True)
    return check.stopped


# ---------------------------------------------------------------- one trial


def objective(trial: optuna.Trial, ctx: Context):
    return run_trial(trial, ctx, evaluate)


def run_trial(trial: optuna.Trial, ctx: Context, evaluate):
    """Draw a candidate, prune a repeat, and run `evaluate(trial, candidate, ctx, tracker)` in its MLflow child run.

    Shared by every task's objective: a failure is recorded (user attr `error`, child run tagged FAIL,
    the trial's checkpoint folder removed) and re-raised for Optuna to mark the trial FAIL.
    """
    candidate = ctx.space.suggest(trial)
    for key, value in candidate.to_dict().items():
        trial.set_user_attr(key, value)
    if hasattr(candidate, "label"):  # how reports name the trial: the candidate says it, not the stage
        trial.set_user_attr("label", candidate.label())
    # TPE returns to good points of a mostly categorical space; training the same candidate again
    # would spend minutes to learn nothing new, so a repeat is pruned and points to its twin.
    # Workers sharing a study can draw (or enqueue) the same point at once: of trials running the same
    # candidate, the lowest-numbered one trains and every later one is pruned, so each student trains once.
    # A candidate stopped early is as known as a completed one: drawing it again would train it to the same stop.
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.PRUNED)
    twin = next((t.number for t in trial.study.get_trials(deepcopy=False, states=states)
                 if (t.state != optuna.trial.TrialState.PRUNED or t.user_attrs.get("stopped_early"))
                 and (t.state != optuna.trial.TrialState.RUNNING or t.number < trial.number)
                 and t.number != trial.number
                 and all(t.user_attrs.get(k) == v or (k == "recipe" and t.user_attrs.get("drawn_recipe") == v)
                         for k, v in candidate.to_dict().items())), None)
    if twin is not None:
        trial.set_user_attr("duplicate_of", twin)
        raise optuna.TrialPruned(f"same candidate as trial {twin}")
    _rule_out(trial, candidate, ctx)
    ctx.clock, started = PhaseClock(), time.perf_counter()
    with ctx.tracking.child(trial, candidate.to_dict()) as tracker:
        try:
            outcome = evaluate(trial, candidate, ctx, tracker)
        except Exception as exc:
            trial.set_user_attr("error", one_line(exc))
            tracker.set_tags({"state": "FAIL", "error": one_line(exc)})
            shutil.rmtree(ctx.cfg.run_dir / "trials" / str(trial.number), ignore_errors=True)
            raise
        finally:  # also for a failed trial: the time it cost is part of the study's
            spent = {k: round(v, 3) for k, v in ctx.clock.seconds.items()}
            spent["other"] = round(max(0.0, time.perf_counter() - started - sum(ctx.clock.seconds.values())), 3)
            trial.set_user_attr("seconds", spent)
    if isinstance(outcome, Stopped):  # raised outside the MLflow run, which ends FINISHED with its partial curve
        raise optuna.TrialPruned(f"stopped early ({outcome.rule}): {outcome.why}")
    return outcome


def screening_bound(ctx: Context) -> float | None:
    """The p95 an untrained candidate is judged against: the budget x (1 + search.screen_margin); None without one."""
    return None if ctx.targets.p95_ms is None else ctx.targets.p95_ms * (1.0 + ctx.cfg.search.screen_margin)


def predicted_p95(model, candidate, recipe: str | None = None) -> float | None:
    """The latency model's p95 for `candidate`'s architecture served by `recipe` (default its own); None without."""
    return None if model is None else model.predict(candidate.family, recipe or candidate.recipe,
                                                    candidate.num_layers, candidate.hidden_size,
                                                    candidate.intermediate_size)


def _rule_out(trial, candidate, ctx: Context) -> None:
    """Prune a draw the latency model predicts too slow for the screening bound, before anything is built."""
    model = ctx.latency_model
    bound = screening_bound(ctx) if model is not None else None
    predicted = predicted_p95(model, candidate) if bound is not None else None
    if predicted is None:
        return
    trial.set_user_attr("predicted_p95_ms", predicted)
    if model.rules_out(predicted, bound):
        trial.set_user_attr("ruled_out", True)
        agreement = 0.0 if ctx.agreement_constraint else None
        for key, value in constraint_values(ctx.targets, predicted, 0.0, 0.0, agreement,
                                            ctx.cfg.export.min_label_agreement if agreement is not None
                                            else None).items():
            trial.set_constraint(key, value)
        raise optuna.TrialPruned(f"the latency model predicts p95 {predicted:.2f} ms (error {model.error:.0%}) "
                                 f"above the screening bound {bound:.2f} ms")


@dataclass
class Training:
    """What a task trains a trial's student with (TrialParts.training): the loss, the batches, the dev score."""
    compute_loss: object  # (model, batch) -> (loss, parts)
    extra_modules: list  # trainable modules of the loss (projections) that the loop prepares with the student
    loader: object  # the distillation set's batches
    evaluate: object  # model -> {metric: value} on the dev set
    tokenizer: object  # saved with every checkpoint


class TrialParts:
    """What one trial needs from its task; `evaluate` below calls them in this order.

    - `student(candidate, ctx)`: the untrained student the candidate describes.
    - `served(recipe, model, ctx, workdir, screening=False)`: `model` as served under `recipe` (a Quantized:
      `.predict(batch)`, `.size_mb`); `screening`: the untrained student's, timed before training.
    - `training(trial_cfg, ctx, student)`: a `Training` (trial_cfg carries the candidate's training knobs).
    - `trained(trial_dir, ctx)`: the best checkpoint, loaded back in eval mode.
    - `quality(served, trained, candidate, ctx)`: (task.metric of the served artefact on the dev set, its
      agreement with the fp32 weights or None when the task has no such constraint).
    """


def evaluate(trial, candidate, ctx: Context, tracker):
    """One trial of any task: build, time untrained (screen), distil, serve, score, time; record it."""
    ctx, clock, parts = ctx.of(getattr(candidate, "family", None)), ctx.clock, ctx.parts
    cfg = ctx.cfg
    unmeasured = 0.0 if ctx.agreement_constraint else None  # keeps every trial's constraints the same keys
    with clock("screening"):
        student = parts.student(candidate, ctx)
        params = count_params(student)
        with tempfile.TemporaryDirectory(prefix="kdlab-screen-") as tmp:
            served = parts.served(candidate.recipe, student, ctx, Path(tmp), screening=True)
            # Judged against the screening bound: a p95 whose interval straddles it gets more rounds first.
            bound = screening_bound(ctx)
            pre = _measure(served, ctx, budget_ms=bound)
    misses = screened_out(ctx.targets, pre.p95_ms, pre.size_mb, cfg.search.screen_margin, pre.p95_low_ms)
    if misses:
        return record_screened(trial, tracker, ctx, pre, params, misses, agreement=unmeasured)

    trial_dir = cfg.run_dir / "trials" / str(trial.number)
    check = StopCheck(trial, cfg, ctx.targets, pre.p95_ms, pre.size_mb, cfg.task.metric)
    with clock("training"):  # its periodic dev evaluations are counted as evaluation, not training
        before = clock.seconds["evaluation"]
        result = _distil(candidate, ctx, student, trial_dir, tracker, check)
    clock.seconds["training"] -= clock.seconds["evaluation"] - before
    if check.stopped is not None:
        return record_stopped(trial, tracker, ctx, pre, params, result, check, agreement=unmeasured)
    with clock("quantization"):
        trained = parts.trained(trial_dir, ctx)
        served = parts.served(candidate.recipe, trained, ctx, trial_dir / "served")
    with clock("evaluation"):
        quality, agreement = parts.quality(served, trained, candidate, ctx)
    if agreement is not None and agreement < cfg.export.min_label_agreement and cfg.search.recipe_fallback:
        fallback = _serve_agreeing(trial, candidate, trained, ctx, trial_dir, agreement)
        if fallback is not None:
            candidate, served, quality, agreement = fallback
    with clock("measurement"):
        post = _measure(served, ctx, budget_ms=ctx.targets.p95_ms)
    return record_trained(trial, tracker, ctx, candidate, trial_dir, quality, pre, post, params, result, agreement)


def fallback_recipes(candidate, ctx: Context) -> list[str]:
    """The space's other recipes for `candidate`'s weights, fastest first: by the latency model's prediction for
    this architecture where it has one, else in the seed order (int8 before half precision before fp32). A recipe
    the model rules out for this architecture is left out: re-served under it, the student would trade an
    agreement miss for a budget miss (every one of the 5 re-served under fp32 in one search here)."""
    others = [r for r in search_recipes(ctx.cfg) if r != candidate.recipe]  # what every family's space draws
    order = {r: i for i, r in enumerate(SEED_RECIPES)}
    model = ctx.latency_model
    bound = screening_bound(ctx) if model is not None else None

    def predicted(recipe):
        return predicted_p95(model, candidate, recipe)
    kept = [r for r in others if bound is None or not model.rules_out(predicted(r), bound)]
    return sorted(kept, key=lambda r: (predicted(r) is None, predicted(r) or 0.0, order.get(r, len(order))))


def _serve_agreeing(trial, candidate, trained, ctx: Context, trial_dir: Path, agreement: float):
    """A trained student whose served artefact disagrees with its fp32 weights is served under the space's other
    recipes, fastest first, until one agrees: (candidate with that recipe, served, quality, agreement), or None.

    The weights are the same, so no training is repeated; only serving and one dev pass per recipe are. The trial
    keeps the drawn recipe in `drawn_recipe` and what each tried recipe agreed in `recipe_agreement`, and its
    `recipe` becomes the one served (what the report, the front and the export read)."""
    tried = {candidate.recipe: round(agreement, 4)}
    found = None
    for recipe in fallback_recipes(candidate, ctx):
        other = dataclasses.replace(candidate, recipe=recipe)
        workdir = trial_dir / f"served-{recipe}"
        with ctx.clock("quantization"):
            served = ctx.parts.served(recipe, trained, ctx, workdir)
        with ctx.clock("evaluation"):
            quality, agreed = ctx.parts.quality(served, trained, other, ctx)
        tried[recipe] = round(agreed, 4)
        if agreed >= ctx.cfg.export.min_label_agreement:
            found = other, served, quality, agreed
            break
        shutil.rmtree(workdir, ignore_errors=True)
    trial.set_user_attr("drawn_recipe", candidate.recipe)
    trial.set_user_attr("recipe_agreement", tried)
    if found is not None:
        trial.set_user_attr("recipe", found[0].recipe)
        trial.set_user_attr("label", found[0].label())
        shutil.rmtree(trial_dir / "served", ignore_errors=True)  # the drawn recipe's artefact, which no one serves
    return found


def _distil(candidate, ctx: Context, student, trial_dir: Path, tracker, check: StopCheck | None = None):
    """One in-process distillation with the candidate's training knobs; best checkpoint -> trial_dir."""
    cfg = ctx.cfg
    train_cfg = dataclasses.replace(cfg.train, learning_rate=candidate.learning_rate, max_steps=cfg.search.train_steps,
                                    num_epochs=cfg.search.train_epochs, resume_from=None, save_state_every_steps=None)
    distill_cfg = dataclasses.replace(cfg.distill, temperature=candidate.temperature, alpha=candidate.alpha)
    training = ctx.parts.training(dataclasses.replace(cfg, train=train_cfg, distill=distill_cfg), ctx, student)

    def save_best(model):
        model.save_pretrained(trial_dir)
        training.tokenizer.save_pretrained(trial_dir)

    def evaluate_dev(model):
        with ctx.clock("evaluation"):
            return training.evaluate(model)

    return fit(ctx.accelerator, student, training.loader, cfg=train_cfg, compute_loss=training.compute_loss,
               evaluate=evaluate_dev, save_best=save_best, out_dir=trial_dir, tracker=tracker, metric=cfg.task.metric,
               extra_modules=training.extra_modules, desc="distill", stop_check=check)
