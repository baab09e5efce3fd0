"""Capacity plan: how many serving instances each candidate needs for a request rate under a p95 SLO.

Library module for `kdlab report --capacity` and `kdlab export`. The plan is arithmetic on measured
latencies (one instance, the target profile, batch sizes 1..max):

- the batch an instance serves at is the largest measured batch whose p95 meets the SLO;
- an instance's throughput there is batch / p50 (requests per second, one batch in flight);
- instances = ceil(target_rps / (throughput x (1 - headroom))), at least 1.

It assumes independent instances behind a load balancer, each serving one batch at a time, with
requests batched up to the chosen batch within the SLO (a batch waits for at most one batch
time to fill, which the SLO has to absorb as well), and it ignores network and queueing delay.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from transformers import AutoModelForSequenceClassification

from kdlab.distill.config import ConfigError
from kdlab.distill.quantize import apply_recipe
from kdlab.eval.latency import clamp_threads, measure
from kdlab.search.gate_report import gate_references
from kdlab.search.study import stored_study
from kdlab.search.timing import cycling, target_profile, timing_batches
from kdlab.train.data import make_loader
from kdlab.train.pipeline import prepare
from kdlab.train.teacher import teacher_folder

ASSUMPTIONS = ("independent instances behind a load balancer, each serving one batch at a time; requests are "
               "batched up to the chosen batch within the SLO; throughput = batch / p50; instances = ceil(target "
               "rate / (throughput x (1 - headroom))); network and queueing delay are not included")


@dataclass
class CapacityRow:
    label: str
    batch_size: int | None  # None: no measured batch meets the SLO
    p95_ms: float | None
    throughput: float | None  # requests per second per instance at batch_size
    instances: int | None
    note: str = ""


def plan_one(label: str, latency: dict[int, tuple[float, float]], *, target_rps: float, p95_slo_ms: float,
             max_batch_size: int, headroom: float) -> CapacityRow:
    """`latency`: batch size -> (p50_ms, p95_ms) measured for one instance."""
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    fits = [b for b, (_, p95) in latency.items() if b <= max_batch_size and p95 <= p95_slo_ms]
    if not fits:
        fastest = min(latency.items(), key=lambda kv: kv[1][1]) if latency else None
        note = (f"no batch meets p95 <= {p95_slo_ms:g} ms (batch {fastest[0]}: {fastest[1][1]:.2f} ms)"
                if fastest else "not measured")
        return CapacityRow(label, None, None, None, None, note)
    batch = max(fits)
    p50, p95 = latency[batch]
    throughput = batch / (p50 / 1e3)
    instances = max(1, math.ceil(target_rps / (throughput * (1 - headroom))))
    return CapacityRow(label, batch, p95, throughput, instances)


def plan(latencies: dict[str, dict[int, tuple[float, float]]], *, target_rps: float, p95_slo_ms: float,
         max_batch_size: int, headroom: float) -> list[CapacityRow]:
    return [plan_one(label, lat, target_rps=target_rps, p95_slo_ms=p95_slo_ms, max_batch_size=max_batch_size,
                     headroom=headroom) for label, lat in latencies.items()]


def markdown(rows: list[CapacityRow], *, target_rps: float, p95_slo_ms: float, headroom: float,
             conditions: str) -> str:
    lines = [f"Capacity for {target_rps:g} requests/s at p95 <= {p95_slo_ms:g} ms, {headroom:.0%} headroom "
             f"({conditions}):", "", "| model | batch | p95 ms | req/s per instance | instances |", "|---|---|---|---|---|"]
    for r in rows:
        if r.batch_size is None:
            lines.append(f"| {r.label} | — | — | — | {r.note} |")
        else:
            lines.append(f"| {r.label} | {r.batch_size} | {r.p95_ms:.2f} | {r.throughput:.0f} | {r.instances} |")
    lines += ["", f"Assumes {ASSUMPTIONS}."]
    return "\n".join(lines)


# ---------------------------------------------------------------- measuring and the report stage


def measure_latencies(served: dict, cfg, eval_ds, tokenizer, vocab_size: int, threads: int,
                      batch_sizes: list[int]) -> tuple[dict[str, dict[int, object]], dict[int, dict]]:
    """Every model timed interleaved with the others at each batch size on the target profile.

    Returns (label -> {batch: LatencyReport}, batch -> the timing batches' lengths).
    """
    out: dict[str, dict[int, object]] = {label: {} for label in served}
    lengths_of: dict[int, dict] = {}
    for bs in sorted(set(batch_sizes)):
        batches, lengths = timing_batches(eval_ds, tokenizer, bs, cfg.target.seq_len, vocab_size=vocab_size,
                                          seed=cfg.train.seed)
        profile = target_profile(replace(cfg.target, batch_size=bs), threads, lengths["seq_len_median"])
        reports = measure({label: cycling(s, batches) for label, s in served.items()}, profile)
        for label, r in reports.items():
            out[label][bs] = r
        lengths_of[bs] = lengths
    return out, lengths_of


def p50_p95(reports: dict[int, object]) -> dict[int, tuple[float, float]]:
    """{batch: LatencyReport} -> {batch: (p50_ms, p95_ms)}, what the plan takes."""
    return {b: (r.p50_ms, r.p95_ms) for b, r in reports.items()}


def slo_ms(cfg, resolved_p95: float | None) -> float | None:
    return cfg.serving.p95_slo_ms or resolved_p95


def run_capacity(cfg, front_rows: list[dict], targets: dict, console=None) -> dict | None:
    """Measure the teacher (fp32 and its best gate recipe) and every front member at serving.batch_sizes; plan."""
    sv = cfg.serving
    if sv.target_rps is None:
        raise ConfigError("serving.target_rps: not set; the capacity plan needs the request rate to plan for "
                          "(e.g. serving.target_rps=200)")
    slo = slo_ms(cfg, targets.get("p95_ms"))
    if slo is None:
        raise ConfigError("serving.p95_slo_ms: not set and the config has no target.p95_ms to fall back on")
    say = console.print if console is not None else print
    threads, _ = clamp_threads(cfg.target.threads)
    prep = prepare(cfg)  # measuring needs no Accelerator (train/accel.py)
    example = next(iter(make_loader(prep.eval_ds, prep.tokenizer, 8, shuffle=False)))
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_folder(cfg), use_safetensors=True).eval()
    served = {"teacher fp32": apply_recipe("fp32", teacher, example_batch=example, threads=threads)}
    _, best = gate_references(cfg.run_dir)
    if best:
        served[f"teacher {best['recipe']}"] = apply_recipe(best["recipe"], teacher, example_batch=example,
                                                           threads=threads, workdir=cfg.run_dir / "capacity" / "teacher")
    for r in front_rows:
        if not r.get("checkpoint"):
            continue
        model = AutoModelForSequenceClassification.from_pretrained(r["checkpoint"], use_safetensors=True).eval()
        served[f"trial {r['trial']} ({r['recipe']})"] = apply_recipe(
            r["recipe"], model, example_batch=example, threads=threads,
            workdir=cfg.run_dir / "capacity" / f"trial-{r['trial']}")
    say(f"capacity: timing {len(served)} model(s) at batch {', '.join(map(str, sv.batch_sizes))} "
        f"({cfg.target.device}, {threads} thread(s))")
    reports, _ = measure_latencies(served, cfg, prep.eval_ds, prep.tokenizer, teacher.config.vocab_size, threads,
                                   sv.batch_sizes)
    latencies = {label: p50_p95(r) for label, r in reports.items()}
    rows = plan(latencies, target_rps=sv.target_rps, p95_slo_ms=slo, max_batch_size=sv.max_batch_size,
                headroom=sv.headroom)
    conditions = f"{cfg.target.device}, {threads} thread(s), sequence length {cfg.target.seq_len}"
    result = {"target_rps": sv.target_rps, "p95_slo_ms": slo, "headroom": sv.headroom,
              "max_batch_size": sv.max_batch_size, "conditions": conditions, "assumptions": ASSUMPTIONS,
              "latency": {k: {str(b): {"p50_ms": v[0], "p95_ms": v[1]} for b, v in lat.items()}
                          for k, lat in latencies.items()},
              "rows": [r.__dict__ for r in rows]}
    out = cfg.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(result, indent=2))
    (out / "capacity.md").write_text(markdown(rows, target_rps=sv.target_rps, p95_slo_ms=slo, headroom=sv.headroom,
                                              conditions=conditions) + "\n")
    return result


def rows_of(result: dict) -> list[CapacityRow]:
    return [CapacityRow(**r) for r in result["rows"]]


def log_capacity(cfg) -> None:
    """Put report/capacity.md and .json on the study's MLflow parent run (when tracking is on)."""
    if not cfg.tracking.enabled:
        return
    import mlflow  # only with tracking on: train/tracking.py says why mlflow loads lazily
    study = stored_study(cfg)
    run_id = study.user_attrs.get("mlflow_parent_run_id") if study is not None else None
    if not run_id:
        return
    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = mlflow.MlflowClient()
    for f in ("capacity.md", "capacity.json"):
        client.log_artifact(run_id, str(cfg.run_dir / "report" / f))
