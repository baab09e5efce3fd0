"""An export folder as an MLflow model on its trial's run, registered with the config's alias.

Library module for search/export.py. MLflow's transformers flavour would log the fp32 model;
the pyfunc flavour serves the export's artefact, so what the registry hands out is what was measured.
"""
from __future__ import annotations

import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import kdlab
import kdlab.distill
import kdlab.eval
from kdlab.distill.config import Config

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


def code_package(where: Path) -> Path:
    """What the pyfunc runs, laid out as the `kdlab` package (kdlab.distill and kdlab.eval, nothing else).

    In the repository those layers are the folders distill/ and eval/, mapped into kdlab by pyproject.toml;
    MLflow puts the code path's parent on sys.path, so the copy must be a folder named kdlab.
    """
    package = where / "kdlab"
    package.mkdir(parents=True)
    shutil.copy2(kdlab.__file__, package / "__init__.py")
    for layer in (kdlab.distill, kdlab.eval):
        shutil.copytree(Path(layer.__file__).parent, package / layer.__name__.rsplit(".", 1)[1],
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return package


def register_export(cfg: Config, folder: Path, manifest: dict) -> dict:
    """Log `folder` as a pyfunc model (on the trial's run when there is one), register it, set the alias."""
    import mlflow

    from kdlab.train.tracking import ensure_experiment
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
    with mlflow.start_run(**kwargs) as run, tempfile.TemporaryDirectory(prefix="kdlab-code-") as code:
        package = code_package(Path(code))
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(package / "distill" / "mlflow_model.py"), artifacts={"export": str(folder)},
            code_paths=[str(package)], pip_requirements=pip_requirements(),
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
