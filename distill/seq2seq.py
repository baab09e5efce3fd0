"""Seq2seq students and losses: T5/mT5, BART/mBART/Marian/Pegasus, and BERT-to-BERT `EncoderDecoderModel`.

Students are the teacher's own class with fewer encoder and/or decoder layers. Two initialisations:

- `teacher-layers`: shrink-and-fine-tune (DistilBART, Shleifer & Rush 2020, "Pre-trained Summarization
  Distillation"). Every non-layer tensor (embeddings, final norms, LM head) is copied, and student
  layer i of each stack takes teacher layer map[i], spread out with the first and last kept.
  Widths must equal the teacher's.
- `random`: the architecture's own initialisation; the only way to a narrower student.

The losses are distill/losses.py's `DistillLoss`, as for every task: with per-position logits its KD term
is word-level KD (Kim & Rush 2016, "Sequence-Level Knowledge Distillation") over target positions whose
label is not -100, and its hidden-state term averages the encoder's and the decoder's stacks.

Layer tensors are found by name, not by architecture: the first `.block.N.` (T5), `.layers.N.`
(BART family) or `.layer.N.` (BERT halves of `EncoderDecoderModel`) in a state-dict name is its
layer, and the name belongs to the decoder when the part before that index contains `decoder`
(`decoder.block.0.`, `model.decoder.layers.0.`, `decoder.bert.encoder.layer.0.`).
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from kdlab.distill.config import ConfigError

SEQ2SEQ_INITS = ("teacher-layers", "random")
# Leftmost layer-list segment: in T5's `encoder.block.0.layer.1.` the layer is block 0, not sub-layer 1.
_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<kind>block|layers|layer)\.(?P<index>\d+)\.")


# --- Configs -------------------------------------------------------------------------------------

def _family(config: PretrainedConfig) -> str:
    """'encoder-decoder' (two sub-configs), 't5' (T5/mT5/UMT5/LongT5) or 'bart' (BART/mBART/Marian/Pegasus)."""
    if getattr(config, "model_type", None) == "encoder-decoder":
        return "encoder-decoder"
    if hasattr(config, "num_layers") and hasattr(config, "num_decoder_layers"):
        return "t5"
    if hasattr(config, "encoder_layers") and hasattr(config, "decoder_layers"):
        return "bart"
    raise ConfigError(f"teacher.source: model_type '{getattr(config, 'model_type', None)}' is not a supported "
                      "seq2seq family; valid: t5/mt5, bart/mbart/marian/pegasus, encoder-decoder")


def layer_depths(config: PretrainedConfig) -> tuple[int, int]:
    """(encoder layers, decoder layers) of a seq2seq model config."""
    family = _family(config)
    if family == "t5":
        return config.num_layers, config.num_decoder_layers
    if family == "bart":
        return config.encoder_layers, config.decoder_layers
    return config.encoder.num_hidden_layers, config.decoder.num_hidden_layers


def _widths(config: PretrainedConfig) -> dict:
    """Every width a layer's tensor shapes depend on, by config attribute."""
    family = _family(config)
    if family == "t5":
        keys = ("d_model", "d_ff", "num_heads", "d_kv")
    elif family == "bart":
        keys = ("d_model", "encoder_ffn_dim", "decoder_ffn_dim", "encoder_attention_heads", "decoder_attention_heads")
    else:
        keys = ("hidden_size", "intermediate_size", "num_attention_heads")
        return {f"{half}.{k}": getattr(getattr(config, half), k) for half in ("encoder", "decoder") for k in keys}
    return {k: getattr(config, k) for k in keys}


def model_width(config: PretrainedConfig) -> int:
    """Width of the residual stream (of the decoder, for `EncoderDecoderModel`)."""
    return config.decoder.hidden_size if _family(config) == "encoder-decoder" else config.d_model


def spread_layer_map(num_student: int, num_teacher: int, key: str = "student.encoder_layers") -> list[int]:
    """Teacher layers spread out over the stack with the first and last kept (DistilBART).

    m == 1 takes layer 0; otherwise student layer i takes round(i * (N - 1) / (m - 1)):
    6 -> 3 gives [0, 2, 5] (Python rounds halves to even). `key` is the config key an error names.
    """
    if not 1 <= num_student <= num_teacher:
        raise ConfigError(f"{key}: {num_student} layers cannot be taken from the teacher's {num_teacher}; "
                          f"valid: 1..{num_teacher} (or student.init=random)")
    if num_student == 1:
        return [0]
    return [round(i * (num_teacher - 1) / (num_student - 1)) for i in range(num_student)]


def student_seq2seq_config(teacher_config: PretrainedConfig, encoder_layers: int, decoder_layers: int,
                           d_model: int | None = None, d_ff: int | None = None,
                           num_heads: int | None = None) -> PretrainedConfig:
    """A deep copy of the teacher's config with the student's depths and, when given, widths.

    For `EncoderDecoderModel` the widths apply to both BERT halves. T5's head size d_kv becomes
    d_model // num_heads only when d_model or num_heads is given (mT5 has d_kv * heads != d_model).
    """
    for key, depth in (("student.encoder_layers", encoder_layers), ("student.decoder_layers", decoder_layers)):
        if depth < 1:
            raise ConfigError(f"{key}: must be >= 1, got {depth}")
    family = _family(teacher_config)
    cfg = copy.deepcopy(teacher_config)
    cfg.architectures = None
    if family == "t5":
        cfg.num_layers, cfg.num_decoder_layers = encoder_layers, decoder_layers
        heads = num_heads or cfg.num_heads
        if d_model or num_heads:
            cfg.d_model = d_model or cfg.d_model
            _check_heads(cfg.d_model, heads)
            cfg.num_heads, cfg.d_kv = heads, cfg.d_model // heads
        cfg.d_ff = d_ff or cfg.d_ff
    elif family == "bart":
        cfg.encoder_layers, cfg.decoder_layers = encoder_layers, decoder_layers
        cfg.d_model = d_model or cfg.d_model
        cfg.encoder_ffn_dim, cfg.decoder_ffn_dim = d_ff or cfg.encoder_ffn_dim, d_ff or cfg.decoder_ffn_dim
        cfg.encoder_attention_heads = num_heads or cfg.encoder_attention_heads
        cfg.decoder_attention_heads = num_heads or cfg.decoder_attention_heads
        _check_heads(cfg.d_model, cfg.encoder_attention_heads)
        _check_heads(cfg.d_model, cfg.decoder_attention_heads)
    else:
        cfg.encoder.num_hidden_layers, cfg.decoder.num_hidden_layers = encoder_layers, decoder_layers
        for half in (cfg.encoder, cfg.decoder):
            half.hidden_size = d_model or half.hidden_size
            half.intermediate_size = d_ff or half.intermediate_size
            half.num_attention_heads = num_heads or half.num_attention_heads
            _check_heads(half.hidden_size, half.num_attention_heads)
    return cfg


def _check_heads(width: int, heads: int) -> None:
    if width % heads:
        raise ConfigError(f"student.num_heads: {heads} heads do not divide the width {width}")


# --- Students ------------------------------------------------------------------------------------

def build_seq2seq_student(teacher: PreTrainedModel, encoder_layers: int, decoder_layers: int,
                          init: str = "teacher-layers", encoder_layer_map: list[int] | None = None,
                          decoder_layer_map: list[int] | None = None, seed: int = 42,
                          **widths) -> PreTrainedModel:
    """A student of the teacher's own class, initialised as `init` says.

    `widths` are `d_model`, `d_ff`, `num_heads` (see `student_seq2seq_config`). The teacher's
    generation settings (beams, lengths, special tokens) carry over to the student.
    """
    if init not in SEQ2SEQ_INITS:
        raise ConfigError(f"student.init: '{init}' is not available for seq2seq; valid: {', '.join(SEQ2SEQ_INITS)}")
    cfg = student_seq2seq_config(teacher.config, encoder_layers, decoder_layers, **widths)
    if init != "random" and _widths(cfg) != _widths(teacher.config):
        teacher_widths = ", ".join(f"{k} {v}" for k, v in _widths(teacher.config).items())
        raise ConfigError(f"student.init: teacher-layers needs the teacher's widths ({teacher_widths}); "
                          "use student.init=random for a narrower seq2seq student")
    torch.manual_seed(seed)
    # _from_config is how AutoModelForSeq2SeqLM.from_config builds; type(teacher) keeps the exact
    # class (EncoderDecoderModel included), whatever the Auto mapping would pick.
    student = type(teacher)._from_config(cfg)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    if init == "random":
        return student
    t_enc, t_dec = layer_depths(teacher.config)
    maps = {False: _checked_map(encoder_layer_map, encoder_layers, t_enc, "encoder"),
            True: _checked_map(decoder_layer_map, decoder_layers, t_dec, "decoder")}
    student.load_state_dict(teacher_layers_state_dict(teacher, student, maps), strict=True)
    if _tied_groups(student) != _tied_groups(teacher):
        raise RuntimeError(f"{type(student).__name__}: loading teacher weights untied "
                           f"{_tied_groups(teacher) - _tied_groups(student)}")
    return student


def _checked_map(layer_map: list[int] | None, num_student: int, num_teacher: int, stack: str) -> list[int]:
    if layer_map is None:
        return spread_layer_map(num_student, num_teacher, key=f"student.{stack}_layers")
    key = f"student.{stack}_layer_map"
    if len(layer_map) != num_student:
        raise ConfigError(f"{key}: needs one teacher layer per student layer ({num_student}), got {len(layer_map)}")
    bad = [i for i in layer_map if not (isinstance(i, int) and 0 <= i < num_teacher)]
    if bad:
        raise ConfigError(f"{key}: teacher layers {bad} do not exist; valid: 0..{num_teacher - 1}")
    return list(layer_map)


def teacher_layers_state_dict(teacher: PreTrainedModel, student: PreTrainedModel,
                              maps: dict[bool, list[int]]) -> dict:
    """The student's state dict filled from the teacher; `maps[is_decoder]` maps student to teacher layers.

    T5 gives only block 0 a relative_attention_bias table, shared by the blocks above it, so a
    student block 0 mapped from teacher block k != 0 finds no such tensor there: any name missing
    from the mapped teacher layer is taken from teacher layer 0 of the same stack.
    """
    teacher_sd = teacher.state_dict()
    out = {}
    for name, s_tensor in student.state_dict().items():
        t_name = name
        m = _LAYER.match(name)
        if m:
            t_name = _in_layer(m, maps["decoder" in m["prefix"]][int(m["index"])])
            if t_name not in teacher_sd:
                t_name = _in_layer(m, 0)
        if t_name not in teacher_sd:
            raise ConfigError(f"student.init: teacher has no tensor '{t_name}' to initialise '{name}'")
        if teacher_sd[t_name].shape != s_tensor.shape:
            raise ConfigError(f"student.init: '{name}' is {tuple(s_tensor.shape)} but the teacher's '{t_name}' is "
                              f"{tuple(teacher_sd[t_name].shape)}")
        out[name] = teacher_sd[t_name].detach().clone()
    return out


def _in_layer(match: re.Match, layer: int) -> str:
    """The matched name moved to another layer of the same stack."""
    return f"{match['prefix']}.{match['kind']}.{layer}.{match.string[match.end():]}"


def _tied_groups(model: nn.Module) -> set[frozenset]:
    """Sets of non-layer parameter names that are one tensor (e.g. T5's shared, embed_tokens, lm_head)."""
    by_param: dict[int, set] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not _LAYER.match(name):
            by_param.setdefault(id(p), set()).add(name)
    return {frozenset(names) for names in by_param.values() if len(names) > 1}
