"""Latency, memory, FLOP and size measurement for serving candidates.

Latency is data (STYLE.md, after HAT): every number comes back in a
`LatencyReport` that carries the conditions it was measured under (device,
threads, batch, sequence length) and whether it was stable enough to trust.

Library module, nothing to launch. Typical use:

    from kdlab.eval.latency import TargetProfile, measure
    profile = TargetProfile(device="cpu", threads=2, batch_size=1, seq_len=128)
    reports = measure({"fp32": lambda: fp32.predict(batch),
                       "int8": lambda: int8.predict(batch)}, profile)
    reports["int8"].p95_ms

This is a leaf layer: it imports nothing from train/, distill/ or search/.
"""

from __future__ import annotations

import gc
import io
import json
import math
import os
import platform
import random
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

try:
    import resource  # the kernel's peak RSS; Windows has no resource module (psutil stands in, below)
except ImportError:
    resource = None

BYTES_PER_MB = 1024 * 1024  # "MB" in this module means MiB, as psutil and torch report memory
DEVICES = ("cpu", "cuda")


@dataclass
class TargetProfile:
    """Where and how a candidate is timed: the serving conditions a latency budget refers to."""

    device: str = field(default="cpu", metadata={"help": "'cpu' or 'cuda'"})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads while timing (CPU)"})
    batch_size: int = field(default=1, metadata={"help": "samples per call; used for throughput"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sample; recorded with the result"})
    warmup_iters: int = field(default=10, metadata={"help": "untimed calls per candidate first"})
    min_iters: int = field(default=30, metadata={"help": "timed calls per candidate, all rounds together"})
    min_seconds: float = field(default=2.0, metadata={"help": "timed seconds per candidate, all rounds together"})
    repeats: int = field(default=5, metadata={"help": "interleaved rounds across candidates"})
    p95_tolerance: float = field(default=0.10, metadata={
        "help": "a p95 is repeatable when its 95 % bootstrap interval across rounds is within +-this fraction"})
    max_rounds: int = field(default=15, metadata={
        "help": "rounds at most: more are added while a p95 is not repeatable or its interval straddles its budget"})

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"TargetProfile.device={self.device!r}; valid: {', '.join(DEVICES)}")
        for name in ("threads", "batch_size", "seq_len", "min_iters", "repeats", "max_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"TargetProfile.{name}={getattr(self, name)}; must be >= 1")
        for name in ("warmup_iters", "min_seconds", "p95_tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(f"TargetProfile.{name}={getattr(self, name)}; must be >= 0")


# ---------------------------------------------------------------- pure statistics


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0 <= q <= 100) by linear interpolation between order statistics.

    With x_(0) <= ... <= x_(n-1) the sorted values, h = (n - 1) * q / 100:

        P_q = x_(floor h) + (h - floor h) * (x_(floor h + 1) - x_(floor h))

    This is numpy.percentile's default ("linear", Hyndman & Fan 1996 type 7).
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q}; must be in [0, 100]")
    ordered = sorted(float(v) for v in values)
    h = (len(ordered) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Sample standard deviation over mean: cv = s / x_bar.

    s = sqrt(sum_i (x_i - x_bar)^2 / (n - 1)) (Bessel-corrected, ddof=1).
    A single value has no spread: cv = 0. A zero mean gives inf (0 if all values are 0).
    """
    if not values:
        raise ValueError("coefficient of variation of an empty sequence")
    n = len(values)
    if n == 1:
        return 0.0
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    if mean == 0.0:
        return 0.0 if var == 0.0 else math.inf
    return math.sqrt(var) / abs(mean)


def p95_interval(rounds: Sequence[Sequence[float]], n_boot: int = 400, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of the pooled p95 over timing rounds: how repeatable the p95 is.

    Rounds are resampled with replacement (each round is one interleaved pass, so drift between passes, the
    noise a re-run meets, is what the interval holds); with one round its samples are resampled instead.
    The interval is the 2.5th to 97.5th percentile of the n_boot resampled p95s (seeded: the same samples
    always give the same interval).
    """
    rounds = [list(r) for r in rounds if len(r)]
    if not rounds:
        raise ValueError("p95_interval needs at least one sample")
    rng = random.Random(seed)
    if len(rounds) == 1:
        units = [[v] for v in rounds[0]]
    else:
        units = rounds
    boots = []
    for _ in range(n_boot):
        pooled = [v for _ in units for v in units[rng.randrange(len(units))]]
        boots.append(percentile(pooled, 95))
    return percentile(boots, 2.5), percentile(boots, 97.5)


def judge_p95(rounds: Sequence[Sequence[float]], tolerance: float, budget_ms: float | None = None
              ) -> tuple[float, float, bool, str | None]:
    """(interval low, high, repeatable, verdict against budget_ms: meets | misses | uncertain | None)."""
    low, high = p95_interval(rounds)
    p95 = percentile([v for r in rounds for v in r], 95)
    repeatable = (high - low) / 2 <= tolerance * p95
    verdict = None
    if budget_ms is not None:
        verdict = "meets" if high <= budget_ms else ("misses" if low > budget_ms else "uncertain")
    return low, high, repeatable, verdict


def summarize(samples_ms: Sequence[float], batch_size: int) -> dict:
    """Percentiles, mean, cv and throughput of per-call latencies. cv is the spread of the workload (at
    seq_len 'data' mostly the spread of input lengths), not a judgement on the measurement.

    throughput (samples/s) = batch_size * 1000 / mean_ms, since each call serves batch_size samples.
    """
    mean_ms = sum(samples_ms) / len(samples_ms) if samples_ms else float("nan")
    return {
        "p50_ms": percentile(samples_ms, 50),
        "p90_ms": percentile(samples_ms, 90),
        "p95_ms": percentile(samples_ms, 95),
        "p99_ms": percentile(samples_ms, 99),
        "mean_ms": mean_ms,
        "cv": coefficient_of_variation(samples_ms),
        "throughput": batch_size * 1000.0 / mean_ms if mean_ms > 0 else math.inf,
        "n_samples": len(samples_ms),
    }


# ---------------------------------------------------------------- timing


@dataclass
class LatencyReport:
    """One candidate's latency under a TargetProfile. throughput is in samples per second."""

    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    cv: float
    throughput: float
    n_samples: int
    stable: bool  # the p95 is repeatable: its bootstrap interval across rounds is within +-p95_tolerance
    peak_mem_mb: float
    device: str
    threads: int
    batch_size: int
    seq_len: int
    p95_low_ms: float = math.nan  # 95 % bootstrap interval of p95 across rounds
    p95_high_ms: float = math.nan
    rounds: int = 0
    verdict: str | None = None  # against the budget measure() was given: meets | misses | uncertain

    def to_dict(self) -> dict:
        return asdict(self)


def clamp_threads(threads: int) -> tuple[int, str | None]:
    """Clamp a requested thread count to [1, os.cpu_count()]; returns (threads_used, warning or None)."""
    available = os.cpu_count() or 1
    if threads > available:
        return available, f"threads={threads} exceeds the {available} CPUs here; using {available}"
    if threads < 1:
        return 1, f"threads={threads} is below 1; using 1"
    return threads, None


def _peak_rss_mb() -> float:
    # The kernel's high-water mark covers the whole process lifetime and cannot be reset, so
    # on CPU this is an upper bound shared by every candidate timed in this process.
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / BYTES_PER_MB if sys.platform == "darwin" else peak * 1024 / BYTES_PER_MB
    # Windows: the peak working set. Imported here: this module is in an export's MLflow model, whose
    # requirements (search/registry.py RUNTIME) do not include psutil.
    import psutil
    info = psutil.Process().memory_info()
    return getattr(info, "peak_wset", info.rss) / BYTES_PER_MB


def _time_calls_cpu(fn: Callable[[], object], min_iters: int, min_seconds: float) -> list[float]:
    samples_ms: list[float] = []
    deadline_ns = time.perf_counter_ns() + int(min_seconds * 1e9)
    while len(samples_ms) < min_iters or time.perf_counter_ns() < deadline_ns:
        start = time.perf_counter_ns()
        fn()
        samples_ms.append((time.perf_counter_ns() - start) / 1e6)
    return samples_ms


def _time_calls_cuda(fn: Callable[[], object], min_iters: int, min_seconds: float) -> list[float]:
    # Synchronise around each call: a served request waits for its result, so queued-up
    # asynchronous launches would flatter the per-call latency.
    pairs = []
    deadline_ns = time.perf_counter_ns() + int(min_seconds * 1e9)
    while len(pairs) < min_iters or time.perf_counter_ns() < deadline_ns:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        pairs.append((start, end))
    return [s.elapsed_time(e) for s, e in pairs]


def _interleaved_rounds(fns: dict[str, Callable[[], object]], profile: TargetProfile,
                        rounds: int | None = None) -> tuple[dict, dict]:
    """Time every fn in `rounds` (default `repeats`) round-robin rounds; returns ({name: [samples_ms per round]},
    peak_mem_mb per name)."""
    cuda = profile.device == "cuda"
    timer = _time_calls_cuda if cuda else _time_calls_cpu
    iters_per_round = math.ceil(profile.min_iters / profile.repeats)
    seconds_per_round = profile.min_seconds / profile.repeats
    samples = {name: [] for name in fns}  # one list per round
    peak_mb = {name: 0.0 for name in fns}
    # Round-robin so a noisy neighbour or thermal drift lands on every candidate alike,
    # instead of on whichever happened to be timed during it.
    for _ in range(profile.repeats if rounds is None else rounds):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            samples[name].append(timer(fn, iters_per_round, seconds_per_round))
            if cuda:
                peak_mb[name] = max(peak_mb[name], torch.cuda.max_memory_allocated() / BYTES_PER_MB)
            else:
                peak_mb[name] = _peak_rss_mb()
    return samples, peak_mb


def measure(fns: dict[str, Callable[[], object]], profile: TargetProfile,
            budgets: dict[str, float | None] | None = None) -> dict[str, LatencyReport]:
    """Time zero-argument callables under one profile, interleaved, and report each.

    Each fn should do one served call of `profile.batch_size` samples (and manage grad mode
    itself). After `repeats` interleaved rounds, a candidate whose p95 is not repeatable (its bootstrap
    interval wider than +-p95_tolerance) or whose interval straddles its budget (`budgets[name]`, ms) gets
    one more round at a time, up to `max_rounds` in all; then it is reported as it stands: stable=False,
    or verdict 'uncertain' with the interval that still straddles.
    """
    if not fns:
        raise ValueError("measure() needs at least one callable")
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("TargetProfile.device='cuda' but torch.cuda.is_available() is False; use device='cpu'")

    threads, warning = clamp_threads(profile.threads)
    if warning:
        warnings.warn(warning, stacklevel=2)
    previous_threads = torch.get_num_threads()
    gc_was_enabled = gc.isenabled()
    try:
        torch.set_num_threads(threads)
        for fn in fns.values():
            for _ in range(profile.warmup_iters):
                fn()
        if profile.device == "cuda":
            torch.cuda.synchronize()
        # A collection during one candidate's loop would charge it for garbage that others made.
        gc.collect()
        gc.disable()
        rounds, peak_mb = _interleaved_rounds(fns, profile)
        budgets = budgets or {}
        judged = {n: judge_p95(rounds[n], profile.p95_tolerance, budgets.get(n)) for n in fns}
        while True:
            open_ = [n for n in fns if (not judged[n][2] or judged[n][3] == "uncertain")
                     and len(rounds[n]) < profile.max_rounds]
            if not open_:
                break
            more, more_peak = _interleaved_rounds({n: fns[n] for n in open_}, profile, rounds=1)
            for n in open_:
                rounds[n].extend(more[n])
                peak_mb[n] = max(peak_mb[n], more_peak[n])
                judged[n] = judge_p95(rounds[n], profile.p95_tolerance, budgets.get(n))
    finally:
        if gc_was_enabled:
            gc.enable()
        torch.set_num_threads(previous_threads)

    reports = {}
    for name in fns:
        stats = summarize([v for r in rounds[name] for v in r], profile.batch_size)
        low, high, repeatable, verdict = judged[name]
        reports[name] = LatencyReport(
            **stats,
            stable=repeatable,
            peak_mem_mb=peak_mb[name],
            device=profile.device,
            threads=threads,
            batch_size=profile.batch_size,
            seq_len=profile.seq_len,
            p95_low_ms=low, p95_high_ms=high, rounds=len(rounds[name]), verdict=verdict,
        )
    return reports


def measure_one(fn: Callable[[], object], profile: TargetProfile) -> LatencyReport:
    """measure() for a single callable."""
    return measure({"candidate": fn}, profile)["candidate"]


# ---------------------------------------------------------------- compute and peak


def count_flops(model: torch.nn.Module, inputs: dict) -> int:
    """FLOPs of one forward call on `inputs` (whole batch; divide by batch size per sample).

    Counted by torch.utils.flop_counter.FlopCounterMode: 2*M*N*K per matmul, plus attention
    and convolutions. Elementwise ops are not counted, nor are quantized kernels (packed int8
    or 4-bit matmuls), so count the fp32 model.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    return int(counter.get_total_flops())


VERSIONED = ("torch", "transformers", "accelerate", "datasets", "onnxruntime", "onnx", "bitsandbytes",
             "mlflow", "optuna", "scikit-learn")


def machine_info() -> dict:
    """The hardware a measurement came from: every benchmark result carries it."""
    out = {"cpu": _cpu_model_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
           "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def versions() -> dict:
    """Versions of the packages a measurement depends on (None when not installed)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measure_matmul_gflops(device: str, n: int, trials: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.float32)
    b = torch.randn(n, n, device=device, dtype=torch.float32)
    flops = 2.0 * n**3
    for _ in range(2):
        torch.mm(a, b)
    best_s = math.inf
    for _ in range(trials):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter_ns()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best_s = min(best_s, (time.perf_counter_ns() - start) / 1e9)
    return flops / best_s / 1e9


def cache_dir() -> Path:
    """Where kdlab keeps per-machine measurements: $KDLAB_CACHE_DIR, else ~/.cache/kdlab."""
    return Path(os.environ.get("KDLAB_CACHE_DIR") or Path.home() / ".cache" / "kdlab")


def matmul_peak_gflops(device: str = "cpu", threads: int = 1, cache_path: str | Path | None = None) -> float:
    """Achievable fp32 GFLOP/s of this machine: the best of several square matmuls.

    GFLOP/s = 2 * n^3 / t_best / 1e9 (n = 1024 on CPU, 4096 on CUDA). This is the stated
    peak that efficiency is reported against (FLOPs / latency / peak), as nanoGPT's
    estimate_mfu does with a datasheet number; measuring it keeps the peak honest for
    whatever CPU the job lands on. Cached in JSON under a key of hostname, CPU model (or
    GPU name), threads and torch version, so each machine pays for it once.
    """
    if device not in DEVICES:
        raise ValueError(f"device={device!r}; valid: {', '.join(DEVICES)}")
    path = Path(cache_path) if cache_path else cache_dir() / "matmul_peak.json"
    hardware = torch.cuda.get_device_name() if device == "cuda" else _cpu_model_name()
    n = 4096 if device == "cuda" else 1024
    key = "|".join([socket.gethostname(), hardware, device, f"threads={threads}", f"torch={torch.__version__}", f"n={n}"])

    cache = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}  # a corrupt cache is only a lost measurement: measure again
    if key in cache:
        return float(cache[key]["gflops"])

    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(clamp_threads(threads)[0])
        gflops = _measure_matmul_gflops(device, n, trials=10)
    finally:
        torch.set_num_threads(previous_threads)

    cache[key] = {
        "gflops": gflops,
        "hostname": socket.gethostname(),
        "hardware": hardware,
        "device": device,
        "threads": threads,
        "torch": torch.__version__,
        "n": n,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=2))
    # Rename is atomic, so two jobs sharing the cache never read half a file.
    os.replace(tmp, path)
    return gflops


# ---------------------------------------------------------------- size


def param_count(model: torch.nn.Module) -> int:
    """Number of nn.Parameter elements (packed quantized weights are not Parameters: count the fp32 model)."""
    return sum(p.numel() for p in model.parameters())


def _tensor_bytes(value, seen: set) -> int:
    if isinstance(value, torch.Tensor):
        # Tied weights (embeddings shared with a head) appear under two keys but are stored once.
        ident = (value.data_ptr(), value.numel(), value.dtype)
        if ident in seen:
            return 0
        seen.add(ident)
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):  # dynamic-int8 keeps (weight, bias) packed in a tuple
        return sum(_tensor_bytes(v, seen) for v in value)
    return 0


def state_dict_size_mb(model: torch.nn.Module) -> float:
    """Bytes of every tensor in the state dict (parameters, buffers, packed quantized weights), in MB."""
    seen: set = set()
    try:
        total = sum(_tensor_bytes(v, seen) for v in model.state_dict().values())
    except Exception:
        # Some packed formats only expose their bytes through serialization.
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        total = buffer.getbuffer().nbytes
    return total / BYTES_PER_MB


def file_size_mb(path: str | Path) -> float:
    """Size of a file, or of every file under a folder, in MB."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"file_size_mb: {path} does not exist")
    if path.is_file():
        return path.stat().st_size / BYTES_PER_MB
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / BYTES_PER_MB
