"""The one accelerate training loop: teacher fine-tuning and distillation both run through `fit`.

`fit` knows nothing of teachers or students: it gets a model, a `compute_loss(model, batch)`
and an `evaluate(model)`; it owns the optimizer, schedule, accumulation, clipping, evaluation,
early stopping, best-checkpoint keeping, `save_state`/resume, progress bar and metric logging.

Test hook, off unless KDLAB_PAUSE_AFTER_STEP is set: KDLAB_PAUSE_AFTER_STEP=STAGE:N with KDLAB_PAUSE_FILE=PATH
pauses the fit whose `desc` is STAGE (`teacher`, `distill`) after optimizer step N; see `pause_point`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from kdlab.distill.adapter import model_inputs
from kdlab.eval.metrics import classification_metrics
from kdlab.distill.config import TrainConfig
from kdlab.train.tracking import Tracker


@dataclass
class LoopState:
    """Counters saved with accelerate's state, so a resumed run continues where it stopped."""
    step: int = 0
    best_metric: float = -math.inf
    best_step: int = 0
    bad_evals: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


@dataclass
class FitResult:
    best_metric: float
    best_step: int
    steps: int
    train_seconds: float
    samples_per_second: float
    step_times: list
    stopped_early: bool = False  # fit(stop_check=...) stopped it (search/early_stop.py)


@torch.no_grad()
def evaluate_classifier(model, loader, accelerator: Accelerator | None) -> dict:
    """Accuracy, macro F1 and mean CE of `model` on `loader`, gathered across processes.

    `accelerator` None: one process, `loader` not prepared; batches go to the model's device.
    """
    model.eval()
    device = next(model.parameters()).device
    preds, labels, losses = [], [], []
    for batch in loader:
        if accelerator is None:
            batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**model_inputs(batch)).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
        if accelerator is not None:
            logits, y, loss = accelerator.gather_for_metrics((logits, batch["labels"], loss))
        else:
            y = batch["labels"]
        preds.append(logits.argmax(-1).cpu())
        labels.append(y.cpu())
        losses.append(loss.cpu())
    model.train()
    p, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    num_labels = (accelerator.unwrap_model(model) if accelerator is not None else model).config.num_labels
    return {**classification_metrics(y, p, num_labels), "loss": float(torch.cat(losses).mean())}


STATE_MARKER = "kdlab_state.json"
# Written beside the states when a fit ends (last step or early stop): the same command then starts over.
FINISHED_MARKER = "finished.json"
KEEP_STATES = 2  # the newest complete state and one before it, in case the newest is torn later


def why_torn(path: Path) -> str | None:
    """Why a saved state cannot be trusted (None: complete): no marker, or a file missing or of another size."""
    marker = path / STATE_MARKER
    if not marker.is_file():
        return f"no {STATE_MARKER} (the save did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return f"{STATE_MARKER} is unreadable"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, not the {size} written"
    return None


def _states(state_root: Path) -> list[Path]:
    """Saved states, newest first (temporary folders of an unfinished save are not states)."""
    found = [p for p in state_root.glob("step_*") if p.is_dir() and p.name.split("_")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]), reverse=True)


def latest_state(state_root: Path, say=print) -> Path | None:
    """The newest complete state; a torn one (killed mid-save, truncated file) is skipped, and said so."""
    for path in _states(state_root):
        why = why_torn(path)
        if why is None:
            return path
        say(f"train: skipping torn state {path}: {why}")
    return None


def run_fingerprint(cfg: TrainConfig, model, desc: str) -> str:
    """What a saved state must share to be resumed automatically: the training config and the model's shapes."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resume_from"}
    shapes = [(name, list(p.shape)) for name, p in model.state_dict().items()]
    return hashlib.sha256(json.dumps([desc, train, shapes], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_state(accelerator: Accelerator, state_root: Path, step: int, fingerprint: str) -> None:
    """accelerate's save_state into a temporary folder, a marker listing every file, then one rename.

    A kill at any point leaves either the previous states untouched or a `.step_N.tmp` folder that
    is never read; older states beyond KEEP_STATES are removed only after the new one is in place.
    """
    tmp, final = state_root / f".step_{step}.tmp", state_root / f"step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
        marker = tmp / STATE_MARKER
        marker.write_text(json.dumps({"step": step, "fingerprint": fingerprint, "files": files}))
        with open(marker) as fh:
            os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in _states(state_root)[KEEP_STATES:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _auto_resume(state_root: Path, fingerprint: str, total_steps: int, say) -> Path | None:
    """The state to continue from when the same command runs again after a crash (None: start over)."""
    latest = latest_state(state_root, say)
    if latest is None:
        return None
    finished = state_root / FINISHED_MARKER
    if finished.is_file() and json.loads(finished.read_text()).get("fingerprint") == fingerprint:
        return None  # that run finished (its last state may be older than its last step): start over
    marker = json.loads((latest / STATE_MARKER).read_text())
    if marker.get("fingerprint") != fingerprint:
        say(f"train: not resuming from {latest}: it was saved by another training config or model")
        return None
    if marker["step"] >= total_steps:
        return None  # that run finished: this one starts over
    return latest


@contextmanager
def atomic_dir(path: Path):
    """Write a folder as a whole: yield a temporary sibling, then swap it in (the old one goes only after)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_saver(out: Path, tokenizer) -> Callable:
    """`fit`'s save_best for a model folder: the model and its tokenizer swapped into `out` as a whole (atomic_dir),
    so a kill mid-save never leaves a half-written best checkpoint."""
    def save_best(model):
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return save_best


PAUSE_AFTER_STEP_ENV = "KDLAB_PAUSE_AFTER_STEP"
PAUSE_FILE_ENV = "KDLAB_PAUSE_FILE"


def pause_point(desc: str) -> tuple[int, Path] | None:
    """The step and release file of the test pause for a fit named `desc` (None: no pause; the default).

    With KDLAB_PAUSE_AFTER_STEP=STAGE:N (e.g. `distill:40`) and KDLAB_PAUSE_FILE=PATH, the fit whose `desc`
    is STAGE stops after optimizer step N, once that step's logging, evaluation, best checkpoint and state
    save are done: the main process writes PATH.reached (JSON: pid, stage, step) and every process then
    waits until PATH exists. Tests kill, interrupt or release a run at a known step this way, instead of
    racing the machine's speed. Once PATH exists, later fits of that process pass step N without stopping.
    """
    spec = os.environ.get(PAUSE_AFTER_STEP_ENV)
    if not spec:
        return None
    stage, _, step = spec.rpartition(":")
    release = os.environ.get(PAUSE_FILE_ENV)
    if not stage or not step.isdigit() or int(step) < 1 or not release:
        raise ValueError(f"{PAUSE_AFTER_STEP_ENV}={spec!r} needs the form STAGE:N with N >= 1 (e.g. distill:40) "
                         f"and {PAUSE_FILE_ENV} set to the release file (now {release!r})")
    return (int(step), Path(release)) if stage == desc else None


def wait_at_pause(accelerator: Accelerator, desc: str, step: int, release: Path) -> None:
    """Say that step `step` of `desc` is reached (PATH.reached, written whole) and wait for PATH."""
    if accelerator.is_main_process:
        sys.stdout.flush()
        sys.stderr.flush()
        reached = release.with_name(release.name + ".reached")
        tmp = reached.with_name(f"{reached.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "stage": desc, "step": step}))
        os.replace(tmp, reached)  # a test polling for it never reads half a file
    while not release.exists():
        time.sleep(0.05)


def fit(accelerator: Accelerator, model, train_loader, *, cfg: TrainConfig,
        compute_loss: Callable, evaluate: Callable, save_best: Callable, out_dir: Path,
        tracker: Tracker, metric: str = "accuracy", extra_modules: list | None = None,
        desc: str = "train", stop_check=None) -> FitResult:
    """Train `model` with AdamW + linear warm-up/decay; keep the checkpoint with the best dev `metric`.

    `compute_loss(model, batch) -> (loss, parts)`; `evaluate(model) -> metrics dict`;
    `save_best(unwrapped_model)` writes the best checkpoint (called on the main process only).
    `extra_modules` train alongside the model (e.g. hidden-state projections).
    `stop_check` (search/early_stop.py StopCheck): also evaluate at its `steps_at(total_steps)`, pass every
    evaluation to `stop_check(step, total_steps, metrics)`, and stop when it returns True (`stopped_early`).
    """
    # One accelerator serves several fits (teacher, then student): forget what an earlier fit
    # prepared, or save_state/load_state would pair this run's weights with another model's.
    accelerator.free_memory()
    accelerator._custom_objects.clear()
    extra = torch.nn.ModuleList(extra_modules or [])
    params = list(model.parameters()) + list(extra.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    model, train_loader = accelerator.prepare(model, train_loader)
    if any(True for _ in extra.parameters()):  # DDP refuses to wrap a module without parameters
        extra = accelerator.prepare(extra)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.grad_accum_steps))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
    # accelerate steps a prepared scheduler once per process for every optimizer step.
    sched_steps = total_steps * accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * sched_steps), sched_steps)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    state = LoopState()
    accelerator.register_for_checkpointing(state)
    state_root = out_dir / "state"

    fingerprint = run_fingerprint(cfg, accelerator.unwrap_model(model), desc)
    path = None
    if cfg.resume_from:
        path = latest_state(state_root, accelerator.print) if cfg.resume_from == "latest" else Path(cfg.resume_from)
        if path is None or not path.is_dir():
            raise FileNotFoundError(f"train.resume_from: no saved state at {cfg.resume_from} ({state_root})")
        if why_torn(path):
            raise FileNotFoundError(f"train.resume_from: {path} is torn ({why_torn(path)}); valid: a complete state "
                                    f"folder, or 'latest' (the newest complete one)")
    elif cfg.save_state_every_steps:
        # The same command after a crash (kill -9, lost machine) continues from its newest complete state.
        path = _auto_resume(state_root, fingerprint, total_steps, accelerator.print)
    if path is not None:
        accelerator.load_state(str(path))
        accelerator.print(f"resumed from {path} at step {state.step}")
    elif accelerator.is_main_process:
        (state_root / FINISHED_MARKER).unlink(missing_ok=True)  # this run is not finished until it ends

    eval_every = cfg.eval_every_steps or steps_per_epoch
    eval_also = set(stop_check.steps_at(total_steps)) if stop_check is not None else set()
    stopped_early = False
    pause = pause_point(desc)
    progress = tqdm(total=total_steps, initial=state.step, desc=desc,
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    model.train()
    step_times, samples, start = [], 0, time.perf_counter()
    stop = state.step >= total_steps
    epoch = state.step // steps_per_epoch
    # Epoch e shuffles with seed + e: a run resumed in epoch e draws the batches an uninterrupted run draws
    # there (the loader's generator itself is neither saved with the state nor reseeded by set_epoch).
    sampler = train_loader.get_sampler() if hasattr(train_loader, "get_sampler") else None
    generator = getattr(sampler, "generator", None)
    base_seed = generator.initial_seed() if generator is not None else None
    while not stop:
        if generator is not None:
            generator.manual_seed(base_seed + epoch)
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        done_in_epoch = state.step - epoch * steps_per_epoch
        loader = (accelerator.skip_first_batches(train_loader, done_in_epoch * cfg.grad_accum_steps)
                  if done_in_epoch > 0 else train_loader)
        t0 = time.perf_counter()
        for batch in loader:
            with accelerator.accumulate(model):
                loss, parts = compute_loss(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            samples += batch["input_ids"].shape[0]
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            step_times.append(time.perf_counter() - t0)
            progress.update(1)
            if state.step % cfg.log_every_steps == 0 or state.step == 1:
                progress.set_postfix(loss=f"{loss.detach().item():.4f}")
                tracker.log_metrics({f"{desc}/loss": loss.detach().item(), f"{desc}/lr": scheduler.get_last_lr()[0],
                                     **{f"{desc}/{k}": v for k, v in parts.items()}}, step=state.step)
            if state.step % eval_every == 0 or state.step == total_steps or state.step in eval_also:
                patience_out, metrics = _evaluate_and_keep(accelerator, model, state, evaluate, save_best, tracker,
                                                           metric, cfg, desc)
                stop = patience_out or stop
                if stop_check is not None and stop_check(state.step, total_steps, metrics):
                    stop = stopped_early = True
            if cfg.save_state_every_steps and state.step % cfg.save_state_every_steps == 0:
                _save_state(accelerator, state_root, state.step, fingerprint)
            if pause is not None and state.step == pause[0]:
                wait_at_pause(accelerator, desc, state.step, pause[1])
            if state.step >= total_steps or stop:
                stop = True
                break
            t0 = time.perf_counter()
        epoch += 1
    progress.close()
    if cfg.save_state_every_steps and accelerator.is_main_process:
        state_root.mkdir(parents=True, exist_ok=True)
        tmp = state_root / f".{FINISHED_MARKER}.tmp"
        tmp.write_text(json.dumps({"step": state.step, "fingerprint": fingerprint}))
        os.replace(tmp, state_root / FINISHED_MARKER)
    seconds = time.perf_counter() - start
    total_samples = samples * accelerator.num_processes
    return FitResult(best_metric=state.best_metric, best_step=state.best_step, steps=state.step,
                     train_seconds=seconds, samples_per_second=total_samples / max(seconds, 1e-9),
                     step_times=step_times, stopped_early=stopped_early)


def _evaluate_and_keep(accelerator, model, state: LoopState, evaluate, save_best, tracker, metric, cfg,
                       desc) -> tuple[bool, dict]:
    """Evaluate, save the checkpoint if it is the best so far; (True when patience runs out, the metrics)."""
    metrics = evaluate(model)
    tracker.log_metrics({f"{desc}/dev_{k}": v for k, v in metrics.items()}, step=state.step)
    accelerator.print(f"[{desc}] step {state.step}: " + " ".join(f"dev_{k}={v:.4f}" for k, v in metrics.items()))
    value = metrics[metric]
    if value > state.best_metric:
        state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_best(accelerator.unwrap_model(model))
        accelerator.wait_for_everyone()
        return False, metrics
    state.bad_evals += 1
    return bool(cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience), metrics


def remove_states(out_dir: Path) -> None:
    shutil.rmtree(out_dir / "state", ignore_errors=True)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
