"""Find the residual blocks and channel groups of a traced model. Reads the graph; never changes it.

See docs/architecture.md for the rules. In short: a residual block is an add whose one operand is computed from
the other operand's source x by a single-entry branch that contains convolutions; a channel group is the output
of a convolution that reaches only other convolutions through per-channel operations.
"""
import operator
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .flops import node_flops
from .gates import gate_flops, gate_hidden
from .plan import BlockSite, ChannelGroup, CostItem, GatePlan, Skipped
from .trace import node_shape

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
# Elementwise functions that act on each channel on its own (no mixing across channels).
_PER_CHANNEL_FUNCTIONS = {
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.hardtanh,
    F.dropout, F.max_pool2d, F.avg_pool2d, torch.relu, torch.sigmoid, torch.tanh,
}
_PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous"}
_ELEMENTWISE_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.ReLU, nn.ReLU6,
                        nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
                        nn.Mish, nn.Hardtanh, nn.PReLU)


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_conv(m) -> bool:
    return isinstance(m, nn.Conv2d)


def _is_depthwise(m) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _is_full_conv(m) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1


def _is_elementwise_module(m) -> bool:
    if isinstance(m, _ELEMENTWISE_MODULES):
        return True
    # timm's own activation layers (Swish, HardSwish, GELU, ...) and norm+act layers whose norm is per channel.
    return type(m).__module__.startswith("timm.layers.activations")


def _is_residual_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        pass
    else:
        return False
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    a, b = (node_shape(x) for x in node.args)
    return a is not None and a == b and len(a) == 4


class _Graph:
    """Reachability helpers over one traced graph."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self._anc: Dict[fx.Node, Set[fx.Node]] = {}

    def ancestors(self, node: fx.Node) -> Set[fx.Node]:
        if node not in self._anc:
            seen, stack = set(), list(node.all_input_nodes)
            while stack:
                n = stack.pop()
                if n not in seen:
                    seen.add(n)
                    stack.extend(n.all_input_nodes)
            self._anc[node] = seen
        return self._anc[node]

    def owned_region(self, out: fx.Node, add: fx.Node) -> Tuple[Set[fx.Node], Set[fx.Node]]:
        """The nodes used only to compute `out` (whose one consumer is `add`), and the region's inputs."""
        region = {out}
        for n in sorted(self.ancestors(out), key=self.order.get, reverse=True):
            if n.op != "placeholder" and n.users and all(u in region for u in n.users):
                region.add(n)
        entries = {i for n in region for i in n.all_input_nodes if i not in region and i.op != "get_attr"}
        return region, entries

    def count_convs(self, nodes) -> int:
        return sum(_is_conv(_module(self.gm, n)) for n in nodes)


def _find_blocks(g: _Graph) -> Tuple[List[Tuple[fx.Node, fx.Node, fx.Node, fx.Node, Set[fx.Node]]], List[Skipped]]:
    """Residual sites as (add, fork, branch_out, shortcut, branch_nodes), and the adds that were rejected."""
    sites, skipped, taken = [], [], set()
    for add in g.nodes:
        if not _is_residual_add(add):
            continue
        best, reason = None, "a sum of branches, not `shortcut(x) + F(x)`"
        for out, other in (add.args, add.args[::-1]):
            if len(out.users) != 1:
                continue
            region, entries = g.owned_region(out, add)
            if len(entries) != 1:
                continue
            (fork,) = entries
            if other is not fork and fork not in g.ancestors(other):
                continue
            n_convs = g.count_convs(region)
            shortcut_nodes = (g.ancestors(other) | {other}) - g.ancestors(fork) - {fork}
            if n_convs == 0 or g.count_convs(shortcut_nodes) > 1 or g.count_convs(shortcut_nodes) >= n_convs:
                continue
            if best is None or n_convs > best[-1]:
                best = (fork, out, other, region, n_convs)
        if best is None:
            skipped.append(Skipped("block", _owner(add), reason))
            continue
        fork, out, other, region, _ = best
        if region & taken or any(s[0] in region for s in sites):
            skipped.append(Skipped("block", _owner(add), "nested inside another gated block"))
            continue
        taken |= region
        sites.append((add, fork, out, other, region))
    return sites, skipped


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


def _channel_axis_size(node: fx.Node, axis: int) -> Optional[int]:
    shape = node_shape(node)
    return shape[axis] if shape is not None and len(shape) == 4 else None


def _is_per_channel(g: _Graph, node: fx.Node, axis: int, channels: int, allow_bias: bool) -> bool:
    """True if `node` maps each channel of its one tensor input on its own, keeping the channel count."""
    if _channel_axis_size(node, axis) != channels or len(node.all_input_nodes) != 1:
        return False
    m = _module(g.gm, node)
    if m is not None:
        if _is_elementwise_module(m):
            return True
        if allow_bias and axis == 1 and (_is_depthwise(m) or isinstance(m, nn.modules.batchnorm._BatchNorm)):
            return True
        return False
    if node.op == "call_function":
        return node.target in _PER_CHANNEL_FUNCTIONS
    if node.op == "call_method":
        return node.target in _PER_CHANNEL_METHODS
    return False


def _is_sink(g: _Graph, node: fx.Node, src: fx.Node, axis: int, channels: int) -> bool:
    """True if `node` is a layer reading the group's channels as its input features."""
    m = _module(g.gm, node)
    if node.args[0] is not src:
        return False
    if axis == 1:
        return _is_full_conv(m) and m.in_channels == channels
    return isinstance(m, nn.Linear) and m.in_features == channels and len(node_shape(src) or ()) == 4


def _is_squeeze(node: fx.Node) -> bool:
    """A spatial mean with kept dims, the first step of squeeze-excite."""
    if node.op == "call_method" and node.target == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return tuple(dims or ()) == (2, 3) and (node.kwargs.get("keepdim") or (len(node.args) > 2 and node.args[2]))
    return False


def _why_not(g: _Graph, node: fx.Node) -> str:
    if _is_residual_add(node) or (node.op == "call_function" and node.target in _ADD_FUNCTIONS):
        return "feeds a residual add"
    if node.op == "call_function" and node.target in (torch.cat, torch.concat):
        return "feeds a concat"
    if node.op == "output":
        return "is a model output"
    m = _module(g.gm, node)
    if _is_conv(m) and m.groups > 1:
        return "feeds a grouped convolution"
    if isinstance(m, nn.Linear) or (m is None and "flatten" in str(node.target)):
        return "feeds the classifier"
    return f"feeds `{node.name}`, which mixes channels"


def _find_group(g: _Graph, producer: fx.Node, axis: int) -> Tuple[Optional[dict], Optional[str]]:
    """Follow a producer's output through per-channel ops to the layers that read it."""
    channels = _channel_axis_size(producer, axis)
    members, end = [producer], producer
    while len(end.users) == 1:
        nxt = next(iter(end.users))
        if not _is_per_channel(g, nxt, axis, channels, allow_bias=True):
            break
        members.append(nxt)
        end = nxt
    sinks, frontier, seen = [], [end], set()
    while frontier:
        src = frontier.pop()
        for u in src.users:
            if u in seen:
                continue
            if _is_sink(g, u, src, axis, channels):
                sinks.append(u)
            elif _is_per_channel(g, u, axis, channels, allow_bias=False):
                frontier.append(u)
            elif axis == 1 and _is_squeeze(u):
                frontier.append(u)
                seen.add(u)
                continue
            elif (u.op == "call_function" and u.target in (operator.mul, torch.mul) and len(u.args) == 2
                  and _channel_axis_size(u, axis) == channels):
                frontier.append(u)  # squeeze-excite rescaling of the group's own channels
            else:
                return None, _why_not(g, u)
            seen.add(u)
    if not sinks:
        return None, "reaches no convolution"
    return {"members": members, "end": end, "sinks": sinks, "channels": channels}, None


def _producers(g: _Graph):
    for n in g.nodes:
        m = _module(g.gm, n)
        if _is_full_conv(m):
            yield n, 1
        elif isinstance(m, nn.Linear) and len(node_shape(n) or ()) == 4:
            yield n, -1


def analyse(gm: fx.GraphModule, architecture: str, input_size, gates: str = "both") -> GatePlan:
    """Build the GatePlan of a traced, shape-annotated model.

    Args:
        gm: the model traced by `dynamize.trace.trace`.
        architecture: timm model name, recorded in the plan.
        input_size: (C, H, W) the FLOPs are counted at.
        gates: "layer", "channel" or "both".
    """
    g = _Graph(gm)
    flops = node_flops(gm, input_size)
    plan = GatePlan(architecture=architecture, gates=gates, input_size=list(input_size),
                    total_flops=sum(flops.values()))

    block_of: Dict[fx.Node, str] = {}
    if gates in ("both", "layer"):
        sites, plan.skipped = _find_blocks(g)
        if not any(_is_residual_add(n) for n in g.nodes):
            plan.skipped.append(Skipped("block", architecture, "no residual adds: channel gates only"))
        used_names: Set[str] = set()
        for add, fork, out, other, region in sites:
            name = _unique(_owner(add), used_names)
            c = node_shape(fork)[1]
            hidden = gate_hidden(c)
            plan.blocks.append(BlockSite(
                name=name, add=add.name, fork=fork.name, branch_out=out.name, shortcut=other.name,
                branch_nodes=[n.name for n in g.nodes if n in region], channels=c, hidden=hidden,
                flops=sum(flops.get(n.name, 0) for n in region), gate_flops=gate_flops(c, 1, hidden)))
            block_of.update({n: name for n in region})

    groups_of: Dict[fx.Node, List[str]] = {}
    if gates in ("both", "channel"):
        used_names = set()
        for producer, axis in _producers(g):
            name = _owner(producer)
            if axis == 1 and node_shape(producer)[2:] == (1, 1):
                plan.skipped.append(Skipped("group", name, "works on a 1x1 map (squeeze-excite or head): too small"))
                continue
            found, reason = _find_group(g, producer, axis)
            if found is None:
                plan.skipped.append(Skipped("group", name, reason))
                continue
            block = block_of.get(producer)
            if any(block_of.get(n) != block for n in found["members"] + found["sinks"]):
                plan.skipped.append(Skipped("group", name, "crosses a residual block boundary"))
                continue
            name = _unique(name, used_names)
            gate_input = producer.args[0]
            in_ch = _channel_axis_size(gate_input, axis)
            hidden = gate_hidden(in_ch)
            scaled = found["members"] + found["sinks"]
            for n in scaled:
                groups_of.setdefault(n, []).append(name)
            plan.groups.append(ChannelGroup(
                name=name, producer=producer.name, gate_input=gate_input.name, gate_after=found["end"].name,
                members=[n.name for n in found["members"]], sinks=[n.name for n in found["sinks"]],
                channels=found["channels"], in_channels=in_ch, axis=axis, hidden=hidden, block=block,
                flops=sum(flops.get(n.name, 0) for n in scaled), gate_flops=gate_flops(in_ch, found["channels"], hidden)))

    by_name = {n.name: n for n in g.nodes}
    plan.costs = [CostItem(node=k, flops=v, block=block_of.get(by_name[k]), groups=groups_of.get(by_name[k], []))
                  for k, v in flops.items() if v]
    return plan


def _unique(name: str, used: Set[str]) -> str:
    base, i = name, 1
    while name in used:
        i += 1
        name = f"{base}#{i}"
    used.add(name)
    return name
