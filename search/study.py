"""The student search: Optuna, two objectives (quality ↑, p95 ↓), the targets as constraints.

    kdlab search --config configs/sst2_minilm.yaml [--n-trials 20] [--timeout 3600]
    kdlab report --config configs/sst2_minilm.yaml          # the front and plots, from the stored study

Each trial draws a student (depth, widths, initialisation, quantization recipe, optionally
learning rate / temperature / alpha) from `search:` (search/space.py), then:

1. builds it untrained, applies its recipe and times it on the target profile: latency depends on
   the architecture, not the weights. A candidate over the p95 budget (beyond `screen_margin`) or
   the size budget is rejected with zero training steps: its measured p95 and size are recorded,
   its constraints are violated, user attrs `screened_out=True`, `train_seconds=0`, and it returns
   quality 0.0 (not the untrained quality: that costs a dev pass and reads like a real score at chance
   level on a plot; 0.0 cannot be mistaken for one). It stays visible in the study, plots and MLflow.
2. otherwise distils it in this process with train/pipeline's loss and train/loop's `fit`, from the
   study's fine-tuned teacher and its cached logits, for `search.train_steps` (or `train_epochs`);
3. applies the recipe to the best checkpoint, scores that served artefact on the full dev set and
   times it again. The post-training figures are what the trial reports.

Constraints (`trial.set_constraint`, > 0 violated) are relative gaps so the units do not weigh
against each other in the samplers' total violation: p95/budget - 1, size/max - 1, 1 - quality/floor.
Classification trials add `agreement`: export.min_label_agreement minus the share of dev labels on
which the served artefact agrees with its own fp32 weights (user attr `label_agreement`; 1.0 for fp32),
measured as `kdlab export` measures it, so the choice never falls on a student the export would refuse
(a screened-out candidate has no artefact: agreement 0). Seq2seq trials have no such constraint.

Sampler: multi-objective TPE (`TPESampler(multivariate=True, group=True)`) by default, chosen by
reasoning, not by a benchmark. With 10-50 trials NSGA-II is a poor fit: its first generation is
random sampling of `population_size` trials (50 by default, so the whole budget would be random
search; a population of a few leaves crossover little to work with), whereas TPE models the trials
from `STARTUP_TRIALS` on. In Optuna 5 both samplers read what `trial.set_constraint` stores; TPE
counts an infeasible trial among the good ones only when too few feasible trials exist, least
violation first. With `group=True` TPE also models conditional parameters (the head count drawn per
hidden size, `init` drawn only when both initialisations are possible), which NSGA-II samples at
random. `constant_liar` keeps workers sharing a study (PostgreSQL) from drawing the same point at
once. A candidate identical to a completed trial is pruned, not retrained. `search.sampler: nsga2 |
random` remain for comparison.

Storage defaults to sqlite:///<output_dir>/optuna.db; any RDB URL works, and running again resumes
the study (the same space and targets; otherwise a ConfigError asks for a new study name) and adds
`--n-trials` more. A trial that raises is recorded as FAIL with user attr `error`; the study goes on.
Checkpoints of front members stay under runs/<name>/trials/<number>/; others are deleted.
Exit code 0 (a feasible student exists), 3 (none), 2 (config error).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import optuna
from accelerate.utils import set_seed

from kdlab.distill.config import Config, ConfigError, load_config, redact
from kdlab.distill.task import task_of
from kdlab.eval.latency import clamp_threads
from kdlab.search.gate_report import gate_references
from kdlab.search.latency_model import calibrate, predicted_errors
from kdlab.search.objective import PHASES, Context, one_line, predicted_p95, screening_bound
from kdlab.search.study_report import arch_text, print_front, targets_text, trial_rows, write_report
from kdlab.search.study_tracking import StudyTracking
from kdlab.search.targets import EXIT_MISS, EXIT_PASS, GateRow, Targets, is_relative, resolve_targets
from kdlab.search.timing import check_device

DIRECTIONS = ["maximize", "minimize"]  # quality, p95_ms
METRIC_NAMES = ["quality", "p95_ms"]  # the objectives by name, as optuna-dashboard and plots label them
STARTUP_TRIALS = 6  # seeds + a few random draws before TPE models the trials (Optuna's 10 is a whole small budget)
NSGA2_POPULATION = 10  # a generation a 10-50 trial budget can complete several times
TARGET_KEYS = ("p95_ms", "min_quality", "max_size_mb")
STORAGE_ATTEMPTS = 5  # opening a fresh database while another worker creates its tables
PROFILE_KEYS = ("device", "threads", "batch_size", "seq_len")
DRAWS_PER_TRIAL = 5  # default search.max_draws: untrained draws (screened out, repeats) per trained trial wanted
RULED_OUT_PER_TRIAL = 50  # draws the latency model may rule out per trained trial wanted before a call gives up


@dataclass
class SearchResult:
    study_name: str
    storage: str
    rows: list
    front: list
    message: str
    exit_code: int
    report_dir: Path


# ---------------------------------------------------------------- storage and study


def storage_url(cfg: Config) -> str:
    return cfg.search.storage or f"sqlite:///{cfg.run_dir / 'optuna.db'}"


def open_storage(cfg: Config, create: bool = True) -> optuna.storages.RDBStorage:
    """The study's RDB storage; an unreachable or malformed URL is a one-line ConfigError."""
    url = storage_url(cfg)
    if cfg.search.storage is None:
        path = cfg.run_dir / "optuna.db"
        if not create and not path.is_file():
            raise ConfigError(f"search.storage: no study database at {path}; run kdlab search --config "
                              f"{cfg.config_path or '<config>'} first")
        path.parent.mkdir(parents=True, exist_ok=True)
    last = None
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # Optuna marks heartbeats experimental; kdlab relies on them on purpose
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=cfg.search.heartbeat_s, grace_period=2 * cfg.search.heartbeat_s,
                    heartbeat_stale_trial_callback=_DeadTrial(cfg))
        except Exception as exc:
            # Workers started together race to create the schema of a fresh database; the loser sees
            # a unique-constraint or "already exists" error and simply opens it a moment later.
            last = exc
            if not any(word in str(exc) for word in ("UNIQUE constraint", "already exists", "duplicate key",
                                                     "database is locked")):
                break
            time.sleep(0.5 * (attempt + 1))
    # sqlalchemy/driver errors come in many types; all mean "cannot use this URL"
    first = str(last).strip().splitlines()[0][:200] if str(last).strip() else ""
    raise ConfigError(f"search.storage: cannot open {redact(url)!r} ({type(last).__name__}: {first}); "
                      "valid: a reachable RDB URL such as sqlite:///runs/x/optuna.db")


class _DeadTrial:
    """Called by Optuna for a trial whose worker stopped sending heartbeats (killed, machine lost).

    Optuna has already marked it FAIL; this closes its MLflow child run as FAILED (it would stay
    RUNNING forever) and enqueues the same parameters again (RetryHeartbeatStaleTrialCallback), up to
    search.max_retries times per original trial.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.search.max_retries)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        why = f"worker died: no heartbeat for {2 * self.cfg.search.heartbeat_s} s"
        if run_id and self.cfg.tracking.enabled:
            try:
                from mlflow.tracking import MlflowClient  # tracking is on here (train/tracking.py: why lazily)
                client = MlflowClient(self.cfg.tracking.uri)
                client.set_tag(run_id, "state", "FAIL")
                client.set_tag(run_id, "error", why)
                client.set_terminated(run_id, status="FAILED")
            except Exception as exc:  # tracking trouble must not stop the study
                print(f"kdlab: warning: could not mark the MLflow run of dead trial {trial.number} FAILED: "
                      f"{one_line(exc)}", file=sys.stderr)
        self.retry(study, trial)
        print(f"kdlab: trial {trial.number} had no heartbeat for {2 * self.cfg.search.heartbeat_s} s (its worker "
              f"died): marked FAIL and enqueued again", file=sys.stderr)


def make_sampler(cfg: Config, n_existing: int) -> optuna.samplers.BaseSampler:
    # The sampler's random state is not stored with the study: offsetting the seed by the trials
    # already there keeps a resumed study from replaying the first session's random draws.
    seed = (cfg.train.seed if cfg.search.seed is None else cfg.search.seed) + n_existing
    if cfg.search.storage is not None:
        # Workers sharing a study would otherwise start from one seed and draw the same students in the same
        # order (each repeat pruned: wasted trials); the default one-worker SQLite study stays reproducible.
        seed += zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 1_000_003
    if cfg.search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=NSGA2_POPULATION)
    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # `group`, stable since 2.8
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=STARTUP_TRIALS)


def _fingerprint(cfg: Config, space) -> dict:
    """What makes trials comparable: a resumed study must keep it."""
    return json.loads(json.dumps({
        "space": space.describe(), "train_steps": cfg.search.train_steps, "train_epochs": cfg.search.train_epochs,
        "target": {k: str(getattr(cfg.target, k)) for k in TARGET_KEYS + PROFILE_KEYS},
        "metric": cfg.task.metric}))


def _check_resumable(study: optuna.Study, fingerprint: dict, url: str) -> None:
    stored = study.user_attrs.get("fingerprint")
    if stored is None or stored == fingerprint:
        return
    changed = next(k for k in fingerprint if stored.get(k) != fingerprint[k])
    detail = ""
    if changed == "space":
        key = next(k for k in fingerprint["space"] if stored["space"].get(k) != fingerprint["space"][k])
        detail = f" (search.{key})"
    if changed == "target":
        key = next(k for k in fingerprint["target"] if stored["target"].get(k) != fingerprint["target"][k])
        detail = f" (target.{key} was {stored['target'].get(key)!r}, now {fingerprint['target'][key]!r})"
    raise ConfigError(f"search.study_name: study '{study.study_name}' in {redact(url)} was created with a different "
                      f"{changed}{detail}; its trials would not compare: use a new search.study_name")


# ---------------------------------------------------------------- after each trial


def summary_of(rows: list[dict]) -> dict:
    feasible = [r for r in rows if r["feasible"]]
    return {"trials": len(rows), "trials_complete": sum(r["state"] == "COMPLETE" for r in rows),
            "trials_failed": sum(r["state"] == "FAIL" for r in rows),
            "trials_screened_out": sum(r["screened_out"] for r in rows), "trials_feasible": len(feasible),
            "trials_stopped_early": sum(bool(r.get("stopped_early")) for r in rows),
            "trials_ruled_out": sum(bool(r.get("ruled_out")) for r in rows),
            "front_size": sum(r["is_pareto"] for r in rows),
            "best_quality": max((r["quality"] for r in feasible), default=None)}


def prune_checkpoints(run_dir: Path, rows: list[dict]) -> None:
    """Delete trials/<n>/ of finished trials off the front; a running trial's folder is left alone."""
    keep = {r["trial"] for r in rows if r["is_pareto"] or r["state"] == "RUNNING"}
    known = {r["trial"] for r in rows}
    root = run_dir / "trials"
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if folder.name.isdigit() and int(folder.name) in known and int(folder.name) not in keep:
            shutil.rmtree(folder, ignore_errors=True)


def refresh(cfg: Config, study: optuna.Study, meta: dict, tracking: StudyTracking) -> list[dict]:
    """Front, checkpoints, report files and MLflow tags from the study as it stands now."""
    rows = trial_rows(study.get_trials(deepcopy=False), cfg.run_dir)
    prune_checkpoints(cfg.run_dir, rows)
    rows = trial_rows(study.get_trials(deepcopy=False), cfg.run_dir)  # checkpoint paths after pruning
    paths = write_report(rows, cfg.run_dir / "report", meta)
    tracking.refresh(rows, paths, summary_of(rows))
    return rows


def _trial_line(row: dict) -> str:
    head = f"trial {row['trial']}: {arch_text(row)}: "
    if row.get("drawn_recipe") and row["drawn_recipe"] != row.get("recipe"):
        head += f"(drawn as {row['drawn_recipe']}, re-served: its artefact disagreed with its fp32 weights) "
    if row["state"] == "FAIL":
        return head + f"FAILED ({row.get('error')})"
    if row.get("ruled_out"):
        return head + f"ruled out unbuilt (the latency model predicts p95 {row['predicted_p95_ms']:.2f} ms)"
    if row.get("stopped_early"):
        return head + (f"stopped early after {row['steps']} steps, trained {row['train_seconds']:.0f} s "
                       f"({row['stopped_early']}: {row['stop_reason']})")
    if row["state"] != "COMPLETE":
        return head + row["state"].lower() + (f" (repeats trial {row['duplicate_of']})"
                                              if row.get("duplicate_of") is not None else "")
    if row["screened_out"]:
        return head + f"screened out untrained (p95 {row['p95_ms']:.2f} ms, {row['size_mb']:.1f} MB), no training"
    agreement = (f", served/fp32 label agreement {row['label_agreement']:.2%}"
                 if row.get("label_agreement") is not None else "")
    if row.get("p95_verdict") == "uncertain":  # still straddling the budget after target.max_rounds rounds
        agreement += f" (p95 uncertain: {row['p95_low_ms']:.2f}-{row['p95_high_ms']:.2f} ms straddles the budget)"
    return head + (f"quality {row['quality']:.4f}, p95 {row['p95_ms']:.2f} ms, {row['size_mb']:.1f} MB{agreement}, "
                   f"trained {row['train_seconds']:.0f} s" + (" [front]" if row["is_pareto"] else
                                                              ("" if row["feasible"] else
                                                               f" [infeasible: {row['violates']}]")))


def outcome(rows: list[dict], targets: dict, study_name: str, report_dir: Path) -> tuple[str, int]:
    """The one-line verdict and exit code: 0 with a front, 3 with no feasible student."""
    front = sorted((r for r in rows if r["is_pareto"]), key=lambda r: -r["quality"])
    screened = sum(r["screened_out"] for r in rows)
    ruled, stopped_n = sum(bool(r.get("ruled_out")) for r in rows), sum(bool(r.get("stopped_early")) for r in rows)
    extra = (f", {ruled} ruled out unbuilt by the latency model" if ruled else "") + (
        f", {stopped_n} stopped early" if stopped_n else "")
    if front:
        best = front[0]
        return (f"search '{study_name}': {len(front)} student(s) on the front of {len(rows)} trials ({screened} "
                f"screened out untrained{extra}); best {best['quality']:.4f} at p95 {best['p95_ms']:.2f} ms (trial "
                f"{best['trial']}); report: {report_dir}"), EXIT_PASS
    measured = [r for r in rows if r.get("p95_ms") is not None]
    if not measured:
        failed = [r for r in rows if r["state"] == "FAIL"]
        why = f"; first error: {failed[0]['error']}" if failed else ""
        return (f"no feasible student: no candidate was measured ({len(failed)} of {len(rows)} trials "
                f"failed{why})"), EXIT_MISS
    parts = []
    if targets.get("p95_ms") is not None:
        fastest = min(measured, key=lambda r: r["p95_ms"])
        parts.append(f"fastest candidate measured {fastest['p95_ms']:.2f} ms vs budget {targets['p95_ms']:.2f} ms "
                     f"(trial {fastest['trial']})")
    if targets.get("max_size_mb") is not None:
        smallest = min(measured, key=lambda r: r["size_mb"])
        parts.append(f"smallest {smallest['size_mb']:.1f} MB vs max {targets['max_size_mb']:.1f} MB")
    trained = [r for r in measured if not r["screened_out"] and r.get("quality") is not None
               and not r.get("stopped_early")]
    stopped = [r for r in measured if r.get("stopped_early")]
    if targets.get("min_quality") is not None and trained:
        parts.append(f"best quality {max(r['quality'] for r in trained):.4f} vs floor {targets['min_quality']:.4f}")
    disagreeing = [r for r in trained if "agreement" in (r.get("violates") or "").split()]
    if disagreeing:  # export.min_label_agreement: the export would refuse these, so the study does not choose them
        parts.append(f"{len(disagreeing)} trained student(s) whose served artefact agrees with its fp32 weights on "
                     f"too few dev labels (best {max(r['label_agreement'] for r in disagreeing):.2%}; "
                     f"export.min_label_agreement)")
    if stopped:
        parts.append(f"{len(stopped)} stopped early (best {max(r['quality'] for r in stopped):.4f} in fp32 when "
                     f"stopped)")
    parts.append(f"{screened} of {len(rows)} candidates screened out before training")
    return "no feasible student: " + "; ".join(parts), EXIT_MISS


# ---------------------------------------------------------------- the stage


def _gate_references(cfg: Config) -> list[dict]:
    """The fp32 teacher and its best quantized form from the gate's table, when the gate was run."""
    fp32, best = gate_references(cfg.run_dir)
    refs = []
    if fp32:
        refs.append({"label": "teacher fp32 (gate)", "p95_ms": float(fp32["p95_ms"]),
                     "quality": float(fp32["quality"])})
    if best:
        refs.append({"label": f"teacher {best['recipe']} (gate, best quantized)", "p95_ms": float(best["p95_ms"]),
                     "quality": float(best["quality"])})
    return refs


SESSION_PREFIX = "time_session/"  # one user attr per search call (a key each, so workers never overwrite another's)


def record_session(study: optuna.Study, started: float, setup_s: float) -> None:
    """This search call's wall and setup seconds (data, teacher, teacher labels, budget), for time_accounting."""
    key = f"{SESSION_PREFIX}{socket.gethostname()}-{os.getpid()}-{int(started)}"
    study.set_user_attr(key, {"wall_s": round(time.time() - started, 3), "setup_s": round(setup_s, 3)})


def time_accounting(study: optuna.Study) -> dict | None:
    """Where the study's time went, over every search call and worker: setup; each trial phase (screening, training,
    evaluation, quantization, measurement, the trial's other work); and idle (between trials: reports, MLflow,
    waiting on storage), the search calls' wall time less the rest. None before a search call has finished."""
    sessions = [v for k, v in study.user_attrs.items() if k.startswith(SESSION_PREFIX)]
    if not sessions:
        return None
    phases = dict.fromkeys((*PHASES, "other"), 0.0)
    for t in study.get_trials(deepcopy=False):
        for phase, seconds in (t.user_attrs.get("seconds") or {}).items():
            phases[phase] = phases.get(phase, 0.0) + seconds
    wall = sum(s["wall_s"] for s in sessions)
    setup = sum(s["setup_s"] for s in sessions)
    out = {"wall_s": round(wall, 1), "calls": len(sessions), "setup_s": round(setup, 1),
           **{f"{k}_s": round(v, 1) for k, v in phases.items()}}
    out["idle_s"] = round(max(0.0, wall - setup - sum(phases.values())), 1)
    return out


def meta_of(cfg: Config, study: optuna.Study) -> dict:
    refs = _gate_references(cfg)
    own = study.user_attrs.get("reference")
    if own and not refs:
        refs = [{"label": "teacher fp32 (measured by the search)", **own}]
    return {"study": study.study_name, "metric": cfg.task.metric, "targets": study.user_attrs.get("targets", {}),
            "conditions": study.user_attrs.get("conditions", {}), "references": refs,
            "time": time_accounting(study)}


def _setup(cfg: Config, accelerator, space, console) -> Context:
    set_seed(cfg.train.seed)
    threads, warning = clamp_threads(cfg.target.threads)
    if warning:
        print(f"kdlab: warning: target.threads: {warning}", file=sys.stderr)
    return task_of(cfg).search_setup(cfg, accelerator, space, console, threads)


PROFILE_KEYS = ("device", "threads", "batch_size", "seq_len", "warmup_iters", "min_iters", "min_seconds", "repeats")
RESOLVING_ATTR = "resolving_targets"  # set by the worker that created the study until its budget is stored
RESOLVE_WAIT_S = 900  # how long another worker waits for that budget before measuring one itself


def seed_fits(ctx: Context):
    """What a seed's recipe must pass: the latency model's central prediction within the screening bound (not the
    low edge that rules draws out: a seed should be expected to fit). None without a model: the preferred recipe."""
    model = ctx.latency_model
    bound = screening_bound(ctx) if model is not None else None
    if bound is None:
        return None

    def fits(c) -> bool:
        predicted = predicted_p95(model, c)
        return predicted is not None and predicted <= bound
    return fits


def gate_reference(cfg: Config) -> dict | None:
    """The fp32 teacher as this config's gate measured it (report/gate.csv), when the gate ran with the same teacher,
    data and target profile; else None. Its p95, quality and size are what relative targets resolve against."""
    report = cfg.run_dir / "report"
    table, saved = report / "gate.csv", report / "gate_config.yaml"
    if not (table.is_file() and saved.is_file()):
        return None
    try:
        gate_cfg = load_config(saved)
    except ConfigError:
        return None
    if (gate_cfg.teacher != cfg.teacher or gate_cfg.data != cfg.data
            or any(getattr(gate_cfg.target, k) != getattr(cfg.target, k) for k in PROFILE_KEYS)):
        return None
    row = gate_references(cfg.run_dir)[0]  # the measured fp32 row of gate.csv, or None
    if row is None:
        return None
    number = lambda v: float(v) if v not in ("", None) else None  # noqa: E731
    return {"p95_ms": number(row["p95_ms"]), "quality": number(row["quality"]), "size_mb": number(row["size_mb"]),
            "p50_ms": number(row["p50_ms"]), "cv": number(row["cv"]), "source": "gate",
            "measured_at": _utc(table.stat().st_mtime), "where": str(table)}


def _utc(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _remeasure_refused(name: str, targets: dict) -> ConfigError:
    return ConfigError(f"--remeasure: study '{name}' fixed its budget when it was created "
                       f"({targets_text(targets).removeprefix('targets: ')}); re-measuring applies to a new study: "
                       f"set a new search.study_name")


def _wait_for_targets(study: optuna.Study, lost_race: bool) -> dict | None:
    """The budget the study's creator is resolving, once stored. `lost_race`: this worker tried to create the study
    a moment ago and another one did, so that one is at work; otherwise wait only while the creator's marker says
    so. None when no creator is at work (it died, or the study predates the marker): this worker resolves it."""
    deadline = time.monotonic() + RESOLVE_WAIT_S
    while time.monotonic() < deadline:
        attrs = study.user_attrs  # read from the storage each time
        if attrs.get("targets") is not None:
            return attrs["targets"]
        marker = attrs.get(RESOLVING_ATTR)
        if not lost_race and (not marker or time.time() - marker.get("since", 0) > RESOLVE_WAIT_S):
            return None
        time.sleep(1.0)
    return None


def budget_line(targets: dict, reference: dict | None) -> str:
    """The budget the study uses, where its reference came from and how repeatable that was: printed, logged."""
    text = targets_text(targets).removeprefix("targets: ")
    if reference:
        origin = {"gate": "measured by the gate", "search": "measured by the search"}.get(reference.get("source"),
                                                                                          "measured")
        cv = f", cv {reference['cv']:.2f} across requests" if reference.get("cv") is not None else ""
        when = f" at {reference['measured_at']}" if reference.get("measured_at") else ""
        text += (f" — reference: fp32 teacher p95 {reference['p95_ms']:.2f} ms{cv}, {origin}{when}; fixed for "
                 f"this study (a new search.study_name re-measures)")
    return text


def teacher_reference(ctx: Context) -> GateRow:
    """The fp32 teacher as served, scored and timed on its own tokens, as its gate measures it (the task's `measure`):
    the reference point of `teacher*f` targets when no gate measured it."""
    rows, _ = task_of(ctx.cfg).measure(ctx.cfg, ctx.teacher.to("cpu"), ctx.prep, ctx.threads, ["fp32"],
                                       ctx.cfg.run_dir / "search_reference")
    ctx.teacher.to(ctx.accelerator.device)
    return rows[0]


def _resolve_targets(ctx: Context, study: optuna.Study, created: bool, remeasure: bool = False,
                     lost_race: bool = False) -> None:
    """Absolute targets, fixed when the study is created and never re-measured for it afterwards.

    A `teacher*f` target resolves against the fp32 teacher as the gate measured it for this config and target
    profile (report/gate.csv), so the gate and every search, worker, report and export of the study use one
    figure; without such a gate (or with `remeasure`) the search measures the teacher once. Workers that start
    a new study together wait for the creator's figure instead of measuring their own.
    """
    stored = study.user_attrs.get("targets")
    if stored is None and not created:
        stored = _wait_for_targets(study, lost_race)
    if stored is not None:
        if remeasure:
            raise _remeasure_refused(study.study_name, stored)
        ctx.targets = Targets(**{k: stored.get(k) for k in TARGET_KEYS}, spec=stored.get("spec", {}))
        return
    if created:
        study.set_user_attr(RESOLVING_ATTR, {"since": time.time(), "host": socket.gethostname(), "pid": os.getpid()})
    cfg, reference, record = ctx.cfg, None, None
    gate = None if remeasure or not is_relative(cfg.target) else gate_reference(cfg)
    if gate is not None:
        reference = GateRow("fp32", candidate=False, quality=gate["quality"], p50_ms=gate["p50_ms"],
                            p95_ms=gate["p95_ms"], cv=gate["cv"], size_mb=gate["size_mb"])
        record = gate
    elif is_relative(cfg.target):
        reference = teacher_reference(ctx)
    if reference is not None and reference.status == "ok" and record is None:
        record = {"p95_ms": reference.p95_ms, "quality": reference.quality, "size_mb": reference.size_mb,
                  "p50_ms": reference.p50_ms, "cv": reference.cv, "source": "search",
                  "measured_at": _utc(time.time())}
    if record is not None:
        study.set_user_attr("reference", record)
    ctx.targets = resolve_targets(cfg.target, reference)
    study.set_user_attr("targets", {**{k: getattr(ctx.targets, k) for k in TARGET_KEYS}, "spec": ctx.targets.spec})
    study.set_user_attr("conditions", ctx.meta["conditions"])
    if created:
        study.set_user_attr(RESOLVING_ATTR, None)


def run_search(cfg: Config, accelerator, n_trials: int | None = None, timeout_s: float | None = None,
               console=None, remeasure: bool = False) -> SearchResult:
    """Run (or resume) the study; write the report and MLflow runs; return the front and the verdict."""
    started = time.time()
    check_device(cfg.target)
    task = task_of(cfg)
    space = task.search_space(cfg)  # space errors before any work starts
    trial_objective = task.trial_objective
    created = not cfg.run_dir.exists()
    storage = open_storage(cfg)
    name = cfg.search.study_name or cfg.name
    fingerprint = _fingerprint(cfg, space)
    fresh = name not in optuna.study.get_all_study_names(storage)
    if not fresh:
        existing = optuna.load_study(study_name=name, storage=storage)
        _check_resumable(existing, fingerprint, storage_url(cfg))
        if remeasure and existing.user_attrs.get("targets") is not None:
            raise _remeasure_refused(name, existing.user_attrs["targets"])
    try:
        ctx = _setup(cfg, accelerator, space, console)
    except ConfigError:
        if created:  # a bad data file or teacher found late: leave nothing behind, as `kdlab distill` does
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
        raise
    try:  # the storage's unique study name decides which of several workers started together created it
        study = optuna.create_study(study_name=name, storage=storage, directions=DIRECTIONS,
                                    sampler=make_sampler(cfg, 0))
        created_study = True
    except optuna.exceptions.DuplicatedStudyError:
        n_existing = len(optuna.load_study(study_name=name, storage=storage).trials)
        study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(cfg, n_existing))
        created_study = False
    if [d.name.lower() for d in study.directions] != DIRECTIONS:
        raise ConfigError(f"search.study_name: study '{name}' exists with other objectives; "
                          "use a new search.study_name")
    study.set_user_attr("fingerprint", fingerprint)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        if study.metric_names != METRIC_NAMES:  # also names a study created before kdlab named them
            study.set_metric_names(METRIC_NAMES)
        optuna.storages.fail_stale_trials(study)  # trials of dead workers: FAIL, MLflow FAILED, retried
    _resolve_targets(ctx, study, created_study, remeasure, lost_race=fresh and not created_study)
    budget = budget_line(study.user_attrs.get("targets", {}), study.user_attrs.get("reference"))
    print(f"budget: {budget}", flush=True)
    if getattr(space, "architectures", None) and cfg.search.latency_samples and ctx.targets.p95_ms is not None:
        ctx.latency_model = calibrate(ctx, space.architectures(), cfg.search.latency_samples,
                                      recheck_points=cfg.search.latency_recheck)
        study.set_user_attr("latency_model", ctx.latency_model.summary())
        bound = screening_bound(ctx)
        possible = [a for a in space.architectures()
                    if not ctx.latency_model.rules_out(ctx.latency_model.predict(a[0], a[5], a[1], a[2], a[4]), bound)]
        print(f"latency model: {ctx.latency_model.points} points ({ctx.latency_model.cached} cached), error "
              f"{ctx.latency_model.error:.0%}; {len(possible)} of {len(space.architectures())} architecture x recipe "
              f"points predicted within the screening bound {bound:.2f} ms", flush=True)
        if not possible:
            fastest = ctx.latency_model.fastest
            message = (f"no feasible student: no candidate of the space is predicted to meet p95 <= "
                       f"{ctx.targets.p95_ms:.2f} ms; the fastest measured is {fastest['num_layers']}L x "
                       f"{fastest['hidden_size']} ({fastest['num_heads']} heads, ffn {fastest['intermediate_size']}), "
                       f"{fastest['recipe']} at p95 {fastest['p95_ms']:.2f} ms; nothing trained (widen the space or "
                       f"the budget)")
            return SearchResult(name, redact(storage_url(cfg)), [], [], message, EXIT_MISS, cfg.run_dir / "report")
    if created_study:  # not `if not study.trials`: workers started together would each enqueue the seeds
        fits = seed_fits(ctx)  # a space without a latency model (a plug-in task's) need not take `fits`
        seeds = (space.seeds(cfg.search.seed_trials, cfg.target.device) if fits is None
                 else space.seeds(cfg.search.seed_trials, cfg.target.device, fits=fits))
        for candidate in seeds:
            study.enqueue_trial(space.params_of(candidate), skip_if_exists=True)
    ctx.meta.update(meta_of(cfg, study))

    wanted = n_trials or cfg.search.n_trials
    spent = {"trained": 0, "drawn": 0, "ruled_out": 0}
    draws = max_draws(cfg, wanted)

    def after_trial(study, frozen) -> None:
        # search.n_trials counts students trained (to the end or stopped early) and failures; a candidate
        # screened out untrained or pruned as a repeat costs seconds, not a trial: search.max_draws bounds them.
        # A draw the latency model rules out costs milliseconds: RULED_OUT_PER_TRIAL per trial wanted bounds those.
        if frozen.user_attrs.get("ruled_out"):
            spent["ruled_out"] += 1
        else:
            spent["drawn"] += 1
        spent["trained"] += counts_as_trained(frozen)
        if spent["trained"] >= wanted or spent["drawn"] >= draws or spent["ruled_out"] >= RULED_OUT_PER_TRIAL * wanted:
            study.stop()
        if frozen.user_attrs.get("ruled_out"):
            return  # no line, no report refresh: nothing was built
        # An exception here would stop the study (Optuna does not catch callbacks): warn and go on;
        # the refresh after the last trial runs unguarded and shows any lasting problem.
        try:
            rows = refresh(cfg, study, ctx.meta, ctx.tracking)
        except Exception as exc:  # the trial's own line still comes, from the study as it stands
            print(f"kdlab: warning: report refresh after trial {frozen.number} failed: {one_line(exc)}",
                  file=sys.stderr)
            rows = trial_rows(study.get_trials(deepcopy=False), cfg.run_dir)
        row = next((r for r in rows if r["trial"] == frozen.number), None)
        if row is not None:
            print(_trial_line(row), flush=True)

    with ctx.tracking.parent(study) as parent:
        reference = study.user_attrs.get("reference") or {}
        parent.set_tags({"kdlab.budget": budget[:4000], "kdlab.budget_source": reference.get("source", "absolute")})
        parent.log_metrics({f"budget_{k}": v for k, v in study.user_attrs.get("targets", {}).items()
                            if k in TARGET_KEYS and v is not None}
                           | {f"reference_{k}": reference[k] for k in ("p95_ms", "quality", "cv")
                              if reference.get(k) is not None})
        setup_s = time.time() - started
        study.optimize(lambda trial: trial_objective(trial, ctx), n_trials=draws + RULED_OUT_PER_TRIAL * wanted,
                       timeout=timeout_s if timeout_s is not None else cfg.search.timeout_s,
                       catch=(Exception,), callbacks=[after_trial], gc_after_trial=True)
        record_session(study, started, setup_s)
        ctx.meta["time"] = time_accounting(study)
        rows = refresh(cfg, study, ctx.meta, ctx.tracking)
        parent.log_metrics({f"time_{k}": v for k, v in ctx.meta["time"].items()})
        errors = predicted_errors(rows) if ctx.latency_model is not None else None
        if errors is not None:
            study.set_user_attr("latency_model_errors", errors)
            parent.log_metrics({f"latency_model_{k}": v for k, v in errors.items()})
            trained = (f"; on {errors['trained']} trained: median {errors['median_error_trained']:.0%}, max "
                       f"{errors['max_error_trained']:.0%} against the served artefact's p95" if "trained" in errors
                       else "")
            print(f"latency model error on {errors['trials']} trials it let through: median "
                  f"{errors['median_error_untrained']:.0%}, max {errors['max_error_untrained']:.0%} against their "
                  f"untrained p95{trained}", flush=True)
    report_dir = cfg.run_dir / "report"
    print_front(rows, ctx.meta, console)
    message, code = outcome(rows, ctx.meta["targets"], name, report_dir)
    return SearchResult(name, redact(storage_url(cfg)), rows, [r for r in rows if r["is_pareto"]], message, code,
                        report_dir)


def max_draws(cfg: Config, wanted: int) -> int:
    """Trials of any kind one call may start: search.max_draws, default DRAWS_PER_TRIAL x the trained ones wanted."""
    return cfg.search.max_draws or DRAWS_PER_TRIAL * wanted


def stored_study(cfg: Config) -> optuna.Study | None:
    """The config's study when its storage already holds it, else None (nothing is created)."""
    if cfg.search.storage is None and not (cfg.run_dir / "optuna.db").is_file():
        return None
    storage = open_storage(cfg, create=False)
    name = cfg.search.study_name or cfg.name
    if name not in optuna.study.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=name, storage=storage)


def counts_as_trained(trial) -> bool:
    """What search.n_trials counts: a student trained (to the end or stopped early), or a trial that failed."""
    return trial.state == optuna.trial.TrialState.FAIL or bool(
        trial.state.is_finished() and trial.user_attrs.get("steps") and not trial.user_attrs.get("screened_out"))


def trained_trials(cfg: Config) -> int:
    """Trials of the config's study that count against search.n_trials; 0 when there is no study yet."""
    study = stored_study(cfg)
    return 0 if study is None else sum(counts_as_trained(t) for t in study.get_trials(deepcopy=False))


def run_report(cfg: Config, console=None) -> SearchResult:
    """`kdlab report`: the front table and plots rebuilt from the stored study (nothing is measured)."""
    storage = open_storage(cfg, create=False)
    name = cfg.search.study_name or cfg.name
    if name not in optuna.study.get_all_study_names(storage):
        raise ConfigError(f"search.study_name: no study '{name}' in {redact(storage_url(cfg))}; "
                          f"run kdlab search --config {cfg.config_path or '<config>'} first")
    study = optuna.load_study(study_name=name, storage=storage)
    meta = meta_of(cfg, study)
    tracking = StudyTracking(cfg)
    tracking.parent_run_id = study.user_attrs.get("mlflow_parent_run_id") if cfg.tracking.enabled else None
    if tracking.enabled:
        tracking.ensure_experiment()
    rows = refresh(cfg, study, meta, tracking)
    print_front(rows, meta, console)
    message, code = outcome(rows, meta["targets"], name, cfg.run_dir / "report")
    return SearchResult(name, redact(storage_url(cfg)), rows, [r for r in rows if r["is_pareto"]], message, code,
                        cfg.run_dir / "report")
