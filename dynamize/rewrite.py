"""Apply a GatePlan to a traced model. Follows the plan; never decides what to gate."""
from typing import Dict

import torch
from torch import fx, nn

from .errors import RunError
from .gates import ChannelGate, Gate, GatedResidual
from .plan import GatePlan

# timm attributes that users and timm's own helpers (data config, distillation task) read off a model.
_TIMM_ATTRS = ("pretrained_cfg", "default_cfg", "num_classes", "num_features", "global_pool", "drop_rate")


def _key(name: str) -> str:
    return name.replace(".", "_").replace("#", "_")


class DynamicNet(nn.Module):
    """A timm model with L-Net / C-Net gates: the rewritten graph plus its plan and timm's model attributes."""

    def __init__(self, graph: fx.GraphModule, plan: GatePlan, base: nn.Module):
        super().__init__()
        self.graph = graph
        self.plan = plan
        self.in_chans = plan.input_size[0]
        for attr in _TIMM_ATTRS:
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        # Channel gates inside a residual branch moved with the branch; find each by the end of its path.
        modules = dict(graph.named_modules())
        self._gate_paths = {}
        for kind, names in (("lnets", [b.name for b in plan.blocks]), ("cnets", [g.name for g in plan.groups])):
            for name in names:
                suffix = f"{kind}.{_key(name)}"
                self._gate_paths[(kind, name)] = next(p for p in modules if p == suffix or p.endswith("." + suffix))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def block_gate(self, name: str) -> Gate:
        """The L-Net gate of a block named in the plan."""
        return self.graph.get_submodule(self._gate_paths[("lnets", name)]).gate

    def channel_gate(self, name: str) -> Gate:
        """The C-Net gate of a channel group named in the plan."""
        return self.graph.get_submodule(self._gate_paths[("cnets", name)]).gate

    def gates(self):
        """All gates, L-Nets first, as (kind, name, Gate)."""
        for b in self.plan.blocks:
            yield "layer", b.name, self.block_gate(b.name)
        for g in self.plan.groups:
            yield "channel", g.name, self.channel_gate(g.name)


def rewrite(gm: fx.GraphModule, plan: GatePlan, base: nn.Module) -> DynamicNet:
    """Insert the plan's gates into a traced model (changed in place) and wrap it as a DynamicNet.

    Raises:
        RunError: the plan names nodes this graph does not have (a plan from another architecture or timm version).
    """
    graph = gm.graph
    nodes: Dict[str, fx.Node] = {n.name: n for n in graph.nodes}

    replaced: Dict[str, fx.Node] = {}  # nodes whose users now read a gate's output instead

    def node(name: str) -> fx.Node:
        """The node that now stands for `name` in the graph."""
        if name in replaced:
            return replaced[name]
        if name not in nodes:
            raise RunError(f"the gate plan names node {name!r}, which {plan.architecture} does not have here "
                           "(a plan from another architecture or timm version); re-run `dynamize convert`")
        return nodes[name]

    gate_nodes: Dict[str, fx.Node] = {}
    for grp in plan.groups:
        target = f"cnets.{_key(grp.name)}"
        gm.add_submodule(target, ChannelGate(grp.in_channels, grp.channels, grp.hidden, grp.axis))
        after = node(grp.gate_after)
        with graph.inserting_after(after):
            gated = graph.call_module(target, (node(grp.gate_input), after))
        after.replace_all_uses_with(gated, delete_user_cb=lambda u, g=gated: u is not g)
        gate_nodes[grp.gate_after] = replaced[grp.gate_after] = gated

    for blk in plan.blocks:
        region = [nodes[name] for name in blk.branch_nodes]  # the gates' own inputs are original nodes
        region += [gate_nodes[name] for name in blk.branch_nodes if name in gate_nodes]
        order = {n: i for i, n in enumerate(graph.nodes)}
        region.sort(key=order.get)
        fork, add = node(blk.fork), node(blk.add)
        sub = fx.Graph()
        env = {fork: sub.placeholder("x")}
        for n in region:
            env[n] = sub.node_copy(n, lambda a: env[a])
        sub.output(env[node(blk.branch_out)])
        target = f"lnets.{_key(blk.name)}"
        gm.add_submodule(target, GatedResidual(fx.GraphModule(gm, sub, "Branch"), blk.channels, blk.hidden))
        with graph.inserting_before(add):
            gated = graph.call_module(target, (fork, node(blk.shortcut)))
        add.replace_all_uses_with(gated)
        replaced[blk.add] = gated
        graph.erase_node(add)
        for n in reversed(region):
            graph.erase_node(n)
        _drop_moved_attributes(gm, [n.target for n in region if n.op == "get_attr"])

    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return DynamicNet(gm, plan, base)


def _drop_moved_attributes(gm: fx.GraphModule, targets) -> None:
    """Delete parameters that moved into an outlined branch (delete_all_unused_submodules only drops modules)."""
    still_used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in set(targets) - still_used:
        owner, _, leaf = target.rpartition(".")
        delattr(gm.get_submodule(owner), leaf)
