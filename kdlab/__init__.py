"""kdlab: knowledge distillation and model selection under a measured latency budget.

    import kdlab
    cfg = kdlab.load_config("configs/smoke.yaml", ["train.max_steps=50"])
    summary = kdlab.run_distill(cfg)                                   # -> runs/smoke/student
    gate = kdlab.run_gate(cfg, model=summary["checkpoint"])            # the student x quantization recipes
    manifest = kdlab.run_export(cfg, model=summary["checkpoint"], out="runs/smoke/student_export")
    kdlab.predict("runs/smoke/student_export", ["a gripping film"])    # [{'label': '1', 'probs': {...}}]

The layers are subpackages (kdlab.eval, kdlab.distill, kdlab.train, kdlab.search, kdlab.scripts;
docs/architecture.md). The names below load on first use, so `import kdlab` and `kdlab --version` stay fast.
"""
from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

# name -> (module, attribute): the public API (kdlab.api) and the errors a caller may catch.
_LAZY = {
    "Config": ("kdlab.distill.config", "Config"),
    "ConfigError": ("kdlab.distill.errors", "ConfigError"),
    "ExportError": ("kdlab.distill.errors", "ExportError"),
    **{name: ("kdlab.api", name) for name in ("load_config", "run_distill", "run_gate", "run_search", "run_export",
                                               "run", "load_export", "predict")},
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
