"""`kdlab`: the command line of the workbench.

    kdlab distill --config configs/smoke.yaml [key.sub=value ...]   one distillation, in this process
    kdlab gate --config configs/sst2_minilm.yaml [target.p95_ms=teacher*0.25 ...]
                                                                    teacher × quantization recipes on the target;
                                                                    exit 0 PASS, 3 MISS (distillation needed)
    kdlab ui [--config configs/smoke.yaml] [--port 5000]            MLflow UI on 127.0.0.1

For several processes use `accelerate launch train/distill.py --config ...` (see README).
User errors print one line `kdlab: error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from distill.config import ConfigError, load_config


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    transformers.logging.set_verbosity_error()


def cmd_distill(args) -> int:
    from train.distill import main as distill_main
    return distill_main(["--config", args.config, *args.overrides])


def cmd_gate(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from accelerate import Accelerator

    from search.gate import run_gate
    # Measuring on the target profile is single-process; the CPU accelerator only serves the
    # teacher's fine-tuning when the checkpoint does not exist yet.
    result = run_gate(cfg, Accelerator(cpu=True))
    print(result.message, flush=True)
    return result.exit_code


def cmd_ui(args) -> int:
    uri = "sqlite:///runs/mlflow.db"
    if args.config:
        uri = load_config(args.config, args.overrides).tracking.uri
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
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


COMMANDS = {
    "distill": (cmd_distill, "distil a student (fine-tuning the teacher first if needed)"),
    "gate": (cmd_gate, "measure the teacher under each quantization recipe against the targets (exit 0 PASS, 3 MISS)"),
    "ui": (cmd_ui, "start the MLflow UI on 127.0.0.1 for the run's tracking store"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdlab", description="Knowledge distillation under a measured latency budget")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=name != "ui", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        if name == "ui":
            p.add_argument("--port", type=int, default=5000)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[args.command][0](args)
    except ConfigError as exc:
        print(f"kdlab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
