"""Students built from the teacher's own config, and three ways to initialise them.

- `teacher-layers`: embeddings, a subset of teacher layers, pooler and head copied as they are
  (DistilBERT, Sanh et al. 2019). Widths must equal the teacher's.
- `teacher-slice`: for narrower students. Each teacher tensor is cut down along its hidden,
  head and FFN axes to the channels, heads and neurons that matter most (structured-pruning
  initialisation in the spirit of Minitron, Muralidharan et al. 2024, with data-free weight
  importance): residual channels ranked by the summed |gamma| of every LayerNorm (the scale
  each sub-layer gives that channel), heads by ||W_v,h|| * ||W_o,h||, FFN neurons by
  ||W_in,n|| * ||W_out,n||. With equal widths it reduces to `teacher-layers`.
- `random`: the architecture's own initialisation.

Layer selection is uniform and top-aligned (TinyBERT's g(m) = m * N / M): 3 of 6 teacher
layers gives layers 1, 3, 5 (0-based), so the last teacher layer is always kept.
"""
from __future__ import annotations

import copy
import re

import torch
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from kdlab.distill.config import ConfigError, StudentConfig

_LAYER = re.compile(r"\.layer\.(\d+)\.")
# Names of the attention projections whose output (q/k/v) or input (o) axis is the head axis,
# for the BERT-family layouts transformers uses (BERT/RoBERTa/ELECTRA, MPNet, DistilBERT).
_HEAD_OUT = re.compile(r"\.(query|key|value|q|k|v|q_lin|k_lin|v_lin)\.(weight|bias)$")
_HEAD_IN = re.compile(r"(attention\.output\.dense|attn\.o|out_lin)\.weight$")


def uniform_layer_map(num_student: int, num_teacher: int) -> list[int]:
    """Student layer m (0-based) takes teacher layer round((m + 1) * N / M) - 1."""
    if num_student > num_teacher:
        raise ConfigError(f"student.num_layers: {num_student} exceeds the teacher's {num_teacher} layers "
                          f"for teacher initialisation; valid: 1..{num_teacher} (or student.init=random)")
    return [round((m + 1) * num_teacher / num_student) - 1 for m in range(num_student)]


def student_config(teacher_config: PretrainedConfig, spec: StudentConfig) -> PretrainedConfig:
    """The teacher's config with the student's depth and widths, checked against `spec.init`.

    Defaults keep the teacher's head size and FFN/hidden ratio. Raises `ConfigError` for any
    shape the chosen initialisation cannot produce, before anything is built or trained.
    """
    t = teacher_config
    hidden = spec.hidden_size or t.hidden_size
    head_dim = t.hidden_size // t.num_attention_heads
    heads = spec.num_heads or max(1, hidden // head_dim)
    if hidden % heads:
        raise ConfigError(f"student.num_heads: {heads} heads do not divide hidden_size {hidden}")
    cfg = copy.deepcopy(t)
    cfg.num_hidden_layers = spec.num_layers
    cfg.hidden_size = hidden
    cfg.num_attention_heads = heads
    cfg.intermediate_size = spec.intermediate_size or t.intermediate_size * hidden // t.hidden_size
    cfg.architectures = None
    if spec.init == "random":
        return cfg
    layer_map = spec.layer_map or uniform_layer_map(spec.num_layers, t.num_hidden_layers)
    bad = [i for i in layer_map if not 0 <= i < t.num_hidden_layers]
    if bad:
        raise ConfigError(f"student.layer_map: teacher layers {bad} do not exist; valid: 0..{t.num_hidden_layers - 1}")
    widths = lambda c: (c.hidden_size, c.num_attention_heads, c.intermediate_size)  # noqa: E731
    if spec.init == "teacher-layers" and widths(cfg) != widths(t):
        raise ConfigError(
            f"student.init: teacher-layers needs the teacher's widths (hidden {t.hidden_size}, heads "
            f"{t.num_attention_heads}, ffn {t.intermediate_size}); use teacher-slice for a narrower student")
    if spec.init == "teacher-slice":
        if hidden > t.hidden_size or cfg.intermediate_size > t.intermediate_size:
            raise ConfigError(f"student: teacher-slice cannot widen the teacher (hidden {t.hidden_size}, "
                              f"ffn {t.intermediate_size}); use student.init=random for a wider student")
        if hidden // heads > head_dim or heads > t.num_attention_heads:
            raise ConfigError(f"student.num_heads: teacher-slice cannot grow heads or head size (teacher "
                              f"{t.num_attention_heads} x {head_dim}, student {heads} x {hidden // heads})")
    return cfg


def build_student(teacher: PreTrainedModel, spec: StudentConfig, seed: int = 42,
                  base: PreTrainedModel | None = None) -> PreTrainedModel:
    """A student for the teacher's task, initialised as `spec.init` says.

    `base` (a pretrained model of another family, `student.pretrained`, loaded as a classifier for the
    teacher's labels) replaces the teacher as the source of architecture and weights: its layers are
    chosen, or its widths cut, exactly as the teacher's would be. The student keeps the teacher's labels.
    """
    torch.manual_seed(seed)
    source = base if base is not None else teacher
    cfg = student_config(source.config, spec)
    cfg.num_labels = teacher.config.num_labels
    cfg.id2label, cfg.label2id = dict(teacher.config.id2label), dict(teacher.config.label2id)
    student = AutoModelForSequenceClassification.from_config(cfg)
    if spec.init != "random":
        layer_map = spec.layer_map or uniform_layer_map(spec.num_layers, source.config.num_hidden_layers)
        student.load_state_dict(sliced_state_dict(source, student, layer_map))
    return student


def same_vocabulary(teacher_tokenizer, student_tokenizer) -> bool:
    """True when both tokenizers map every token to the same id (the student may then read the teacher's batches)."""
    return teacher_tokenizer is student_tokenizer or teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, kept in their original order."""
    return torch.topk(scores, k).indices.sort().values


def _shares_a_per_head_tensor(teacher_sd: dict, t_cfg) -> bool:
    """Whether a tensor outside the layers has an axis per attention head, which every layer reads (MPNet's
    `encoder.relative_attention_bias`, buckets x heads)."""
    return any(_layer_of(k) is None and t_cfg.num_attention_heads in t.shape and t_cfg.hidden_size not in t.shape
               for k, t in teacher_sd.items())


def _importances(teacher_sd: dict, t_cfg, s_cfg, layer_map: list[int]) -> dict:
    """Index sets per axis kind: 'hidden' (global), ('heads', layer), ('ffn', layer).

    Heads are ranked per layer, unless a per-head tensor is shared by all layers (_shares_a_per_head_tensor): then every
    layer keeps the same heads, ranked by their importance summed over the kept layers, so that the shared
    tensor's columns still belong to each layer's heads; ('head_count', None) indexes that tensor."""
    gammas = [v.abs() for k, v in teacher_sd.items()
              if k.lower().endswith(("layernorm.weight", "layer_norm.weight"))
              and v.shape == (t_cfg.hidden_size,)]
    gammas = gammas or [torch.ones(t_cfg.hidden_size)]
    index = {"hidden": _top(torch.stack(gammas).sum(0), s_cfg.hidden_size)}
    head_dim_t = t_cfg.hidden_size // t_cfg.num_attention_heads
    head_dim_s = s_cfg.hidden_size // s_cfg.num_attention_heads
    head_scores = {}
    for layer in set(layer_map):
        mid = f".layer.{layer}."
        v = next(t for k, t in teacher_sd.items() if mid in k and _HEAD_OUT.search(k) and
                 re.search(r"\.(value|v|v_lin)\.weight$", k))
        o = next(t for k, t in teacher_sd.items() if mid in k and _HEAD_IN.search(k))
        per_head = lambda w, axis: w.reshape(*([t_cfg.num_attention_heads, head_dim_t, -1] if axis == 0 else  # noqa: E731
                                               [-1, t_cfg.num_attention_heads, head_dim_t]))
        v_norm = per_head(v, 0).pow(2).sum(dim=(1, 2)).sqrt()
        o_norm = per_head(o, 1).pow(2).sum(dim=(0, 2)).sqrt()
        head_scores[layer] = v_norm * o_norm
        w_in = next(t for k, t in teacher_sd.items()
                    if mid in k and k.endswith(("intermediate.dense.weight", "ffn.lin1.weight")))
        w_out = next(t for k, t in teacher_sd.items() if mid in k and (
            re.search(r"\.layer\.\d+\.output\.dense\.weight$", k) or k.endswith("ffn.lin2.weight")))
        index[("ffn", layer)] = _top(w_in.norm(dim=1) * w_out.norm(dim=0), s_cfg.intermediate_size)
    shared = _shares_a_per_head_tensor(teacher_sd, t_cfg)
    if shared:
        index[("head_count", None)] = _top(torch.stack(list(head_scores.values())).sum(0), s_cfg.num_attention_heads)
    for layer, scores in head_scores.items():
        heads = index[("head_count", None)] if shared else _top(scores, s_cfg.num_attention_heads)
        index[("heads", layer)] = (heads[:, None] * head_dim_t + torch.arange(head_dim_s)).flatten()
        index[("head_count", layer)] = heads
    return index


def sliced_state_dict(teacher: PreTrainedModel, student: PreTrainedModel, layer_map: list[int]) -> dict:
    """Student-shaped tensors taken from the teacher (copied whole where shapes already match)."""
    t_cfg, s_cfg = teacher.config, student.config
    teacher_sd = teacher.state_dict()
    same_widths = all(getattr(t_cfg, k) == getattr(s_cfg, k)
                      for k in ("hidden_size", "num_attention_heads", "intermediate_size"))
    index = {} if same_widths else _importances(teacher_sd, t_cfg, s_cfg, layer_map)
    out = {}
    for name, s_tensor in student.state_dict().items():
        s_layer = _layer_of(name)
        t_layer = layer_map[s_layer] if s_layer is not None else None
        t_name = _LAYER.sub(f".layer.{t_layer}.", name) if s_layer is not None else name
        if t_name not in teacher_sd:
            raise ConfigError(f"student.init: teacher has no tensor '{t_name}' to initialise '{name}'")
        t_tensor = teacher_sd[t_name]
        for axis, (t_size, s_size) in enumerate(zip(t_tensor.shape, s_tensor.shape)):
            if t_size == s_size:
                continue
            if (_HEAD_OUT.search(t_name) and axis == 0) or (_HEAD_IN.search(t_name) and axis == 1):
                idx = index[("heads", t_layer)]
            elif t_size == t_cfg.intermediate_size and t_layer is not None:
                idx = index[("ffn", t_layer)]
            elif t_size == t_cfg.hidden_size:
                idx = index["hidden"]
            elif t_size == t_cfg.num_attention_heads and ("head_count", t_layer) in index:
                idx = index[("head_count", t_layer)]
            else:
                raise ConfigError(f"student.init: cannot slice '{t_name}' axis {axis} from {t_size} to {s_size}")
            t_tensor = t_tensor.index_select(axis, idx)
        if t_tensor.shape != s_tensor.shape:
            raise ConfigError(f"student.init: '{name}' is {tuple(s_tensor.shape)} but the teacher gives "
                              f"{tuple(t_tensor.shape)}")
        out[name] = t_tensor.clone()
    return out


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
