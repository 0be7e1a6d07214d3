"""The cost model: FLOPs of every node, of the gates, and per image from the gates' decisions.

This is the one place that defines what a FLOPs fraction is; training (the budget penalty), calibration, the report,
the bench and the plan printout all read it. FLOPs are torch.utils.flop_counter's: 2 x multiply-accumulates of
convolutions and matrix multiplies (papers usually quote MACs, half of this), plus the additions of the gates'
average pooling, which the counter does not see.

Per image: every node costs its FLOPs x keep(its block) x the kept fraction of every group that scales it; each
active gate adds its MLP when it runs (a C-Net inside a skipped block does not); each pooled tensor is paid once if
any active gate that reads it runs. The fraction divides by the original model's FLOPs.
"""
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from .gates import Gate
from .plan import BlockSite, ChannelGroup, GatePlan
from .rewrite import DynamicNet

OUTSIDE = "(outside gated blocks)"
GATES = "(gates)"

# What running a channel group on its kept channels costs besides their MACs, in multiply-accumulates of a
# convolution: gathering the kept weights. Measured on this project's 2-core AVX-512 x86 CPU (2 threads):
# convolutions run at ~60-90 GMAC/s, gathers copy ~18 G floats/s as whole rows (kept filters, or kept inputs of a
# transposed copy), ~6 G/s as 3x3 chunks (kept inputs and outputs at once) and ~2 G/s one float at a time. The
# runtime's choice of layout and the plan's `channel_gate_pays` both read these.
GATHER_MACS = {"rows": 5, "chunks": 12, "floats": 40}
# What a channel gate costs per call whatever it keeps, in the same units: pooling its input, its MLP, the decision and
# the multiplication, about 130 us of small operations and Python dispatch (at ~60 GMAC/s).
GATE_CALL_MACS = 8e6
# The keep share at which `channel_gate_pays` judges a gate: a typical budget keeps about half of a group.
PAYBACK_KEEP = 0.5


class _CountingInterpreter(fx.Interpreter):
    """Runs a graph node by node, recording each node's FLOPs."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.flops: dict[str, int] = {}

    def run_node(self, n: fx.Node):
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        self.flops[n.name] = counter.get_total_flops()
        return out


def node_flops(gm: fx.GraphModule, input_size) -> dict[str, int]:
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


def gate_flops(in_channels: int, units: int, hidden: int) -> int:
    """FLOPs of one gate's MLP for one image, counted the same way as the model's own layers."""
    gate = Gate(in_channels, units, hidden)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        gate.mlp(torch.zeros(1, in_channels))
    return counter.get_total_flops()


def pool_flops(shape) -> int:
    """Additions of a global average pool over one image's [C, H, W] (or [H, W, C]) tensor."""
    c, h, w = shape[-3:]
    return int(c * h * w)


def gather_macs(weights: int, kernel: int, both: bool = False) -> float:
    """Cost of gathering `weights` weights of a layer with `kernel` weights per (output, input) channel pair.

    Args:
        weights: how many weights are copied.
        kernel: kh * kw of the layer (1 for linears and 1x1 convolutions).
        both: kept outputs and kept inputs are gathered together (chunks of the flattened weight).
    """
    if not both:
        return weights * GATHER_MACS["rows"]
    return weights * GATHER_MACS["chunks" if kernel > 1 else "floats"]


def channel_gather_macs(producer: nn.Conv2d | nn.Linear, depthwise: Sequence[nn.Conv2d],
                        sinks: Sequence[nn.Conv2d | nn.Linear], channels: int, upstream: bool,
                        downstream: Sequence[bool]) -> float:
    """Cost of gathering one kept channel's weights in every layer of a channel group: the producer's filter,
    the depthwise filters and the sinks' input columns.

    Args:
        producer, depthwise, sinks: the group's layers (convolutions or linears).
        channels: channels of the group.
        upstream: the producer's inputs are another group's kept channels (kept inputs and outputs are gathered).
        downstream: per sink, whether its outputs are another group's kept channels (the sink produces a group).
            A convolution gated on its inputs alone copies whole rows of a transposed copy of its weights; one gated on
            both sides copies kept inputs and outputs together, as chunks.
    """
    def kernel(m: nn.Conv2d | nn.Linear) -> int:
        return m.weight[0, 0].numel() if isinstance(m, nn.Conv2d) else 1

    cost = gather_macs(producer.weight.numel() // channels, kernel(producer), both=upstream)
    cost += sum(gather_macs(m.weight.numel() // channels, 1) for m in depthwise)
    for m, produces in zip(sinks, downstream, strict=True):
        per_input = m.weight.numel() // (m.in_channels if isinstance(m, nn.Conv2d) else m.in_features)
        cost += gather_macs(per_input, kernel(m), both=produces and kernel(m) > 1)
    return cost


def channel_gate_pays(macs: float, gather: float, channels: int, keep: float = PAYBACK_KEEP) -> bool:
    """Does one image run a group faster on a share `keep` of its channels than on all of them, counting the gate?

    Args:
        macs: multiply-accumulates of the group's layers per channel and image.
        gather: cost of gathering one kept channel's weights (`channel_gather_macs`).
        channels: channels of the group.
        keep: share of channels kept.

    A group on small maps (late stages, small inputs) or with few channels does little work: gathering its kept
    weights, or the gate's own fixed cost, can exceed what the dropped channels save.
    """
    return keep * channels * (macs + gather) + GATE_CALL_MACS < channels * macs


Decisions = Mapping[str, torch.Tensor]


def parts(plan: GatePlan, keep_block: Decisions, kept: Decisions,
          active: Mapping[str, bool] | None = None) -> dict[str, torch.Tensor]:
    """Per-image FLOPs, [batch], split by where they are spent: each gated block, OUTSIDE and GATES.

    Args:
        plan: the model's plan.
        keep_block: per block name, each image's keep decision (0/1, or a probability).
        kept: per group name, each image's kept fraction of the group's channels.
        active: per gate name, whether it runs (inactive gates keep everything and cost nothing); default all.
    """
    ref = next(iter({**keep_block, **kept}.values()))
    n = ref.shape[0]
    out: dict[str, torch.Tensor] = defaultdict(lambda: ref.new_zeros(n))
    for item in plan.costs:
        term = ref.new_full((n,), float(item.flops))
        block = item.block if item.block in keep_block else None
        if block is not None:
            term = term * keep_block[block]
        for group in item.groups:
            term = term * kept[group]
        key = block if block is not None else OUTSIDE
        out[key] = out[key] + term
    runs: dict[str, torch.Tensor] = {}  # per pooled tensor: whether any active gate reading it runs, per image
    gates = out[GATES]
    for b in plan.blocks:
        if active is None or active.get(b.name, True):
            gates = gates + b.gate_flops
            runs[b.pool] = ref.new_ones(n)
    for g in plan.groups:
        if active is None or active.get(g.name, True):
            run = keep_block[g.block] if g.block is not None and g.block in keep_block else ref.new_ones(n)
            gates = gates + g.gate_flops * run
            runs[g.pool] = torch.maximum(runs[g.pool], run) if g.pool in runs else run
    sites: list[BlockSite | ChannelGroup] = [*plan.blocks, *plan.groups]
    pools = {s.pool: s.pool_flops for s in sites}
    for pool, run in runs.items():
        gates = gates + pools[pool] * run
    out[GATES] = gates
    return dict(out)


def fraction(plan: GatePlan, keep_block: Decisions, kept: Decisions,
             active: Mapping[str, bool] | None = None) -> torch.Tensor:
    """Per-image FLOPs as a fraction of the original model's, [batch] (see `parts`)."""
    total = cast(torch.Tensor, sum(parts(plan, keep_block, kept, active).values()))  # GATES is always a part
    return total / plan.total_flops


def decisions(model: DynamicNet) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, bool]]:
    """(keep_block, kept, active) of a gated model's last forward pass, differentiable in training."""
    plan = model.plan
    keep_block = {b.name: model.block_gate(b.name).decisions[:, 0] for b in plan.blocks}
    kept = {g.name: model.channel_gate(g.name).decisions.mean(1) for g in plan.groups}
    active = {name: gate.is_active for _, name, gate in model.gates()}
    return keep_block, kept, active


def flops_per_image(model: DynamicNet) -> torch.Tensor:
    """Per-image FLOPs fraction, [batch], from the decisions of the model's last forward pass.

    Differentiable through straight-through decisions in training, so it can drive the budget penalty.
    """
    return fraction(model.plan, *decisions(model))


def flops_by_part(model: DynamicNet) -> dict[str, torch.Tensor]:
    """Per-image FLOPs of the last forward pass, by block, OUTSIDE and GATES (they add up to `flops_per_image`)."""
    return parts(model.plan, *decisions(model))


@torch.no_grad()
def flops_fraction(model: DynamicNet, images: torch.Tensor) -> torch.Tensor:
    """Each image's FLOPs as a fraction of the original model's, with the model's hard (evaluation) decisions."""
    was_training = model.training
    model.eval()
    model(images)
    model.train(was_training)
    return flops_per_image(model)


def expected_fraction(plan: GatePlan, p: float, trained: str = "both") -> float:
    """Mean FLOPs fraction when every trained gate keeps each of its units independently with probability p.

    Groups keep at least the channels they always keep (`ChannelGroup.always_kept`); gates of a kind that is not
    trained stay open and cost nothing.
    """
    one = torch.ones(1)
    layer, channel = trained in ("both", "layer"), trained in ("both", "channel")
    keep_block = {b.name: one * (p if layer else 1.0) for b in plan.blocks}
    kept = {g.name: one * (max(p, g.always_kept / g.channels) if channel else 1.0) for g in plan.groups}
    active = {**{b.name: layer for b in plan.blocks}, **{g.name: channel for g in plan.groups}}
    if not keep_block and not kept:
        return 1.0
    return fraction(plan, keep_block, kept, active).item()


def min_fraction(plan: GatePlan, trained: str = "both") -> float:
    """The smallest mean FLOPs fraction the trained gates can reach: every block skipped, every group at the channels
    it always keeps."""
    return expected_fraction(plan, 0.0, trained)


def smallest_budget(plan: GatePlan, trained: str = "both") -> float:
    """The smallest budget the trained gates can meet: `min_fraction` rounded up to a thousandth, as it is shown."""
    return math.ceil(min_fraction(plan, trained) * 1000) / 1000
