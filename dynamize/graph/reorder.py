"""Width mode's change to the weights: each gated group's channels ordered by importance, the function unchanged.

A width-mode C-Net keeps a prefix of its group's channels, so the channels that matter most should come first. As in
OFA's `re_organize_middle_weights`, a channel's importance is the L1 norm of the weights that read it: its input
columns in the group's sinks, summed over sinks. The order is applied once, at conversion, to every tensor indexed by
the group's channels: the producer's filters and bias, the per-channel parameters and statistics of its norms and
depthwise convolutions, the output of a squeeze-excite's expanding convolution, and the sinks' input columns. The
model then computes exactly what it computed before (the saved weights are the reordered ones; loading replays the
plan and loads them as they are).

`find_edits` is the analysis (which tensors a group's order touches, or why it cannot be reordered safely);
`reorder` applies the plan's orders. Groups that share a layer on the same axis (StarNet's `act(f1(x)) * f2(x)`)
would need one order for both: `plan_model` leaves them per channel.
"""
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import ops
from .gates import width_choices
from .plan import ChannelGroup, GatePlan, Skipped
from .trace import symbolic_trace, target_path


@dataclass(frozen=True)
class Edit:
    """Tensors of one module of a unit whose axis `dim` is indexed by a group's channels."""
    module: str
    names: tuple[str, ...]
    dim: int


_OWN = ""  # a rescale whose factors are the group's own channels: nothing more to reorder
_SHARED = "shares a layer with another group (channels joined by a product), which would need the same order"
_NORM = ("weight", "bias", "running_mean", "running_var")
_LAYER_OUT = ("weight", "bias")


def find_edits(gm: fx.GraphModule, group: ChannelGroup) -> list[Edit] | str:
    """What reordering `group`'s channels changes in its unit (traced as `gm`), or why that is not safe.

    Args:
        gm: the unit's own torch.fx trace, whose node names the plan's group uses.
        group: the group.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[target_path(n)] = calls.get(target_path(n), 0) + 1
    members = {nodes[name] for name in group.members}
    edits = [Edit(target_path(nodes[group.producer]), _LAYER_OUT, 0)]
    for name in group.members[1:]:
        n = nodes[name]
        m = ops.module_of(gm, n)
        if m is None or next(m.parameters(), None) is None and next(m.buffers(), None) is None:
            continue
        if isinstance(m, _BatchNorm):
            edits.append(Edit(target_path(n), _NORM, 0))
        elif ops.is_depthwise(m):
            edits.append(Edit(target_path(n), _LAYER_OUT, 0))
        else:
            return f"its channels pass through {type(m).__name__}, whose parameters the order does not know"
    sinks = [nodes[s] for s in group.sinks]
    edits += [Edit(target_path(s), ("weight",), 1) for s in sinks]
    stack, seen = [nodes[group.gate_after]], set()
    while stack:
        src = stack.pop()
        for u in src.users:
            if u in seen or u in sinks:
                continue
            seen.add(u)
            if u.name in group.exits:
                return "its channels are added into a residual shortcut, whose channel order is fixed"
            if u.op == "output":
                return "its channels leave the unit"
            if ops.role(gm, u, group.axis) is ops.Role.RESCALE:
                factors = [a for a in u.all_input_nodes if a is not src]
                source = _factor_layer(gm, factors[0], members) if factors else _OWN
                if source is None:
                    return "its squeeze-excite factors do not come from one layer of its own"
                if source != _OWN:
                    edits.append(Edit(source, _LAYER_OUT, 0))
            stack.append(u)
    if any(calls.get(e.module, 0) != 1 for e in edits):
        return "a layer of the group is called more than once (shared weights)"
    for e in edits:
        m = gm.get_submodule(e.module)
        if any((t := getattr(m, name, None)) is not None and t.shape[e.dim] != group.channels for name in e.names):
            return f"{e.module} is not indexed by the group's channels"
    return edits


def _factor_layer(gm: fx.GraphModule, factor: fx.Node, members: set[fx.Node]) -> str | None:
    """Where a rescale's per-channel factors come from: `_OWN` if from the group's own channels (`x * sigmoid(x)`:
    already in the order), else the layer whose output reaches the factor only through single-use elementwise ops
    (a squeeze-excite's expanding convolution and its sigmoid); None if neither."""
    n = factor
    while n not in members and len(n.all_input_nodes) == 1 and ops.role(gm, n) is ops.Role.ELEMENTWISE:
        if len(n.users) != 1:
            return None
        n = n.all_input_nodes[0]
    if n in members:
        return _OWN
    m = ops.module_of(gm, n)
    if len(n.users) == 1 and (ops.is_plain_conv(m) or isinstance(m, nn.Linear)):
        return target_path(n)
    return None


def assign_widths(plan: GatePlan, traces: dict[str, fx.GraphModule]) -> list[Skipped]:
    """Give each group of `plan` that can be reordered its widths (width mode); say why the others cannot.

    Args:
        plan: the plan, whose groups get `widths` in place.
        traces: each unit's own torch.fx trace, by unit path.

    Returns:
        A `Skipped` item (kind "width") for every group left with per-channel decisions.
    """
    found = {g.name: find_edits(traces[g.unit], g) for g in plan.groups}
    claims: dict[tuple[str, str, int], list[str]] = {}
    for g in plan.groups:
        edits = found[g.name]
        for e in edits if isinstance(edits, list) else []:
            claims.setdefault((g.unit, e.module, e.dim), []).append(g.name)
    shared = {name for names in claims.values() if len(names) > 1 for name in names}
    skipped = []
    for g in plan.groups:
        edits = found[g.name]
        widths = width_choices(g.channels, g.min_keep)
        reason = edits if isinstance(edits, str) else (
            _SHARED if g.name in shared else None if widths else "too few channels for a choice of widths")
        if reason is None:
            g.widths = widths
        else:
            skipped.append(Skipped("width", g.name, f"{reason}: per-channel decisions"))
    return skipped


def importance(unit: nn.Module, group: ChannelGroup, edits: list[Edit]) -> torch.Tensor:
    """Each channel's importance: the L1 norm of the sinks' input weights that read it, summed over sinks."""
    total = torch.zeros(group.channels)
    for e in edits:
        if e.dim == 1:
            w = unit.get_submodule(e.module).get_parameter("weight").detach()
            total += w.abs().transpose(0, 1).reshape(group.channels, -1).sum(1).float().cpu()
    return total


@torch.no_grad()
def reorder(model: nn.Module, plan: GatePlan) -> None:
    """Order the channels of every width-mode group of `plan` (those with `widths`) by importance, in place.

    Args:
        model: the base timm model the plan was made for (a copy: its weights change, its function does not).
        plan: the plan.

    Raises:
        RuntimeError: the plan asks to reorder a group that its unit cannot reorder (`plan_model` checked it).
    """
    traces: dict[str, fx.GraphModule] = {}
    for group in plan.groups:
        if not group.widths:
            continue
        unit = model.get_submodule(group.unit)
        if group.unit not in traces:
            traces[group.unit] = symbolic_trace(unit, plan.none_args.get(group.unit, ()))
        edits = find_edits(traces[group.unit], group)
        if isinstance(edits, str):
            raise RuntimeError(f"cannot reorder the channels of {group.name}: {edits}")
        order = importance(unit, group, edits).argsort(descending=True, stable=True)
        for e in edits:
            m = unit.get_submodule(e.module)
            for name in e.names:
                t = getattr(m, name, None)
                if t is not None:
                    t.copy_(t.index_select(e.dim, order.to(t.device)))
