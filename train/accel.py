"""The one place a training `Accelerator` is built: train/distill.py, a teacher's fine-tuning, search trials.

Library module; nothing to launch. Measuring (the gate, capacity) and exporting never build one: accelerate
keeps the device and mixed precision of the first Accelerator of a process in shared state, so an
`Accelerator(cpu=True)` made only to measure would keep a later training in the same process on the CPU of a
GPU machine (or make it raise when train.mixed_precision is set), and one made without
`gradient_accumulation_steps` trains with train.grad_accum_steps silently ignored. Latency is measured on
`target.device`, whatever accelerate would choose.
"""
from __future__ import annotations

from kdlab.distill.config import Config, ConfigError


def training_accelerator(cfg: Config):
    """The Accelerator a training under `cfg` runs with: the launcher's device and processes, the config's
    mixed precision (None: what `accelerate launch` was given, else no) and gradient accumulation."""
    from accelerate import Accelerator
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.grad_accum_steps)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("train.mixed_precision: fp16 needs a GPU; valid on CPU: no, bf16")
    return accelerator
