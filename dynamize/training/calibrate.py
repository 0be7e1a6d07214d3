"""Calibration: move the gates' decision thresholds so that the mean FLOPs fraction on held-out data meets a budget.

Layer and channel gates get their own offsets. Moving both together, only the layer gates, or only the channel
gates all reach the budget; calibration tries each direction (bisection along it) and keeps the one with the best
accuracy on the held-out data. Training is meant to reach the budget itself, so calibration only trims.
"""
import torch
from torch.utils.data import DataLoader

from ..graph.rewrite import DynamicNet
from .evaluate import predict

KINDS = ("layer", "channel")


def active_kinds(model: DynamicNet) -> list[str]:
    """The kinds of gates that were trained (inactive gates stay open and are never calibrated)."""
    return [k for k in KINDS if any(kind == k and gate.is_active for kind, _, gate in model.gates())]


def thresholds(model: DynamicNet) -> dict[str, float]:
    """The current threshold offset of each active kind of gate."""
    out: dict[str, float] = {}
    for kind, _, gate in model.gates():
        if gate.is_active:
            out.setdefault(kind, float(gate.threshold))
    return out


def set_thresholds(model: DynamicNet, offsets: dict[str, float]) -> None:
    """Move the decision threshold (a saved buffer) of every active gate of each kind in `offsets`."""
    for kind, _, gate in model.gates():
        if gate.is_active and kind in offsets:
            gate.threshold.fill_(offsets[kind])


@torch.no_grad()
def mean_fraction(model: DynamicNet, data: DataLoader) -> float:
    return predict(model, data)["fractions"].mean().item()


def _top1(pred: dict[str, torch.Tensor]) -> float:
    return 100 * (pred["top5"][:, 0] == pred["labels"]).float().mean().item()


def _along(model: DynamicNet, data: DataLoader, budget: float, start: dict[str, float], direction: dict[str, float],
           tol: float, iters: int, span: float) -> dict:
    """Bisect t so that thresholds start + t * direction give the budget (the fraction falls as t grows)."""
    lo, hi = -span, span
    best: dict = {"error": float("inf")}
    for _ in range(iters):
        t = (lo + hi) / 2
        offsets = {k: start[k] + t * direction.get(k, 0.0) for k in start}
        set_thresholds(model, offsets)
        pred = predict(model, data)
        frac = pred["fractions"].mean().item()
        if abs(frac - budget) < best["error"]:
            best = {"error": abs(frac - budget), "offsets": offsets, "fraction": frac, "top1": _top1(pred)}
        if abs(frac - budget) <= tol:
            break
        lo, hi = (t, hi) if frac > budget else (lo, t)
    return best


def calibrate(model: DynamicNet, data: DataLoader, budget: float, tol: float = 0.005, iters: int = 16,
              span: float = 12.0) -> dict:
    """Set the threshold offsets whose mean FLOPs fraction on `data` is closest to `budget`, best accuracy first.

    Returns:
        The offsets per kind, the fraction and top-1 % they give on `data`, and the direction chosen.
    """
    start = thresholds(model)
    directions = {"both": {k: 1.0 for k in start}}
    if len(start) > 1:
        directions.update({k: {k: 1.0} for k in start})
    results = {name: _along(model, data, budget, start, d, tol, iters, span) for name, d in directions.items()}
    closest = min(r["error"] for r in results.values())
    name, best = max(((n, r) for n, r in results.items() if r["error"] <= max(tol, closest)),
                     key=lambda item: item[1]["top1"])
    set_thresholds(model, best["offsets"])
    return {"offsets": best["offsets"], "fraction": best["fraction"], "top1": best["top1"], "moved": name}
