"""kdlab: knowledge distillation and model selection under a measured latency budget.

    import kdlab
    cfg = kdlab.load_config("configs/smoke.yaml", ["train.max_steps=50"])
    summary = kdlab.distill(cfg)                       # teacher (fine-tuned if needed) -> student
    gate = kdlab.gate(cfg, model=summary["checkpoint"])   # the student under each quantization recipe
    manifest = kdlab.export(cfg, model=summary["checkpoint"], out="runs/smoke/my_export")
    labels, probs = kdlab.load_export("runs/smoke/my_export").predict(["a gripping film"])

The layers live in subpackages (kdlab.eval, kdlab.distill, kdlab.train, kdlab.search, kdlab.scripts;
docs/architecture.md). The names below load on first use, so `import kdlab` and `kdlab --version` stay fast.
"""
from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

# name -> (module, attribute): the public API (kdlab.api) and the errors a caller may catch.
_LAZY = {
    "Config": ("kdlab.distill.config", "Config"),
    "ConfigError": ("kdlab.distill.config", "ConfigError"),
    "ExportError": ("kdlab.distill.export", "ExportError"),
    "load_config": ("kdlab.api", "load_config"),
    "distill": ("kdlab.api", "distill"),
    "gate": ("kdlab.api", "gate"),
    "search": ("kdlab.api", "search"),
    "export": ("kdlab.api", "export"),
    "run": ("kdlab.api", "run"),
    "load_export": ("kdlab.api", "load_export"),
    "predict": ("kdlab.api", "predict"),
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'kdlab' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
