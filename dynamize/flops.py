"""FLOPs accounting: a static per-node table from torch's FlopCounterMode, and per-image effective FLOPs.

FLOPs here are torch.utils.flop_counter's: 2 x multiply-accumulates (papers usually quote MACs, half of this).
"""
from typing import Dict

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode


class _CountingInterpreter(fx.Interpreter):
    """Runs a graph node by node, recording each node's FLOPs."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.flops: Dict[str, int] = {}

    def run_node(self, n: fx.Node):
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        self.flops[n.name] = counter.get_total_flops()
        return out


def node_flops(gm: fx.GraphModule, input_size) -> Dict[str, int]:
    """FLOPs of every node of a traced model for one image of `input_size` (C, H, W)."""
    was_training = gm.training
    gm.eval()
    interp = _CountingInterpreter(gm)
    with torch.no_grad():
        interp.run(torch.zeros(1, *input_size))
    gm.train(was_training)
    return interp.flops


def count_flops(model: nn.Module, input_size) -> int:
    """Total FLOPs of a model for one image, straight from FlopCounterMode."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *input_size))
    model.train(was_training)
    return counter.get_total_flops()


def flops_per_image(model: nn.Module) -> torch.Tensor:
    """Per-image FLOPs fraction, [batch], from the decisions of the model's last forward pass.

    Differentiable through straight-through decisions in training, so it can drive the budget penalty.
    """
    plan = model.plan
    keep_block = {b.name: model.block_gate(b.name).last_keep[:, 0] for b in plan.blocks}
    kept = {g.name: model.channel_gate(g.name).last_keep.mean(1) for g in plan.groups}
    ref = next(iter(keep_block.values()), None)
    if ref is None:
        ref = next(iter(kept.values()), None)
    if ref is None:
        raise ValueError("the model has no gates")
    total = ref.new_zeros(ref.shape[0])
    for item in plan.costs:
        term = ref.new_full((ref.shape[0],), float(item.flops))
        if item.block and item.block in keep_block:
            term = term * keep_block[item.block]
        for g in item.groups:
            term = term * kept[g]
        total = total + term
    for b in plan.blocks:
        total = total + b.gate_flops
    for g in plan.groups:
        total = total + (g.gate_flops * keep_block[g.block] if g.block in keep_block else g.gate_flops)
    return total / plan.total_flops


@torch.no_grad()
def flops_fraction(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Each image's FLOPs as a fraction of the original model's, with the model's hard (evaluation) decisions."""
    was_training = model.training
    model.eval()
    model(images)
    model.train(was_training)
    return flops_per_image(model)
