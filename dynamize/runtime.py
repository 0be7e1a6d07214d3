"""The hard inference path: gated models that compute only what their gates keep.

`compile_runtime` rebuilds a DynamicNet's fx graph for inference. Skipped residual branches are already not called
(GatedResidual). Here each channel group whose C-Net keeps k of C channels runs its producer with only the k kept
filters, its per-channel chain (norms, depthwise convolutions, activations, squeeze-excite) on k channels, and its
sinks with only those k input channels. Weights are indexed once per call; nothing is cached, so the runtime stays
exact when the DynamicNet's weights change.

A batch of several images is run in one of two ways per group, chosen by a small cost model (`Decide`):
- union: the channels kept by any image, with a per-image multiplier that zeroes the channels an image dropped;
- split: each image on its own kept channels (worth it when images disagree a lot and calls are large).
The values that flow between the layers of a group are its *compact* tensors: one tensor [N, k_union, ...] in
union mode, or a list of per-image tensors [1, k_i, ...] in split mode.
"""
import copy
import operator
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.conv2d_same import conv2d_same
from torch import fx, nn

from .gates import ChannelGate, Gate, GatedResidual
from .plan import ChannelGroup
from .rewrite import DynamicNet, _key

CHANNEL_MODES = ("auto", "union", "split")

# Cost model constants, in multiply-accumulate equivalents, rough calibrations on a 2-core x86 CPU (one thread:
# ~19 GMAC/s in convolutions). Gathering one weight is a strided, memory-bound copy: ~0.5 ns, i.e. ~10 MACs.
_GATHER_MACS = 10
# A per-image pass through one group's layers: a handful of Python calls, index copies and a concatenation (~200 us).
_CALL_MACS = 4_000_000
# A batch-1 convolution runs well below the batched speed (smaller GEMMs, no reuse of the weights across images).
_IMAGE_SLOWDOWN = 1.5

Compact = Union[torch.Tensor, List[torch.Tensor]]


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
    idx: Optional[torch.Tensor]
    mult: torch.Tensor
    images: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None

    def index(self, i: int) -> Optional[torch.Tensor]:
        """The channels image `i` is computed on."""
        return self.images[i][0] if self.images is not None else self.idx

    def shape(self, n: int) -> Tuple[int, ...]:
        """Shape that broadcasts [n, k] multipliers over a compact tensor."""
        return (n, -1, 1, 1) if self.axis == 1 else (n, 1, 1, -1)


def _pick(t: Optional[torch.Tensor], idx: Optional[torch.Tensor], dim: int = 0) -> Optional[torch.Tensor]:
    return t if t is None or idx is None else t.index_select(dim, idx)


def _nonempty(idx: torch.Tensor) -> torch.Tensor:
    # A convolution with zero filters is an error; channel 0 with multiplier 0 computes the same (zero) result.
    return idx if idx.numel() else idx.new_zeros(1)


def _is_split(*kept: Optional[Kept]) -> bool:
    return any(k is not None and k.images is not None for k in kept)


def _image(x: Compact, i: int) -> torch.Tensor:
    return x[i] if isinstance(x, list) else x[i:i + 1]


def _batch(x: Compact) -> int:
    return len(x) if isinstance(x, list) else x.shape[0]


class Decide(nn.Module):
    """Runs a group's C-Net before its producer and turns the decisions into a `Kept`.

    Args:
        gate: the group's Gate (shared with the DynamicNet: `forced`, `threshold` and `last_keep` work as usual).
        in_channels: channels of the gate's input.
        fan_in: weights per output channel of the producer (its MACs per output channel and pixel).
        stride: spatial stride of the producer, to estimate its output size from its input.
        mode: "auto" (cost model), "union" or "split"; how a batch of several images is run.
    """

    def __init__(self, gate: Gate, in_channels: int, fan_in: int, stride: int, mode: str):
        super().__init__()
        self.gate = gate
        self.in_channels, self.fan_in, self.stride, self.mode = in_channels, fan_in, stride, mode

    def forward(self, x: Compact, inp: Optional[Kept]) -> Kept:
        keep, scale = self.gate(self._gate_input(x, inp))
        mult = keep * scale
        n, axis = keep.shape[0], self.gate.axis
        idx = _nonempty(keep.amax(0).nonzero()[:, 0])
        union = Kept(axis, None if idx.numel() == keep.shape[1] else idx, _pick(mult, idx, 1))
        if n == 1 or self.mode == "union":
            return union
        images = []
        for i in range(n):
            idx_i = _nonempty(keep[i].nonzero()[:, 0])
            images.append((idx_i, mult[i:i + 1].index_select(1, idx_i)))
        if self.mode == "auto" and not self._split_is_cheaper(x, idx.numel(), sum(len(i) for i, _ in images), n):
            return union
        return Kept(axis, union.idx, union.mult, images)

    def _gate_input(self, x: Compact, inp: Optional[Kept]) -> torch.Tensor:
        """The C-Net's input. If it is another group's compact tensor, rebuild its pooled full-width form.

        The C-Net only average-pools its input, so a [N, C, 1, 1] map of the pooled values (zero for dropped
        channels, as in the masked graph) gives the same decisions without materialising the full feature map.
        """
        if inp is None:
            return x
        dims = (2, 3) if inp.axis == 1 else (1, 2)
        if inp.images is None and inp.idx is None:
            pooled = x.mean(dims)
        elif inp.images is None:
            pooled = x.new_zeros(x.shape[0], self.in_channels).index_copy_(1, inp.idx, x.mean(dims))
        else:
            pooled = x[0].new_zeros(len(x), self.in_channels)
            for i, t in enumerate(x):
                pooled[i].index_copy_(0, inp.index(i), t.mean(dims)[0])
        return pooled[:, :, None, None] if inp.axis == 1 else pooled[:, None, None, :]

    def _split_is_cheaper(self, x: Compact, union: int, total: int, n: int) -> bool:
        """Compare the producer's cost on the union of kept channels with per-image execution."""
        t = _image(x, 0)
        hw = (t.shape[2] * t.shape[3] if self.gate.axis == 1 else t.shape[1] * t.shape[2]) / self.stride
        union_cost = self.fan_in * union * (n * hw + _GATHER_MACS)
        split_cost = self.fan_in * total * (_IMAGE_SLOWDOWN * hw + _GATHER_MACS) + n * _CALL_MACS
        return split_cost < union_cost


def _conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
          groups: int) -> torch.Tensor:
    if isinstance(conv, Conv2dSame):
        return conv2d_same(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)


class SlicedLayer(nn.Module):
    """A convolution or linear layer restricted to kept output channels (`out`) and/or kept inputs (`inp`)."""

    def __init__(self, layer: Union[nn.Conv2d, nn.Linear]):
        super().__init__()
        self.layer = layer

    def forward(self, x: Compact, inp: Optional[Kept], out: Optional[Kept]) -> Compact:
        if not _is_split(inp, out):
            return self._run(x, inp and inp.idx, out and out.idx)
        ys = [self._run(_image(x, i), inp and inp.index(i), out and out.index(i)) for i in range(_batch(x))]
        return ys if _is_split(out) else torch.cat(ys)

    def _run(self, x: torch.Tensor, in_idx: Optional[torch.Tensor], out_idx: Optional[torch.Tensor]) -> torch.Tensor:
        weight, bias = _pick(_pick(self.layer.weight, out_idx), in_idx, 1), _pick(self.layer.bias, out_idx)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, bias)
        return _conv(self.layer, x, weight, bias, groups=1)


class _OnKeptChannels(nn.Module):
    """A per-channel layer run on the kept channels: once for the batch, or per image in split execution."""

    def forward(self, x: Compact, kept: Kept) -> Compact:
        if not _is_split(kept):
            return self._run(x, kept.idx)
        return [self._run(t, kept.index(i)) for i, t in enumerate(x)]

    def _run(self, x: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class SlicedDepthwise(_OnKeptChannels):
    """A depthwise convolution on the kept channels only."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def _run(self, x: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
        weight = _pick(self.conv.weight, idx)
        return _conv(self.conv, x, weight, _pick(self.conv.bias, idx), groups=weight.shape[0])


class SlicedBatchNorm(_OnKeptChannels):
    """An evaluation-mode BatchNorm (with timm's fused drop + activation, if any) on the kept channels only."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.bn = bn

    def _run(self, x: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
        bn = self.bn
        x = F.batch_norm(x, _pick(bn.running_mean, idx), _pick(bn.running_var, idx), _pick(bn.weight, idx),
                         _pick(bn.bias, idx), False, 0.0, bn.eps)
        if hasattr(bn, "act"):  # timm's BatchNormAct2d
            x = bn.act(bn.drop(x))
        return x


class Each(nn.Module):
    """A per-channel operation (activation, pooling, mean, ...) applied to a compact value as it is."""

    def __init__(self, op: Union[nn.Module, Callable, str]):
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
        if not _is_split(kept):
            return x * kept.mult.reshape(kept.shape(x.shape[0]))
        return [t * m.reshape(kept.shape(1)) for t, (_, m) in zip(x, kept.images)]


class ScaleBy(nn.Module):
    """`x * other` where x is compact and `other` full-width (squeeze-excite): other's kept channels are picked."""

    def forward(self, x: Compact, other: torch.Tensor, kept: Kept) -> Compact:
        def pick(o: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
            return o if o.shape[kept.axis] == 1 else _pick(o, idx, kept.axis)
        if not _is_split(kept):
            return x * pick(other, kept.idx)
        return [t * pick(_image(other, i) if other.shape[0] > 1 else other, kept.index(i)) for i, t in enumerate(x)]


def _with_branch(res: GatedResidual, branch: nn.Module) -> GatedResidual:
    """A GatedResidual sharing `res`'s gate but running another branch."""
    new = copy.copy(res)
    new._modules = dict(res._modules)  # copy.copy shares the child dict; only this copy's branch changes
    new._modules["branch"] = branch
    return new


def _plain_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"


def _free_of_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is None


class _GroupSites:
    """The nodes of one channel group in one graph, and why the group cannot be sliced (if it cannot)."""

    def __init__(self, gm: fx.GraphModule, group: ChannelGroup, nodes: Dict[str, fx.Node], gate: fx.Node):
        self.group, self.gate = group, gate
        self.producer = nodes[group.producer]
        self.members = [nodes[m] for m in group.members[1:]]
        self.sinks = [nodes[s] for s in group.sinks]
        self.frontier: List[fx.Node] = []
        stack, seen = [gate], set()
        while stack:
            for u in stack.pop().users:
                # Another C-Net reading these channels as its gate input only pools them (see Decide).
                if u not in seen and u not in self.sinks and not _is_channel_gate(gm, u):
                    seen.add(u)
                    self.frontier.append(u)
                    stack.append(u)
        self.compact = {self.producer, gate, *self.members, *self.frontier}
        self.reason = self._unsupported(gm)

    def _unsupported(self, gm: fx.GraphModule) -> Optional[str]:
        mod = lambda n: gm.get_submodule(n.target) if n.op == "call_module" else None  # noqa: E731
        if not isinstance(mod(self.producer), nn.Linear) and not _plain_conv(mod(self.producer)):
            return "producer is not a plain convolution or linear layer"
        for n in self.sinks:
            if not isinstance(mod(n), nn.Linear) and not _plain_conv(mod(n)):
                return f"sink {n.name} is not a plain convolution or linear layer"
        for n in self.members + self.frontier:
            m = mod(n)
            if _is_mul(n):
                if sum(a in self.compact for a in n.args) != 1:
                    return f"{n.name} multiplies two tensors of the group"
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is None:
                    return f"{n.name} normalises with batch statistics"
            elif m is not None and not (_plain_conv(m) or _free_of_params(m)):
                return f"{n.name} ({type(m).__name__}) has per-channel parameters the runtime does not slice"
            elif any(isinstance(a, fx.Node) for a in (*n.args[1:], *n.kwargs.values())):
                return f"{n.name} reads a second tensor"
        return None


def _is_channel_gate(gm: fx.GraphModule, n: fx.Node) -> bool:
    return n.op == "call_module" and isinstance(gm.get_submodule(n.target), ChannelGate)


def _is_mul(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (torch.mul, operator.mul) and len(n.args) == 2


def _slice_groups(gm: fx.GraphModule, groups: List[ChannelGroup], mode: str, masked: List[str]) -> None:
    """Replace, in place, each sliceable group's layers in `gm` by sliced calls; note the others in `masked`."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    gate_nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites = []
    for g in groups:
        gate = gate_nodes.get(f"cnets.{_key(g.name)}")
        if gate is None:
            continue  # the group lives in another graph (a residual branch or the top level)
        site = _GroupSites(gm, g, nodes, gate)
        if site.reason:
            masked.append(f"{g.name}: {site.reason}")
        else:
            sites.append(site)
    sites.sort(key=lambda s: order[s.producer])

    def add(name: str, module: nn.Module) -> str:
        gm.add_submodule(f"runtime.{name}", module)
        return f"runtime.{name}"

    compact_of = {n: s for s in sites for n in s.compact}
    kept: Dict[str, fx.Node] = {}
    for s in sites:
        layer = gm.get_submodule(s.producer.target)
        gate_input = s.producer.args[0]
        inp = compact_of.get(gate_input)
        stride = layer.stride[0] * layer.stride[1] if isinstance(layer, nn.Conv2d) else 1
        decide = Decide(gm.get_submodule(s.gate.target).gate, s.group.in_channels, layer.weight[0].numel(), stride,
                        mode)
        with graph.inserting_before(s.producer):
            kept[s.group.name] = graph.call_module(add(f"decide_{_key(s.group.name)}", decide),
                                                   (gate_input, kept[inp.group.name] if inp else None))

    producer_of = {s.producer: s for s in sites}
    sink_of = {n: s for s in sites for n in s.sinks}
    for n in list(graph.nodes):
        own, src = compact_of.get(n), sink_of.get(n)
        if own is None and src is None:
            continue
        k, kwargs = kept[own.group.name] if own else None, {}
        if n in producer_of or (src and own is None):
            target = add(n.name, SlicedLayer(gm.get_submodule(n.target)))
            args = (n.args[0], kept[src.group.name] if src else None, k)
        elif n is own.gate:
            target, args = add(n.name, Scale()), (n.args[1], k)
        elif _is_mul(n):
            x, other = n.args if n.args[0] in compact_of else n.args[::-1]
            target, args = add(n.name, ScaleBy()), (x, other, k)
        else:
            m = gm.get_submodule(n.target) if n.op == "call_module" else None
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                target, args = add(n.name, SlicedBatchNorm(m)), (n.args[0], k)
            elif isinstance(m, nn.Conv2d):
                target, args = add(n.name, SlicedDepthwise(m)), (n.args[0], k)
            else:
                target, args, kwargs = add(n.name, Each(m if m is not None else n.target)), n.args, n.kwargs
        with graph.inserting_before(n):
            new = graph.call_module(target, args, kwargs)
        n.replace_all_uses_with(new)
        compact_of[new] = own
        graph.erase_node(n)


def _compile_graph(gm: fx.GraphModule, groups: List[ChannelGroup], mode: str, masked: List[str]) -> fx.GraphModule:
    """A copy of `gm` (sharing its layers and gates) with sliced channel groups, recursively into branches."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    new = fx.GraphModule(gm, graph, "Runtime")
    for n in graph.nodes:
        if n.op == "call_module" and isinstance(new.get_submodule(n.target), GatedResidual):
            res = new.get_submodule(n.target)
            new.add_submodule(n.target, _with_branch(res, _compile_graph(res.branch, groups, mode, masked)))
    _slice_groups(new, groups, mode, masked)
    graph.lint()
    new.recompile()
    new.delete_all_unused_submodules()
    return new


def compile_runtime(net: DynamicNet, channels: str = "auto") -> fx.GraphModule:
    """Build the hard inference path of a gated model.

    The result shares every layer and gate with `net` (so weight updates, `Gate.forced` and thresholds apply to
    both) and computes, in evaluation mode, what `net.eval()` computes, but only on the kept blocks and channels.
    It is for inference only: it always uses the BatchNorm running statistics and the hard decisions.

    Args:
        net: a model from `dynamize.convert` or `dynamize.load`.
        channels: how a batch of several images runs a channel group: "auto" (a cost model picks per group and
            batch), "union" (the channels any image keeps) or "split" (each image on its own channels).

    Returns:
        An fx GraphModule in evaluation mode; `.masked_groups` lists groups left masked (computed in full, then
        multiplied by their decisions) with the reason.
    """
    if channels not in CHANNEL_MODES:
        raise ValueError(f"channels must be one of {CHANNEL_MODES}, not {channels!r}")
    masked: List[str] = []
    runtime = _compile_graph(net.graph, net.plan.groups, channels, masked)
    runtime.masked_groups = masked
    return runtime.eval()
