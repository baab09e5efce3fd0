"""The one accelerate training loop: teacher fine-tuning and distillation both run through `fit`.

`fit` knows nothing of teachers or students: it gets a model, a `compute_loss(model, batch)`
and an `evaluate(model)`; it owns the optimizer, schedule, accumulation, clipping, evaluation,
early stopping, best-checkpoint keeping, `save_state`/resume, progress bar and metric logging.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from distill.adapter import model_inputs
from eval.metrics import classification_metrics
from distill.config import TrainConfig
from train.tracking import Tracker


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


@torch.no_grad()
def evaluate_classifier(model, loader, accelerator: Accelerator) -> dict:
    """Accuracy, macro F1 and mean CE of `model` on `loader`, gathered across processes."""
    model.eval()
    preds, labels, losses = [], [], []
    for batch in loader:
        logits = model(**model_inputs(batch)).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
        logits, y, loss = accelerator.gather_for_metrics((logits, batch["labels"], loss))
        preds.append(logits.argmax(-1).cpu())
        labels.append(y.cpu())
        losses.append(loss.cpu())
    model.train()
    p, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    num_labels = accelerator.unwrap_model(model).config.num_labels
    return {**classification_metrics(y, p, num_labels), "loss": float(torch.cat(losses).mean())}


def _latest_state(state_root: Path) -> Path | None:
    states = sorted(state_root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return states[-1] if states else None


def fit(accelerator: Accelerator, model, train_loader, *, cfg: TrainConfig,
        compute_loss: Callable, evaluate: Callable, save_best: Callable, out_dir: Path,
        tracker: Tracker, metric: str = "accuracy", extra_modules: list | None = None,
        desc: str = "train") -> FitResult:
    """Train `model` with AdamW + linear warm-up/decay; keep the checkpoint with the best dev `metric`.

    `compute_loss(model, batch) -> (loss, parts)`; `evaluate(model) -> metrics dict`;
    `save_best(unwrapped_model)` writes the best checkpoint (called on the main process only).
    `extra_modules` train alongside the model (e.g. hidden-state projections).
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

    if cfg.resume_from:
        path = _latest_state(state_root) if cfg.resume_from == "latest" else Path(cfg.resume_from)
        if path is None or not path.is_dir():
            raise FileNotFoundError(f"train.resume_from: no saved state at {cfg.resume_from} ({state_root})")
        accelerator.load_state(str(path))
        accelerator.print(f"resumed from {path} at step {state.step}")

    eval_every = cfg.eval_every_steps or steps_per_epoch
    progress = tqdm(total=total_steps, initial=state.step, desc=desc,
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    model.train()
    step_times, samples, start = [], 0, time.perf_counter()
    stop = state.step >= total_steps
    epoch = state.step // steps_per_epoch
    while not stop:
        # Reseeding per epoch keeps the shuffled order reproducible, also after a resume.
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
            if state.step % eval_every == 0 or state.step == total_steps:
                stop = _evaluate_and_keep(accelerator, model, state, evaluate, save_best, tracker,
                                          metric, cfg, desc) or stop
            if cfg.save_state_every_steps and state.step % cfg.save_state_every_steps == 0:
                accelerator.save_state(str(state_root / f"step_{state.step}"))
            if state.step >= total_steps or stop:
                stop = True
                break
            t0 = time.perf_counter()
        epoch += 1
    progress.close()
    seconds = time.perf_counter() - start
    total_samples = samples * accelerator.num_processes
    return FitResult(best_metric=state.best_metric, best_step=state.best_step, steps=state.step,
                     train_seconds=seconds, samples_per_second=total_samples / max(seconds, 1e-9),
                     step_times=step_times)


def _evaluate_and_keep(accelerator, model, state: LoopState, evaluate, save_best, tracker, metric, cfg, desc) -> bool:
    """Evaluate, save the checkpoint if it is the best so far; True when early stopping fires."""
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
        return False
    state.bad_evals += 1
    return bool(cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience)


def remove_states(out_dir: Path) -> None:
    shutil.rmtree(out_dir / "state", ignore_errors=True)
