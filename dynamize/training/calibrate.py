"""Calibration: move the gates' decision thresholds so that the mean FLOPs fraction on held-out data meets a budget."""

import torch
from torch import nn
from torch.utils.data import DataLoader

from .evaluate import predict


def set_threshold(model: nn.Module, offset: float) -> None:
    """Move every active gate's decision threshold (a saved buffer) to `offset`; open gates stay open."""
    for _, _, gate in model.gates():
        if gate.is_active:
            gate.threshold.fill_(offset)


@torch.no_grad()
def mean_fraction(model: nn.Module, data: DataLoader) -> float:
    return predict(model, data)["fractions"].mean().item()


def calibrate(model: nn.Module, data: DataLoader, budget: float, tol: float = 0.005, iters: int = 16,
              span: float = 12.0) -> dict[str, float | None]:
    """Find the gate-threshold offset whose mean FLOPs fraction on `data` is closest to `budget` (bisection).

    Raising every threshold drops more blocks and channels, so the fraction falls as the offset grows.
    Returns the offset set on the model and the fraction it gives.
    """
    lo, hi = -span, span
    best = (float("inf"), 0.0, None)
    for _ in range(iters):
        mid = (lo + hi) / 2
        set_threshold(model, mid)
        frac = mean_fraction(model, data)
        if abs(frac - budget) < best[0]:
            best = (abs(frac - budget), mid, frac)
        if abs(frac - budget) <= tol:
            break
        lo, hi = (mid, hi) if frac > budget else (lo, mid)
    set_threshold(model, best[1])
    return {"offset": best[1], "fraction": best[2]}
