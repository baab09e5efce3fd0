"""The Ray Serve application of an export folder: its served artefact behind HTTP, batched dynamically.

Library module; two ways to run it:

    kdlab serve --model runs/sst2_minilm/export                  (scripts/serve.py: checks, Ray, Ctrl-C)
    cd runs/sst2_minilm/export && serve run serve_config.yaml     (Ray's own CLI; `kdlab export` writes the file)

Routes (one deployment, the ingress; Ray Serve's proxy is the load balancer in front of its replicas):

- POST /predict  {"texts": ["...", ...], "pairs": [...] (pair tasks)} -> {"model", "version", "recipe",
  "predictions": [{"label", "probs"}] (seq2seq: [{"output"}]), "truncated": [indices], "batch_sizes": [...]};
  errors are JSON {"error": "..."} with 400 (not JSON), 413 (too large), 422 (wrong shape) or 503 (warming up);
  Ray Serve itself answers 503 when max_queued_requests is reached and 408 after request_timeout_s.
- GET /health    200 {"status": "ready", ...} once the replica has warmed up, 503 {"status": "warming up"} before;
  with the model, its version and recipe, the replica's threads and batching, and the deployment's replicas.
- GET /metrics   Prometheus text of the replica that answers: requests, texts, errors by status, batches by size.

Each text is one call of the `@serve.batch` method, so `max_batch_size` counts texts, as the capacity plan does;
the model runs on one worker thread per replica (torch and ONNX Runtime limited to the plan's threads), so the
replica's event loop keeps taking requests and filling the next batch meanwhile. The export is loaded by
`load_served`, exactly as `kdlab predict` loads it, and predictions are rounded as `kdlab predict` writes them.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from ray import serve
from transformers.utils import logging as hf_logging
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

from kdlab.distill.deploy import DEPLOYMENT, MAX_TEXTS, deployment_options, plan_settings, read_manifest
from kdlab.distill.errors import ConfigError
from kdlab.distill.export import MANIFEST, load_served
from kdlab.scripts.predict import rounded

# Short real-looking sentences for warm-up: every batch size the replica may serve is run once or more, so
# the first real requests do not pay for lazy initialisation (ONNX Runtime arenas, int8 kernels).
WARMUP_TEXTS = ["a gripping , funny film", "dull and far too long", "the cast is wonderful",
                "nothing here works", "an honest , moving story", "i laughed , then i slept"]


@dataclass
class AppSettings:
    """What one replica does; from the export's capacity plan (manifest capacity.plan.serve) unless overridden."""
    model: str  # the export folder (a relative path is taken from the directory the app is built in)
    threads: int = 1
    max_batch_size: int = 1
    batch_wait_timeout_s: float = 0.0
    max_texts: int = MAX_TEXTS  # texts per request
    max_body_bytes: int = 1 << 20
    warmup_batches: int = 3  # warm-up passes per batch size up to max_batch_size


def model_version(manifest: dict) -> str:
    """The registry version when the export was registered (name/version), else its weights' sha256 prefix."""
    registered = manifest.get("mlflow") or {}
    if registered.get("version") is not None:
        return f"{registered['model_name']}/{registered['version']}"
    weights = (manifest.get("files") or {}).get(manifest["served"]["file"]) or {}
    return f"sha256:{weights.get('sha256', 'unknown')[:12]}"


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class ExportModel:
    """One replica: the export's served artefact, warmed up in the background, predicting batches of texts."""

    def __init__(self, settings: dict):
        self.settings = AppSettings(**settings)
        s = self.settings
        torch.set_num_threads(s.threads)
        hf_logging.disable_progress_bar()  # from_pretrained's bar, once per replica, in the server's log
        self.served = load_served(s.model, threads=s.threads)
        self.manifest = self.served.manifest
        self.version = model_version(self.manifest)
        self.max_chars = 20 * self.manifest["max_length"]  # no token is 20 characters long: cut before tokenizing
        # The length check runs on the event loop while a batch tokenizes on the model thread. A fast tokenizer
        # keeps padding and truncation in one shared backend, so the check gets its own copy: on the model's,
        # its truncation=False call turned padding off under a running batch of mixed lengths.
        self.length_tokenizer = copy.deepcopy(self.served.tokenizer)
        self.infer.set_max_batch_size(s.max_batch_size)
        self.infer.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        # One worker thread runs the model: batches run one at a time on the plan's threads.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdlab-model")
        self.counts: Counter = Counter()
        self.batches: Counter = Counter()
        self.model_seconds = 0.0
        self.warmup = self.worker.submit(self.warm_up)

    # ---- the model, on the worker thread

    def warm_up(self) -> float:
        started = time.perf_counter()
        for size in range(1, self.settings.max_batch_size + 1):
            texts = [WARMUP_TEXTS[i % len(WARMUP_TEXTS)] for i in range(size)]
            for _ in range(self.settings.warmup_batches):
                self.run_model(texts, None)
        return time.perf_counter() - started

    def run_model(self, texts: list[str], pairs: list[str] | None) -> list[dict]:
        return [rounded(r) for r in self.served.predict_records(texts, pairs)]

    def timed_batch(self, texts: list[str], pairs: list[str] | None) -> list[dict]:
        started = time.perf_counter()
        out = self.run_model(texts, pairs)
        self.model_seconds += time.perf_counter() - started
        self.batches[len(texts)] += 1
        return out

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def infer(self, items: list[tuple[str, str | None]]) -> list[tuple[dict, int]]:
        texts = [text for text, _ in items]
        pairs = [pair for _, pair in items] if items[0][1] is not None else None
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self.worker, self.timed_batch, texts, pairs)
        return [(row, len(items)) for row in out]

    # ---- HTTP

    @property
    def ready(self) -> bool:
        return self.warmup.done() and self.warmup.exception() is None

    async def __call__(self, request: Request):
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method == "GET" and path == "health":
            return self.health()
        if request.method == "GET" and path == "metrics":
            return PlainTextResponse(self.metrics_text())
        if request.method == "POST" and path == "predict":
            response = await self.predict(request)
            self.counts[response.status_code] += 1
            return response
        return error(404, f"{request.method} {request.url.path}: no such route; valid: POST /predict, GET /health, "
                          f"GET /metrics")

    def health(self) -> JSONResponse:
        s = self.settings
        body = {"model": self.manifest["name"], "version": self.version, "recipe": self.served.artefact.recipe,
                "threads": s.threads, "max_batch_size": s.max_batch_size,
                "batch_wait_timeout_s": s.batch_wait_timeout_s,
                "replicas": serve.get_replica_context().world_size}  # at this moment (autoscaling changes it)
        if self.ready:
            return JSONResponse({"status": "ready", **body})
        if self.warmup.done():  # warm-up raised: the model cannot serve
            return JSONResponse({"status": "failed", "error": repr(self.warmup.exception()), **body}, status_code=500)
        return JSONResponse({"status": "warming up", **body}, status_code=503)

    async def predict(self, request: Request):
        s = self.settings
        if not self.ready:
            return JSONResponse({"error": "warming up; retry shortly (GET /health says when ready)"},
                                status_code=503, headers={"Retry-After": "1"})
        body = await request.body()
        if len(body) > s.max_body_bytes:
            return error(413, f"body: {len(body):,} bytes; valid: at most {s.max_body_bytes:,}")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error(400, f"body: not JSON ({exc}); valid: {{\"texts\": [\"...\", ...]}}")
        texts = payload.get("texts") if isinstance(payload, dict) else None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return error(422, "texts: missing or not a list of strings; valid: {\"texts\": [\"...\", ...]}")
        if not texts:
            return error(422, f"texts: empty list; valid: 1 to {s.max_texts} strings")
        if len(texts) > s.max_texts:
            return error(413, f"texts: {len(texts)} texts; valid: at most {s.max_texts} per request (split the list)")
        pair_column = self.manifest.get("text_pair_column")
        pairs = payload.get("pairs")
        if pair_column and (not isinstance(pairs, list) or len(pairs) != len(texts)
                            or not all(isinstance(p, str) for p in pairs)):
            return error(422, f"pairs: this model reads text pairs ({pair_column}); valid: \"pairs\": a list of "
                              f"strings as long as \"texts\"")
        pairs = pairs if pair_column else None
        truncated = self.truncated(texts, pairs)
        texts = [t[:self.max_chars] for t in texts]
        pairs = [p[:self.max_chars] for p in pairs] if pairs else None
        self.counts["texts"] += len(texts)
        results = await asyncio.gather(*(self.infer((t, pairs[i] if pairs else None)) for i, t in enumerate(texts)))
        out = {"model": self.manifest["name"], "version": self.version, "recipe": self.served.artefact.recipe,
               "predictions": [row for row, _ in results], "batch_sizes": [size for _, size in results]}
        if truncated:
            out["truncated"] = truncated
            out["note"] = (f"texts {truncated} are longer than the model's max_length of "
                           f"{self.manifest['max_length']} tokens: they were truncated to it")
        return JSONResponse(out)

    def truncated(self, texts: list[str], pairs: list[str] | None) -> list[int]:
        """Indices of the texts the tokenizer will cut to max_length (as `kdlab predict` cuts them)."""
        limit = self.manifest["max_length"]
        cut = [t[:self.max_chars] for t in texts]
        cut_pairs = [p[:self.max_chars] for p in pairs] if pairs else None
        ids = self.length_tokenizer(cut, cut_pairs, truncation=False)["input_ids"]
        return [i for i, (t, row) in enumerate(zip(texts, ids)) if len(row) > limit or len(t) > self.max_chars]

    def metrics_text(self) -> str:
        replica = serve.get_replica_context().replica_tag
        lines = ["# HELP kdlab_requests_total POST /predict requests answered by this replica, by HTTP status",
                 "# TYPE kdlab_requests_total counter"]
        lines += [f'kdlab_requests_total{{replica="{replica}",status="{k}"}} {v}'
                  for k, v in sorted(self.counts.items(), key=str) if isinstance(k, int)]
        lines += ["# HELP kdlab_texts_total texts predicted by this replica", "# TYPE kdlab_texts_total counter",
                  f'kdlab_texts_total{{replica="{replica}"}} {self.counts["texts"]}',
                  "# HELP kdlab_batches_total batches the model ran for requests, by batch size",
                  "# TYPE kdlab_batches_total counter"]
        lines += [f'kdlab_batches_total{{replica="{replica}",size="{k}"}} {v}' for k, v in sorted(self.batches.items())]
        lines += ["# HELP kdlab_model_seconds_total time the model spent on batches",
                  "# TYPE kdlab_model_seconds_total counter",
                  f'kdlab_model_seconds_total{{replica="{replica}"}} {self.model_seconds:.6f}',
                  "# HELP kdlab_ready 1 once the replica has warmed up", "# TYPE kdlab_ready gauge",
                  f'kdlab_ready{{replica="{replica}"}} {int(self.ready)}']
        return "\n".join(lines) + "\n"


def settings_for(model: str | Path, **overrides) -> AppSettings:
    """AppSettings of an export folder: its plan's values, then any override that is not None."""
    folder = Path(model).resolve()
    plan = plan_settings(read_manifest(folder))
    known = {f.name for f in fields(AppSettings)}
    values = {k: plan[k] for k in ("threads", "max_batch_size", "batch_wait_timeout_s") if plan.get(k) is not None}
    values.update({k: v for k, v in overrides.items() if v is not None and k in known})
    return AppSettings(model=str(folder), **{k: v for k, v in values.items() if k != "model"})


def build(settings: AppSettings, options: dict):
    """The bound application: the deployment with its options and the replica's settings."""
    return serve.deployment(ExportModel, name=DEPLOYMENT).options(**options).bind(asdict(settings))


def app_builder(args: dict):
    """Ray Serve application builder (`import_path: kdlab.scripts.serve_app:app_builder` in serve_config.yaml).

    `args`: `model` (the export folder; `.` in the file `kdlab export` writes, so run `serve run` from the
    export folder) and any AppSettings field. Deployment options (replicas, queues, autoscaling) are the plan's;
    the `deployments:` section of the config file overrides them, as Ray Serve does for any application.
    """
    args = dict(args or {})
    model = args.pop("model", ".")
    if not (Path(model) / MANIFEST).is_file():
        raise ConfigError(f"args.model: {Path(model).resolve()} holds no {MANIFEST}; run `serve run "
                          f"serve_config.yaml` from the export folder (cwd {os.getcwd()}) or give its path")
    settings = settings_for(model, **args)
    plan = plan_settings(read_manifest(Path(settings.model)))
    return build(settings, deployment_options(plan, threads=settings.threads, max_batch_size=settings.max_batch_size))
