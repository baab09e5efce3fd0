"""Distillation losses: pure functions of tensors, plus `DistillLoss`, which mixes them.

Every function takes named tensors from `distill.adapter.Signals`; none knows the architecture. The
seq2seq mix (distill/seq2seq.py) uses the same logit and hidden-state terms per target position and per stack.
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
    """{"kd": alpha * logit KD over every row, "ce": (1 - alpha) * CE over the labelled rows} (terms at weight 0 left out)."""
    out = {}
    if alpha > 0:
        out["kd"] = alpha * logit_kd_loss(student_logits, teacher_logits, temperature)
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


class DistillLoss(nn.Module):
    """Mixes logit KD + CE with optional hidden-state and attention terms.

    Holds the learned projections for hidden-state KD, so they train with the student.
    """

    def __init__(self, cfg, student_layers: int, teacher_layers: int,
                 student_width: int, teacher_width: int):
        super().__init__()
        self.cfg = cfg
        self.hidden_map = cfg.hidden_layer_map or uniform_hidden_map(student_layers, teacher_layers)
        if len(self.hidden_map) != student_layers + 1:
            raise ValueError(f"distill.hidden_layer_map needs {student_layers + 1} entries "
                             f"(embeddings + each student layer), got {len(self.hidden_map)}")
        # The last layer of the student attends like the teacher's last layer (MiniLM).
        self.attention_map = [teacher_layers - 1] if cfg.attention_weight > 0 else []
        self.projections = layer_projections(self.hidden_map, student_width, teacher_width, cfg.hidden_weight > 0)

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

    def terms(self, student: Signals, teacher: Signals, labels: torch.Tensor) -> dict:
        """Each weighted term as a tensor: kd, ce, and hidden / attention when they are on."""
        c = self.cfg
        parts = kd_ce_terms(student.logits, teacher.logits, labels, c.temperature, c.alpha)
        parts.update(self._intermediate(student, teacher))
        return parts

    def forward(self, student: Signals, teacher: Signals, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        parts = {"kd_ce": kd_ce_loss(student.logits, teacher.logits, labels, c.temperature, c.alpha)}
        parts.update(self._intermediate(student, teacher))
        loss = sum(parts.values())
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def _intermediate(self, student: Signals, teacher: Signals) -> dict:
        c = self.cfg
        parts = {}
        mask = student.attention_mask
        if self.needs_hidden:
            parts["hidden"] = c.hidden_weight * hidden_states_mse(
                student.hidden_states, teacher.hidden_states, self.hidden_map, mask, self.projections or None,
                normalize=getattr(c, "normalize_hidden", False))
        if self.needs_attentions:
            parts["attention"] = c.attention_weight * attention_mse_loss(
                student.attentions[-1], teacher.attentions[self.attention_map[0]], mask)
        if self.needs_values:
            parts["attention"] = c.attention_weight * value_relation_loss(
                student.values[-1], teacher.values[self.attention_map[0]], mask, c.relation_heads)
        return parts
