"""Quantization recipes: turn a trained BERT-family classifier into a served artefact.

Each recipe is registered under a string key (STYLE.md principle 3) and returns a
`Quantized` whose `predict(batch)` gives float32 CPU logits, whatever it runs on, so the
latency profiler and the accuracy evaluation treat every recipe alike.

Library module, nothing to launch. Typical use:

    from kdlab.distill.quantize import apply_recipe, list_recipes, RecipeUnavailable
    for name in list_recipes():
        try:
            served = apply_recipe(name, student, example_batch=batch, workdir=Path("runs/x") / name)
        except RecipeUnavailable as exc:
            print(f"skip {name}: {exc}")

Recipes never mutate the caller's model. Those that cannot run here (fp16 on CPU, a
missing library, a kernel that rejects a shape) raise RecipeUnavailable with a one-line
reason, so a search can skip them and say why.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kdlab.distill.adapter import MODEL_INPUTS
from kdlab.eval.latency import BYTES_PER_MB, file_size_mb

HEAD_PREFIXES = ("classifier",)  # BERT/RoBERTa/DistilBERT heads: kept in full precision by the bnb recipes only
NF4_BLOCK_N = 32  # bitsandbytes' CPU 4-bit kernel packs weights in blocks of 32 output rows
NF4_BLOCKSIZE = 64  # weights per absmax scale; the CPU kernel also needs in_features to be a multiple
# Bumped when a recipe's artefact changes, so caches of measured figures (search/latency_model.py) start afresh.
# 2: per-channel int8 weight scales in dynamic-int8 and onnx-int8; onnx-int8 keeps the embedding tables in fp32.
RECIPE_REVISION = 2
ONNX_SINGLE_FILE_LIMIT_BYTES = 1536 * BYTES_PER_MB  # protobuf caps one file at 2 GiB


class RecipeUnavailable(Exception):
    """A recipe cannot run in this environment; str(exc) is a one-line reason."""


@dataclass
class Quantized:
    """A served artefact: what a recipe produced, its size, and how to call it.

    size_mb is the on-disk size of `files` when the recipe writes files (ONNX), else the
    bytes of the serialized state dict. `module` is the torch module for torch recipes
    (None for ONNX Runtime ones).
    """

    recipe: str
    device: str
    size_mb: float
    files: list[Path]
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor] = field(repr=False)
    module: nn.Module | None = field(default=None, repr=False)
    tokens_per_row: float | None = None  # seq2seq: mean generated tokens per row on the dev set

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for a tokenized batch, as float32 on CPU."""
        return self.forward(batch)


_REGISTRY: dict[str, Callable[..., Quantized]] = {}


def _register(name: str):
    def add(builder):
        _REGISTRY[name] = builder
        return builder

    return add


def list_recipes() -> list[str]:
    """Recipe names, cheapest change to the model first."""
    return list(_REGISTRY)


# ---------------------------------------------------------------- helpers


def _model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    # Labels or other collator keys would make a HF model compute a loss or fail: keep inputs only.
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def _serialized_mb(module: nn.Module) -> float:
    # Serializing measures what would be shipped, packed quantized weights included, the
    # same way for every torch recipe, so fp32 and int8 sizes are comparable.
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes / BYTES_PER_MB


def _torch_forward(module: nn.Module, device: str) -> Callable[[dict], torch.Tensor]:
    def forward(batch: dict) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in _model_inputs(batch).items()}
        with torch.inference_mode():
            logits = module(**inputs).logits
        return logits.float().cpu()

    return forward


def torch_served(recipe: str, module: nn.Module, device: str) -> Quantized:
    """A torch module as a served artefact: its serialized size, its forward on `device`, float32 CPU logits."""
    return Quantized(recipe, device, _serialized_mb(module), [], _torch_forward(module, device), module)


def _fresh_copy(model: nn.Module, device: str, dtype: torch.dtype | None = None) -> nn.Module:
    module = copy.deepcopy(model).eval()
    return module.to(device=device, dtype=dtype) if dtype else module.to(device)


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of the given prefixes."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _silence(logger_name: str, *prefixes: str) -> None:
    """Drop these messages from a library's own logger for the rest of the process."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) and f.prefixes == prefixes for f in logger.filters):
        logger.addFilter(_DropMessages(*prefixes))


@contextmanager
def _silenced_root(*prefixes: str):
    """Drop these messages from the root logger only while the block runs (it is everyone's logger)."""
    root = logging.getLogger()
    dropper = _DropMessages(*prefixes)
    root.addFilter(dropper)
    try:
        yield
    finally:
        root.removeFilter(dropper)


# ---------------------------------------------------------------- torch recipes


@_register("fp32")
def _fp32(model, *, device, **_) -> Quantized:
    module = _fresh_copy(model, device, torch.float32)
    return torch_served("fp32", module, device)


@_register("bf16")
def _bf16(model, *, device, allow_cpu_half, **_) -> Quantized:
    if device == "cpu" and not allow_cpu_half:
        raise RecipeUnavailable(
            "bf16 on CPU is off by default (fast only on CPUs with AMX/AVX512-BF16); pass allow_cpu_half=True to try it"
        )
    module = _fresh_copy(model, device, torch.bfloat16)
    return torch_served("bf16", module, device)


@_register("fp16")
def _fp16(model, *, device, **_) -> Quantized:
    if device != "cuda":
        raise RecipeUnavailable(f"fp16 needs a CUDA device; CPU half-precision kernels are slow or missing (device='{device}')")
    module = _fresh_copy(model, device, torch.float16)
    return torch_served("fp16", module, device)


@_register("dynamic-int8")
def _dynamic_int8(model, *, device, **_) -> Quantized:
    if device != "cpu":
        raise RecipeUnavailable(f"dynamic-int8 runs on CPU only (fbgemm/qnnpack kernels), not device='{device}'")
    if torch.backends.quantized.engine == "none":
        raise RecipeUnavailable("dynamic-int8: this torch build has no quantized CPU engine (fbgemm/qnnpack)")
    return torch_served("dynamic-int8", dynamic_int8_module(model), "cpu")


def dynamic_int8_module(model: nn.Module, per_channel: bool = True) -> nn.Module:
    """A copy of `model` with every nn.Linear replaced by a dynamically quantized int8 one.

    Per-channel (the recipe's form) gives each output row its own weight scale. With one scale per tensor
    (per_channel=False, kept for scripts/bench_int8.py's comparison) an outlier row sets the step for all,
    and 1-2 % of a small student's dev labels flipped against its own fp32 weights
    (benchmarks/results/int8_agreement.json); per channel costs no measurable latency.
    """
    module = _fresh_copy(model, "cpu", torch.float32)
    qconfig = (torch.ao.quantization.per_channel_dynamic_qconfig if per_channel
               else torch.ao.quantization.default_dynamic_qconfig)
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, but torchao 0.18 breaks
        # every transformers import here (STACK.md), so the deprecated API is the one that works.
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(module, {nn.Linear: qconfig}, dtype=torch.qint8)


# ---------------------------------------------------------------- ONNX Runtime recipes


def _export_onnx(model: nn.Module, example_batch: dict, path: Path) -> list[str]:
    """Export to ONNX with dynamic batch and sequence axes; returns the graph's input names."""
    try:  # only the ONNX recipes need onnxscript: imported here, not at the top
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; fail with a reason, not deep inside)
    except ImportError as exc:
        raise RecipeUnavailable("ONNX export needs onnxscript: pip install onnxscript") from exc
    module = _fresh_copy(model, "cpu", torch.float32)
    inputs = {k: v.cpu() for k, v in _model_inputs(example_batch).items()}
    # Dim.DYNAMIC (unlike Dim.STATIC or an unmarked axis) never bakes the example's batch or
    # sequence length into the graph; the axes get readable names after export, because
    # named Dims shared across inputs make the exporter warn once per input.
    dynamic = {name: {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} for name in inputs}
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > ONNX_SINGLE_FILE_LIMIT_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_onnx_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous_level = torch_onnx_logger.level
    try:
        # The exporter logs one line per torchvision op it cannot register; we export no vision ops.
        torch_onnx_logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            # Raised from inside torch.export's pytree handling, not by our call; nothing to change here.
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
            # dynamo=True (torch.export) is torch's default exporter since 2.9; the TorchScript one is
            # deprecated and traces data-dependent Python branches into constants.
            program = torch.onnx.export(
                module, (), None, kwargs=inputs, dynamo=True, verbose=False,
                input_names=list(inputs), output_names=["logits"], dynamic_shapes=dynamic,
            )
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RecipeUnavailable(f"ONNX export failed: {type(exc).__name__}: {first_line}") from exc
    finally:
        torch_onnx_logger.setLevel(previous_level)
    # Each node carries its Python stack trace and FX text: for a small student that debug
    # metadata outweighs the weights, and it embeds local paths in a file we ship.
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
    axes = {}
    for graph_input in program.model.graph.inputs:
        axes.update({graph_input.shape[0]: "batch", graph_input.shape[1]: "seq"})
    program.rename_axes(axes)
    stale_data = path.with_name(path.name + ".data")
    stale_data.unlink(missing_ok=True)  # left by an earlier, larger export into this workdir
    program.save(str(path), external_data=large)
    return list(inputs)


def _onnx_files(path: Path) -> list[Path]:
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def _ort_quantized(recipe: str, path: Path, threads: int) -> Quantized:
    # Imported by the ONNX recipes only: a torch recipe (and a config check, a gate without ONNX) never loads
    # ONNX Runtime's native library.
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One request at a time, as in the latency profile: a second pool would only add contention.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    declared = {i.name: i for i in session.get_inputs()}

    def forward(batch: dict) -> torch.Tensor:
        missing = [name for name in declared if name not in batch]
        if missing:
            raise ValueError(f"{recipe}: batch lacks input(s) {missing} that {path.name} declares; has {sorted(batch)}")
        # The graph rejects inputs it does not declare (token_type_ids may have been pruned).
        feed = {name: batch[name].detach().cpu().numpy().astype("int64") for name in declared}
        logits = session.run(["logits"], feed)[0]
        return torch.from_numpy(logits).float()

    files = _onnx_files(path)
    return Quantized(recipe, "cpu", sum(file_size_mb(f) for f in files), files, forward)


def serve_onnx(recipe: str, path: Path, threads: int = 1) -> Quantized:
    """An ONNX file written earlier (an export folder's model.onnx / model.int8.onnx), served as `recipe`."""
    return _ort_quantized(recipe, Path(path), threads)


def _onnx_workdir(workdir: Path | None) -> Path:
    return Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="kdlab-onnx-"))


def _onnx_cpu_only(device: str) -> None:
    if device != "cpu":
        raise RecipeUnavailable(f"onnx recipes serve on ONNX Runtime's CPUExecutionProvider, not device='{device}'")


@_register("onnx-fp32")
def _onnx_fp32(model, *, example_batch, device, workdir, threads, **_) -> Quantized:
    _onnx_cpu_only(device)
    path = _onnx_workdir(workdir) / "model.onnx"
    _export_onnx(model, example_batch, path)
    return _ort_quantized("onnx-fp32", path, threads)


@_register("onnx-int8-ffn")
def _onnx_int8_ffn(model, *, example_batch, device, workdir, threads, **_) -> Quantized:
    """As onnx-int8, but the attention projections (query, key, value, output) keep fp32 weights.

    For students whose onnx-int8 form flips too many labels: int8 error in the attention projections compounds
    across layers. On bench_kd's best 6-layer distilled SST-2 student (kd_sst2.json `best`), onnx-int8 agreed with
    fp32 on 97.3-97.7 % of report-half labels and this form on 98.4-98.6 % (batches of 1, 16, 128: activation
    scales are set per batch), at p95 9.2 ms against 7.0 (onnx-int8) and 14.7 (onnx-fp32), batch 1, 1 thread.
    """
    return _onnx_int8_recipe("onnx-int8-ffn", ONNX_INT8_FFN_FILE, model, example_batch=example_batch, device=device,
                             workdir=workdir, threads=threads, attention_fp32=True)


ONNX_INT8_FFN_FILE = "model.int8-ffn.onnx"
# A Linear belongs to attention when its module path has this part: BERT/RoBERTa (`attention.self.query`,
# `attention.output.dense`), MPNet (`attention.attn.q`), DistilBERT (`attention.q_lin`).
ATTENTION_PART = "attention"


def attention_matmuls(fp32_path: Path, model: nn.Module) -> list[str]:
    """Names of the MatMul nodes of the exported graph whose weight is one of `model`'s attention Linears.

    The exporter names weights anonymously (val_83) and folds the transpose into them, so a MatMul is matched to
    its Linear by value: the initializer equals that Linear's weight transposed, bit for bit. Raises
    RecipeUnavailable when the model has attention Linears and none is found in the graph.
    """
    import onnx  # lazy, as onnxruntime in _ort_quantized
    from onnx import numpy_helper

    def key(array) -> tuple:
        return array.shape, hashlib.sha1(array.tobytes()).hexdigest()

    wanted = {key(m.weight.detach().float().cpu().t().contiguous().numpy())
              for name, m in model.named_modules() if isinstance(m, nn.Linear) and ATTENTION_PART in name.split(".")}
    if not wanted:
        return []
    graph = onnx.load(str(fp32_path)).graph  # external data (a large model) loads from beside the file
    weights = {init.name: init for init in graph.initializer}
    keep = [node.name for node in graph.node if node.op_type == "MatMul" and len(node.input) == 2
            and node.input[1] in weights and key(numpy_helper.to_array(weights[node.input[1]])) in wanted]
    if not keep:
        raise RecipeUnavailable(f"onnx-int8-ffn: none of the model's {len(wanted)} attention weights is a MatMul "
                                f"weight in {fp32_path.name}; use onnx-int8")
    return keep


@_register("onnx-int8")
def _onnx_int8(model, *, example_batch, device, workdir, threads, **_) -> Quantized:
    """Export fp32 to model.onnx (kept as an intermediate), serve model.int8.onnx (QInt8 weights)."""
    return _onnx_int8_recipe("onnx-int8", "model.int8.onnx", model, example_batch=example_batch, device=device,
                             workdir=workdir, threads=threads, attention_fp32=False)


def _onnx_int8_recipe(recipe: str, filename: str, model, *, example_batch, device, workdir, threads,
                      attention_fp32: bool) -> Quantized:
    """The int8 ONNX recipes: export fp32 to model.onnx, quantize it into `filename` (the attention projections
    left in fp32 when attention_fp32) and serve that."""
    _onnx_cpu_only(device)
    folder = _onnx_workdir(workdir)
    fp32_path, int8_path = folder / "model.onnx", folder / filename
    _export_onnx(model, example_batch, fp32_path)
    onnx_int8_file(fp32_path, int8_path, keep_fp32=attention_matmuls(fp32_path, model) if attention_fp32 else ())
    return _ort_quantized(recipe, int8_path, threads)


# What onnx-int8 quantizes: the MatMul weights, as dynamic-int8 quantizes the nn.Linear ones. ONNX Runtime's
# default set also quantizes the embedding Gathers; with one int8 scale per table, that flipped another 0.1-0.3 %
# of dev labels on three small SST-2 students and kept 2 of them under 99 % agreement
# (benchmarks/results/int8_agreement.json), for no latency gain. The cost is size: a MiniLM-vocabulary table at
# 384 wide is 47 MB in fp32 against 12 MB in int8.
ONNX_INT8_OPS = ("MatMul",)


def onnx_int8_file(fp32_path: Path, int8_path: Path, *, per_channel: bool = True,
                   op_types: tuple[str, ...] | None = ONNX_INT8_OPS, keep_fp32: list[str] = ()) -> None:
    """Write `int8_path`: ONNX Runtime's dynamic quantization of `fp32_path` (QInt8 weights).

    per_channel as in dynamic_int8_module. op_types: the node types quantized (ONNX_INT8_OPS); None is ONNX
    Runtime's default set, which adds the embedding Gathers (scripts/bench_int8.py compares the forms).
    keep_fp32: names of nodes left unquantized (onnx-int8-ffn's attention projections).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic  # lazy, as in _ort_quantized: pulls in onnx

    # ORT's pre-processing (quant_pre_process) fails on torch.export graphs here with
    # "Incomplete symbolic shape inference", so we quantize without it and drop its advice.
    with _silenced_root("Please consider to run pre-processing before quantization"):
        quantize_dynamic(
            str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=per_channel,
            op_types_to_quantize=list(op_types) if op_types else None, nodes_to_exclude=list(keep_fp32),
            use_external_data_format=len(_onnx_files(fp32_path)) > 1,
        )


# ---------------------------------------------------------------- bitsandbytes recipes


def _import_bitsandbytes():
    # Imported by the bnb recipes only: bitsandbytes loads native kernels at import (and may be absent or fail to
    # load on a machine; then the recipe is skipped with the reason, and every other recipe still runs).
    # Without the optional `kernels` package (a Hub download), bitsandbytes logs a warning at
    # import and uses its own bundled CPU kernel instead, which is what we time.
    _silence("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")
    try:
        with warnings.catch_warnings():
            # torch.utils.mkldnn, which bitsandbytes pulls in, uses torch.jit.script_method at import.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)
            import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a native library that fails to load
        raise RecipeUnavailable(f"bitsandbytes is not usable here: {type(exc).__name__}: {exc}") from exc
    return bnb


def _is_head(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in HEAD_PREFIXES)


def _replace_linears(module: nn.Module, make: Callable[[nn.Linear], nn.Module | None]) -> int:
    """Swap each nn.Linear outside the head for make(linear) (None keeps it); returns the count swapped."""
    swaps = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear) and not _is_head(name):
            replacement = make(child)
            if replacement is not None:
                swaps.append((name, replacement))
    for name, replacement in swaps:
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, replacement)
    return len(swaps)


def _bnb_recipe(recipe: str, model: nn.Module, device: str) -> Quantized:
    bnb = _import_bitsandbytes()
    module = _fresh_copy(model, "cpu", torch.float32)

    def int8(linear: nn.Linear) -> nn.Module:
        # threshold=6.0 is LLM.int8()'s outlier split (Dettmers et al. 2022), as transformers uses.
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=6.0)
        q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return q

    def nf4(linear: nn.Linear) -> nn.Module | None:
        # On AVX512-BF16 CPUs the inference kernel repacks weights in blocks of 32 output
        # rows ("N must be divisible by block_n", STACK.md) and reshapes the scales to
        # (out, in / blocksize), which fails for in_features below or off the blocksize.
        if linear.out_features % NF4_BLOCK_N or linear.in_features % NF4_BLOCKSIZE:
            return None
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     blocksize=NF4_BLOCKSIZE)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return q

    swapped = _replace_linears(module, int8 if recipe == "bnb-int8" else nf4)
    if swapped == 0:
        raise RecipeUnavailable(f"{recipe}: no nn.Linear outside the head qualifies for quantization")
    # Moving the module to its device is what makes bitsandbytes quantize the weights.
    module = module.to(device).eval()
    # The 8-bit matmul logs this on every forward; the fp16 cast of activations is expected.
    _silence("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast")
    size_mb = _serialized_mb(module)
    return Quantized(recipe, device, size_mb, [], _torch_forward(module, device), module)


@_register("bnb-int8")
def _bnb_int8(model, *, device, **_) -> Quantized:
    return _bnb_recipe("bnb-int8", model, device)


@_register("bnb-nf4")
def _bnb_nf4(model, *, device, **_) -> Quantized:
    return _bnb_recipe("bnb-nf4", model, device)


RECIPES: tuple[str, ...] = tuple(_REGISTRY)


# ---------------------------------------------------------------- entry point


def apply_recipe(
    name: str,
    model: nn.Module,
    *,
    example_batch: dict[str, torch.Tensor],
    device: str = "cpu",
    workdir: Path | None = None,
    allow_cpu_half: bool = False,
    threads: int = 1,
) -> Quantized:
    """Build the served artefact for recipe `name` from a HF sequence classifier.

    example_batch is a tokenized batch (input_ids, attention_mask, optionally
    token_type_ids): ONNX export traces it, and every recipe is run on it once so that a
    kernel that rejects the model fails here, as RecipeUnavailable, not while timing.
    workdir receives written files (ONNX); None makes a temporary folder. threads sets ONNX
    Runtime's intra-op pool; torch recipes take their threads from the latency profile.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown quantization recipe {name!r}; valid: {', '.join(RECIPES)}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}; valid: cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RecipeUnavailable(f"{name}: device='cuda' requested but torch.cuda.is_available() is False")
    if "input_ids" not in example_batch:
        raise ValueError(f"example_batch needs 'input_ids'; has {sorted(example_batch)}")

    served = _REGISTRY[name](
        model, example_batch=example_batch, device=device, workdir=workdir,
        allow_cpu_half=allow_cpu_half, threads=threads,
    )
    try:
        logits = served.predict(example_batch)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RecipeUnavailable(f"{name} failed at first forward on {device}: {type(exc).__name__}: {first_line}") from exc
    if not torch.isfinite(logits).all():
        raise RecipeUnavailable(f"{name} gives non-finite logits on the example batch (overflow in reduced precision?)")
    return served


# ---------------------------------------------------------------- seq2seq: a served call is a whole generate()

SEQ2SEQ_ONNX_REASON = ("ONNX export of seq2seq generation is not built into kdlab yet (it needs separate encoder and "
                       "decoder-with-past graphs and a decoding loop around them); use dynamic-int8 on CPU")
GENERATE_INPUTS = ("input_ids", "attention_mask")


def apply_generation_recipe(
    name: str,
    model: nn.Module,
    *,
    example_batch: dict[str, torch.Tensor],
    generate_kwargs: dict,
    device: str = "cpu",
    allow_cpu_half: bool = False,
    threads: int = 1,
) -> Quantized:
    """Recipe `name` for a seq2seq model; `predict(batch)` runs one `generate` call and returns token ids.

    The torch recipes (fp32, bf16, fp16, dynamic-int8, bnb-*) apply unchanged to encoder-decoders;
    the ONNX ones raise RecipeUnavailable (SEQ2SEQ_ONNX_REASON). The artefact generates once on
    `example_batch` here, so a kernel that rejects the model fails now, not while timing.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown quantization recipe {name!r}; valid: {', '.join(RECIPES)}")
    if name.startswith("onnx"):
        raise RecipeUnavailable(f"{name}: {SEQ2SEQ_ONNX_REASON}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RecipeUnavailable(f"{name}: device='cuda' requested but torch.cuda.is_available() is False")
    served = _REGISTRY[name](model, example_batch=example_batch, device=device, workdir=None,
                             allow_cpu_half=allow_cpu_half, threads=threads)
    module = served.module
    run_on = "cpu" if name == "dynamic-int8" else device

    def generate(batch: dict) -> torch.Tensor:
        inputs = {k: batch[k].to(run_on) for k in GENERATE_INPUTS if k in batch}
        with torch.inference_mode():
            return module.generate(**inputs, **generate_kwargs).cpu()

    served.forward = generate
    try:
        generate(example_batch)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RecipeUnavailable(f"{name} failed at first generate on {device}: {type(exc).__name__}: "
                                f"{first_line}") from exc
    return served
