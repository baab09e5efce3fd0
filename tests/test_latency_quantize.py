"""Tests for eval/latency.py (statistics, profiler, sizes, peak) and distill/quantize.py (recipes).

Run: .venv/bin/python -m pytest -q tests/test_latency_quantize.py

Models are tiny random-weight BERTs built from a BertConfig (no downloads); the whole
file takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from kdlab.distill.quantize import (RECIPES, Quantized, RecipeUnavailable, apply_recipe, attention_matmuls,
                                    list_recipes)
from kdlab.eval.latency import (
    BYTES_PER_MB,
    LatencyReport,
    TargetProfile,
    clamp_threads,
    coefficient_of_variation,
    count_flops,
    file_size_mb,
    matmul_peak_gflops,
    measure,
    measure_one,
    param_count,
    judge_p95,
    p95_interval,
    percentile,
    state_dict_size_mb,
    summarize,
)

# Largest |quantized - fp32| logit difference allowed, as a fraction of the largest |fp32|
# logit, on random inputs. Float paths must match to rounding; 8-bit paths lose about
# 1-4% here; nf4 on random (not trained) weights about 20%.
REL_TOLERANCE = {
    "fp32": 1e-6,
    "onnx-fp32": 1e-4,
    "bf16": 0.05,
    "dynamic-int8": 0.10,
    "onnx-int8": 0.10,
    "onnx-int8-ffn": 0.10,
    "bnb-int8": 0.10,
    "bnb-nf4": 0.35,
}
CPU_RECIPES = [r for r in RECIPES if r != "fp16"]


def tiny_bert(hidden: int = 32, intermediate: int = 64, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=intermediate, num_labels=2, max_position_embeddings=64,
    )
    return BertForSequenceClassification(config).eval()


def random_batch(batch_size: int, seq_len: int, seed: int, token_types: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 100, (batch_size, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, seq_len // 2 :] = 0  # every other row padded, so masking is exercised
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_types:
        batch["token_type_ids"] = torch.zeros_like(input_ids)
    return batch


# ---------------------------------------------------------------- statistics


def test_percentile_hand_values():
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 50) == pytest.approx(2.5)  # h = 3 * 0.5 = 1.5 -> 2 + 0.5 * (3 - 2)
    assert percentile(values, 95) == pytest.approx(3.85)  # h = 2.85 -> 3 + 0.85 * (4 - 3)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_matches_numpy_linear():
    rng = np.random.default_rng(0)
    values = rng.exponential(10.0, size=37).tolist()
    for q in (0, 12.5, 50, 90, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_coefficient_of_variation_hand_values():
    # mean 5, squared deviations sum to 32, sample variance 32 / 7
    values = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
    assert coefficient_of_variation(values) == pytest.approx(math.sqrt(32 / 7) / 5)
    assert coefficient_of_variation([3.0]) == 0.0
    assert coefficient_of_variation([2.0, 2.0, 2.0]) == 0.0


def test_summarize_throughput_identity():
    stats = summarize([10.0, 20.0, 30.0, 40.0], batch_size=8)
    assert stats["mean_ms"] == pytest.approx(25.0)
    assert stats["throughput"] == pytest.approx(8 * 1000 / 25.0)  # 320 samples/s
    assert stats["p50_ms"] == pytest.approx(25.0)
    assert stats["n_samples"] == 4
    assert stats["cv"] == pytest.approx(coefficient_of_variation([10.0, 20.0, 30.0, 40.0]))


def test_target_profile_validates():
    with pytest.raises(ValueError, match="device='tpu'"):
        TargetProfile(device="tpu")
    with pytest.raises(ValueError, match="repeats=0"):
        TargetProfile(repeats=0)


# ---------------------------------------------------------------- profiler


def test_profiler_on_tiny_model_reports_every_field():
    model = tiny_bert()
    batch = random_batch(4, 16, seed=0)
    profile = TargetProfile(device="cpu", threads=1, batch_size=4, seq_len=16,
                            warmup_iters=2, min_iters=10, min_seconds=0.2, repeats=2)

    def forward():
        with torch.inference_mode():
            return model(**batch).logits

    threads_before = torch.get_num_threads()
    report = measure_one(forward, profile)
    assert torch.get_num_threads() == threads_before  # restored after timing

    assert isinstance(report, LatencyReport)
    assert set(report.to_dict()) == {
        "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "cv", "throughput", "n_samples",
        "stable", "peak_mem_mb", "device", "threads", "batch_size", "seq_len", "p95_low_ms", "p95_high_ms",
        "rounds", "verdict",
    }
    assert 0 < report.p50_ms <= report.p90_ms <= report.p95_ms <= report.p99_ms
    assert report.throughput == pytest.approx(4 * 1000 / report.mean_ms)
    assert report.n_samples >= 10
    assert report.p95_low_ms <= report.p95_high_ms and profile.repeats <= report.rounds <= profile.max_rounds
    assert report.stable == ((report.p95_high_ms - report.p95_low_ms) / 2 <= profile.p95_tolerance * report.p95_ms)
    assert report.verdict is None  # no budget given
    assert report.peak_mem_mb > 10  # a Python process with torch loaded holds far more than 10 MB
    assert (report.device, report.threads, report.batch_size, report.seq_len) == ("cpu", 1, 4, 16)


def test_measure_interleaves_rounds_across_candidates():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    profile = TargetProfile(warmup_iters=1, min_iters=6, min_seconds=0.0, repeats=3, p95_tolerance=1e9, max_rounds=3)
    reports = measure(fns, profile)

    timed = calls[2:]  # one warm-up call each first
    blocks = [timed[0]] + [cur for prev, cur in zip(timed, timed[1:]) if cur != prev]
    assert blocks == ["a", "b", "a", "b", "a", "b"]  # round-robin, 2 calls per round
    assert reports["a"].n_samples == reports["b"].n_samples == 6


def scripted_rounds(monkeypatch, rounds_ms):
    """Replace the CPU timer: round k of a candidate returns rounds_ms(k) as its samples (no clock, no noise)."""
    import kdlab.eval.latency as latency
    seen = {"rounds": 0}

    def fake_timer(fn, min_iters, min_seconds):
        fn()
        seen["rounds"] += 1
        return list(rounds_ms(seen["rounds"]))

    monkeypatch.setattr(latency, "_time_calls_cpu", fake_timer)
    return seen


def test_a_spread_workload_with_a_repeatable_p95_is_stable(monkeypatch):
    """Calls of 4 ms and 0 ms alternating: cv near 1 (the workload's spread), but every round has the same p95."""
    seen = scripted_rounds(monkeypatch, lambda k: [4.0, 0.0] * 4)
    profile = TargetProfile(warmup_iters=0, min_iters=8, min_seconds=0.0, repeats=4, p95_tolerance=0.10, max_rounds=8)
    report = measure_one(lambda: None, profile)
    assert report.cv > 0.9 and report.stable and report.rounds == seen["rounds"] == 4  # no extra round needed
    assert (report.p95_low_ms, report.p95_high_ms) == (4.0, 4.0)


def test_a_drifting_p95_gets_more_rounds_up_to_the_limit_and_is_flagged(monkeypatch):
    """Each round 2 ms slower than the last (drift a re-run would meet): the interval stays wide, rounds are added
    until max_rounds, and the report says the p95 is not repeatable."""
    seen = scripted_rounds(monkeypatch, lambda k: [2.0 * k] * 3)
    profile = TargetProfile(warmup_iters=0, min_iters=4, min_seconds=0.0, repeats=2, p95_tolerance=0.05, max_rounds=5)
    report = measure_one(lambda: None, profile)
    assert report.rounds == seen["rounds"] == 5 and not report.stable


def test_a_budget_inside_the_interval_gets_more_rounds_one_outside_none(monkeypatch):
    # Rounds alternate p95 1 ms and 3 ms: the interval [1, 3] straddles 2 ms however many rounds are added.
    scripted_rounds(monkeypatch, lambda k: [1.0 if k % 2 else 3.0] * 3)
    profile = TargetProfile(warmup_iters=0, min_iters=4, min_seconds=0.0, repeats=2, p95_tolerance=10.0, max_rounds=6)
    far = measure({"c": lambda: None}, profile, budgets={"c": 100.0})["c"]
    assert far.verdict == "meets" and far.rounds == 2
    inside = measure({"c": lambda: None}, profile, budgets={"c": 2.0})["c"]
    assert inside.rounds == 6 and inside.verdict in ("uncertain", "misses")
    assert inside.p95_low_ms <= inside.p95_high_ms == 3.0


def test_the_p95_verdict_against_a_budget_by_hand():
    rounds = [[1.0] * 10, [3.0] * 10]  # interval [1, 3] (below); pooled p95 3
    assert judge_p95(rounds, 0.5, 2.0) == (1.0, 3.0, True, "uncertain")  # half-width 1 <= 0.5 x 3
    assert judge_p95(rounds, 0.2, 3.5) == (1.0, 3.0, False, "meets")     # half-width 1 > 0.2 x 3
    assert judge_p95(rounds, 0.5, 0.5)[3] == "misses"
    assert judge_p95(rounds, 0.5, None)[3] is None


def test_a_budget_far_from_the_interval_needs_no_extra_round_and_one_inside_it_gets_them(monkeypatch):
    # Each round 2 ms slower than the last (scripted: a loaded machine cannot change the verdicts): a wide interval.
    profile = TargetProfile(warmup_iters=0, min_iters=4, min_seconds=0.0, repeats=2, p95_tolerance=10.0, max_rounds=6)
    scripted_rounds(monkeypatch, lambda k: [2.0 * k] * 3)
    far = measure({"c": lambda: None}, profile, budgets={"c": 1000.0})["c"]
    assert far.verdict == "meets" and far.rounds == 2
    # Rounds 1 and 2 give 2 and 4 ms: a 3 ms budget lies inside the interval, so rounds are added until the
    # interval clears it (it moves up with the drift) or the limit is reached.
    seen = scripted_rounds(monkeypatch, lambda k: [2.0 * k] * 3)
    inside = measure({"c": lambda: None}, profile, budgets={"c": 3.0})["c"]
    assert inside.rounds == seen["rounds"] > 2 and (inside.verdict == "misses" or inside.rounds == 6)


def test_the_p95_interval_by_hand():
    # One round: the samples are resampled; identical samples give a zero-width interval at their value.
    assert p95_interval([[2.0] * 10]) == (2.0, 2.0)
    # Two rounds of constant values 1 and 3: each resample pools (1,1), (1,3) or (3,3) rounds, so the p95 is 1 or
    # 3 (or the pooled 95th percentile of an even mix, 3): the interval spans [1, 3].
    low, high = p95_interval([[1.0] * 10, [3.0] * 10])
    assert (low, high) == (1.0, 3.0)
    assert p95_interval([[1.0] * 10, [3.0] * 10], seed=0) == p95_interval([[1.0] * 10, [3.0] * 10], seed=0)


def test_count_flops_of_a_linear_layer():
    linear = nn.Linear(64, 32)
    # one (4 x 64) @ (64 x 32) matmul: 2 * M * K * N
    assert count_flops(linear, {"input": torch.randn(4, 64)}) == 2 * 4 * 64 * 32


def test_count_flops_scales_with_batch():
    model = tiny_bert()
    one = count_flops(model, random_batch(1, 16, seed=0))
    four = count_flops(model, random_batch(4, 16, seed=0))
    assert one > 0 and four == 4 * one


def test_clamp_threads():
    cpus = os.cpu_count()
    used, warning = clamp_threads(cpus + 3)
    assert used == cpus and str(cpus + 3) in warning
    assert clamp_threads(1) == (1, None)
    used, warning = clamp_threads(0)
    assert used == 1 and warning is not None


def test_matmul_peak_gflops_is_cached(tmp_path):
    cache = tmp_path / "peak.json"
    first = matmul_peak_gflops("cpu", threads=1, cache_path=cache)
    assert first > 0.1  # any CPU of this decade does far more than 0.1 GFLOP/s
    stored = json.loads(cache.read_text())
    assert len(stored) == 1
    (key, entry), = stored.items()
    assert entry["gflops"] == first and entry["threads"] == 1 and torch.__version__ in key

    # A second call must read the file, not measure: plant a value no machine would measure.
    entry["gflops"] = 12345.0
    cache.write_text(json.dumps(stored))
    assert matmul_peak_gflops("cpu", threads=1, cache_path=cache) == 12345.0


def test_sizes_by_hand(tmp_path):
    linear = nn.Linear(64, 32)
    assert param_count(linear) == 64 * 32 + 32
    assert state_dict_size_mb(linear) == pytest.approx((64 * 32 + 32) * 4 / BYTES_PER_MB)

    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 3000)
    assert file_size_mb(tmp_path / "a.bin") == pytest.approx(1000 / BYTES_PER_MB)
    assert file_size_mb(tmp_path) == pytest.approx(4000 / BYTES_PER_MB)
    with pytest.raises(FileNotFoundError, match="missing"):
        file_size_mb(tmp_path / "missing")


# ---------------------------------------------------------------- recipes


def test_registry_order_and_unknown_name():
    assert list_recipes() == list(RECIPES) == [
        "fp32", "bf16", "fp16", "dynamic-int8", "onnx-fp32", "onnx-int8-ffn", "onnx-int8", "bnb-int8", "bnb-nf4",
    ]
    with pytest.raises(ValueError) as info:
        apply_recipe("int3", tiny_bert(), example_batch=random_batch(2, 8, seed=0))
    message = str(info.value)
    assert "'int3'" in message and all(name in message for name in RECIPES)


def test_half_precision_on_cpu_is_unavailable_with_a_reason():
    model, batch = tiny_bert(), random_batch(2, 8, seed=0)
    with pytest.raises(RecipeUnavailable, match="fp16 needs a CUDA device"):
        apply_recipe("fp16", model, example_batch=batch, device="cpu")
    with pytest.raises(RecipeUnavailable, match="allow_cpu_half"):
        apply_recipe("bf16", model, example_batch=batch, device="cpu")


@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory):
    """Every CPU recipe applied once to the same tiny model, plus a snapshot to check it is unchanged."""
    model = tiny_bert()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    workdir = tmp_path_factory.mktemp("recipes")
    served = {
        name: apply_recipe(name, model, example_batch=random_batch(2, 8, seed=1),
                           workdir=workdir / name, allow_cpu_half=True, threads=1)
        for name in CPU_RECIPES
    }
    return model, snapshot, served


@pytest.mark.parametrize("recipe", CPU_RECIPES)
def test_recipe_logits_close_to_fp32(tiny_served, recipe):
    model, _, served = tiny_served
    batch = random_batch(64, 16, seed=2)  # other batch and sequence sizes than the export example
    with torch.inference_mode():
        reference = model(**batch).logits
    quantized = served[recipe]
    logits = quantized.predict(batch)

    assert isinstance(quantized, Quantized) and quantized.recipe == recipe and quantized.size_mb > 0
    assert logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.shape == (64, 2)
    allowed = REL_TOLERANCE[recipe] * reference.abs().max().item()
    assert (logits - reference).abs().max().item() <= allowed
    # Where fp32 decides by more than twice the allowed error, the quantized model must agree.
    margin = (reference[:, 0] - reference[:, 1]).abs()
    decided = margin > 2 * allowed
    assert torch.equal(logits.argmax(-1)[decided], reference.argmax(-1)[decided])


def test_recipes_leave_callers_model_untouched(tiny_served):
    model, snapshot, _ = tiny_served
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())
    assert all(type(m) is nn.Linear for name, m in model.named_modules() if name.endswith(".dense"))
    assert not model.training


def test_onnx_recipes_write_the_files_they_report(tiny_served):
    _, _, served = tiny_served
    for recipe, filename in (("onnx-fp32", "model.onnx"), ("onnx-int8", "model.int8.onnx"),
                             ("onnx-int8-ffn", "model.int8-ffn.onnx")):
        files = served[recipe].files
        assert [f.name for f in files] == [filename] and files[0].exists()
        assert served[recipe].size_mb == pytest.approx(file_size_mb(files[0]))


def test_bnb_recipes_keep_head_and_skip_unaligned_nf4_layers():
    # hidden 64, intermediate 80: attention Linears are aligned, the feed-forward pair is not.
    model = tiny_bert(hidden=64, intermediate=80)
    batch = random_batch(2, 8, seed=3)
    nf4 = apply_recipe("bnb-nf4", model, example_batch=batch).module
    int8 = apply_recipe("bnb-int8", model, example_batch=batch).module
    import bitsandbytes as bnb

    layer = nf4.bert.encoder.layer[0]
    assert type(nf4.classifier) is nn.Linear and type(int8.classifier) is nn.Linear
    assert isinstance(layer.attention.self.query, bnb.nn.Linear4bit)  # 64 -> 64: aligned
    assert type(layer.intermediate.dense) is nn.Linear  # 64 -> 80: 80 is not a multiple of 32
    assert type(layer.output.dense) is nn.Linear  # 80 -> 64: 80 is not a multiple of the 64 blocksize
    assert isinstance(int8.bert.encoder.layer[0].intermediate.dense, bnb.nn.Linear8bitLt)


def test_int8_recipes_shrink_a_linear_heavy_model(tmp_path):
    # hidden 256: the encoder's Linear weights are ~90% of the parameters, so int8 should be < 40% of fp32.
    model = tiny_bert(hidden=256, intermediate=1024)
    example = random_batch(1, 8, seed=4, token_types=False)  # batch of 1: the export must still be dynamic
    fp32 = apply_recipe("fp32", model, example_batch=example)
    dynamic = apply_recipe("dynamic-int8", model, example_batch=example)
    onnx_int8 = apply_recipe("onnx-int8", model, example_batch=example, workdir=tmp_path)
    assert dynamic.size_mb < 0.4 * fp32.size_mb
    assert onnx_int8.size_mb < 0.4 * fp32.size_mb
    assert fp32.size_mb == pytest.approx(state_dict_size_mb(model), rel=0.05)

    # The graph declares only the inputs it was exported with; extra batch keys must be ignored.
    batch = random_batch(3, 13, seed=5, token_types=True)
    with torch.inference_mode():
        reference = model(**batch).logits
    logits = onnx_int8.predict(batch)
    assert logits.shape == (3, 2)
    assert (logits - reference).abs().max().item() <= REL_TOLERANCE["onnx-int8"] * reference.abs().max().item()


def test_int8_recipes_scale_each_output_row_on_its_own(tmp_path):
    # One FFN row 100x larger than the rest: with one scale per tensor, the other rows would be quantized in
    # steps of that outlier's size (most of them to 0). Per output row, every row keeps its own step.
    model = tiny_bert(hidden=64, intermediate=128)
    dense = model.bert.encoder.layer[0].intermediate.dense
    with torch.no_grad():
        dense.weight[7] *= 100.0
    example = random_batch(2, 8, seed=6)
    dynamic = apply_recipe("dynamic-int8", model, example_batch=example).module
    packed = dynamic.bert.encoder.layer[0].intermediate.dense.weight()
    # The packed fbgemm weight reports an affine per-channel scheme; symmetric means every zero point is 0.
    assert packed.qscheme() == torch.per_channel_affine and not packed.q_per_channel_zero_points().any()
    scales = packed.q_per_channel_scales()
    rows = dense.weight.detach()
    assert scales.shape == (128,)
    # Symmetric int8: a row's step is its largest |weight| / 127.5 (to float rounding), so each rounds within half a step.
    assert torch.allclose(scales.float(), rows.abs().amax(dim=1) / 127.5, rtol=1e-3)
    assert ((packed.dequantize() - rows).abs() <= scales[:, None].float() * 0.501).all()

    import onnx
    from onnx import numpy_helper

    apply_recipe("onnx-int8", model, example_batch=example, workdir=tmp_path)
    graph = onnx.load(str(tmp_path / "model.int8.onnx")).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    quantized = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert quantized
    for node in quantized:  # inputs: A, B (int8 weight [in, out]), A's zero point, B's zero point
        weight, zero_point = init[node.input[1]], init[node.input[3]]
        assert weight.dtype == np.int8 and zero_point.shape == (weight.shape[1],)  # one per output column
    # The embedding tables stay fp32 (ONNX_INT8_OPS): the Gathers read float tables, not dequantized int8 ones.
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in init]
    assert gathers and all(init[n.input[0]].dtype == np.float32 for n in gathers)
    assert init["bert.embeddings.word_embeddings.weight"].shape == (100, 64)


def test_onnx_int8_ffn_keeps_exactly_the_attention_projections_in_fp32(tmp_path):
    # 2 layers x (query, key, value, attention output) stay fp32 MatMuls, their weights the Linears' own
    # transposed, bit for bit; everything onnx-int8 quantizes besides them (the FFN pair, pooler, head) is int8.
    import onnx
    from onnx import numpy_helper

    model, example = tiny_bert(hidden=64, intermediate=128), random_batch(2, 8, seed=7)
    apply_recipe("onnx-int8", model, example_batch=example, workdir=tmp_path / "all")
    apply_recipe("onnx-int8-ffn", model, example_batch=example, workdir=tmp_path / "ffn")

    def weight_matmuls(path):
        graph = onnx.load(str(path)).graph
        init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        fp32 = [init[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in init]
        return fp32, sum(n.op_type == "MatMulInteger" for n in graph.node)

    all_fp32, all_int8 = weight_matmuls(tmp_path / "all" / "model.int8.onnx")
    ffn_fp32, ffn_int8 = weight_matmuls(tmp_path / "ffn" / "model.int8-ffn.onnx")
    attention = [getattr(part, name).weight.detach().t().numpy() for layer in model.bert.encoder.layer
                 for part, names in ((layer.attention.self, ("query", "key", "value")),
                                     (layer.attention.output, ("dense",)))
                 for name in names]
    assert all_fp32 == [] and len(attention) == 8
    assert len(ffn_fp32) == 8 and ffn_int8 == all_int8 - 8
    assert all(any(w.shape == a.shape and (w == a).all() for w in ffn_fp32) for a in attention)


def test_attention_projections_are_found_in_an_mpnet_graph(tmp_path):
    # MPNet names them attention.attn.{q,k,v,o}: 4 a layer, found by value in the exported graph.
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    model = MPNetForSequenceClassification(MPNetConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=70, num_labels=2)).eval()
    served = apply_recipe("onnx-fp32", model, example_batch=random_batch(2, 8, seed=8, token_types=False),
                          workdir=tmp_path)
    assert len(attention_matmuls(served.files[0], model)) == 2 * 4
