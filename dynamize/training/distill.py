"""Budget-controlled distillation: timm's logit distillation, the budget losses of `budget.py`, and the phases.

Training runs in two phases inside one resumable loop:
1. gate learning: task CE + T^2 KL(teacher || student) + the budget terms; the FLOPs target anneals from 1.0 to
   the budget, the per-block bounds relax, batch shaping fades and the gates' noise decays to zero;
2. settling (the last `settle_fraction` of the steps): at its first step the job's `settle` callback calibrates the
   thresholds to the budget and re-estimates BatchNorm statistics; the gates and the BatchNorm statistics are then
   frozen and the backbone is fine-tuned with the deterministic decisions and statistics it will see at inference.
"""
from collections.abc import Callable

import torch
from timm.task import LogitDistillationTask
from timm.utils import unwrap_model
from torch import nn

from ..graph.cost import flops_per_image, min_fraction
from ..graph.rewrite import DynamicNet
from .batchnorm import freeze_statistics
from .budget import BudgetSchedule, batch_shaping_loss, block_densities, bounds_loss, floor_scaled_weight
from .recipe import Recipe

SHAPING_CONCENTRATION = 0.8  # a + b of the batch-shaping prior: U-shaped, most images clearly on or off


def settle_step(recipe: Recipe, total: int) -> int:
    """The step at which the gates are calibrated and frozen (== total: never)."""
    return total - round(recipe.settle_fraction * total)


class BudgetDistillationTask(LogitDistillationTask):
    """Loss = task CE + T^2 KL(teacher || student) + budget terms while the gates learn; CE + KL once they settle.

    The budget terms: budget_weight * (mean FLOPs fraction - target)^2 (two-sided: spending less than the budget
    costs accuracy for nothing; the weight grows near the smallest reachable fraction, `floor_scaled_weight`)
    + bounds_weight * per-block bounds + shaping_weight * batch shaping. The task owns its schedule: the training
    loop calls `on_step(step, total)` before each step.

    Args:
        student: the gated model.
        teacher: the original model (frozen, evaluation mode).
        recipe: loss weights and schedule.
        settle: called once, at the first settling step, to calibrate thresholds and re-estimate BatchNorm.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, recipe: Recipe,
                 settle: Callable[[], None] | None = None):
        super().__init__(student, teacher, criterion=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing),
                         distill_loss_weight=recipe.distill_weight, task_loss_weight=recipe.task_weight,
                         temperature=recipe.temperature, verbose=False)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.recipe, self.settle = recipe, settle
        self.schedule = BudgetSchedule.at(0.0, recipe.budget, recipe.anneal_fraction, recipe.bounds_fraction,
                                          recipe.noise_final)
        self.settled = False
        self.kinds = 1 + (recipe.gates == "both")
        self.floor = min_fraction(self.student.plan, recipe.gates)
        self.budget_weight = floor_scaled_weight(recipe.budget_weight, recipe.budget, self.floor,
                                                 recipe.floor_margin)

    @property
    def student(self) -> DynamicNet:
        return unwrap_model(self.trainable_module)

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> "BudgetDistillationTask":
        """Wrap the student in DDP that lets parameters go without a gradient, which DDP would otherwise wait for
        at the next step. Once the gates settle (or on a resume after that) theirs get none, and with hard
        decisions neither does a block's branch that no image of a rank's batch keeps (wrapping again
        at the settle without `find_unused_parameters` was tried and failed on such a batch)."""
        super().prepare_distributed(device_ids, **{"find_unused_parameters": True, **ddp_kwargs})
        return self

    def on_step(self, step: int, total: int) -> None:
        """Set the schedule for the coming step; settle the gates at the settling step."""
        start = settle_step(self.recipe, total)
        self.schedule = BudgetSchedule.at(min(1.0, step / max(1, start)), self.recipe.budget,
                                          self.recipe.anneal_fraction, self.recipe.bounds_fraction,
                                          self.recipe.noise_final)
        if step == start and self.settle is not None:
            self.settle()
        self.settled = step >= start
        if self.settled:
            freeze_statistics(self.student)
        for _, _, gate in self.student.gates():
            gate.noise = 0.0 if self.settled else self.schedule.noise
            for p in gate.parameters():
                p.requires_grad_(gate.is_active and not self.settled)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(input, target)
        frac = flops_per_image(self.student)
        out["flops"] = frac.detach()
        if self.settled:
            return out
        s, r = self.schedule, self.recipe
        budget = (frac.mean() - s.target) ** 2
        bounds = bounds_loss(block_densities(self.student), s.target, s.tightness)
        # A unit's share of images: the k-th root of the target when k kinds of gates multiply each other's cost.
        probs = [gate.last_prob for _, _, gate in self.student.gates() if gate.is_active and gate.last_prob is not None]
        shaping_weight = 0.0 if r.static_gates else r.shaping_weight * s.shaping  # static: nothing to shape
        shaping = batch_shaping_loss(probs, s.target ** (1 / self.kinds), SHAPING_CONCENTRATION) if shaping_weight \
            else budget.new_zeros(())
        out["loss"] = (out["loss"] + self.budget_weight * budget + r.bounds_weight * bounds + shaping_weight * shaping)
        out.update(budget_loss=budget.detach(), bounds_loss=bounds.detach(), shaping_loss=shaping.detach())
        return out


def configure_gates(model: DynamicNet, kinds: str, tau: float, static: bool = False) -> None:
    """Train only the chosen kind of gates ("layer", "channel", "both"); the others stay open at scale 1.

    Whether a gate is active is part of its state dict, so a run keeps its kinds after save and load.

    Args:
        static: gates that ignore the image (`Gate.make_static`): the static baseline of the same method.
    """
    for kind, _, gate in model.gates():
        trained = kinds == "both" or kinds == kind
        gate.active.fill_(trained)
        gate.tau = tau
        if trained and static:
            gate.make_static()
        for p in gate.parameters():
            p.requires_grad_(trained)


def param_groups(model: DynamicNet, recipe: Recipe) -> list[dict]:
    """Backbone and gate parameters with their own learning rates; gates get no weight decay.

    Every gate parameter is listed (also those frozen now), so that settling can freeze and a resume can restore.
    """
    gate_ids = {id(p) for _, _, g in model.gates() for p in g.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in gate_ids and p.requires_grad]
    gates = [p for _, _, g in model.gates() if g.is_active for p in g.parameters()]
    groups = [{"params": backbone, "lr": recipe.lr_backbone, "weight_decay": recipe.weight_decay}]
    if gates:
        groups.append({"params": gates, "lr": recipe.lr_gates, "weight_decay": 0.0})
    return groups
