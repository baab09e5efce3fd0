"""An export folder as an MLflow model on its trial's run, registered with the config's alias.

Library module for search/export.py. MLflow's transformers flavour would log the fp32 model;
the pyfunc flavour serves the export's artefact, so what the registry hands out is what was measured.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from distill.config import Config

ROOT = Path(__file__).resolve().parents[1]
# What loading the model needs, pinned to what exported it (STACK.md: never let MLflow infer them).
RUNTIME = ("torch", "transformers", "tokenizers", "safetensors", "onnxruntime", "numpy", "pyyaml")


def pip_requirements() -> list[str]:
    out = []
    for name in RUNTIME:
        try:
            out.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return out


def register_export(cfg: Config, folder: Path, manifest: dict) -> dict:
    """Log `folder` as a pyfunc model (on the trial's run when there is one), register it, set the alias."""
    import mlflow

    from train.tracking import ensure_experiment
    ensure_experiment(cfg)
    name = cfg.export.model_name or cfg.name
    choice, lat = manifest["choice"], manifest["latency"][0]
    run_id = choice.get("mlflow_run_id")
    if run_id:
        try:
            if mlflow.get_run(run_id).info.lifecycle_stage != "active":
                run_id = None
        except mlflow.exceptions.MlflowException:
            run_id = None
    kwargs = {"run_id": run_id} if run_id else {"run_name": "export"}
    with mlflow.start_run(**kwargs) as run:
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(ROOT / "distill" / "mlflow_model.py"), artifacts={"export": str(folder)},
            code_paths=[str(ROOT / "distill"), str(ROOT / "eval")], pip_requirements=pip_requirements(),
            input_example=[manifest.get("example_input", "a gripping, funny film")], registered_model_name=name)
        mlflow.set_tags({"kdlab.export": str(folder), "kdlab.export_recipe": manifest["served"]["recipe"]})
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, cfg.export.alias, version)
    tags = {"study": choice.get("study") or "", "trial": "" if choice.get("trial") is None else str(choice["trial"]),
            "quality": f"{manifest['measured']['quality']:.6f}", "p95_ms": f"{lat['p95_ms']:.4f}",
            "recipe": manifest["served"]["recipe"], "source": choice["label"]}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return {"model_name": name, "version": version, "alias": cfg.export.alias, "run_id": run.info.run_id,
            "model_uri": info.model_uri}
