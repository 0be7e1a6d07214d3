"""Accuracy, per-image FLOPs and adaptivity of a model on a data set, with its hard (evaluation) decisions."""
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..graph.rewrite import DynamicNet
from ..runtime.cascade import Cascade, confidence, last_fractions

# Below this p95 - p5 spread of per-image FLOPs fractions, a model's decisions are called nearly static: it is
# pruned, not adaptive.
STATIC_SPREAD = 0.02


@lru_cache(maxsize=8)
def _code_weights(units: int) -> torch.Tensor:
    return torch.rand(units, dtype=torch.float64, generator=torch.Generator().manual_seed(units))


def decision_codes(model: DynamicNet) -> torch.Tensor:
    """One number per image of the last pass that differs between images whose decisions differ (a random
    projection of every active gate's 0/1 decisions), [batch]."""
    keep = torch.cat([gate.decisions > 0.5 for _, _, gate in model.gates() if gate.is_active], dim=1)
    return keep.double() @ _code_weights(keep.shape[1])


@torch.no_grad()
def predict(model: nn.Module, data: DataLoader) -> dict[str, torch.Tensor]:
    """Labels, top-5 predictions, top softmax probabilities ("confidence") and, for gated models and cascades,
    per-image FLOPs fractions and decision codes (of the gated network), in data order; for cascades also which
    images escalated."""
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"labels": [], "top5": [], "confidence": [], "fractions": [], "codes": [],
                                          "escalated": []}
    costed = model if isinstance(model, (DynamicNet, Cascade)) else None  # has per-image FLOPs
    net = model.gated if isinstance(model, Cascade) else model if isinstance(model, DynamicNet) else None
    active = net is not None and any(gate.is_active for _, _, gate in net.gates())
    for images, target in data:
        logits = model(images)
        out["labels"].append(target)
        out["top5"].append(logits.topk(min(5, logits.shape[1]), dim=1).indices)
        out["confidence"].append(confidence(logits))
        if costed is not None:
            out["fractions"].append(last_fractions(costed))
        if isinstance(model, Cascade):
            out["escalated"].append(model.escalated)
        if net is not None and active:
            out["codes"].append(decision_codes(net))
    model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items() if v}


def adaptivity(fractions: torch.Tensor, codes: torch.Tensor | None = None) -> dict:
    """How much the compute depends on the image: quantiles and spread of the per-image FLOPs fraction, and the
    number and entropy (bits) of distinct decision patterns."""
    q = {f"p{p}": fractions.quantile(p / 100).item() for p in (5, 50, 95)}
    out = {"mean": fractions.mean().item(), **q, "spread": q["p95"] - q["p5"]}
    if codes is not None:
        _, counts = codes.unique(return_counts=True)
        share = counts.double() / counts.sum()
        out.update(patterns=len(counts), pattern_entropy_bits=abs((share * share.log2()).sum().item()))
    out["nearly_static"] = out["spread"] < STATIC_SPREAD
    return out


def summarize(pred: dict[str, torch.Tensor]) -> dict:
    """Top-1 / top-5 accuracy in percent and, for gated models, the FLOPs fraction's mean, quantiles and
    adaptivity (see `adaptivity`); for cascades the share of images that escalated."""
    hit = pred["top5"] == pred["labels"][:, None]
    out: dict[str, Any] = {"top1": 100 * hit[:, 0].float().mean().item(),
                           "top5": 100 * hit.any(1).float().mean().item(), "n": len(pred["labels"])}
    if "fractions" in pred:
        a = adaptivity(pred["fractions"], pred.get("codes"))
        out.update(flops_mean=a.pop("mean"), flops_p95=a["p95"], adaptivity=a)
    if "escalated" in pred:
        out["escalated"] = pred["escalated"].float().mean().item()
    return out


def evaluate(model: nn.Module, data: DataLoader) -> dict:
    return summarize(predict(model, data))
