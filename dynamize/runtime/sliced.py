"""The hard inference path: gated models that compute only what their gates keep.

`compile_unit` rebuilds one DynamicUnit's gated graph for inference; `use_runtime` makes every unit of a model run
that graph in evaluation without gradients (training and gradients keep the masked graph). A skipped residual branch
is not called: the images that keep it are gathered, run and added back. Each channel group whose C-Net keeps k of C
channels runs its producer with only the k kept filters, its per-channel chain (norms, depthwise convolutions,
activations, squeeze-excite) on k channels, and its sinks with only those k input channels; a batch runs the group
in the layout a cost model picks (`decide.py`: every channel, the batch's union, or per image). Weights are prepared
once (BatchNorm folded in) and re-prepared when they change (`packing.py`), so the runtime stays exact after weight
updates.
"""
import copy
import itertools
from collections.abc import Container, Mapping
from typing import TypeVar, cast

import torch
from timm.layers import DropBlock2d, DropPath
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..graph import ops
from ..graph.cost import channel_gather_macs
from ..graph.gates import ChannelGate, Gate, GatedResidual, GatePool
from ..graph.ops import Role
from ..graph.plan import ChannelGroup
from ..graph.rewrite import DynamicNet, DynamicUnit, gate_key, set_fast_path_compiler, submodule
from ..graph.trace import TimmTracer, target_path
from .decide import Decide, decisions
from .layers import CompactPool, FoldedConv, Scale, ScaleBy, SlicedDepthwise, SlicedLayer, SlicedNorm, Widen

CHANNEL_MODES = ("auto", "union", "split")
_M = TypeVar("_M", bound=nn.Module)
# Modules that return their input in evaluation: the fast graph does not call them.
_NO_OPS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, DropPath, DropBlock2d)


class FastResidual(GatedResidual):
    """A GatedResidual's evaluation path in the runtime: same gate, the runtime's branch, no per-call searches.

    Images that keep the block are gathered, run through the branch and added back in one `index_add_`.
    """

    @classmethod
    def of(cls, res: GatedResidual, branch: nn.Module) -> "FastResidual":
        """A copy of `res` that shares its gate and runs `branch`."""
        new = cast(FastResidual, copy.copy(res))
        new.__class__ = cls
        new._modules = {**res._modules, "branch": branch}  # the gate stays shared; modules() reaches the branch
        new.set_branch(branch)
        new.__dict__["inner"] = [m for m in branch.modules() if isinstance(m, Gate)]
        return new

    def _inner_gates(self) -> list[Gate]:
        return self.__dict__["inner"]

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor, pooled: torch.Tensor, *extra) -> torch.Tensor:
        keep, scale = decisions(self.gate, pooled)
        n = x.shape[0]
        kept = int(keep.sum())
        if kept == n:  # the branch's output is its own new tensor: scaled and added in place
            return self._run_branch(x, *extra).mul_(scale.reshape(-1, 1, 1, 1)).add_(shortcut)
        if kept == 0:  # a fresh tensor, as the add it replaces: the unit may write into it in place
            self._scatter_inner_decisions(keep.new_zeros(0, dtype=torch.long), n)
            return shortcut.clone()
        idx = keep[:, 0].nonzero()[:, 0]
        y = self._branch_on(x, extra, idx).mul_(scale.index_select(0, idx).reshape(-1, 1, 1, 1))
        self._scatter_inner_decisions(idx, n)
        out = shortcut.clone()  # keeps a channels-last shortcut channels-last
        flat_out, flat_y = _flat(out), _flat(y)
        if flat_out is not None and flat_y is not None and out.stride()[1:] == y.stride()[1:]:
            flat_out.index_add_(0, idx, flat_y)
        else:
            out.index_add_(0, idx, y)
        return out

    @staticmethod
    def _images(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        flat = _flat(t)
        if flat is None:
            return t[idx]
        picked = flat.index_select(0, idx)
        return picked.as_strided((len(idx), *t.shape[1:]), t.stride())


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    """A [N, rest] view of a batch tensor whose images are each one dense block of memory (contiguous or
    channels-last), else None. Picking and adding whole images through it copies plain rows: 2-3x faster than
    indexing a channels-last tensor along its batch axis."""
    if t.is_contiguous():
        return t.view(t.shape[0], -1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return None


def _module(gm: fx.GraphModule, node: fx.Node, cls: type[_M]) -> _M:
    """The module a `call_module` node calls, which the op table says is a `cls`."""
    return submodule(gm, target_path(node), cls)


def _layer(gm: fx.GraphModule, node: fx.Node) -> nn.Conv2d | nn.Linear:
    """The convolution or linear layer a producer or sink node calls."""
    m = ops.module_of(gm, node)
    if not isinstance(m, (nn.Conv2d, nn.Linear)):  # the analysis reads the same op table: a bug if reached
        raise RuntimeError(f"{node.name} is not a convolution or linear layer")
    return m


def _node(arg: fx.node.Argument) -> fx.Node:
    """A node's argument that is another node (the input of a layer or norm)."""
    if not isinstance(arg, fx.Node):
        raise TypeError(f"{arg!r} is not a graph node")
    return arg


class _GroupSites:
    """The nodes of one channel group in one unit graph, and what each of them is in the op table."""

    def __init__(self, gm: fx.GraphModule, group: ChannelGroup, nodes: dict[str, fx.Node], gate: fx.Node):
        self.group, self.gate = group, gate
        self.producer = nodes[group.producer]
        self.members = [nodes[m] for m in group.members[1:]]
        self.sinks = [nodes[s] for s in group.sinks]
        self.frontier: list[fx.Node] = []
        self.pools: list[fx.Node] = []  # other gates' pooled inputs, read from this group's channels
        # Where the channels leave the group at full width (compact node, reader): the residual add the group ends
        # in, or the output of the branch it ends.
        self.exits: list[tuple[fx.Node, fx.Node]] = []
        stack, seen = [gate], set()
        while stack:
            src = stack.pop()
            for u in src.users:
                if u in self.sinks:
                    continue
                if u.op == "output" or u.name in group.exits:
                    self.exits.append((src, u))
                    continue
                if u in seen:
                    continue
                seen.add(u)
                if isinstance(ops.module_of(gm, u), GatePool):
                    self.pools.append(u)
                else:
                    self.frontier.append(u)
                    stack.append(u)
        self.compact = {self.producer, gate, *self.members, *self.frontier}
        for n in self.members + self.frontier:
            if ops.role(gm, n, group.axis) is None:  # the analysis reads the same op table: a bug if reached
                raise RuntimeError(f"{n.name} in group {group.name} is not a per-channel op")


def _decide(gm: fx.GraphModule, site: _GroupSites, upstream: bool, producers: Container[fx.Node],
            mode: str) -> Decide:
    """The group's Decide, with the group's costs per channel: its MACs from the plan, and gathering its weights
    (`producers`: the producers of every group the runtime runs compact)."""
    group = site.group
    depthwise = [_module(gm, n, nn.Conv2d) for n in site.members if ops.is_depthwise(ops.module_of(gm, n))]
    gather = channel_gather_macs(_layer(gm, site.producer), depthwise, [_layer(gm, n) for n in site.sinks],
                                 group.channels, upstream, [n in producers for n in site.sinks])
    gate = _module(gm, site.gate, ChannelGate).gate
    return Decide(gate, group.axis, group.flops / 2 / group.channels, group.pool_flops / group.in_channels, gather,
                  mode)


def _folds(gm: fx.GraphModule, site: _GroupSites) -> dict[fx.Node, fx.Node]:
    """Evaluation-mode BatchNorms right after a layer the group runs (its producer, a depthwise member, a sink):
    layer node -> norm node. The norm is folded into the layer's weights."""
    folds = {}
    for n in site.members:
        if ops.is_running_batchnorm(ops.module_of(gm, n)):
            conv = _node(n.args[0])
            if conv is site.producer or (conv in site.members and ops.is_depthwise(ops.module_of(gm, conv))):
                folds[conv] = n
    for sink in site.sinks:
        if isinstance(ops.module_of(gm, sink), nn.Conv2d) and len(sink.users) == 1:
            (user,) = sink.users
            if ops.is_running_batchnorm(ops.module_of(gm, user)) and user.args[0] is sink and len(user.args) == 1:
                folds[sink] = user
    return folds


def _slice_groups(gm: fx.GraphModule, groups: list[ChannelGroup], mode: str) -> None:
    """Replace, in place, the layers of each channel group of `gm` by calls that run on the kept channels."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    gate_nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites = [_GroupSites(gm, g, nodes, gate_nodes[f"cnets.{gate_key(g.name)}"]) for g in groups
             if f"cnets.{gate_key(g.name)}" in gate_nodes]  # others live in another graph (a branch, the unit)
    # Groups joined by an elementwise op (StarNet's act(f1(x)) * f2(x)) keep different channels on each side: no
    # compact tensor holds their product, so they run masked, on every channel.
    joined = {n for a, b in itertools.combinations(sites, 2) for n in a.compact & b.compact}
    sites = [s for s in sites if not s.compact & joined]
    sites.sort(key=lambda s: order[s.producer])

    def add(name: str, module: nn.Module) -> str:
        gm.add_submodule(f"runtime.{name}", module)
        return f"runtime.{name}"

    compact_of: dict[fx.Node, _GroupSites | None] = {n: s for s in sites for n in s.compact}
    sink_of = {n: s for s in sites for n in s.sinks}
    producer_of = {s.producer: s for s in sites}
    kept: dict[str, fx.Node] = {}
    for s in sites:
        src = sink_of.get(s.producer)
        with graph.inserting_before(s.producer):
            args = (s.gate.args[0], s.producer.args[0], kept[src.group.name] if src else None)
            decide = _decide(gm, s, src is not None, producer_of, mode)
            kept[s.group.name] = graph.call_module(add(f"decide_{gate_key(s.group.name)}", decide), args)

    for s in sites:
        for compact, reader in s.exits:
            with graph.inserting_before(reader):
                full = graph.call_module(add(f"widen_{gate_key(s.group.name)}", Widen()),
                                         (compact, kept[s.group.name]))
            reader.replace_input_with(compact, full)

    folds = {conv: bn for s in sites for conv, bn in _folds(gm, s).items()}
    folded = set(folds.values())
    pool_of = {n: s for s in sites for n in s.pools}
    for n in list(graph.nodes):
        own, src, pooled = compact_of.get(n), sink_of.get(n), pool_of.get(n)
        if own is None and src is None and pooled is None and n not in folded:
            continue
        norm = _module(gm, folds[n], _BatchNorm) if n in folds else None
        k = kept[own.group.name] if own else None
        call: tuple[nn.Module, tuple[fx.node.Argument, ...]] | None
        if pooled is not None:
            call = CompactPool(pooled.group.axis), (n.args[0], kept[pooled.group.name])
        elif n in producer_of or (src and own is None):
            call = SlicedLayer(_layer(gm, n), norm, gathers_inputs=src is not None), (
                n.args[0], kept[src.group.name] if src else None, k)
        elif own is not None and n is own.gate:
            call = Scale(), (n.args[1], k)
        elif n in folded:
            _drop_folded_norm(gm, n)
            continue
        elif own is not None and k is not None:
            call = _sliced(gm, n, own.group.axis, k, compact_of, norm)
        else:
            call = None
        if call is None:  # elementwise ops and the squeeze run on compact tensors as they are
            continue
        with graph.inserting_before(n):
            new = graph.call_module(add(n.name, call[0]), call[1])
        n.replace_all_uses_with(new)
        compact_of[new] = own
        graph.erase_node(n)


def _drop_folded_norm(gm: fx.GraphModule, n: fx.Node) -> None:
    """Remove the call of a norm folded into the convolution before it; timm's fused drop + act, if any, stay."""
    module, out = _module(gm, n, nn.Module), _node(n.args[0])
    for part in ("drop", "act"):
        if isinstance(getattr(module, part, None), nn.Module):
            with gm.graph.inserting_before(n):
                out = gm.graph.call_module(f"{target_path(n)}.{part}", (out,))
    n.replace_all_uses_with(out)
    gm.graph.erase_node(n)


def _fold_norms(gm: fx.GraphModule) -> None:
    """Fold each evaluation-mode BatchNorm that follows a plain convolution outside the channel groups (shortcut
    projections, ungated layers) into that convolution: one pass over the map less per norm."""
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or target_path(n).startswith("runtime.") or len(n.users) != 1:
            continue
        conv = ops.module_of(gm, n)
        (user,) = n.users
        if not isinstance(conv, nn.Conv2d) or not ops.is_plain_conv(conv) or user.op != "call_module" \
                or len(user.args) != 1 or user.kwargs:
            continue
        norm = ops.module_of(gm, user)
        if not isinstance(norm, _BatchNorm) or not ops.is_running_batchnorm(norm):
            continue
        gm.add_submodule(f"runtime.{n.name}", FoldedConv(conv, norm))
        with gm.graph.inserting_before(n):
            new = gm.graph.call_module(f"runtime.{n.name}", n.args, n.kwargs)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        _drop_folded_norm(gm, user)


def _sliced(gm: fx.GraphModule, n: fx.Node, axis: int, k: fx.Node, compact_of: Mapping[fx.Node, object],
            norm: _BatchNorm | None) -> tuple[nn.Module, tuple[fx.node.Argument, ...]] | None:
    """The runtime module and arguments for a per-channel op of a group, by its role in the op table."""
    role = ops.role(gm, n, axis)
    m = ops.module_of(gm, n)
    if role is Role.RESCALE:
        x, other = n.args if n.args[0] in compact_of else n.args[::-1]
        return ScaleBy(), (x, other, k)
    if role is Role.CHANNELWISE:  # a depthwise convolution or a running BatchNorm (ops.role)
        if isinstance(m, nn.Conv2d) and ops.is_depthwise(m):
            return SlicedDepthwise(m, norm), (n.args[0], k)
        return SlicedNorm(cast(_BatchNorm, m)), (n.args[0], k)
    return None


def _drop_no_ops(gm: fx.GraphModule) -> None:
    """Remove the calls of modules that return their input in evaluation (identities, dropouts, drop paths)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and isinstance(ops.module_of(gm, n), _NO_OPS) and len(n.args) == 1 \
                and not n.kwargs:
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)


def _compile_graph(gm: fx.GraphModule, groups: list[ChannelGroup], mode: str) -> fx.GraphModule:
    """A copy of `gm` (sharing its layers and gates) with sliced channel groups, recursively into branches."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    new = fx.GraphModule(gm, graph, "Runtime")
    for n in graph.nodes:
        if n.op == "call_module" and isinstance(res := ops.module_of(new, n), GatedResidual):
            branch = cast(fx.GraphModule, res.branch)  # DynamicUnit._assemble sets every branch to a GraphModule
            new.add_submodule(target_path(n), FastResidual.of(res, _compile_graph(branch, groups, mode)))
    _slice_groups(new, groups, mode)
    _fold_norms(new)
    _drop_no_ops(new)
    graph.lint()
    new.recompile()  # no delete_all_unused_submodules(): the modules are the model's own, shared, not copies
    return new.eval()


def compile_unit(unit: DynamicUnit, groups: list[ChannelGroup], mode: str = "auto") -> fx.GraphModule:
    """The hard inference path of one unit: its gated graph with each channel group run on its kept channels.

    The result shares every layer and gate with the unit (so weight updates, `Gate.forced` and thresholds apply to
    both) and computes what the unit computes in evaluation. It always uses the BatchNorm running statistics and
    the hard decisions.

    Args:
        unit: a DynamicUnit of a gated model.
        groups: the plan's channel groups of this unit.
        mode: how a batch of several images runs a channel group: "auto" (a cost model picks per group and
            batch), "union" (the channels any image keeps) or "split" (each image on its own channels).
    """
    if mode not in CHANNEL_MODES:
        raise ValueError(f"channels must be one of {CHANNEL_MODES}, not {mode!r}")
    return _compile_graph(unit.masked, groups, mode)


class _ShellTracer(TimmTracer):
    """Traces a gated model's own code; its units are called as they are (each runs its own fast path)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, DynamicUnit) or super().is_leaf_module(m, module_qualified_name)


def compile_shell(net: DynamicNet) -> fx.GraphModule | None:
    """The model's code around its units as a graph with the evaluation-mode norms after plain convolutions folded
    in (the stem, the blocks left ungated, the head), sharing every module with `net`; None if it cannot be traced
    (the model then runs its own code, with its norms unfolded)."""
    try:
        gm = fx.GraphModule(net, _ShellTracer().trace(net), "Shell")
    except Exception:  # torch.fx raises plain TraceError/TypeError/etc. for code it cannot follow
        return None
    _fold_norms(gm)
    _drop_no_ops(gm)
    gm.recompile()
    return gm


def use_runtime(net: DynamicNet, mode: str | None = "auto") -> DynamicNet:
    """Make `net` run the hard inference path in evaluation without gradients (None: always the masked graph).

    Training, and evaluation with gradients, keep the masked graph. The fast graphs are built on first use and
    rebuilt after a copy of the model.
    """
    if mode is not None and mode not in CHANNEL_MODES:
        raise ValueError(f"channels must be one of {CHANNEL_MODES}, not {mode!r}")
    for path, unit in net.units():
        unit.set_fast_path(mode, [g for g in net.plan.groups if g.unit == path])
    net.set_fast_shell(mode is not None)
    return net


set_fast_path_compiler(compile_unit, compile_shell)
