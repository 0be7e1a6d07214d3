"""What drives the gates to a FLOPs budget with input-dependent decisions: the schedule and the losses.

Lessons of the peers that fine-tune pretrained networks without collapse, each a function here:
- the network's FLOPs target is annealed from 1.0 to the budget, and a squared penalty pulls the measured mean
  fraction onto it, so the gates reach the budget in training and calibration only trims (DynConv's loss);
- per-block bounds start tight around the target and relax over the first part of training, so no block is
  switched off wholesale before the others have learned what they can drop (DynConv, DGNet);
- batch shaping (Bejnordi et al.) matches each gate's keep probabilities over a batch to a U-shaped Beta prior, so
  that a gate is on for some images and off for others instead of settling on a constant; its weight decays;
- the Gumbel noise decays to zero, so the decisions of late training are the deterministic ones of inference;
- near the smallest reachable fraction the budget penalty grows, so that the gates still reach the budget there.
"""
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..graph.cost import decisions, parts
from ..graph.rewrite import DynamicNet


def _cosine_decay(progress: float, span: float) -> float:
    """1 at progress 0, falling along a half cosine to 0 at `span` (a share of training), 0 after."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress / span))) if span > 0 else 0.0


# The most the budget penalty's weight is scaled up near the floor: a budget on the floor itself would divide by zero.
_MAX_FLOOR_SCALE = 10.0


def floor_scaled_weight(weight: float, budget: float, floor: float, margin: float) -> float:
    """The budget penalty's weight for a budget that lies `budget - floor` above the smallest reachable fraction.

    Only the FLOPs above the floor are the gates' to spend, and the squared penalty's pull on a miss of a given share
    of them shrinks with that range. At ResNet-18's 0.05 (0.014 above its floor) the recipe's weight let the gates
    settle 0.03-0.05 above the budget, so that calibration cut up to half of what they had learned to spend, and four
    times the weight gained 2.8 pt (docs/benchmarks.md). So within `margin` of the floor the weight grows in inverse
    proportion to the distance (at most tenfold), which keeps the pull on a relative miss what it is at `margin`;
    further away the recipe's weight stands. Against the recipe's fixed weight it gained 1.05 pt on ResNet-18 at 0.05
    (two seeds) and 3.8 pt on MobileNetV2 at 0.25 (one seed).

    Args:
        weight: the recipe's budget_weight.
        budget: the FLOPs fraction the run is trained to.
        floor: the smallest fraction the trained gates can reach (`graph.cost.min_fraction`).
        margin: the distance below which the weight grows; 0 keeps the recipe's weight everywhere.
    """
    distance = budget - floor
    if margin <= 0 or distance >= margin:
        return weight
    return weight * min(_MAX_FLOOR_SCALE, margin / max(distance, margin / _MAX_FLOOR_SCALE))


@dataclass
class BudgetSchedule:
    """The values of the budget schedule at one point of training (progress in [0, 1] of the gate-learning phase).

    Attributes:
        target: FLOPs fraction the network is pulled to: 1.0 annealed linearly to the budget.
        tightness: how tight the per-block bounds are around the target: 1 at the start, 0 (free) at the end of
            the bound phase.
        noise: scale of the gates' logistic noise: 1 decaying to `noise_final`.
        shaping: weight factor of the batch-shaping loss: 1 decaying to 0.
    """
    target: float
    tightness: float
    noise: float
    shaping: float

    @classmethod
    def at(cls, progress: float, budget: float, anneal_fraction: float, bounds_fraction: float,
           noise_final: float) -> "BudgetSchedule":
        target = 1.0 - (1.0 - budget) * min(1.0, progress / anneal_fraction)
        noise = noise_final + (1.0 - noise_final) * _cosine_decay(progress, 1.0)
        return cls(target, _cosine_decay(progress, bounds_fraction), noise, _cosine_decay(progress, 1.0))


def block_densities(model: DynamicNet) -> torch.Tensor:
    """Each controllable part's mean FLOPs density over the batch of the last pass: per gated block its FLOPs over
    its full FLOPs, and per channel group outside the blocks its kept fraction. Differentiable in training."""
    plan = model.plan
    keep_block, kept, active = decisions(model)
    by_block = parts(plan, keep_block, kept, active)
    full = {b.name: b.flops for b in plan.blocks}
    out = [by_block[b].mean() / full[b] for b in full if b in by_block and active.get(b, True) and full[b]]
    out += [kept[g.name].mean() for g in plan.groups if g.block is None and active.get(g.name, True)]
    return torch.stack(out) if out else torch.zeros(0)


def bounds_loss(densities: torch.Tensor, target: float, tightness: float) -> torch.Tensor:
    """Mean squared distance of each part's density outside [tightness * target, 1 - tightness * (1 - target)]."""
    if not densities.numel():
        return densities.new_zeros(())
    lower, upper = tightness * target, 1.0 - tightness * (1.0 - target)
    return (torch.relu(lower - densities) ** 2 + torch.relu(densities - upper) ** 2).mean()


@lru_cache(maxsize=64)
def beta_quantiles(mean: float, concentration: float, n: int, grid: int = 20000) -> torch.Tensor:
    """The n quantiles at (i + 0.5) / n of Beta(concentration * mean, concentration * (1 - mean)).

    Computed deterministically (no random draws, so training stays reproducible) by integrating the density on a
    grid x = sin^2(theta), which is dense where a U-shaped density is large.
    """
    a, b = concentration * mean, concentration * (1 - mean)
    theta = (torch.arange(grid, dtype=torch.float64) + 0.5) * (math.pi / 2 / grid)
    weight = torch.sin(theta) ** (2 * a - 1) * torch.cos(theta) ** (2 * b - 1)  # density x d(theta), unnormalised
    cdf = weight.cumsum(0)
    cdf /= cdf[-1].clone()
    x = torch.sin(theta) ** 2
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    idx = torch.searchsorted(cdf, u).clamp(max=grid - 1)
    return x[idx].float()


def batch_shaping_loss(probs: Iterable[torch.Tensor], prior_mean: float, concentration: float = 1.0
                       ) -> torch.Tensor:
    """Bejnordi et al.'s batch shaping: the squared distance between each gate unit's sorted keep probabilities
    over the batch and the quantiles of a Beta prior with the given mean (U-shaped for concentration <= 1).

    Args:
        probs: per gate, its keep probabilities [batch, units].
        prior_mean: the share of images that should keep a unit (clamped to [0.05, 0.95]).
        concentration: a + b of the prior; below 1 it is U-shaped: most images clearly on or clearly off.
    """
    probs = list(probs)
    if not probs:
        return torch.zeros(())
    mean = round(min(0.95, max(0.05, prior_mean)), 2)
    losses = []
    for p in probs:
        q = beta_quantiles(mean, concentration, p.shape[0]).to(p)
        losses.append(((p.sort(dim=0).values - q[:, None]) ** 2).mean())
    return torch.stack(losses).mean()
