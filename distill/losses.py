"""Distillation losses: pure functions of tensors, plus `DistillLoss`, which mixes them for any task.

Every function takes named tensors from `distill.adapter.Signals`; none knows the architecture or the task.
Logits come per row ([B, C]: a classifier) or per position ([B, T, V]: a decoder's targets, a token tagger);
hidden states come in one stack (an encoder) or two (an encoder-decoder), each matched layer by layer.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.adapter import Signals


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch's rows, or over the positions
    `mask` marks when the logits have one more axis ([B, T, V] with a [B, T] mask: word-level KD, Kim & Rush 2016).

    Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network". The T^2 factor
    keeps the gradient scale independent of T, so the mix with cross-entropy stays balanced.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    if mask is None:
        return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1)
    mask = mask.float()
    return (kl * mask).sum() / mask.sum().clamp(min=1) * t * t


IGNORE = -100  # the label of a row without a gold label (a transfer-set row)


def masked_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the rows that have a label (label != -100); 0 (with a graph) when none has."""
    has = labels != IGNORE
    if not bool(has.any()):
        return student_logits.float().sum() * 0.0
    return F.cross_entropy(student_logits.float()[has], labels[has])


def kd_ce_terms(student_logits, teacher_logits, labels, temperature: float, alpha: float) -> dict:
    """{"kd": alpha * logit KD, "ce": (1 - alpha) * CE over the labelled rows or positions} (terms at weight 0 left out).

    Per-row logits are matched on every row: there -100 marks a transfer row without a gold label, which the
    teacher still labels. Per-position logits ([B, T, V]) are matched where the label is not -100: there it
    marks padding, where neither model's output means anything.
    """
    out = {}
    if alpha > 0:
        mask = labels != IGNORE if student_logits.dim() == 3 else None
        out["kd"] = alpha * logit_kd_loss(student_logits, teacher_logits, temperature, mask=mask)
    if alpha < 1:
        out["ce"] = (1 - alpha) * masked_ce(student_logits, labels)
    return out


def kd_ce_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float) -> torch.Tensor:
    """alpha * logit KD + (1 - alpha) * CE(student, hard labels); rows labelled -100 get KD alone."""
    return sum(kd_ce_terms(student_logits, teacher_logits, labels, temperature, alpha).values())


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real (unpadded) tokens of a [B, T] tensor."""
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def hidden_mse_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    mask: torch.Tensor | None = None, projection: nn.Module | None = None,
                    normalize: bool = False) -> torch.Tensor:
    """MSE(W h_s, h_t) over real tokens (TinyBERT, Jiao et al. 2020, eq. 8).

    `projection` (W, learned) maps the student width to the teacher's when they differ. `normalize`
    divides by the teacher states' mean square over the same tokens, so the term reads "fraction of the
    teacher's signal missed" (1.0 for a student that outputs zeros) whatever the activation scale.
    """
    h = projection(student_hidden) if projection is not None else student_hidden
    per_token = (h.float() - teacher_hidden.float()).pow(2).mean(-1)
    mse = _token_mean(per_token, mask)
    if normalize:
        scale = _token_mean(teacher_hidden.float().pow(2).mean(-1), mask).detach()
        mse = mse / scale.clamp(min=1e-12)
    return mse


def hidden_states_mse(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                      layer_map: list[int], mask: torch.Tensor | None = None,
                      projection: nn.Module | Sequence[nn.Module] | None = None,
                      normalize: bool = False) -> torch.Tensor:
    """Mean over i of `hidden_mse_loss`(h_s[i], h_t[layer_map[i]]) over real tokens (TinyBERT, Jiao et al. 2020).

    States are one stack's `output_hidden_states` (index 0 = embeddings, i = after layer i). `mask`
    [B, T] marks real tokens. `projection` maps student width to teacher width: one module for
    every pair, or one per pair.
    """
    if len(layer_map) != len(student_states):
        raise ValueError(f"hidden-state map has {len(layer_map)} entries for {len(student_states)} student states")
    per_pair = projection if isinstance(projection, (list, tuple, nn.ModuleList)) else [projection] * len(layer_map)
    terms = [hidden_mse_loss(student_states[i], teacher_states[j], mask, per_pair[i], normalize=normalize)
             for i, j in enumerate(layer_map)]
    return torch.stack(terms).mean()


def layer_projections(layer_map: list[int], student_width: int, teacher_width: int, on: bool) -> nn.ModuleList:
    """One learned student-to-teacher width map per matched pair, when the term is `on` and the widths differ."""
    return nn.ModuleList([nn.Linear(student_width, teacher_width) for _ in layer_map]
                         if on and student_width != teacher_width else [])


def attention_mse_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between attention maps [B, heads, T, T] over real query tokens (TinyBERT eq. 7).

    transformers returns post-softmax maps (TinyBERT uses pre-softmax scores). When the head
    counts differ, both sides are averaged over heads first.
    """
    if student_attn.shape[1] != teacher_attn.shape[1]:
        student_attn, teacher_attn = student_attn.mean(1, keepdim=True), teacher_attn.mean(1, keepdim=True)
    per_query = (student_attn.float() - teacher_attn.float()).pow(2).mean(dim=(1, 3))
    return _token_mean(per_query, mask)


def _relations(values: torch.Tensor, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """log softmax(V_h V_h^T / sqrt(d_r)) per relation head: [B, heads, T, T]."""
    b, t, width = values.shape
    if width % heads:
        raise ValueError(f"relation heads {heads} must divide the width {width}")
    v = values.float().view(b, t, heads, width // heads).transpose(1, 2)
    scores = v @ v.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def value_relation_loss(student_values: torch.Tensor, teacher_values: torch.Tensor,
                        mask: torch.Tensor | None = None, relation_heads: int = 4) -> torch.Tensor:
    """KL(VR_t || VR_s) with VR = softmax(V V^T / sqrt(d_r)), averaged over heads and real tokens.

    MiniLM (Wang et al. 2020) value-relation transfer, with MiniLMv2's relation heads (2021) so
    that student and teacher may have different numbers of attention heads and widths.
    """
    log_s = _relations(student_values, relation_heads, mask)
    log_t = _relations(teacher_values, relation_heads, mask)
    per_query = (log_t.exp() * (log_t - log_s)).sum(-1).mean(1)
    return _token_mean(per_query, mask)


def uniform_hidden_map(num_student: int, num_teacher: int) -> list[int]:
    """Hidden-state index i of the student (0 = embeddings) matches teacher index i * N / M."""
    return [round(i * num_teacher / num_student) for i in range(num_student + 1)]


# The stacks of `Signals` the hidden-state term can match, each with the field marking its real tokens.
STACK_MASKS = {"encoder_hidden_states": "encoder_mask", "hidden_states": "attention_mask"}


class DistillLoss(nn.Module):
    """alpha * logit KD + (1 - alpha) * CE, plus hidden-state and attention terms when their weights are on.

    `depths` maps each stack of `Signals` the hidden-state term matches to its (student, teacher) layer
    counts: `{"hidden_states": (3, 12)}` for an encoder, and `encoder_hidden_states` as well for an
    encoder-decoder (whose `hidden_states` are the decoder's). The hidden term is the mean over stacks of
    each stack's MSE, student state i against teacher state `uniform_hidden_map` i (distill.hidden_layer_map
    instead, on a one-stack model). The attention term pairs the student's last layer of `hidden_states` with
    the teacher's last (MiniLM). Holds the learned width projections, so they train with the student.
    """

    def __init__(self, cfg, depths: dict[str, tuple[int, int]], student_width: int, teacher_width: int):
        super().__init__()
        unknown = sorted(set(depths) - set(STACK_MASKS))
        if unknown:
            raise ValueError(f"DistillLoss: no stack {unknown[0]!r} in Signals; stacks: {', '.join(STACK_MASKS)}")
        self.cfg = cfg
        self.maps = {}
        for stack in (k for k in STACK_MASKS if k in depths):
            s_layers, t_layers = depths[stack]
            given = cfg.hidden_layer_map if len(depths) == 1 else None
            self.maps[stack] = given or uniform_hidden_map(s_layers, t_layers)
            if len(self.maps[stack]) != s_layers + 1:
                raise ValueError(f"distill.hidden_layer_map needs {s_layers + 1} entries "
                                 f"(embeddings + each student layer), got {len(self.maps[stack])}")
        self.projections = nn.ModuleDict({stack: layer_projections(m, student_width, teacher_width,
                                                                   cfg.hidden_weight > 0)
                                          for stack, m in self.maps.items()})
        # The last layer of the student attends like the teacher's last layer (MiniLM).
        last = depths.get("hidden_states", (0, 0))[1] - 1
        self.attention_layer = last if cfg.attention_weight > 0 else None

    @property
    def needs_hidden(self) -> bool:
        return self.cfg.hidden_weight > 0

    @property
    def needs_attentions(self) -> bool:
        return self.cfg.attention_weight > 0 and self.cfg.attention_loss == "tinybert"

    @property
    def needs_values(self) -> bool:
        return self.cfg.attention_weight > 0 and self.cfg.attention_loss == "minilm"

    @property
    def logits_only(self) -> bool:
        return not (self.needs_hidden or self.needs_attentions or self.needs_values)

    @property
    def needs_teacher(self) -> bool:
        """False for the hard-label control (alpha 0, logits only): no term reads the teacher."""
        return self.cfg.alpha > 0 or not self.logits_only

    def terms(self, student: Signals, teacher: Signals | None, labels: torch.Tensor) -> dict:
        """Each weighted term as a tensor: kd, ce, and hidden / attention when they are on."""
        c = self.cfg
        if self.needs_teacher and teacher is None:
            raise ValueError("DistillLoss: alpha > 0 or an intermediate term needs the teacher's outputs")
        parts = kd_ce_terms(student.logits, teacher.logits if teacher is not None else None, labels,
                            c.temperature, c.alpha)
        # Per-position logits: a position is real exactly when it holds a label (a decoder's input t is label t-1).
        positions = labels != IGNORE if student.logits.dim() == 3 else None
        if self.needs_hidden:
            per_stack = []
            for stack, layer_map in self.maps.items():
                s_states, t_states = getattr(student, stack), getattr(teacher, stack)
                if s_states is None or t_states is None:
                    raise ValueError(f"DistillLoss: hidden_weight > 0 needs {stack} (output_hidden_states=True)")
                mask = getattr(student, STACK_MASKS[stack])
                per_stack.append(hidden_states_mse(
                    s_states, t_states, layer_map, positions if mask is None else mask,
                    self.projections[stack] or None, normalize=getattr(c, "normalize_hidden", False)))
            parts["hidden"] = c.hidden_weight * sum(per_stack) / len(per_stack)
        mask = student.attention_mask
        if self.needs_attentions:
            parts["attention"] = c.attention_weight * attention_mse_loss(
                student.attentions[-1], teacher.attentions[self.attention_layer], mask)
        if self.needs_values:
            parts["attention"] = c.attention_weight * value_relation_loss(
                student.values[-1], teacher.values[self.attention_layer], mask, c.relation_heads)
        return parts

    def forward(self, student: Signals, teacher: Signals | None, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        parts = self.terms(student, teacher, labels)
        return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}
