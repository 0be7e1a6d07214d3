"""Accuracy and per-image FLOPs of a model on a data set, and calibration of gate thresholds to a budget."""
from typing import Dict, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from .flops import flops_per_image


@torch.no_grad()
def predict(model: nn.Module, data: DataLoader) -> Dict[str, torch.Tensor]:
    """Labels, top-5 predictions and (for gated models) per-image FLOPs fractions, in data order."""
    was_training = model.training
    model.eval()
    labels, top5, fractions = [], [], []
    for images, target in data:
        logits = model(images)
        labels.append(target)
        top5.append(logits.topk(min(5, logits.shape[1]), dim=1).indices)
        if hasattr(model, "plan"):
            fractions.append(flops_per_image(model))
    model.train(was_training)
    out = {"labels": torch.cat(labels), "top5": torch.cat(top5)}
    if fractions:
        out["fractions"] = torch.cat(fractions)
    return out


def summarize(pred: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Top-1 / top-5 accuracy in percent and the FLOPs fraction's mean and p95."""
    hit = pred["top5"] == pred["labels"][:, None]
    out = {"top1": 100 * hit[:, 0].float().mean().item(), "top5": 100 * hit.any(1).float().mean().item(),
           "n": len(pred["labels"])}
    if "fractions" in pred:
        f = pred["fractions"]
        out.update(flops_mean=f.mean().item(), flops_p95=f.quantile(0.95).item())
    return out


def evaluate(model: nn.Module, data: DataLoader) -> Dict[str, float]:
    return summarize(predict(model, data))


def set_threshold(model: nn.Module, offset: float) -> None:
    """Move every trained gate's decision threshold (a saved buffer) to `offset`."""
    for _, _, gate in model.gates():
        gate.threshold.fill_(offset)


@torch.no_grad()
def mean_fraction(model: nn.Module, data: DataLoader) -> float:
    return predict(model, data)["fractions"].mean().item()


def calibrate(model: nn.Module, data: DataLoader, budget: float, tol: float = 0.005, iters: int = 16,
              span: float = 12.0) -> Dict[str, Optional[float]]:
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
