"""`kdlab gate --model DIR`: a trained model under the quantization ladder, measured as the gate measures the teacher.

    kdlab gate --config configs/sst2_minilm.yaml --model runs/sst2_minilm/student
    kdlab gate --config configs/sst2_minilm.yaml --model runs/sst2_minilm/student target.p95_ms=teacher*0.25

DIR is the student `accelerate launch train/distill.py` wrote, or any model trained for the config's task
(train/model_dir.py checks it). Every recipe of `quantization.recipes` is built from DIR, scored as that artefact
on the full dev set (tokenized by DIR's own tokenizer), timed interleaved on `target`, and checked against the
targets. A relative target (`teacher*0.5`) is that factor times the fp32 teacher's figure as the teacher's own
gate stored it (runs/<name>/report/gate.csv), timed under the same target profile. Without that figure the gate
refuses with one line (run `kdlab gate --config C` first): it never fine-tunes or times the teacher by surprise.

Writes runs/<name>/gate_models/<folder name>-<8 hex digits of its absolute path>/ (the teacher's report is never
touched): gate.csv, gate.md, gate_config.yaml and gate.json (the folder, a digest of its weights, the resolved
targets and the teacher's figures they came from), and one MLflow run `gate-model` with a child run per recipe.
Exit code 0 (PASS; the line names `kdlab export --config C --model DIR --recipe R`), 3 (MISS), 2 (bad input).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from accelerate.utils import set_seed

from kdlab.distill.config import Config, ConfigError, parse_budget
from kdlab.distill.task import task_of
from kdlab.search.gate_report import gate_references, gate_table, publish
from kdlab.search.targets import GateResult, GateRow, judge, target_gaps
from kdlab.search.timing import check_device, check_seq_len, complete_conditions, target_threads
from kdlab.train.model_dir import ModelDir, check_model_dir, load_network, prepare_model, weights_sha256

RECORD = "gate.json"
_PROFILE_KEYS = ("device", "threads", "batch_size", "seq_len")


def model_gate_dir(cfg: Config, model_dir: Path) -> Path:
    """Where the gate of `model_dir` reports: one folder per model folder, named so that people can read it."""
    resolved = Path(model_dir).resolve()
    return cfg.run_dir / "gate_models" / f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def _profile(values: dict) -> str:
    return (f"{values['device']}, {values['threads']} thread(s), batch {values['batch_size']}, "
            f"seq len {values['seq_len']}")


def teacher_reference(cfg: Config, threads: int) -> GateRow | None:
    """The fp32 teacher's figures as the teacher's gate stored them (None when no target is relative).

    A relative p95 target also needs that teacher timed under this very target profile (device, threads,
    batch, sequence length): a latency from another profile is not comparable.
    """
    relative = [k for k in ("p95_ms", "min_quality", "max_size_mb")
                if (parse_budget(getattr(cfg.target, k), k) or ("abs",))[0] == "teacher"]
    if not relative:
        return None
    table = cfg.run_dir / "report" / "gate.csv"
    where = cfg.config_path or "<config>"
    key = relative[0]
    spec = f"target.{key}: {str(getattr(cfg.target, key))!r} is relative to the fp32 teacher"
    fp32, _ = gate_references(cfg.run_dir)
    if fp32 is None:
        why = "does not exist" if not table.is_file() else "holds no measured fp32 row"
        raise ConfigError(f"{spec}, whose figures come from the teacher's gate, and {table} {why}; run kdlab gate "
                          f"--config {where} first (or give absolute targets)")
    here = {"device": cfg.target.device, "threads": threads, "batch_size": cfg.target.batch_size,
            "seq_len": cfg.target.seq_len}
    if "p95_ms" in relative and any(str(fp32.get(k)) != str(here[k]) for k in _PROFILE_KEYS):
        raise ConfigError(f"{spec}, which {table} timed on {_profile(fp32)}, not on this target ({_profile(here)}); "
                          f"run kdlab gate --config {where} with this target first")
    return GateRow("fp32", candidate=False, quality=float(fp32["quality"]), p95_ms=float(fp32["p95_ms"]),
                   size_mb=float(fp32["size_mb"]))


def run_model_gate(cfg: Config, model_dir: str, console=None) -> GateResult:
    """Measure the model in `model_dir` under every recipe on cfg.target; write its own report and MLflow runs."""
    check_device(cfg.target)
    model = check_model_dir(cfg, model_dir)
    threads = target_threads(cfg.target)
    reference = teacher_reference(cfg, threads)
    check_seq_len(cfg.target, model.config, f"{model.path}'s")
    set_seed(cfg.train.seed)
    prep = prepare_model(cfg, model)  # the labels are checked here, against the data
    digest = weights_sha256(model.path)
    net = load_network(cfg, model, prep.tokenizer)
    out = model_gate_dir(cfg, model.path)
    recipes = list(cfg.quantization.recipes)
    rows, conditions = task_of(cfg).measure(cfg, net, prep, threads, recipes, out / "artefacts")
    conditions = complete_conditions(conditions, cfg, threads)
    teacher_fig = None if reference is None else {
        "quality": reference.quality, "p95_ms": reference.p95_ms, "size_mb": reference.size_mb,
        "from": str(cfg.run_dir / "report" / "gate.csv")}
    conditions.update(model=str(model.path), model_dev=(model.summary or {}).get("best_dev"),
                      teacher_reference=teacher_fig)
    targets, passed, message = judge(rows, cfg, model=str(model_dir), reference=reference)
    result = GateResult(rows, targets, conditions, passed, target_gaps(rows, targets), message,
                        subject=f"model {model.path}")
    tags = {"kdlab.model": str(model.path.resolve())}
    if model.mlflow_run_id:
        tags["kdlab.distill_run_id"] = model.mlflow_run_id
    publish(cfg, result, None, console, out_dir=out, run_name="gate-model", tags=tags)
    record = {"model": str(model.path.resolve()), "weights_sha256": digest, "distill_run_id": model.mlflow_run_id,
              "targets": {k: getattr(targets, k) for k in ("p95_ms", "min_quality", "max_size_mb")},
              "target_spec": targets.spec, "teacher_reference": teacher_fig,
              "verdict": "PASS" if passed else "MISS", "recipe": passed.recipe if passed else None,
              "message": message}
    tmp = out / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / RECORD)  # written last: a gate.csv without it is a gate that did not finish
    return result


def model_gate_rows(cfg: Config, model: ModelDir) -> tuple[list[dict], Path]:
    """The measured rows of the model's own gate ([] when none finished for it) and its gate.csv.

    A gate of earlier weights (the folder was trained again since) is refused: its figures are not this model's.
    """
    out = model_gate_dir(cfg, model.path)
    record_path = out / RECORD
    if not record_path.is_file():
        return [], out / "gate.csv"
    record = json.loads(record_path.read_text())
    if record.get("weights_sha256") != weights_sha256(model.path):
        raise ConfigError(f"--model: {model.path} was trained again since kdlab gate --model measured it (its "
                          f"weights differ from those {record_path} names); run kdlab gate --config "
                          f"{cfg.config_path or '<config>'} --model {model.path} again")
    return gate_table(cfg.run_dir, out / "gate.csv"), out / "gate.csv"
