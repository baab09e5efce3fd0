"""Capacity plan: the serving configuration and replica count a model needs for a request rate under a p95 SLO.

Library module for `kdlab report --capacity`, `kdlab export` (the plan in the manifest, the card and
serve_config.yaml), `kdlab serve` and the serving benchmark. The plan works from latencies measured for one
replica on the target profile (its threads, batch sizes 1..max) and the serving figures that `kdlab loadtest`
measures: the serving overhead (time a request spends in the server beyond the model), the server's own CPU
per request (HTTP, proxy, routing, JSON, tokenizing: `stack_cpu_ms`) and, of that, the replica's own beyond the
model (`replica_ms`: receiving, parsing and answering the request in the replica's Python process, which takes
turns with the model's Python on one interpreter lock, so it lengthens the replica's service time instead of
overlapping it); and, when the replicas share one machine, the cores they share.

A configuration (batch b, r replicas, `threads` each) offered λ requests per second:

- each replica receives λ / r; a batch leaves when full or when the batch wait ends, so it holds
  b_eff = min(b, 1 + (λ / r) x wait) requests, and the first of them waited fill = min(wait, (b - 1) / (λ / r));
- capacity μ = min(r x b_eff / (p50(b_eff) + b_eff x replica_ms), cores / (stack_cpu_ms + threads x p50(b_eff) /
  b_eff)): the replicas' service time (the batch's model time and each of its requests' own work in the replica),
  or, on shared cores, the CPU every request costs (the second term only with `cores`);
- queueing at utilisation ρ = λ / μ: Kingman's approximation of the mean wait, ρ / (1 - ρ) x (1 + cs²) / 2
  x (1 / μ) for Poisson arrivals and service variation cs (the model's, from its p50 and p95), with an
  exponential tail: wait95 = mean wait / ρ x ln(ρ / 0.05) (zero while ρ <= 0.05);
- predicted p95 through the server = fill + p95(b_eff) + overhead + wait95;
- the sustained rate is the highest λ whose predicted p95 meets the SLO (what a load test measures).

For each measured batch size the plan takes the fewest replicas that keep utilisation at the target rate within
1 - headroom (the headroom, applied once) and the predicted p95 within the SLO; among the batch sizes that can
(b <= serving.max_batch_size), the one with the best throughput per replica, where a larger batch must beat the
best smaller one by serving.batching_gain, since it costs latency and a few per cent is timing noise. Batching
helps the model when that choice is a batch above 1.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import asdict, dataclass, field, replace

from kdlab.distill.config import ConfigError
from kdlab.distill.task import task_of
from kdlab.eval.latency import clamp_threads, measure
from kdlab.search.gate_report import gate_references
from kdlab.search.study import stored_study
from kdlab.search.timing import cycling, target_profile
from kdlab.train.teacher import teacher_folder

ASSUMPTIONS = ("replicas behind Ray Serve's proxy, each serving one batch at a time on its own threads, a batch "
               "taking the model's time plus the replica's own work for each of its requests (serving.replica_ms); "
               "Poisson arrivals; predicted p95 = wait to fill the batch + the model's p95 at that batch + the serving "
               "overhead + the p95 wait in the queue (Kingman's approximation with an exponential tail) at the "
               "planned utilisation; replicas = the fewest that keep utilisation within 1 - headroom and p95 within "
               "the SLO; with serving.cores, every request's CPU (model and serving stack) shares those cores")
P95_TAIL = 0.05  # the queueing tail the p95 leaves
MAX_REPLICAS_PLANNED = 10_000


def latency_cv(p50_ms: float, p95_ms: float) -> float:
    """The model's service-time variation from its p50 and p95 (a normal tail: p95 = p50 x (1 + 1.645 cv))."""
    return max(0.0, (p95_ms / p50_ms - 1.0) / 1.645) if p50_ms > 0 else 0.0


def interpolate(latency: dict[int, tuple[float, float]], batch: float) -> tuple[float, float]:
    """(p50, p95) ms at a batch of `batch` requests, linear between the measured batch sizes (nearest outside)."""
    sizes = sorted(latency)
    if batch <= sizes[0]:
        return latency[sizes[0]]
    if batch >= sizes[-1]:
        return latency[sizes[-1]]
    hi = next(b for b in sizes if b >= batch)
    lo = max(b for b in sizes if b <= batch)
    if hi == lo:
        return latency[lo]
    f = (batch - lo) / (hi - lo)
    return tuple(a + f * (c - a) for a, c in zip(latency[lo], latency[hi]))


def queue_wait_p95_ms(rate: float, capacity: float, cv: float) -> float:
    """p95 of the time a request waits for a server of `capacity` requests/s offered `rate` (Poisson arrivals):
    Kingman's mean wait with an exponential tail; inf at or above capacity."""
    if rate <= 0:
        return 0.0
    rho = rate / capacity
    if rho >= 1:
        return math.inf
    if rho <= P95_TAIL:
        return 0.0
    mean_wait_ms = rho / (1 - rho) * (1 + cv * cv) / 2 * (1e3 / capacity)
    return mean_wait_ms / rho * math.log(rho / P95_TAIL)


@dataclass(frozen=True)
class Serving:
    """One way of serving a model: what the serving model predicts from."""
    latency: dict  # batch -> (p50_ms, p95_ms) of the model itself on one replica
    batch_size: int
    replicas: int = 1
    threads: int = 1
    batch_wait_ms: float | None = None  # None: a batch waits until full
    overhead_ms: float = 0.0
    stack_cpu_ms: float = 0.0
    cores: float | None = None  # the cores all replicas share; None: each replica has its own
    wait_factor: float = 1.0  # multiplies the queueing wait (serving.wait_factor: fitted on one configuration)
    replica_ms: float = 0.0  # a request's own work in its replica beyond the model, serial with it (serving.replica_ms)

    def at(self, rate: float) -> dict:
        """The predicted figures when offered `rate` requests/s."""
        b = self.batch_size
        per_replica = rate / self.replicas
        if b == 1 or per_replica <= 0:
            b_eff, fill_ms = 1.0, 0.0
        else:
            fill_ms = (b - 1) / per_replica * 1e3
            if self.batch_wait_ms is not None:
                fill_ms = min(fill_ms, self.batch_wait_ms)
            b_eff = min(float(b), 1.0 + per_replica * fill_ms / 1e3)
        p50, p95 = interpolate(self.latency, b_eff)
        capacity = self.replicas * b_eff / ((p50 + b_eff * self.replica_ms) / 1e3)
        if self.cores:
            capacity = min(capacity, self.cores * 1e3 / (self.stack_cpu_ms + self.threads * p50 / b_eff))
        wait_ms = self.wait_factor * queue_wait_p95_ms(rate, capacity, latency_cv(p50, p95))
        return {"batch": b_eff, "fill_ms": fill_ms, "model_p50_ms": p50, "model_p95_ms": p95,
                "capacity_rps": capacity, "utilisation": rate / capacity, "queue_p95_ms": wait_ms,
                "p95_ms": fill_ms + p95 + self.overhead_ms + wait_ms}

    def sustained_rps(self, slo_ms: float) -> float:
        """The highest offered rate whose predicted p95 meets `slo_ms` (0 when none does): the rates below the
        first miss, on a fine geometric grid up to the capacity at full batches."""
        full = interpolate(self.latency, self.batch_size)[0]
        top = self.replicas * self.batch_size / (full / 1e3) * 1.5  # above the capacity: replica_ms only lowers it
        rate, best = 0.1, 0.0
        while rate < top:
            if self.at(rate)["p95_ms"] > slo_ms:
                break
            best, rate = rate, rate * 1.01
        return best


@dataclass
class BatchOption:
    """One batch size, evaluated for the target rate."""
    batch_size: int
    model_p50_ms: float
    model_p95_ms: float
    throughput: float  # requests per second per replica (full batches, one in flight, replica_ms included)
    replicas: int
    fill_wait_ms: float
    p95_ms: float  # predicted through the server at the target rate
    meets_slo: bool
    queue_p95_ms: float = 0.0  # the queueing part of p95_ms
    utilisation: float = 0.0  # at the target rate


@dataclass
class CapacityRow:
    label: str
    batch_size: int | None  # None: no measured batch meets the SLO
    p95_ms: float | None  # predicted p95 through the server at batch_size
    throughput: float | None  # requests per second per replica at batch_size
    instances: int | None  # replicas for target_rps, headroom applied once
    note: str = ""
    model_p95_ms: float | None = None
    fill_wait_ms: float | None = None
    batch_wait_timeout_s: float | None = None
    threads: int | None = None
    batching_helps: bool | None = None
    options: list = field(default_factory=list)  # a BatchOption (as a dict) per measured batch size
    serve: dict | None = None  # the Ray Serve settings this plan gives (serve_settings)


def batch_option(batch_size: int, latency: dict[int, tuple[float, float]], *, target_rps: float, headroom: float,
                 overhead_ms: float, p95_slo_ms: float, threads: int = 1, stack_cpu_ms: float = 0.0,
                 cores: float | None = None, wait_factor: float = 1.0, replica_ms: float = 0.0) -> BatchOption:
    """The fewest replicas at this batch that keep utilisation at target_rps within 1 - headroom and the
    predicted p95 within the SLO (the fewest within the headroom alone, marked missing the SLO, when none does)."""
    p50, p95 = latency[batch_size]
    throughput = batch_size / ((p50 + batch_size * replica_ms) / 1e3)
    first = max(1, math.ceil(target_rps / (throughput * (1 - headroom))))
    fewest = previous = None
    for replicas in range(first, MAX_REPLICAS_PLANNED + 1):
        got = Serving(latency, batch_size, replicas, threads, None, overhead_ms, stack_cpu_ms, cores,
                      wait_factor, replica_ms).at(target_rps)
        fewest = fewest or (replicas, got)
        if got["utilisation"] <= 1 - headroom and got["p95_ms"] <= p95_slo_ms:
            return BatchOption(batch_size, p50, p95, throughput, replicas, got["fill_ms"], got["p95_ms"], True,
                               got["queue_p95_ms"], got["utilisation"])
        if cores and got["utilisation"] > 1 - headroom:
            break  # the replicas share the cores: another one adds no CPU
        if previous is not None and got["p95_ms"] >= previous["p95_ms"] - 1e-9:
            break  # another replica no longer shortens the p95: the batch's own latency misses the SLO
        previous = got
    replicas, got = fewest
    return BatchOption(batch_size, p50, p95, throughput, replicas, got["fill_ms"], got["p95_ms"], False,
                       got["queue_p95_ms"], got["utilisation"])


def serve_settings(option: BatchOption, *, threads: int, headroom: float, overhead_ms: float,
                   p95_slo_ms: float) -> dict:
    """Ray Serve settings for a planned batch option (kdlab serve and serve_config.yaml take them).

    - max_ongoing_requests: twice what a replica completes within the SLO (at least one batch running and one
      filling): requests then wait in the replica's own queue, which it keeps working through, not in Ray Serve's
      router, whose retries while every replica is full cut throughput (measured here at 98 req/s offered to
      one replica of the SST-2 student: 7 ongoing answered 26 req/s and turned 1,220 requests away with 503; 22
      and 64 ongoing answered 96.7 req/s, none turned away);
    - max_queued_requests: what all replicas can still serve within the SLO; a request queued behind more
      would miss it anyway, so it is turned away at once (HTTP 503) instead;
    - autoscaling: 1 to the planned replicas, each aiming at the requests in flight (Little's law) of a replica
      loaded to its planned share, throughput x (1 - headroom) x time in the server.
    """
    b = option.batch_size
    in_server_s = (option.fill_wait_ms + option.model_p50_ms + overhead_ms) / 1e3
    target_ongoing = max(1.0, round(option.throughput * (1 - headroom) * in_server_s, 1))
    return {"num_replicas": option.replicas, "threads": threads, "max_batch_size": b,
            "batch_wait_timeout_s": round(option.fill_wait_ms / 1e3, 6),
            **queue_limits(b, option.throughput, option.replicas, p95_slo_ms),
            "autoscaling": {"min_replicas": 1, "max_replicas": option.replicas,
                            "target_ongoing_requests": target_ongoing}}


def queue_limits(batch_size: int, throughput: float, replicas: int, p95_slo_ms: float) -> dict:
    """Ray Serve's two queue bounds for replicas that complete `throughput` requests/s each at `batch_size`
    (serve_settings says why these)."""
    return {"max_ongoing_requests": max(2 * batch_size, math.ceil(2 * throughput * p95_slo_ms / 1e3)),
            "max_queued_requests": max(1, math.ceil(replicas * throughput * p95_slo_ms / 1e3))}


def plan_one(label: str, latency: dict[int, tuple[float, float]], *, target_rps: float, p95_slo_ms: float,
             max_batch_size: int, headroom: float, overhead_ms: float = 0.0, batching_gain: float = 0.1,
             threads: int = 1, stack_cpu_ms: float = 0.0, cores: float | None = None,
             wait_factor: float = 1.0, replica_ms: float = 0.0) -> CapacityRow:
    """`latency`: batch size -> (p50_ms, p95_ms) of the model itself on one replica."""
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    latency = {int(b): v for b, v in latency.items()}
    options = [batch_option(b, latency, target_rps=target_rps, headroom=headroom, overhead_ms=overhead_ms,
                            p95_slo_ms=p95_slo_ms, threads=threads, stack_cpu_ms=stack_cpu_ms, cores=cores,
                            wait_factor=wait_factor, replica_ms=replica_ms)
               for b in sorted(latency) if b <= max_batch_size]
    best = None
    for o in options:  # ascending batch: a larger one must beat the best so far by batching_gain
        if o.meets_slo and (best is None or o.throughput > best.throughput * (1 + batching_gain)):
            best = o
    table = [asdict(o) for o in options]
    if best is None:
        fastest = min(options, key=lambda o: o.p95_ms) if options else None
        note = (f"no batch meets p95 <= {p95_slo_ms:g} ms through the server (best: batch {fastest.batch_size}, "
                f"predicted {fastest.p95_ms:.2f} ms)" if fastest else "not measured")
        if fastest and cores and fastest.utilisation > 1 - headroom:
            note += f"; {cores:g} shared cores cannot serve {target_rps:g} requests/s"
        return CapacityRow(label, None, None, None, None, note, options=table)
    return CapacityRow(label, best.batch_size, best.p95_ms, best.throughput, best.replicas,
                       model_p95_ms=best.model_p95_ms, fill_wait_ms=best.fill_wait_ms,
                       batch_wait_timeout_s=best.fill_wait_ms / 1e3, threads=threads,
                       batching_helps=best.batch_size > 1, options=table,
                       serve=serve_settings(best, threads=threads, headroom=headroom, overhead_ms=overhead_ms,
                                            p95_slo_ms=p95_slo_ms))


def plan(latencies: dict[str, dict[int, tuple[float, float]]], *, target_rps: float, p95_slo_ms: float,
         max_batch_size: int, headroom: float, overhead_ms: float = 0.0, batching_gain: float = 0.1,
         threads: int = 1, stack_cpu_ms: float = 0.0, cores: float | None = None,
         wait_factor: float = 1.0, replica_ms: float = 0.0) -> list[CapacityRow]:
    return [plan_one(label, lat, target_rps=target_rps, p95_slo_ms=p95_slo_ms, max_batch_size=max_batch_size,
                     headroom=headroom, overhead_ms=overhead_ms, batching_gain=batching_gain, threads=threads,
                     stack_cpu_ms=stack_cpu_ms, cores=cores, wait_factor=wait_factor, replica_ms=replica_ms)
            for label, lat in latencies.items()]


def batching_line(row: CapacityRow) -> str:
    """Whether batching helps the model, in one sentence, from its batch options."""
    if row.batch_size is None:
        return f"{row.label}: {row.note}"
    one = next((o for o in row.options if o["batch_size"] == 1), None)
    if row.batching_helps:
        gain = f", {row.throughput / one['throughput']:.1f}x batch 1's" if one else ""
        return (f"{row.label}: batching helps: batch {row.batch_size} serves {row.throughput:.0f} requests/s per "
                f"replica{gain}")
    better = [o for o in row.options if o["batch_size"] > 1 and o["meets_slo"]]
    why = ("no larger batch meets the SLO at this rate" if not better else
           f"the best larger batch ({max(better, key=lambda o: o['throughput'])['batch_size']}) serves "
           f"{max(o['throughput'] for o in better):.0f}")
    return (f"{row.label}: batching does not help: batch 1 serves {row.throughput:.0f} requests/s per replica; "
            f"{why}")


def markdown(rows: list[CapacityRow], *, target_rps: float, p95_slo_ms: float, headroom: float,
             conditions: str, overhead_ms: float = 0.0) -> str:
    lines = [f"Capacity for {target_rps:g} requests/s at p95 <= {p95_slo_ms:g} ms through the server, "
             f"{headroom:.0%} headroom, serving overhead {overhead_ms:g} ms ({conditions}):", "",
             "| model | batch | fill wait ms | model p95 ms | predicted p95 ms | req/s per replica | replicas |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.batch_size is None:
            lines.append(f"| {r.label} | — | — | — | — | — | {r.note} |")
        else:
            lines.append(f"| {r.label} | {r.batch_size} | {r.fill_wait_ms:.1f} | {r.model_p95_ms:.2f} | "
                         f"{r.p95_ms:.2f} | {r.throughput:.0f} | {r.instances} |")
    lines += [""] + [f"- {batching_line(r)}" for r in rows]
    lines += ["", f"Assumes {ASSUMPTIONS}."]
    return "\n".join(lines)


# ---------------------------------------------------------------- measuring and the report stage


def measure_latencies(served: dict, cfg, threads: int, batch_sizes: list[int],
                      batches_of) -> tuple[dict[str, dict[int, object]], dict[int, dict]]:
    """Every model timed interleaved with the others at each batch size on the target profile.

    `batches_of(batch_size)` gives a task's request batches and their lengths (search/timing.py timing_batches
    for one forward pass; the seq2seq gate's generation_batches for one `generate`), the same for every model, or
    a dict label -> such a function where models tokenize differently.
    Returns (label -> {batch: LatencyReport}, batch -> the first model's timing batches' lengths).
    """
    per_model = batches_of if isinstance(batches_of, dict) else dict.fromkeys(served, batches_of)
    out: dict[str, dict[int, object]] = {label: {} for label in served}
    lengths_of: dict[int, dict] = {}
    for bs in sorted(set(batch_sizes)):
        made: dict = {}  # one call per distinct function: a shared one draws its batches once
        for fn in per_model.values():
            if id(fn) not in made:
                made[id(fn)] = fn(bs)
        own = {label: made[id(per_model[label])] for label in served}
        lengths = next(iter(own.values()))[1]
        profile = target_profile(replace(cfg.target, batch_size=bs), threads, lengths["seq_len_median"])
        reports = measure({label: cycling(s, own[label][0]) for label, s in served.items()}, profile)
        for label, r in reports.items():
            out[label][bs] = r
        lengths_of[bs] = lengths
    return out, lengths_of


def p50_p95(reports: dict[int, object]) -> dict[int, tuple[float, float]]:
    """{batch: LatencyReport} -> {batch: (p50_ms, p95_ms)}, what the plan takes."""
    return {b: (r.p50_ms, r.p95_ms) for b, r in reports.items()}


def plan_for(cfg, label: str, latency: dict[int, tuple[float, float]], threads: int) -> CapacityRow:
    """plan_one with the config's serving section (serving.target_rps and serving.p95_slo_ms must be set)."""
    sv = cfg.serving
    return plan_one(label, latency, target_rps=sv.target_rps, p95_slo_ms=sv.p95_slo_ms,
                    max_batch_size=sv.max_batch_size, headroom=sv.headroom, overhead_ms=sv.overhead_ms,
                    batching_gain=sv.batching_gain, threads=threads, stack_cpu_ms=sv.stack_cpu_ms, cores=sv.cores,
                    wait_factor=sv.wait_factor, replica_ms=sv.replica_ms)


def capacity_section(cfg, latency: dict[int, tuple[float, float]], threads: int, *, label: str, unit: str,
                     tokens_per_request: float | None = None) -> dict:
    """The capacity plan of one exported model (manifest, card, serve_config.yaml) from its measured
    {batch: (p50_ms, p95_ms)} per request, where a request is what the task serves in one call (`unit`:
    one forward pass for classification, one whole `generate` for seq2seq).

    With `tokens_per_request` (the mean generated tokens of a request) the plan also gives the tokens per
    second one instance generates at the planned batch: requests/s per instance x tokens per request.
    """
    sv = cfg.serving
    row = plan_for(cfg, label, latency, threads)
    out = {"target_rps": sv.target_rps, "p95_slo_ms": sv.p95_slo_ms, "headroom": sv.headroom,
           "overhead_ms": sv.overhead_ms, "stack_cpu_ms": sv.stack_cpu_ms, "cores": sv.cores,
           "wait_factor": sv.wait_factor, "replica_ms": sv.replica_ms,
           "batching_gain": sv.batching_gain, "unit": unit,
           "latency": {str(b): {"p50_ms": v[0], "p95_ms": v[1]} for b, v in latency.items()}, "plan": asdict(row),
           "batching": batching_line(row), "assumptions": ASSUMPTIONS}
    if tokens_per_request is not None:
        out["tokens_per_request"] = tokens_per_request
        out["tokens_per_s_per_instance"] = None if row.throughput is None else row.throughput * tokens_per_request
    return out


def capacity_card(cap: dict | None) -> list[str]:
    """The model card's Capacity section (its lines) from a manifest's capacity plan; [] without one."""
    if not cap or not cap.get("plan"):
        return []
    pl = cap["plan"]
    lines = ["", "## Capacity", ""]
    slo = f"For {cap['target_rps']:g} requests/s at p95 <= {cap['p95_slo_ms']:g} ms through the server"
    if pl["batch_size"] is None:
        lines.append(f"{slo}: {pl['note']}.")
    else:
        sv = pl.get("serve") or {}
        lines.append(f"{slo}: batch {pl['batch_size']} (wait to fill {pl['fill_wait_ms']:.1f} ms, model p95 "
                     f"{pl['model_p95_ms']:.2f} ms, serving overhead {cap['overhead_ms']:g} ms: predicted p95 "
                     f"{pl['p95_ms']:.2f} ms), {pl['throughput']:.0f} requests/s per replica on {pl['threads']} "
                     f"thread(s), **{pl['instances']} replica(s)** with {cap['headroom']:.0%} headroom; "
                     f"batch_wait_timeout_s {pl['batch_wait_timeout_s']:.4f}, max_ongoing_requests "
                     f"{sv.get('max_ongoing_requests')}, max_queued_requests {sv.get('max_queued_requests')}.")
        lines += ["", f"{cap['batching']}."]
        if cap.get("tokens_per_s_per_instance") is not None:
            lines += ["", f"A request is {cap['unit']}: {cap['tokens_per_request']:.1f} generated tokens on "
                          f"average, so one replica generates {cap['tokens_per_s_per_instance']:.0f} tokens/s at "
                          f"this batch."]
    lines += ["", f"Assumes {cap['assumptions']}."]
    return lines


def run_capacity(cfg, front_rows: list[dict], console=None) -> dict | None:
    """Measure the teacher (fp32 and its best gate recipe) and every front member at serving.batch_sizes, one
    request being what the task serves in one call (its `serving_latency`); plan."""
    sv = cfg.serving
    if sv.target_rps is None:
        raise ConfigError("serving.target_rps: not set; the capacity plan needs the request rate to plan for "
                          "(e.g. serving.target_rps=200)")
    slo = sv.p95_slo_ms  # config validation makes it explicit whenever target_rps is set
    say = console.print if console is not None else print
    threads, _ = clamp_threads(cfg.target.threads)
    models = {"teacher fp32": (teacher_folder(cfg), "fp32", None)}
    _, best = gate_references(cfg.run_dir)
    if best:
        models[f"teacher {best['recipe']}"] = (teacher_folder(cfg), best["recipe"], cfg.run_dir / "capacity" / "teacher")
    for r in front_rows:
        if r.get("checkpoint"):
            models[f"trial {r['trial']} ({r['recipe']})"] = (Path(r["checkpoint"]), r["recipe"],
                                                            cfg.run_dir / "capacity" / f"trial-{r['trial']}")
    say(f"capacity: timing {len(models)} model(s) at batch {', '.join(map(str, sv.batch_sizes))} "
        f"({cfg.target.device}, {threads} thread(s))")
    task = task_of(cfg)
    latencies = task.serving_latency(cfg, models, threads, sv.batch_sizes)
    rows = [plan_for(cfg, label, lat, threads) for label, lat in latencies.items()]
    conditions = f"{cfg.target.device}, {threads} thread(s), sequence length {cfg.target.seq_len}"
    result = {"target_rps": sv.target_rps, "p95_slo_ms": slo, "headroom": sv.headroom,
              "overhead_ms": sv.overhead_ms, "stack_cpu_ms": sv.stack_cpu_ms, "cores": sv.cores,
              "wait_factor": sv.wait_factor, "replica_ms": sv.replica_ms, "batching_gain": sv.batching_gain,
              "max_batch_size": sv.max_batch_size, "unit": task.capacity_unit(cfg), "conditions": conditions, "assumptions": ASSUMPTIONS,
              "latency": {k: {str(b): {"p50_ms": v[0], "p95_ms": v[1]} for b, v in lat.items()}
                          for k, lat in latencies.items()},
              "rows": [asdict(r) for r in rows]}
    out = cfg.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(result, indent=2))
    (out / "capacity.md").write_text(markdown(rows, target_rps=sv.target_rps, p95_slo_ms=slo, headroom=sv.headroom,
                                              conditions=conditions, overhead_ms=sv.overhead_ms) + "\n")
    return result


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


# ---------------------------------------------------------------- the plan against load tests (kdlab loadtest)


def predicted_for(loadtest: dict) -> dict | None:
    """The serving model's figures for the configuration one load test ran (its server's batching, batch wait,
    threads and replicas, at its offered rate, with the plan's overhead, stack CPU and cores), beside what the
    test measured. None when the test names no model latency table."""
    server, table = loadtest.get("server") or {}, loadtest.get("model_latency") or {}
    if not table or not server.get("max_batch_size"):
        return None
    plan = loadtest.get("plan") or {}
    serving = Serving({int(b): (v["p50_ms"], v["p95_ms"]) for b, v in table.items()}, server["max_batch_size"],
                      max(1, server.get("replicas") or 1), server.get("threads") or 1,
                      server.get("batch_wait_timeout_s", 0.0) * 1e3, plan.get("overhead_ms") or 0.0,
                      plan.get("stack_cpu_ms") or 0.0, plan.get("cores"), plan.get("wait_factor") or 1.0,
                      plan.get("replica_ms") or 0.0)
    rate = loadtest["offered_rps"]
    got = serving.at(rate)
    return {"model": loadtest.get("model", {}).get("name") if loadtest.get("model") else None,
            "batch": serving.batch_size, "replicas": serving.replicas, "threads": server.get("threads"),
            "offered_rps": rate, "predicted_capacity_rps": got["capacity_rps"], "achieved_rps": loadtest["achieved_rps"],
            "predicted_p95_ms": got["p95_ms"], "measured_p95_ms": loadtest["p95_ms"],
            "overhead_ms": serving.overhead_ms, "measured_overhead_ms": loadtest.get("overhead_ms"),
            "failures": loadtest["failures"], "slo_ms": plan.get("p95_slo_ms"),
            "predicted_sustained_rps": serving.sustained_rps(plan["p95_slo_ms"]) if plan.get("p95_slo_ms") else None}


def comparison_markdown(report_dir) -> str | None:
    """Predicted and measured side by side for every report/loadtest*.json (None when there is none)."""
    rows = []
    for path in sorted(Path(report_dir).glob("loadtest*.json")):
        row = predicted_for(json.loads(path.read_text()))
        if row:
            rows.append((path.name, row))
    if not rows:
        return None

    def f(v, fmt="{:.1f}"):
        return "—" if v is None else fmt.format(v)
    lines = ["The plan against the server (kdlab loadtest; predicted with the plan's serving overhead):", "",
             "| load test | model | batch | replicas | offered req/s | achieved req/s | predicted capacity req/s | "
             "predicted p95 ms | measured p95 ms | failures |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['model'] or '—'} | {r['batch']} | {r['replicas']} | {r['offered_rps']:g} | "
                     f"{f(r['achieved_rps'])} | {f(r['predicted_capacity_rps'], '{:.0f}')} | "
                     f"{f(r['predicted_p95_ms'], '{:.2f}')} | {f(r['measured_p95_ms'], '{:.2f}')} | {r['failures']} |")
    lines += ["", "Predicted p95 = wait to fill the batch at the offered rate (at most batch_wait_timeout_s) + the "
                  "model's p95 at the batch that fills + the serving overhead + the p95 wait in the queue at that "
                  "utilisation (infinite at or above the predicted capacity)."]
    return "\n".join(lines)
