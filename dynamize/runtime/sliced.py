"""The hard inference path: gated models that compute only what their gates keep.

`compile_unit` rebuilds one DynamicUnit's gated graph for inference; `use_runtime` makes every unit of a model run
that graph in evaluation without gradients (training and gradients keep the masked graph). Skipped residual branches
are already not called (GatedResidual). Here each channel group whose C-Net keeps k of C channels runs its producer
with only the k kept filters, its per-channel chain (norms, depthwise convolutions, activations, squeeze-excite) on
k channels, and its sinks with only those k input channels. Weights are indexed once per call; nothing is cached,
so the runtime stays exact when the model's weights change.

A batch of several images is run in one of two ways per group, chosen by a small cost model (`Decide`):
- union: the channels kept by any image, with a per-image multiplier that zeroes the channels an image dropped;
- split: each image on its own kept channels (worth it when images disagree a lot and calls are large).
The values that flow between the layers of a group are its *compact* tensors: one tensor [N, k_union, ...] in
union mode, or a list of per-image tensors [1, k_i, ...] in split mode.
"""
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast, overload

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.conv2d_same import conv2d_same
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..graph import ops
from ..graph.gates import ChannelGate, Gate, GatedResidual, GatePool
from ..graph.ops import Role
from ..graph.plan import ChannelGroup
from ..graph.rewrite import DynamicNet, DynamicUnit, gate_key, set_fast_path_compiler, submodule
from ..graph.trace import target_path

CHANNEL_MODES = ("auto", "union", "split")

# Cost model constants, in multiply-accumulate equivalents, rough calibrations on a 2-core x86 CPU (one thread:
# ~19 GMAC/s in convolutions). Gathering one weight is a strided, memory-bound copy: ~0.5 ns, i.e. ~10 MACs.
_GATHER_MACS = 10
# A per-image pass through one group's layers: a handful of Python calls, index copies and a concatenation (~200 us).
_CALL_MACS = 4_000_000
# A batch-1 convolution runs well below the batched speed (smaller GEMMs, no reuse of the weights across images).
_IMAGE_SLOWDOWN = 1.5

Compact = torch.Tensor | list[torch.Tensor]


@dataclass
class Kept:
    """One channel group's decisions for a batch, in the form its sliced layers consume.

    Attributes:
        axis: channel axis of the group's tensors (1 for NCHW, -1 for channels-last).
        idx: channels kept by at least one image (never empty), or None if that is every channel: full-width
            layers then run on their own weights, without copying them.
        mult: [N, k] keep * scale on those channels; zero where an image dropped a channel.
        images: in split mode, per image (kept channels, [1, k_i] multipliers); None in union mode.
    """
    axis: int
    idx: torch.Tensor | None
    mult: torch.Tensor
    images: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def index(self, i: int) -> torch.Tensor | None:
        """The channels image `i` is computed on."""
        return self.images[i][0] if self.images is not None else self.idx

    def shape(self, n: int) -> tuple[int, ...]:
        """Shape that broadcasts [n, k] multipliers over a compact tensor."""
        return (n, -1, 1, 1) if self.axis == 1 else (n, 1, 1, -1)


@overload
def _pick(t: torch.Tensor, idx: torch.Tensor | None, dim: int = 0) -> torch.Tensor: ...
@overload
def _pick(t: torch.Tensor | None, idx: torch.Tensor | None, dim: int = 0) -> torch.Tensor | None: ...
def _pick(t: torch.Tensor | None, idx: torch.Tensor | None, dim: int = 0) -> torch.Tensor | None:
    return t if t is None or idx is None else t.index_select(dim, idx)


def _nonempty(idx: torch.Tensor) -> torch.Tensor:
    # A convolution with zero filters is an error; channel 0 with multiplier 0 computes the same (zero) result.
    return idx if idx.numel() else idx.new_zeros(1)


def _is_split(*kept: Kept | None) -> bool:
    return any(k is not None and k.images is not None for k in kept)


def _whole(x: Compact) -> torch.Tensor:
    """A compact value in union mode: one tensor for the batch."""
    if isinstance(x, list):
        raise TypeError("a per-image (split) value where the group runs in union mode")
    return x


def _image(x: Compact, i: int) -> torch.Tensor:
    return x[i] if isinstance(x, list) else x[i:i + 1]


def _batch(x: Compact) -> int:
    return len(x) if isinstance(x, list) else x.shape[0]


class Decide(nn.Module):
    """Runs a group's C-Net before its producer and turns the decisions into a `Kept`.

    Args:
        gate: the group's Gate (shared with the model: `forced`, `threshold` and `last_keep` work as usual).
        fan_in: weights per output channel of the producer (its MACs per output channel and pixel).
        stride: spatial stride of the producer, to estimate its output size from its input.
        mode: "auto" (cost model), "union" or "split"; how a batch of several images is run.
    """

    def __init__(self, gate: Gate, axis: int, fan_in: int, stride: int, mode: str):
        super().__init__()
        self.gate = gate
        self.axis, self.fan_in, self.stride, self.mode = axis, fan_in, stride, mode

    def forward(self, pooled: torch.Tensor, x: Compact) -> Kept:
        keep, scale = self.gate(pooled)
        mult = keep * scale
        n = keep.shape[0]
        idx = _nonempty(keep.amax(0).nonzero()[:, 0])
        union = Kept(self.axis, None if idx.numel() == keep.shape[1] else idx, _pick(mult, idx, 1))
        if n == 1 or self.mode == "union":
            return union
        images = []
        for i in range(n):
            idx_i = _nonempty(keep[i].nonzero()[:, 0])
            images.append((idx_i, mult[i:i + 1].index_select(1, idx_i)))
        if self.mode == "auto" and not self._split_is_cheaper(x, idx.numel(), sum(len(i) for i, _ in images), n):
            return union
        return Kept(self.axis, union.idx, union.mult, images)

    def _split_is_cheaper(self, x: Compact, union: int, total: int, n: int) -> bool:
        """Compare the producer's cost on the union of kept channels with per-image execution."""
        t = _image(x, 0)
        hw = (t.shape[2] * t.shape[3] if self.axis == 1 else t.shape[1] * t.shape[2]) / self.stride
        union_cost = self.fan_in * union * (n * hw + _GATHER_MACS)
        split_cost = self.fan_in * total * (_IMAGE_SLOWDOWN * hw + _GATHER_MACS) + n * _CALL_MACS
        return split_cost < union_cost


class CompactPool(nn.Module):
    """A gate's pooled input read from a group's compact tensor: the pooled kept channels at full width, zero for
    the dropped ones (as the masked graph computes them)."""

    def __init__(self, channels: int, axis: int):
        super().__init__()
        self.channels, self.axis = channels, axis

    def forward(self, x: Compact, kept: Kept) -> torch.Tensor:
        dims = (2, 3) if self.axis == 1 else (1, 2)
        if kept.images is None:
            x = _whole(x)
            if kept.idx is None:
                return x.mean(dims)
            return x.new_zeros(x.shape[0], self.channels).index_copy_(1, kept.idx, x.mean(dims))
        pooled = x[0].new_zeros(len(x), self.channels)
        for i, t in enumerate(x):
            pooled[i].index_copy_(0, kept.images[i][0], t.mean(dims)[0])
        return pooled


def _conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          groups: int) -> torch.Tensor:
    if isinstance(conv, Conv2dSame):
        # nn.Conv2d stores stride, padding and dilation as pairs; torch annotates them as tuple[int, ...].
        return conv2d_same(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)  # type: ignore[arg-type]
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)


class SlicedLayer(nn.Module):
    """A convolution or linear layer restricted to kept output channels (`out`) and/or kept inputs (`inp`)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear):
        super().__init__()
        self.layer = layer

    def forward(self, x: Compact, inp: Kept | None, out: Kept | None) -> Compact:
        if not _is_split(inp, out):
            return self._run(_whole(x), inp.idx if inp else None, out.idx if out else None)
        ys = [self._run(_image(x, i), inp.index(i) if inp else None, out.index(i) if out else None)
              for i in range(_batch(x))]
        return ys if _is_split(out) else torch.cat(ys)

    def _run(self, x: torch.Tensor, in_idx: torch.Tensor | None, out_idx: torch.Tensor | None) -> torch.Tensor:
        weight, bias = _pick(_pick(self.layer.weight, out_idx), in_idx, 1), _pick(self.layer.bias, out_idx)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, bias)
        return _conv(self.layer, x, weight, bias, groups=1)


class _OnKeptChannels(nn.Module):
    """A per-channel layer run on the kept channels: once for the batch, or per image in split execution."""

    def forward(self, x: Compact, kept: Kept) -> Compact:
        if not _is_split(kept):
            return self._run(_whole(x), kept.idx)
        return [self._run(t, kept.index(i)) for i, t in enumerate(x)]

    def _run(self, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class SlicedDepthwise(_OnKeptChannels):
    """A depthwise convolution on the kept channels only."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def _run(self, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        weight = _pick(self.conv.weight, idx)
        return _conv(self.conv, x, weight, _pick(self.conv.bias, idx), groups=weight.shape[0])


class SlicedBatchNorm(_OnKeptChannels):
    """An evaluation-mode BatchNorm (with timm's fused drop + activation, if any) on the kept channels only."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.bn = bn

    def _run(self, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        bn = self.bn
        x = F.batch_norm(x, _pick(bn.running_mean, idx), _pick(bn.running_var, idx), _pick(bn.weight, idx),
                         _pick(bn.bias, idx), False, 0.0, bn.eps)
        if hasattr(bn, "act"):  # timm's BatchNormAct2d
            x = bn.get_submodule("act")(bn.get_submodule("drop")(x))
        return x


class Each(nn.Module):
    """A per-channel operation (activation, pooling, mean, ...) applied to a compact value as it is."""

    def __init__(self, op: nn.Module | Callable | str):
        super().__init__()
        self.op = op

    def _call(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if isinstance(self.op, str):
            return getattr(x, self.op)(*args, **kwargs)
        return self.op(x, *args, **kwargs)

    def forward(self, x: Compact, *args, **kwargs) -> Compact:
        if isinstance(x, list):
            return [self._call(t, *args, **kwargs) for t in x]
        return self._call(x, *args, **kwargs)


class Scale(nn.Module):
    """The C-Net's multiplication, on the kept channels: keep * scale per image."""

    def forward(self, x: Compact, kept: Kept) -> Compact:
        if kept.images is None:
            x = _whole(x)
            return x * kept.mult.reshape(kept.shape(x.shape[0]))
        return [t * m.reshape(kept.shape(1)) for t, (_, m) in zip(x, kept.images)]


class ScaleBy(nn.Module):
    """`x * other` where x is compact and `other` full-width (squeeze-excite): other's kept channels are picked."""

    def forward(self, x: Compact, other: torch.Tensor, kept: Kept) -> Compact:
        def pick(o: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
            return o if o.shape[kept.axis] == 1 else _pick(o, idx, kept.axis)
        if not _is_split(kept):
            return x * pick(other, kept.idx)
        return [t * pick(_image(other, i) if other.shape[0] > 1 else other, kept.index(i)) for i, t in enumerate(x)]


def _layer(gm: fx.GraphModule, node: fx.Node) -> nn.Conv2d | nn.Linear:
    """The convolution or linear layer a producer or sink node calls."""
    m = ops.module_of(gm, node)
    if not isinstance(m, (nn.Conv2d, nn.Linear)):  # the analysis reads the same op table: a bug if reached
        raise RuntimeError(f"{node.name} is not a convolution or linear layer")
    return m


def _with_branch(res: GatedResidual, branch: nn.Module) -> GatedResidual:
    """A GatedResidual sharing `res`'s gate but running another branch."""
    new = copy.copy(res)
    new._modules = {**res._modules, "branch": branch}  # the gate stays shared; modules() reaches the branch
    new.set_branch(branch)
    return new


class _GroupSites:
    """The nodes of one channel group in one unit graph, and what each of them is in the op table."""

    def __init__(self, gm: fx.GraphModule, group: ChannelGroup, nodes: dict[str, fx.Node], gate: fx.Node):
        self.group, self.gate = group, gate
        self.producer = nodes[group.producer]
        self.members = [nodes[m] for m in group.members[1:]]
        self.sinks = [nodes[s] for s in group.sinks]
        self.frontier: list[fx.Node] = []
        self.pools: list[fx.Node] = []  # other gates' pooled inputs, read from this group's channels
        stack, seen = [gate], set()
        while stack:
            for u in stack.pop().users:
                if u in seen or u in self.sinks:
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


def _slice_groups(gm: fx.GraphModule, groups: list[ChannelGroup], mode: str) -> None:
    """Replace, in place, the layers of each channel group of `gm` by calls that run on the kept channels."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    gate_nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites = [_GroupSites(gm, g, nodes, gate_nodes[f"cnets.{gate_key(g.name)}"]) for g in groups
             if f"cnets.{gate_key(g.name)}" in gate_nodes]  # others live in another graph (a branch, the unit)
    sites.sort(key=lambda s: order[s.producer])

    def add(name: str, module: nn.Module) -> str:
        gm.add_submodule(f"runtime.{name}", module)
        return f"runtime.{name}"

    kept: dict[str, fx.Node] = {}
    for s in sites:
        layer = _layer(gm, s.producer)
        stride = layer.stride[0] * layer.stride[1] if isinstance(layer, nn.Conv2d) else 1
        gate = submodule(gm, target_path(s.gate), ChannelGate).gate
        decide = Decide(gate, s.group.axis, layer.weight[0].numel(), stride, mode)
        with graph.inserting_before(s.producer):
            kept[s.group.name] = graph.call_module(add(f"decide_{gate_key(s.group.name)}", decide),
                                                   (s.gate.args[0], s.producer.args[0]))

    compact_of: dict[fx.Node, _GroupSites | None] = {n: s for s in sites for n in s.compact}
    producer_of = {s.producer: s for s in sites}
    sink_of = {n: s for s in sites for n in s.sinks}
    pool_of = {n: s for s in sites for n in s.pools}
    for n in list(graph.nodes):
        own, src, pooled = compact_of.get(n), sink_of.get(n), pool_of.get(n)
        if own is None and src is None and pooled is None:
            continue
        k = kept[own.group.name] if own else None
        kwargs: dict[str, fx.node.Argument] = {}
        args: tuple[fx.node.Argument, ...]
        if pooled is not None:
            target = add(n.name, CompactPool(pooled.group.channels, pooled.group.axis))
            args = (n.args[0], kept[pooled.group.name])
        elif n in producer_of or own is None:  # a producer, or a sink outside every other group
            target = add(n.name, SlicedLayer(_layer(gm, n)))
            args = (n.args[0], kept[src.group.name] if src else None, k)
        elif n is own.gate:
            target, args = add(n.name, Scale()), (n.args[1], k)
        else:
            target, args, kwargs = _sliced(gm, n, own.group.axis, k, compact_of, add)
        with graph.inserting_before(n):
            new = graph.call_module(target, args, kwargs)
        n.replace_all_uses_with(new)
        compact_of[new] = own
        graph.erase_node(n)


def _sliced(gm: fx.GraphModule, n: fx.Node, axis: int, k: fx.Node | None, compact_of, add):
    """The runtime call for a per-channel op of a group, by its role in the op table."""
    role = ops.role(gm, n, axis)
    m = ops.module_of(gm, n)
    if role is Role.RESCALE:
        x, other = n.args if n.args[0] in compact_of else n.args[::-1]
        return add(n.name, ScaleBy()), (x, other, k), {}
    if role is Role.CHANNELWISE:
        # CHANNELWISE is a depthwise convolution or a running BatchNorm (ops.role)
        sliced = SlicedDepthwise(m) if ops.is_depthwise(m) else SlicedBatchNorm(cast(_BatchNorm, m))
        return add(n.name, sliced), (n.args[0], k), {}
    return add(n.name, Each(m if m is not None else n.target)), n.args, n.kwargs


def _compile_graph(gm: fx.GraphModule, groups: list[ChannelGroup], mode: str) -> fx.GraphModule:
    """A copy of `gm` (sharing its layers and gates) with sliced channel groups, recursively into branches."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    new = fx.GraphModule(gm, graph, "Runtime")
    for n in graph.nodes:
        if n.op == "call_module" and isinstance(res := new.get_submodule(n.target), GatedResidual):
            branch = cast(fx.GraphModule, res.branch)  # DynamicUnit._assemble sets every branch to a GraphModule
            new.add_submodule(n.target, _with_branch(res, _compile_graph(branch, groups, mode)))
    _slice_groups(new, groups, mode)
    graph.lint()
    new.recompile()
    new.delete_all_unused_submodules()
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


def use_runtime(net: DynamicNet, mode: str | None = "auto") -> DynamicNet:
    """Make `net` run the hard inference path in evaluation without gradients (None: always the masked graph).

    Training, and evaluation with gradients, keep the masked graph. The fast graphs are built on first use and
    rebuilt after a copy of the model.
    """
    if mode is not None and mode not in CHANNEL_MODES:
        raise ValueError(f"channels must be one of {CHANNEL_MODES}, not {mode!r}")
    for path, unit in net.units():
        unit.set_fast_path(mode, [g for g in net.plan.groups if g.unit == path])
    return net


set_fast_path_compiler(compile_unit)
