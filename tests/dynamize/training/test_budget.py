"""The budget schedule and losses: shapes that can be checked without training a network."""
import math

import pytest
import torch

from dynamize.training.budget import (
    BudgetSchedule,
    batch_shaping_loss,
    beta_quantiles,
    bounds_loss,
    floor_scaled_weight,
)


def test_schedule_starts_open_and_ends_at_the_budget():
    start = BudgetSchedule.at(0.0, budget=0.3, anneal_fraction=0.5, bounds_fraction=0.5, noise_final=0.0)
    middle = BudgetSchedule.at(0.25, budget=0.3, anneal_fraction=0.5, bounds_fraction=0.5, noise_final=0.0)
    end = BudgetSchedule.at(1.0, budget=0.3, anneal_fraction=0.5, bounds_fraction=0.5, noise_final=0.1)
    assert (start.target, start.tightness, start.noise, start.shaping) == (1.0, 1.0, 1.0, 1.0)
    assert middle.target == pytest.approx(0.65) and 0 < middle.tightness < 1
    assert end.target == pytest.approx(0.3) and end.tightness == 0.0 and end.shaping == 0.0
    assert end.noise == pytest.approx(0.1)


def test_bounds_loss_is_zero_inside_and_grows_outside():
    inside = bounds_loss(torch.tensor([0.5, 0.6]), target=0.5, tightness=0.5)  # bounds [0.25, 0.75]
    outside = bounds_loss(torch.tensor([0.05, 0.95]), target=0.5, tightness=0.5)
    assert inside == 0 and outside == pytest.approx((0.2 ** 2 + 0.2 ** 2) / 2)


def test_beta_quantiles_follow_the_prior():
    arcsine = beta_quantiles(0.5, 1.0, 10)  # Beta(1/2, 1/2): quantile sin^2(pi u / 2)
    u = (torch.arange(10) + 0.5) / 10
    torch.testing.assert_close(arcsine, torch.sin(math.pi * u / 2) ** 2, atol=2e-3, rtol=0)
    assert beta_quantiles(0.3, 0.8, 1000).mean().item() == pytest.approx(0.3, abs=0.01)


def test_batch_shaping_prefers_images_clearly_on_or_off():
    constant = torch.full((16, 4), 0.5)
    split = torch.cat([torch.full((8, 4), 0.02), torch.full((8, 4), 0.98)])
    assert batch_shaping_loss([split], 0.5) < batch_shaping_loss([constant], 0.5) / 2


def test_batch_shaping_gradient_spreads_a_gate_over_the_batch():
    logits = (torch.randn(32, 1) * 0.1).requires_grad_()
    optimizer = torch.optim.SGD([logits], lr=20.0)
    spread_before = torch.sigmoid(logits).std().item()
    for _ in range(50):
        optimizer.zero_grad()
        batch_shaping_loss([torch.sigmoid(logits)], 0.5).backward()
        optimizer.step()
    p = torch.sigmoid(logits).detach()
    assert p.std().item() > 4 * spread_before and 0.3 < (p > 0.5).float().mean().item() < 0.7


def test_budget_weight_grows_only_near_the_floor():
    assert floor_scaled_weight(10.0, budget=0.30, floor=0.10, margin=0.05) == 10.0
    assert floor_scaled_weight(10.0, budget=0.15, floor=0.10, margin=0.05) == pytest.approx(10.0)  # at the margin
    assert floor_scaled_weight(10.0, budget=0.125, floor=0.10, margin=0.05) == pytest.approx(20.0)
    assert floor_scaled_weight(10.0, budget=0.11, floor=0.10, margin=0.05) == pytest.approx(50.0)
    assert floor_scaled_weight(10.0, budget=0.10, floor=0.10, margin=0.05) == pytest.approx(100.0)  # capped
    assert floor_scaled_weight(10.0, budget=0.11, floor=0.10, margin=0.0) == 10.0  # turned off
