"""Distillation losses against hand-computed values and identities."""
import math

import pytest
import torch
from torch import nn

from distill.adapter import Signals
from distill.config import DistillConfig
from distill.losses import (DistillLoss, attention_mse_loss, hidden_mse_loss, kd_ce_loss, logit_kd_loss,
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


def test_distill_loss_combines_weighted_terms():
    cfg = DistillConfig(temperature=2.0, alpha=0.5, hidden_weight=2.0)
    loss_mod = DistillLoss(cfg, student_layers=1, teacher_layers=2, student_width=4, teacher_width=8)
    assert len(loss_mod.projections) == 2 and loss_mod.hidden_map == [0, 2]
    mask = torch.ones(3, 5, dtype=torch.long)
    s = Signals(logits=torch.randn(3, 2), hidden_states=tuple(torch.randn(3, 5, 4) for _ in range(2)),
                attention_mask=mask)
    t = Signals(logits=torch.randn(3, 2), hidden_states=tuple(torch.randn(3, 5, 8) for _ in range(3)))
    y = torch.tensor([0, 1, 1])
    loss, parts = loss_mod(s, t, y)
    expected_hidden = 2.0 * torch.stack([
        hidden_mse_loss(s.hidden_states[0], t.hidden_states[0], mask, loss_mod.projections[0]),
        hidden_mse_loss(s.hidden_states[1], t.hidden_states[2], mask, loss_mod.projections[1])]).mean()
    assert parts["hidden"] == pytest.approx(expected_hidden.item(), rel=1e-5)
    assert loss.item() == pytest.approx(parts["kd_ce"] + parts["hidden"], rel=1e-5)
