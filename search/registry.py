"""An export folder as an MLflow model on its trial's run, registered with the config's alias.

Library module for search/export.py. MLflow's transformers flavour would log the fp32 model;
the pyfunc flavour serves the export's artefact, so what the registry hands out is what was measured.
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import kdlab
import kdlab.distill
import kdlab.eval
from kdlab.distill.config import Config
from kdlab.distill.export import write_manifest
from kdlab.train.tracking import ensure_experiment

# What loading the model needs, pinned to what exported it (STACK.md: never let MLflow infer them).
RUNTIME = ("torch", "transformers", "tokenizers", "safetensors", "onnxruntime", "numpy", "pandas", "pyyaml")


def pip_requirements() -> list[str]:
    out = []
    for name in RUNTIME:
        try:
            out.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return out


def code_package(where: Path) -> Path:
    """What the pyfunc runs, laid out as the `kdlab` package (kdlab.distill, kdlab.eval and kdlab.tasks, nothing else).

    In the repository those layers are the folders distill/ and eval/, mapped into kdlab by pyproject.toml;
    MLflow puts the code path's parent on sys.path, so the copy must be a folder named kdlab.
    """
    package = where / "kdlab"
    package.mkdir(parents=True)
    shutil.copy2(kdlab.__file__, package / "__init__.py")
    for layer in (kdlab.distill, kdlab.eval):
        shutil.copytree(Path(layer.__file__).parent, package / layer.__name__.rsplit(".", 1)[1],
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # The tasks load and run an export's artefact (kdlab.distill.task); found, not imported: no stage imports them.
    tasks = importlib.util.find_spec("kdlab.tasks").submodule_search_locations[0]
    shutil.copytree(tasks, package / "tasks", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return package


def pyfunc_signature(manifest: dict):
    """Input: one string column, the texts. Output: `label` and one `prob_<label>` per label (the columns
    distill/mlflow_model.py returns), or, for an export without labels (seq2seq), the generated text."""
    # mlflow only when registering: kdlab export imports this module with tracking off too (train/tracking.py).
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    labels = manifest.get("labels") or []
    outputs = ([ColSpec("string", "label"), *(ColSpec("double", f"prob_{name}") for name in labels)] if labels
               else [ColSpec("string")])
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema(outputs))


def pyfunc_arguments(folder: Path, manifest: dict, package: Path) -> dict:
    """What mlflow.pyfunc.log_model (or save_model) takes for export `folder`, with `package` from code_package."""
    return {"python_model": str(package / "distill" / "mlflow_model.py"), "artifacts": {"export": str(folder)},
            "code_paths": [str(package)], "pip_requirements": pip_requirements(),
            "input_example": [manifest.get("example_input", "a gripping, funny film")],
            "signature": pyfunc_signature(manifest)}


def register_export(cfg: Config, folder: Path, manifest: dict) -> dict:
    """Log `folder` as a pyfunc model (on the run that trained it when there is one: a trial's, or a distillation's
    for `--model DIR`), register it, set the alias; that run is tagged with the export's folder and version."""
    import mlflow  # lazy, as in pyfunc_signature

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
        info = mlflow.pyfunc.log_model(name="model", registered_model_name=name,
                                       **pyfunc_arguments(folder, manifest, package))
        mlflow.set_tags({"kdlab.export": str(folder), "kdlab.export_recipe": manifest["served"]["recipe"]})
        if manifest.get("test"):  # the held-out split, scored once for this model
            mlflow.log_metric(f"test_{manifest['test']['metric']}", manifest["test"]["quality"])
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, cfg.export.alias, version)
    # The run that produced the model (a trial's, a distillation's) says which registered version it became.
    client.set_tag(run.info.run_id, "kdlab.export_version", f"{name}/{version}")
    tags = {"study": choice.get("study") or "", "trial": "" if choice.get("trial") is None else str(choice["trial"]),
            "quality": f"{manifest['measured']['quality']:.6f}", "p95_ms": f"{lat['p95_ms']:.4f}",
            "recipe": manifest["served"]["recipe"], "source": choice["label"]}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return {"model_name": name, "version": version, "alias": cfg.export.alias, "run_id": run.info.run_id,
            "model_uri": info.model_uri}


def register(cfg: Config, dest: Path, manifest: dict, card) -> dict:
    """Register the finished export in MLflow (when asked) and rewrite its card and manifest to say so."""
    if cfg.export.register and cfg.tracking.enabled:
        manifest["mlflow"] = register_export(cfg, dest, manifest)
        (dest / "README.md").write_text(card(manifest))
        manifest = write_manifest(dest, manifest)
    return manifest
