"""Escalation to the original model: a gated network hands the images it is least sure of to the model it came from.

Per-image compute at its coarsest. Most images run only the cheap gated network; an image whose top softmax
probability is at or below a threshold also runs the original model, whose answer replaces the cheap one. An
escalated image costs the cheap network's FLOPs plus all of the original's (a fraction of 1.0 more): nothing is
reused. On Fashion-MNIST with ResNet-18 this two-level allocation beat every graded one measured
(docs/benchmarks.md, "What per-image compute can win here"), so dynamize offers it on top of the gates.

The threshold is chosen on held-out data so that the mean cost there meets a budget (`escalation_threshold`).
"""
from pathlib import Path

import torch
from torch import nn

from ..errors import RunError
from ..graph.cost import flops_per_image
from ..graph.plan import GatePlan
from ..graph.rewrite import DynamicNet
from ..io.runs import GATED, check_run, load, load_teacher
from .sliced import use_runtime

CASCADE = "cascade"
# Per-image fractions are float32: a cost that meets the budget exactly can come out a few units in the last place
# above it.
_FLOAT32_SLACK = 1e-6


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """Each image's top softmax probability, [batch]: what decides whether it escalates."""
    return logits.softmax(1).amax(1)


def escalates(confidences: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which images escalate, [batch] bool: those whose `confidence` is at or below the threshold."""
    return confidences <= threshold


def escalation_threshold(confidences: torch.Tensor, fractions: torch.Tensor, budget: float) -> float:
    """The confidence at or below which images escalate so that the mean cost on these images meets `budget`.

    The least confident images escalate first; each adds the original's whole cost (1.0) to its own.

    Args:
        confidences: the cheap network's `confidence` per image.
        fractions: its FLOPs fraction per image.
        budget: the mean FLOPs fraction to meet, cheap network and escalations together.

    Returns:
        The threshold; -inf when not even one image can escalate within the budget.
    """
    order = confidences.argsort()
    cost = fractions.double().mean() + torch.arange(1, len(order) + 1, dtype=torch.float64) / len(order)
    affordable = int((cost <= budget + _FLOAT32_SLACK).sum())
    return float("-inf") if affordable == 0 else confidences[order[affordable - 1]].item()


class Cascade(nn.Module):
    """A gated network with an escalation exit to the original model.

    Args:
        gated: the cheap network, a fine-tuned gated model.
        original: the model it was made from (the teacher of its fine-tuning), same inputs and classes.
        threshold: images whose top softmax probability is at or below it run the original too.
    """

    def __init__(self, gated: DynamicNet, original: nn.Module, threshold: float):
        super().__init__()
        self.gated, self.original, self.threshold = gated, original, threshold
        self.escalated = torch.zeros(0, dtype=torch.bool)  # of the last pass, [batch]

    @property
    def plan(self) -> GatePlan:
        """The gated network's plan (input size, gates): what a cascade is timed and counted against."""
        return self.gated.plan

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.gated(images)
        self.escalated = escalates(confidence(logits), self.threshold)
        if self.escalated.any():
            logits = logits.index_put((self.escalated.nonzero()[:, 0],),
                                      self.original(images[self.escalated]).to(logits.dtype))
        return logits

    def flops_per_image(self) -> torch.Tensor:
        """Per-image FLOPs fraction of the last pass: the gated network's, plus 1.0 for each escalated image."""
        return flops_per_image(self.gated) + self.escalated.to(torch.float32)


def last_fractions(model: DynamicNet | Cascade) -> torch.Tensor:
    """Per-image FLOPs fractions of the last pass of a gated model or a cascade."""
    return model.flops_per_image() if isinstance(model, Cascade) else flops_per_image(model)


def load_cascade(path: str | Path) -> Cascade:
    """Rebuild a cascade from a run directory written by `dynamize cascade`: the gated network (with the fast
    runtime), its original model (the run's recorded teacher) and the calibrated threshold.

    Raises:
        RunError: the run, its teacher or its weights are missing or damaged, or the run is not a cascade.
    """
    run = check_run(path, GATED)
    settings = run.info.get(CASCADE)
    if not isinstance(settings, dict) or not isinstance(settings.get("threshold"), (int, float)):
        raise RunError(f"{path} is not a cascade (no threshold in its config.json); make one with "
                       f"`dynamize cascade {path} --budget B`")
    return Cascade(use_runtime(load(path)), load_teacher(path), float(settings["threshold"])).eval()
