"""Accuracy and per-image FLOPs of a model on a data set, with the model's hard (evaluation) decisions."""

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..graph.cost import flops_per_image
from ..graph.rewrite import DynamicNet


@torch.no_grad()
def predict(model: nn.Module, data: DataLoader) -> dict[str, torch.Tensor]:
    """Labels, top-5 predictions and (for gated models) per-image FLOPs fractions, in data order."""
    was_training = model.training
    model.eval()
    labels, top5, fractions = [], [], []
    for images, target in data:
        logits = model(images)
        labels.append(target)
        top5.append(logits.topk(min(5, logits.shape[1]), dim=1).indices)
        if isinstance(model, DynamicNet):
            fractions.append(flops_per_image(model))
    model.train(was_training)
    out = {"labels": torch.cat(labels), "top5": torch.cat(top5)}
    if fractions:
        out["fractions"] = torch.cat(fractions)
    return out


def summarize(pred: dict[str, torch.Tensor]) -> dict[str, float]:
    """Top-1 / top-5 accuracy in percent and the FLOPs fraction's mean and p95."""
    hit = pred["top5"] == pred["labels"][:, None]
    out = {"top1": 100 * hit[:, 0].float().mean().item(), "top5": 100 * hit.any(1).float().mean().item(),
           "n": len(pred["labels"])}
    if "fractions" in pred:
        f = pred["fractions"]
        out.update(flops_mean=f.mean().item(), flops_p95=f.quantile(0.95).item())
    return out


def evaluate(model: nn.Module, data: DataLoader) -> dict[str, float]:
    return summarize(predict(model, data))
