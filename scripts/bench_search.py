"""Benchmark: the student search on SST-2 under configs/sst2_minilm.yaml's targets.

    make bench-search                       # or: .venv/bin/python scripts/bench_search.py
    .venv/bin/python scripts/bench_search.py --quick   # 1-2 min smoke: un-fine-tuned MiniLM, 200 rows, 3 short
                                                       # trials, written to a temp folder; not for claims

Runs (or resumes) the study of the config and reports, with the conditions they were measured under:
1. the front (quality of the served artefact on the full dev set, p50/p95, size, training time) against
   the fp32 teacher and its best quantized form from the gate (runs/<name>/report/gate.csv, if run);
2. what measuring first saved: trials screened out untrained, and the training time they would have
   cost at the mean of the trained ones;
3. whether latency is a property of the architecture: untrained vs trained p95 of each trained trial.

`--compare` (issue 15): the search as it was (`current`: every draw built and timed, no latency model; every
student trained to the end, no early stop) and as it is (`new`) side by side, each for the same wall-clock budget
(--minutes, default 20) and sampler seeds (--seeds, default 1 2), from the same teacher and the gate's budget
(the main run's teacher and gate.csv, linked into each run's folder). One folder and one result file per run under
runs/<name>/compare/, so an interrupted comparison resumes at the run it stopped in. Adds `comparison` to
search_sst2.json: per run its front's hypervolume (quality above the floor x ms under the p95 budget, from each
trial's own measured p95), trials trained, stopped early and screened, trained students that missed the p95
budget, minutes to the quality of --reach (0.8681, the best of the first committed search) and the best student.
About 80 minutes on 2 cores; nothing else should run beside it (wall-clock budgets).

Needs runs/sst2_minilm/teacher/ fine-tuned for the config (`--allow-train` lets this script do it).
Writes benchmarks/results/search_sst2.json and the section between `<!-- search:start -->` and
`<!-- search:end -->` of benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import optuna  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from kdlab.scripts.bench_readme import publish, write_result  # noqa: E402
from kdlab.distill.config import ConfigError, load_config  # noqa: E402
from kdlab.eval.latency import machine_info, versions  # noqa: E402
from kdlab.search.gate import run_gate  # noqa: E402
from kdlab.search.study import gate_reference, meta_of, open_storage, run_search  # noqa: E402
from kdlab.search.study_report import targets_text  # noqa: E402
from kdlab.train.pipeline import prepare  # noqa: E402
from kdlab.train.teacher import require_fine_tuned  # noqa: E402

# The search trains logit-only KD so the teacher's logits are computed once and cached (1.46x per step,
# benchmarks/results/distill_sst2.json); hidden-state KD moved (a) by one dev sentence there.
CONFIG = "configs/sst2_minilm.yaml"
FULL = ["distill.hidden_weight=0"]
QUICK = ["teacher.fine_tune=never", "data.max_train_samples=200", "data.max_eval_samples=200",
         "target.warmup_iters=2", "target.min_iters=10", "target.min_seconds=0.3", "target.repeats=2",
         "search.num_layers=[1,2]", "search.hidden_size=[192,384]", "search.num_heads=[6,12]",
         "search.intermediate_size=null", "search.recipes=[fp32,dynamic-int8]", "search.learning_rate=null",
         "search.train_steps=5", "search.seed_trials=2"]


def _f(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def analyse(rows: list[dict]) -> dict:
    trained = [r for r in rows if r["state"] == "COMPLETE" and not r["screened_out"]]
    screened = [r for r in rows if r["screened_out"]]
    mean_train_s = statistics.mean(r["train_seconds"] for r in trained) if trained else None
    drift = [abs(r["p95_ms"] - r["pre_p95_ms"]) / r["p95_ms"] for r in trained if r.get("pre_p95_ms")]
    return {"trials": len(rows), "trained": len(trained), "screened_out": len(screened),
            "failed": sum(r["state"] == "FAIL" for r in rows), "feasible": sum(r["feasible"] for r in rows),
            "train_seconds_total": sum(r["train_seconds"] or 0 for r in trained),
            "train_seconds_saved_estimate": None if mean_train_s is None else mean_train_s * len(screened),
            "pre_vs_post_p95_rel_diff_median": statistics.median(drift) if drift else None,
            "pre_vs_post_p95_rel_diff_max": max(drift) if drift else None}


# The search before issue 15, as far as config keys reach back: no latency model (every draw is built and timed)
# and no early stopping (every student trains to the end). The budget taken from the gate and the interval
# verdicts have no switch; both searches get them.
COMPARED = {"current": ["search.latency_samples=0", "search.stop_at=[]", "search.recipe_fallback=false"], "new": []}


def hypervolume(points: list[tuple[float, float]], floor: float, budget: float) -> float:
    """The area that (quality, p95 ms) points dominate above the quality floor and under the p95 budget (exact in
    2-D): sweep by p95, each strip as wide as the gap to the next point and as high as the best quality so far."""
    inside = sorted((p95, q) for q, p95 in points if q > floor and p95 < budget)
    area, best = 0.0, floor
    for i, (p95, q) in enumerate(inside):
        best = max(best, q)
        area += ((inside[i + 1][0] if i + 1 < len(inside) else budget) - p95) * (best - floor)
    return area


def comparison_row(search: str, seed: int, rows: list[dict], finished: dict[int, float], targets: dict,
                   wall_seconds: float, reach: float) -> dict:
    """One compared run: `finished` maps trial number -> seconds from the run's start to that trial's end."""
    floor, budget = targets["min_quality"], targets["p95_ms"]
    # A stopped student is a PRUNED trial with `stopped_early` set (search/objective.py): trained, then stopped
    stopped = [r for r in rows if r.get("stopped_early") and not r["screened_out"]]
    completed = [r for r in rows if r["state"] == "COMPLETE" and not r["screened_out"] and r.get("quality") is not None
                 and not r.get("stopped_early")]
    trained = completed + stopped
    feasible = [r for r in completed if r["feasible"]]
    reached = [finished[r["trial"]] for r in feasible if r["quality"] >= reach and r["trial"] in finished]
    best = max(feasible, key=lambda r: r["quality"], default=None)
    return {"search": search, "seed": seed, "wall_seconds": round(wall_seconds, 1), "budget_p95_ms": budget,
            "hypervolume": hypervolume([(r["quality"], r["p95_ms"]) for r in feasible], floor, budget),
            "trained": len(trained), "stopped_early": len(stopped),
            "screened": sum(bool(r["screened_out"]) for r in rows),
            "missed_p95_after_training": sum(r["p95_ms"] is not None and r["p95_ms"] > budget for r in completed),
            # trained students whose served artefact disagreed with their own weights: infeasible, or re-served
            # under another recipe (search.recipe_fallback)
            "missed_agreement": sum("agreement" in (r.get("violates") or "").split() for r in completed),
            "re_served": sum(bool(r.get("drawn_recipe")) and r.get("drawn_recipe") != r.get("recipe")
                             for r in completed),
            "minutes_to_0_8681": round(min(reached) / 60, 1) if reached else None,
            "best": None if best is None else {"trial": best["trial"], "quality": best["quality"],
                                               "p95_ms": best["p95_ms"], "recipe": best["recipe"],
                                               "num_layers": best.get("num_layers"),
                                               "hidden_size": best.get("hidden_size")}}


def compare_markdown(rows: list[dict], minutes: float) -> str:
    budgets = {r.get("budget_p95_ms") for r in rows}
    lines = [f"Current against new search, {minutes:g} minutes of wall clock each, same teacher, "
             + ("same p95 budget" if len(budgets) == 1 else "**p95 budgets that differ between runs** (each run "
                "measured its own fp32 teacher instead of taking the gate's figure)")
             + " (`make bench-search ARGS=--compare`):", "",
             "| search | seed | p95 budget ms | hypervolume | trained | stopped early | screened | "
             "missed p95 after training | missed agreement / re-served | minutes to 0.8681 | best |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["best"]
        lines.append(f"| {r['search']} | {r['seed']} | {_f(r.get('budget_p95_ms'), '{:.2f}')} | {r['hypervolume']:.4f} | "
                     f"{r['trained']} | {r['stopped_early']} | "
                     f"{r['screened']} | {r['missed_p95_after_training']} | {r.get('missed_agreement', '-')} / "
                     f"{r.get('re_served', '-')} | {_f(r['minutes_to_0_8681'], '{:.1f}')} | "
                     + (f"{b['num_layers']}L x {b['hidden_size']} {b['recipe']}: {b['quality']:.4f}, p95 "
                        f"{b['p95_ms']:.2f} ms |" if b else "none feasible |"))
    means = {s: statistics.mean(r["hypervolume"] for r in rows if r["search"] == s) for s in COMPARED
             if any(r["search"] == s for r in rows)}
    if len(means) == 2:
        ratio = (f"ratio {means['new'] / means['current']:.2f}x" if means["current"] > 0
                 else "no ratio: the current search found no feasible student" if means["new"] > 0
                 else "no ratio: neither search found a feasible student")
        lines += ["", f"Mean hypervolume: new {means['new']:.4f}, current {means['current']:.4f}, {ratio}."]
    return "\n".join(lines)


def compare(args, overrides: list[str]) -> int:
    """Both searches for each seed, one resumable run each (see the module docstring); the JSON and README gain
    the comparison."""
    base = load_config(args.config, [*overrides, *args.overrides])
    teacher, gate_csv = base.run_dir / "teacher", base.run_dir / "report" / "gate.csv"
    for need, how in ((teacher, "make bench-search (or --allow-train)"), (gate_csv, f"kdlab gate --config {args.config}")):
        if not need.exists() and not args.quick:  # --quick: the un-fine-tuned teacher, a budget measured per run
            raise ConfigError(f"--compare: {need} is missing; run {how} first")
    if not args.quick:  # a teacher fine-tuned for other settings would be fine-tuned again, through the links below
        require_fine_tuned(base, prepare(base, Accelerator(cpu=True)).data, args.config)
    root = base.run_dir / "compare"
    rows, started = [], time.time()
    for search, extra in COMPARED.items():
        for seed in args.seeds:
            done = root / f"{search}-s{seed}.json"
            if done.is_file():
                rows.append(json.loads(done.read_text()))
                continue
            out_dir = root / f"{search}-s{seed}"
            cfg = load_config(args.config, [*overrides, *extra, f"output_dir={out_dir}", f"search.seed={seed}",
                                            "search.n_trials=1000", f"search.timeout_s={args.minutes * 60}",
                                            f"tracking.experiment={base.name}-compare", *args.overrides])
            (cfg.run_dir / "report").mkdir(parents=True, exist_ok=True)
            if teacher.exists() and not (cfg.run_dir / "teacher").exists():
                (cfg.run_dir / "teacher").symlink_to(teacher.resolve(), target_is_directory=True)
            if gate_csv.exists():  # the gate's figure is the study's only with the config it ran under beside it
                for name in ("gate.csv", "gate_config.yaml"):
                    # copy2 keeps the modification time, which is when the gate measured the figure
                    shutil.copy2(gate_csv.parent / name, cfg.run_dir / "report" / name)
                if gate_reference(cfg) is None:  # else each run would measure its own budget
                    raise ConfigError(f"--compare: the gate's figure in {gate_csv} is not for this config's teacher, data "
                                      f"and target profile; run kdlab gate --config {args.config} again")
            print(f"bench_search: compare: {search} search, seed {seed}, {args.minutes:g} minutes", flush=True)
            t0 = time.time()
            result = run_search(cfg, Accelerator(cpu=True), timeout_s=args.minutes * 60)
            wall = time.time() - t0
            study = optuna.load_study(study_name=result.study_name, storage=open_storage(cfg, create=False))
            finished = {t.number: t.datetime_complete.timestamp() - t0 for t in study.get_trials(deepcopy=False)
                        if t.datetime_complete is not None}
            row = comparison_row(search, seed, result.rows, finished, meta_of(cfg, study)["targets"], wall, args.reach)
            write_result(done, row)  # atomic: an interrupted run leaves no half a file to resume from
            rows.append(row)
    scratch = base.run_dir if args.quick else None  # --quick writes beside its runs, never the committed files
    out = Path(args.out or (scratch / "search_sst2.json" if scratch else "benchmarks/results/search_sst2.json"))
    result = json.loads(out.read_text()) if out.is_file() else {"benchmark": "search_sst2"}
    result.update(comparison=rows, comparison_minutes=args.minutes, comparison_date=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  comparison_machine=machine_info(), comparison_versions=versions(),
                  seconds=round(time.time() - started, 1))
    publish(result, compare_markdown(rows, args.minutes), marker="search-compare",
            heading="Current against new search on SST-2 (`make bench-search ARGS=--compare`)", out=out,
            readme=Path(args.readme or (scratch / "README.md" if scratch else "benchmarks/README.md")),
            script="bench_search")
    return 0


def markdown(result: dict) -> str:
    c, a = result["conditions"], result["analysis"]
    lines = [f"Study `{result['study']}` ({result['sampler']} sampler), teacher `{c['teacher']}`, {c['dev_rows']} dev "
             f"rows, {c['device']}, {c['threads']} thread(s), batch {c['batch_size']}, seq len {c['seq_len']}; "
             f"{result['machine']['cpu']}, torch {result['versions']['torch']}, optuna {result['versions']['optuna']}. "
             f"Targets: {result['targets']}. {a['trials']} trials in {result['seconds']:.0f} s: "
             f"{a['trained']} trained, "
             f"{a['screened_out']} screened out untrained, {a['failed']} failed. Regenerate: `make bench-search`"
             + ("" if result.get("config", CONFIG) == CONFIG else f" `ARGS=\"--config {result['config']}\"`") + "."
             + (" **Quick smoke run: not for claims.**" if result["quick"] else ""), "",
             "| trial | student | recipe | quality | p50 ms | p95 ms | size MB | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["front_rows"]:
        student = r.get("label") or (f"{r['num_layers']}L x {r['hidden_size']} ({r['num_heads']} heads, ffn "
                                     f"{r['intermediate_size']}, {r['init']})")
        lines.append(f"| {r['trial']} | {student.removesuffix(', ' + r['recipe'])} | {r['recipe']} | {r['quality']:.4f} | "
                     f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['size_mb']:.1f} | {r['train_seconds']:.0f} |")
    for ref in result["references"]:
        lines.append(f"| — | {ref['label']} | | {ref['quality']:.4f} | | {ref['p95_ms']:.2f} | | |")
    if not result["front_rows"]:
        lines.append(f"| — | {result['message']} | | | | | | |")
    lines += ["", f"Screening saved an estimated {_f(a['train_seconds_saved_estimate'], '{:.0f}')} s of training "
              f"({a['screened_out']} candidate(s) x the mean training time of the trained ones). Untrained vs trained "
              f"p95 of the same architecture: median relative difference "
              f"{_f(a['pre_vs_post_p95_rel_diff_median'], '{:.1%}')}, "
              f"max {_f(a['pre_vs_post_p95_rel_diff_max'], '{:.1%}')}."]
    b = result.get("best")
    if b:
        lines += ["", f"Best feasible student: trial {b['trial']}, {b['params'].get('num_layers')}L x "
                      f"{b['params'].get('hidden_size')} {b['recipe']}, quality {b['quality']:.4f} "
                      f"({_f(b['retention'], '{:.1%}')} of the teacher's {_f(result['teacher']['quality'], '{:.4f}')}), "
                      f"p95 {b['p95_ms']:.2f} ms, {_f(b['speedup'], '{:.1f}')}x faster than the fp32 teacher's "
                      f"{_f(result['teacher']['p95_ms'], '{:.2f}')} ms."]
    if result.get("gate"):
        lines += ["", f"Gate first (as `kdlab run` does): {result['gate']['message']}"]
    if result.get("picture"):
        lines += ["", f"![Pareto front of the search]({result['picture']})"]
    return "\n".join(lines)



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--quick", action="store_true", help="1-2 min smoke in a temp folder; not for claims")
    parser.add_argument("--n-trials", type=int, default=None, help="default search.n_trials (quick: 3)")
    parser.add_argument("--allow-train", action="store_true", help="fine-tune the teacher if it is not there yet")
    parser.add_argument("--out", default=None, help="default benchmarks/results/search_sst2.json (quick: temp)")
    parser.add_argument("--readme", default=None, help="default benchmarks/README.md (quick: temp)")
    parser.add_argument("--timeout", type=float, default=3300.0,
                        help="stop starting trials after this many seconds of search (default 3300: the issue's hour, "
                             "less the gate)")
    parser.add_argument("--no-gate", action="store_true", help="skip the gate (its references then come from an "
                                                                  "earlier gate.csv, or the search's own fp32 teacher)")
    parser.add_argument("--compare", action="store_true", help="the current and the new search side by side "
                                                                   "(module docstring)")
    parser.add_argument("--minutes", type=float, default=20.0, help="--compare: wall clock per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="--compare: sampler seeds")
    parser.add_argument("--reach", type=float, default=0.8681, help="--compare: the quality whose time is reported")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    transformers.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quick_dir = Path(tempfile.mkdtemp(prefix="kdlab-bench-search-")) if args.quick else None
    overrides = ([*QUICK, f"output_dir={quick_dir}", f"tracking.uri=sqlite:///{quick_dir}/mlflow.db"]
                 if args.quick else list(FULL))
    started = time.time()
    if args.compare:
        try:
            return compare(args, overrides)
        except ConfigError as exc:
            print(f"bench_search: error: {exc}", file=sys.stderr)
            return 2
    try:
        cfg = load_config(args.config, [*overrides, *args.overrides])
        accelerator = Accelerator(cpu=True)
        if not args.quick and not args.allow_train:
            require_fine_tuned(cfg, prepare(cfg, accelerator).data, args.config)
        gate = None
        if not args.quick and not args.no_gate:  # what `kdlab run` does first: the search only runs on a MISS
            gate = run_gate(cfg, accelerator)
            print(f"bench_search: gate: {gate.message}")
        gate_seconds = time.time() - started
        result = run_search(cfg, accelerator, n_trials=args.n_trials or (3 if args.quick else None),
                            timeout_s=None if args.quick else args.timeout)
    except ConfigError as exc:
        print(f"bench_search: error: {exc}", file=sys.stderr)
        return 2
    study = optuna.load_study(study_name=result.study_name, storage=open_storage(cfg, create=False))
    meta = meta_of(cfg, study)
    search_seconds = time.time() - started - gate_seconds
    arch = ("num_layers", "hidden_size", "num_heads", "intermediate_size", "init", "recipe", "learning_rate",
            "temperature", "alpha")

    def issue_row(r: dict) -> dict:
        return {"number": r["trial"], "params": {k: r.get(k) for k in arch if r.get(k) is not None},
                "state": r["state"], "screened_out": r["screened_out"], "train_seconds": r.get("train_seconds") or 0,
                "quality": r.get("quality"), "p95_ms": r.get("p95_ms"), "pre_p95_ms": r.get("pre_p95_ms"),
                "size_mb": r.get("size_mb"), "feasible": r["feasible"], "is_pareto": r["is_pareto"]}
    reference = study.user_attrs.get("reference") or {}
    teacher_ref = {"quality": reference.get("quality"), "p95_ms": reference.get("p95_ms")}
    front_rows = sorted(result.front, key=lambda r: -r["quality"])
    best = front_rows[0] if front_rows else None
    teacher_q, teacher_p95 = teacher_ref["quality"], teacher_ref["p95_ms"]
    out_result = {
        "benchmark": "search_sst2",
        "budget_p95_ms": meta["targets"].get("p95_ms"), "min_quality": meta["targets"].get("min_quality"),
        "wall_seconds": round(search_seconds, 1), "gate_seconds": round(gate_seconds, 1),
        "gate": None if gate is None else {"message": gate.message, "passed": gate.passed is not None,
                                           "rows": [{"recipe": g.recipe, "status": g.status, "quality": g.quality,
                                                     "p95_ms": g.p95_ms, "size_mb": g.size_mb, "meets": g.meets}
                                                    for g in gate.rows]},
        "teacher": teacher_ref,
        "trials": [issue_row(r) for r in result.rows],
        "front": [issue_row(r) for r in front_rows],
        "best": None if best is None else {
            "quality": best["quality"], "p95_ms": best["p95_ms"], "recipe": best["recipe"], "trial": best["trial"],
            "params": {k: best.get(k) for k in arch if best.get(k) is not None}, "parameters": best.get("params"),
            "retention": best["quality"] / teacher_q if teacher_q else None,
            "speedup": teacher_p95 / best["p95_ms"] if teacher_p95 else None},
        "overrides": overrides + list(args.overrides), "quick": args.quick, "config": args.config, "study": result.study_name,
        "sampler": cfg.search.sampler, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.time() - started, 1), "machine": machine_info(), "versions": versions(),
        "conditions": meta["conditions"], "targets": targets_text(meta["targets"]).removeprefix("targets: "),
        "references": meta["references"], "message": result.message, "analysis": analyse(result.rows),
        "front_rows": sorted(result.front, key=lambda r: r["p95_ms"]), "rows": result.rows,
    }
    # The default config's results keep their names; another config's go beside them, named after it.
    default = Path(args.config).resolve() == (ROOT / CONFIG).resolve()
    stem, marker = ("search_sst2", "search") if default else (f"search_{cfg.name}", f"search-{cfg.name}")
    out_result["benchmark"] = stem
    png = cfg.run_dir / "report" / "pareto.png"
    if not args.quick and png.is_file():
        shutil.copyfile(png, ROOT / "benchmarks" / "results" / f"{stem}_pareto.png")
        out_result["picture"] = f"results/{stem}_pareto.png"
    out = Path(args.out or (quick_dir / f"{stem}.json" if args.quick else f"benchmarks/results/{stem}.json"))
    readme = Path(args.readme or (quick_dir / "README.md" if args.quick else "benchmarks/README.md"))
    how = "`make bench-search`" if default else f"`make bench-search ARGS=\"--config {args.config}\"`"
    publish(out_result, markdown(out_result), marker=marker,
            heading=f"The student search on {cfg.name} ({how})", out=out, readme=readme, script="bench_search")
    return 0


if __name__ == "__main__":
    sys.exit(main())
