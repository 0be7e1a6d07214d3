"""Budget-controlled distillation: timm's logit distillation plus a two-sided penalty on the FLOPs fraction."""

import torch
from timm.task import LogitDistillationTask
from timm.utils import unwrap_model
from torch import nn

from ..graph.cost import flops_per_image
from .recipe import Recipe


def budget_target(progress: float, budget: float, anneal_fraction: float) -> float:
    """FLOPs target at `progress` (0..1 of training): 1.0 annealed linearly to the budget, then held.

    Starting at 1.0 lets the gates learn what to drop gradually instead of collapsing at the first step.
    """
    return 1.0 - (1.0 - budget) * min(1.0, progress / anneal_fraction)


class BudgetDistillationTask(LogitDistillationTask):
    """Loss = task CE + T^2 KL(teacher || student) + budget_weight * |mean FLOPs fraction - target|.

    The penalty is two-sided: spending less than the budget costs accuracy for nothing. The task owns its schedule:
    the training loop calls `on_step(progress)` before each step.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, recipe: Recipe):
        super().__init__(student, teacher, criterion=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing),
                         distill_loss_weight=recipe.distill_weight, task_loss_weight=recipe.task_weight,
                         temperature=recipe.temperature, verbose=False)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.recipe = recipe
        self.target = 1.0

    def on_step(self, progress: float) -> None:
        """Set the FLOPs target for the coming step."""
        self.target = budget_target(progress, self.recipe.budget, self.recipe.anneal_fraction)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(input, target)
        frac = flops_per_image(unwrap_model(self.trainable_module))
        penalty = (frac.mean() - self.target).abs()
        out["loss"] = out["loss"] + self.recipe.budget_weight * penalty
        out["flops"] = frac.detach()
        return out


def configure_gates(model: nn.Module, kinds: str, tau: float) -> None:
    """Train only the chosen kind of gates ("layer", "channel", "both"); the others stay open at scale 1.

    Whether a gate is active is part of its state dict, so a run keeps its kinds after save and load.
    """
    for kind, _, gate in model.gates():
        trained = kinds == "both" or kinds == kind
        gate.active.fill_(trained)
        gate.tau = tau
        for p in gate.parameters():
            p.requires_grad_(trained)


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """Backbone and gate parameters with their own learning rates; gates get no weight decay."""
    gate_ids = {id(p) for _, _, g in model.gates() for p in g.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in gate_ids and p.requires_grad]
    gates = [p for p in model.parameters() if id(p) in gate_ids and p.requires_grad]
    groups = [{"params": backbone, "lr": recipe.lr_backbone, "weight_decay": recipe.weight_decay}]
    if gates:
        groups.append({"params": gates, "lr": recipe.lr_gates, "weight_decay": 0.0})
    return groups
