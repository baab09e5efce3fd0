"""Deployment files of an export folder: Ray Serve's `serve_config.yaml` and a CPU `Dockerfile`.

Library module for `kdlab export` (search/export.py writes them into the folder before its manifest, so they are
hashed with the rest) and `kdlab serve` (the same mapping from the capacity plan to Ray Serve's deployment
options). Nothing here imports Ray: the files are plain text in Ray Serve's config format
(`ray.serve.schema.ServeDeploySchema`; tests/test_serve.py validates and deploys one).

    cd runs/sst2_minilm/export && serve run serve_config.yaml
    docker build -f runs/sst2_minilm/export/Dockerfile --build-arg EXPORT=runs/sst2_minilm/export \
        --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> -t kdlab-serve .
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from kdlab.distill.errors import ConfigError
from kdlab.distill.export import MANIFEST

SERVE_CONFIG = "serve_config.yaml"
DOCKERFILE = "Dockerfile"
APP_NAME = "kdlab"
DEPLOYMENT = "ExportModel"
IMPORT_PATH = "kdlab.scripts.serve_app:app_builder"
DEFAULT_PORT = 8000
REQUEST_TIMEOUT_S = 30.0
MAX_TEXTS = 64


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no {MANIFEST}; not an export folder (make one with kdlab export)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{folder / MANIFEST}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def plan_settings(manifest: dict) -> dict:
    """The Ray Serve settings the export's capacity plan gives ({} when it was exported without one)."""
    return ((manifest.get("capacity") or {}).get("plan") or {}).get("serve") or {}


def deployment_options(plan: dict, *, replicas: int | None = None, autoscale: bool = False,
                       max_ongoing_requests: int | None = None, max_queued_requests: int | None = None,
                       threads: int = 1, max_batch_size: int = 1) -> dict:
    """Ray Serve deployment options from the plan's serve settings, explicit values taking precedence."""
    options = {
        # One batch running and one filling: Ray Serve warns when fewer than a batch may be in flight.
        "max_ongoing_requests": max_ongoing_requests or plan.get("max_ongoing_requests") or max(8, 2 * max_batch_size),
        "max_queued_requests": max_queued_requests or plan.get("max_queued_requests") or 64,
        "ray_actor_options": {"num_cpus": threads},
    }
    if autoscale:
        scaling = dict(plan["autoscaling"])
        # Ray's defaults (30 s up, 600 s down) suit clusters that add machines; replicas on running machines
        # start in seconds, so scale up after 5 s of load and back down after 30 s without.
        scaling.update(upscale_delay_s=5.0, downscale_delay_s=30.0)
        if replicas:
            scaling["max_replicas"] = replicas
        options["autoscaling_config"] = scaling
    else:
        options["num_replicas"] = replicas or plan.get("num_replicas") or 1
    return options


def replica_args(manifest: dict) -> dict:
    """The application builder's args besides the folder: what each replica does (scripts/serve_app.AppSettings)."""
    plan = plan_settings(manifest)
    threads = plan.get("threads") or (manifest.get("conditions") or {}).get("threads") or 1
    return {"threads": threads, "max_batch_size": plan.get("max_batch_size", 1),
            "batch_wait_timeout_s": plan.get("batch_wait_timeout_s", 0.0), "max_texts": MAX_TEXTS}


def serve_config(manifest: dict) -> dict:
    """Ray Serve's config (ServeDeploySchema) serving the folder it sits in, with the plan's settings."""
    args = replica_args(manifest)
    options = deployment_options(plan_settings(manifest), threads=args["threads"],
                                 max_batch_size=args["max_batch_size"])
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": DEFAULT_PORT, "request_timeout_s": REQUEST_TIMEOUT_S},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
            # `.`: the export folder, as the directory `serve run` is started in (its workers start there).
            "args": {"model": ".", **args},
            "deployments": [{"name": DEPLOYMENT, **options}],
        }],
    }


def serve_config_text(manifest: dict) -> str:
    plan = plan_settings(manifest)
    origin = ("the capacity plan in manifest.json" if plan else
              "defaults (one replica, unbatched): this export has no capacity plan (serving.target_rps unset)")
    return (f"# Ray Serve config of this export, from {origin}.\n"
            f"#   cd <this folder> && serve run {SERVE_CONFIG}      (needs kdlab with its serve extra)\n"
            f"#   kdlab serve --model <this folder> does the same with integrity checks and a clean Ctrl-C.\n"
            + yaml.safe_dump(serve_config(manifest), sort_keys=False))


def dockerfile_text(manifest: dict) -> str:
    torch_version = str((manifest.get("versions") or {}).get("torch", "")).split("+")[0]
    torch_pin = f"torch=={torch_version}" if torch_version else "torch"
    return f"""# {manifest['name']} served by Ray Serve (`kdlab serve`), CPU only. Build from the root of the kdlab checkout,
# naming this export folder; everything is installed at build time and nothing is downloaded when it runs:
#   docker build -f <export>/Dockerfile --build-arg EXPORT=<export> \\
#       --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> -t kdlab-{manifest['name']} .
#   docker run --rm --shm-size=1g -p 127.0.0.1:8000:8000 kdlab-{manifest['name']}
FROM python:3.11-slim
ARG TORCH_INDEX_URL
ARG EXPORT
RUN test -n "$TORCH_INDEX_URL" || (echo "--build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> is required" && exit 1); \\
    test -n "$EXPORT" || (echo "--build-arg EXPORT=<export folder in the build context> is required" && exit 1)
WORKDIR /opt/kdlab
COPY pyproject.toml constraints.txt README.md ./
COPY kdlab kdlab
COPY eval eval
COPY distill distill
COPY train train
COPY search search
COPY scripts scripts
# The CPU build of torch first, from its own index, then kdlab with its serve extra, holding that torch.
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" {torch_pin} \\
    && pip install --no-cache-dir -c constraints.txt ".[serve]"
COPY ${{EXPORT}} /srv/model
RUN useradd --create-home kdlab
USER kdlab
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
EXPOSE 8000
# 0.0.0.0 is the container's own interface (loopback inside it is unreachable from the host); publish the port
# on the host's loopback, as above, unless a load balancer in front of it needs more.
CMD ["kdlab", "serve", "--model", "/srv/model", "--host", "0.0.0.0", "--port", "8000"]
"""


def write_deploy_files(folder: Path, manifest: dict) -> None:
    (Path(folder) / SERVE_CONFIG).write_text(serve_config_text(manifest))
    (Path(folder) / DOCKERFILE).write_text(dockerfile_text(manifest))
