"""Distillation losses against hand-computed values and identities."""
import math

import pytest
import torch
from torch import nn

from kdlab.distill.adapter import Signals
from kdlab.distill.config import DistillConfig
from kdlab.distill.losses import (DistillLoss, attention_mse_loss, hidden_mse_loss, kd_ce_loss, logit_kd_loss,
                            uniform_hidden_map, value_relation_loss)


def test_logit_kd_is_zero_for_equal_logits():
    z = torch.randn(4, 3)
    assert logit_kd_loss(z, z.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_logit_kd_matches_hand_computed_kl():
    # T = 1: p_t = softmax([0, ln 3]) = (1/4, 3/4); p_s = softmax([0, 0]) = (1/2, 1/2)
    # KL(p_t || p_s) = 1/4 ln(1/2) + 3/4 ln(3/2)
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    student = torch.tensor([[0.0, 0.0]])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert logit_kd_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-5)


def test_logit_kd_scales_by_t_squared():
    # Dividing logits by T then scaling by T^2: loss(z_s*T, z_t*T, T) == T^2 * loss(z_s, z_t, 1)
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    for temp in (2.0, 4.0):
        assert logit_kd_loss(s * temp, t * temp, temp).item() == pytest.approx(
            temp ** 2 * logit_kd_loss(s, t, 1.0).item(), rel=1e-4)


def test_kd_ce_mixes_by_alpha():
    s, t, y = torch.randn(6, 2), torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 0])
    ce = nn.functional.cross_entropy(s, y).item()
    kd = logit_kd_loss(s, t, 3.0).item()
    assert kd_ce_loss(s, t, y, 3.0, 0.0).item() == pytest.approx(ce, rel=1e-6)
    assert kd_ce_loss(s, t, y, 3.0, 1.0).item() == pytest.approx(kd, rel=1e-6)
    assert kd_ce_loss(s, t, y, 3.0, 0.25).item() == pytest.approx(0.25 * kd + 0.75 * ce, rel=1e-6)


def test_hidden_mse_ignores_padding_and_matches_hand_value():
    s = torch.zeros(1, 3, 2)
    t = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [100.0, 100.0]]])  # third token is padding
    mask = torch.tensor([[1, 1, 0]])
    # per token mean of squares: token0 = 1, token1 = 2 -> mean 1.5
    assert hidden_mse_loss(s, t, mask).item() == pytest.approx(1.5)


def test_gradients_flow_through_projection():
    proj = nn.Linear(4, 8)
    s = torch.randn(2, 5, 4, requires_grad=True)
    loss = hidden_mse_loss(s, torch.randn(2, 5, 8), torch.ones(2, 5), proj)
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert s.grad.abs().sum() > 0


def test_attention_mse_zero_for_equal_maps_and_averages_heads_when_counts_differ():
    a = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    assert attention_mse_loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-8)
    two_heads = a.view(2, 2, 2, 5, 5).mean(2)  # same head-mean as `a`
    assert attention_mse_loss(two_heads, a).item() == pytest.approx(0.0, abs=1e-8)


def test_value_relation_kl_identities():
    v = torch.randn(2, 6, 16)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    assert value_relation_loss(v, v.clone(), mask, 4).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 6, 8)  # narrower student, same relation heads
    assert value_relation_loss(other, v, mask, 4).item() > 0
    # Padding keys/queries must not matter: change padded positions only.
    v2 = v.clone()
    v2[1, 4:] = 50.0
    assert value_relation_loss(other, v2, mask, 4).item() == pytest.approx(
        value_relation_loss(other, v, mask, 4).item(), rel=1e-5)


def test_uniform_hidden_map():
    assert uniform_hidden_map(3, 6) == [0, 2, 4, 6]
    assert uniform_hidden_map(2, 6) == [0, 3, 6]


# ---------------------------------------------------------------- DistillLoss against hand-written formulas
# The oracles below spell each term out in plain torch (softmax, log, sums, masks); none calls distill.losses.


def hand_kd(s_logits, t_logits, temperature):
    """T^2 * mean over rows of sum_c p_t (log p_t - log p_s), p = softmax(z / T)."""
    log_ps = torch.log_softmax(s_logits / temperature, -1)
    pt = torch.softmax(t_logits / temperature, -1)
    return (pt * (pt.log() - log_ps)).sum(-1).mean() * temperature ** 2


def hand_ce(s_logits, labels):
    return -torch.log_softmax(s_logits, -1)[torch.arange(len(labels)), labels].mean()


def masked_token_mean(per_token, mask):
    m = mask.float()
    return (per_token * m).sum() / m.sum()


def hand_hidden(s_hidden, t_hidden, mask, weight, bias):
    h = s_hidden @ weight.T + bias  # the learned projection W h_s + b
    return masked_token_mean((h - t_hidden).pow(2).mean(-1), mask)


def hand_attention(s_attn, t_attn, mask):
    if s_attn.shape[1] != t_attn.shape[1]:  # different head counts: compare head means
        s_attn, t_attn = s_attn.mean(1, keepdim=True), t_attn.mean(1, keepdim=True)
    return masked_token_mean((s_attn - t_attn).pow(2).mean(dim=(1, 3)), mask)


def hand_value_relation(s_values, t_values, mask, heads):
    def log_rel(v):
        b, t, w = v.shape
        d = w // heads
        v = v.view(b, t, heads, d).transpose(1, 2)
        scores = v @ v.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, -1e9)  # padded keys get no weight
        return torch.log_softmax(scores, -1)
    log_s, log_t = log_rel(s_values), log_rel(t_values)
    per_query = (log_t.exp() * (log_t - log_s)).sum(-1).mean(1)
    return masked_token_mean(per_query, mask)


def padded_mask():
    return torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])


def test_distill_loss_combines_weighted_terms():
    torch.manual_seed(0)
    cfg = DistillConfig(temperature=2.0, alpha=0.5, hidden_weight=2.0)
    loss_mod = DistillLoss(cfg, {"hidden_states": (1, 2)}, student_width=4, teacher_width=8)
    assert len(loss_mod.projections["hidden_states"]) == 2 and loss_mod.maps == {"hidden_states": [0, 2]}
    mask = padded_mask()
    s = Signals(logits=torch.randn(3, 2), hidden_states=tuple(torch.randn(3, 5, 4) for _ in range(2)),
                attention_mask=mask)
    t = Signals(logits=torch.randn(3, 2), hidden_states=tuple(torch.randn(3, 5, 8) for _ in range(3)))
    y = torch.tensor([0, 1, 1])
    loss, parts = loss_mod(s, t, y)
    p = loss_mod.projections["hidden_states"]
    with torch.no_grad():
        # student embeddings -> teacher embeddings, student layer 1 -> teacher layer 2 (uniform map 1 of 2)
        hidden = 2.0 * (hand_hidden(s.hidden_states[0], t.hidden_states[0], mask, p[0].weight, p[0].bias)
                        + hand_hidden(s.hidden_states[1], t.hidden_states[2], mask, p[1].weight, p[1].bias)) / 2
        kd, ce = 0.5 * hand_kd(s.logits, t.logits, 2.0), 0.5 * hand_ce(s.logits, y)
    assert set(parts) == {"kd", "ce", "hidden"}
    assert parts["kd"] == pytest.approx(kd.item(), rel=1e-5)
    assert parts["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert parts["hidden"] == pytest.approx(hidden.item(), rel=1e-5)
    assert loss.item() == pytest.approx((kd + ce + hidden).item(), rel=1e-5)
    assert loss.item() == pytest.approx(parts["kd"] + parts["ce"] + parts["hidden"], rel=1e-5)
    loss.backward()  # the projections train with the student
    assert all(q.weight.grad is not None and q.weight.grad.abs().sum() > 0 for q in p)


def test_distill_loss_tinybert_attention_term_uses_the_teachers_last_layer():
    torch.manual_seed(1)
    cfg = DistillConfig(temperature=3.0, alpha=0.25, attention_weight=0.7, attention_loss="tinybert")
    loss_mod = DistillLoss(cfg, {"hidden_states": (2, 3)}, student_width=8, teacher_width=8)
    assert loss_mod.needs_attentions and not loss_mod.needs_values and not loss_mod.needs_hidden
    mask = padded_mask()
    s_attn = tuple(torch.softmax(torch.randn(3, 2, 5, 5), -1) for _ in range(2))  # 2 student heads
    t_attn = tuple(torch.softmax(torch.randn(3, 4, 5, 5) * (k + 1), -1) for k in range(3))  # 4 teacher heads
    s = Signals(logits=torch.randn(3, 4), attentions=s_attn, attention_mask=mask)
    t = Signals(logits=torch.randn(3, 4), attentions=t_attn)
    y = torch.tensor([3, 0, 2])
    loss, parts = loss_mod(s, t, y)
    attention = 0.7 * hand_attention(s_attn[-1], t_attn[2], mask)  # last student layer vs last teacher layer
    kd, ce = 0.25 * hand_kd(s.logits, t.logits, 3.0), 0.75 * hand_ce(s.logits, y)
    assert set(parts) == {"kd", "ce", "attention"}
    assert parts["attention"] == pytest.approx(attention.item(), rel=1e-5)
    assert parts["kd"] == pytest.approx(kd.item(), rel=1e-5) and parts["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx((kd + ce + attention).item(), rel=1e-5)
    # Another teacher layer gives another value: the test would see a wrong layer index.
    assert abs(hand_attention(s_attn[-1], t_attn[1], mask).item() * 0.7 - parts["attention"]) > 1e-4
    # Padded query rows do not count: changing them leaves the term unchanged.
    s_pad = list(s_attn)
    s_pad[-1] = s_pad[-1].clone()
    s_pad[-1][1, :, 3:] = 1.0
    _, parts_pad = loss_mod(Signals(logits=s.logits, attentions=tuple(s_pad), attention_mask=mask), t, y)
    assert parts_pad["attention"] == pytest.approx(parts["attention"], rel=1e-6)


def test_distill_loss_minilm_value_relation_term():
    torch.manual_seed(2)
    cfg = DistillConfig(temperature=1.0, alpha=1.0, attention_weight=1.5, attention_loss="minilm", relation_heads=2)
    loss_mod = DistillLoss(cfg, {"hidden_states": (1, 2)}, student_width=8, teacher_width=12)
    assert loss_mod.needs_values and not loss_mod.needs_attentions
    mask = padded_mask()
    s_values = [torch.randn(3, 5, 8)]
    t_values = [torch.randn(3, 5, 12), torch.randn(3, 5, 12) * 2.0]
    s = Signals(logits=torch.randn(3, 2), values=s_values, attention_mask=mask)
    t = Signals(logits=torch.randn(3, 2), values=t_values)
    y = torch.tensor([1, 0, 1])
    loss, parts = loss_mod(s, t, y)
    attention = 1.5 * hand_value_relation(s_values[0], t_values[1], mask, heads=2)
    kd = hand_kd(s.logits, t.logits, 1.0)  # alpha = 1: no cross-entropy
    assert parts["attention"] == pytest.approx(attention.item(), rel=1e-5)
    assert set(parts) == {"kd", "attention"}
    assert parts["kd"] == pytest.approx(kd.item(), rel=1e-5)
    assert loss.item() == pytest.approx((kd + attention).item(), rel=1e-5)
    assert abs(1.5 * hand_value_relation(s_values[0], t_values[0], mask, heads=2).item() - parts["attention"]) > 1e-4
