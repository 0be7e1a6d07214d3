"""`dynamize.convert`: a timm model in, the same model with L-Net / C-Net gates out; `plan_model` decides where."""
import copy
import math
from collections import Counter

import torch
from timm.data import resolve_model_data_config
from torch import fx, nn

from ..errors import ModelError
from ..models import create_base
from ..ranges import check_choice
from . import ops
from .cost import channel_gate_pays, channel_gather_macs, gate_flops, node_flops, pool_flops
from .find import Block, Graph, Group, find_blocks, find_groups, is_residual_add, owner
from .gates import gate_hidden
from .plan import CHANNEL_MODES, GATE_KINDS, BlockSite, ChannelGroup, CostItem, GatePlan, Skipped
from .reorder import assign_widths, reorder
from .rewrite import DynamicNet, rewrite
from .trace import check_cnn, input_error, input_node, node_shape, tensor_shape, trace
from .units import ROOT, assign_units, common_unit, crosses_blocks, is_within, module_path

# A group outside every residual branch keeps at least this share of its channels: with no shortcut around it,
# an image that dropped all of them would lose the signal (mobile nets' stride-2 blocks, plain VGG-style stacks).
MIN_KEEP_SHARE = 0.25

_SUPPORTED = ("timm CNNs: ResNet/ResNeXt/SE-ResNet, RegNet, MobileNet, EfficientNet, MixNet, GhostNet, ReXNet, DLA, "
              "CSP nets, HRNet, DenseNet, VGG, ConvNeXt, ...")
_CROSSES = ("runs from one block into a later stage (a projection): gating it would fold the residual blocks "
            "between into one unit; left ungated")
_NO_ADDS = "no residual adds: channel gates only"
_TOP_LEVEL = "spans the model's top-level modules (a stem into the first block): left ungated to keep the timm model"
_SLOW = ("too little work for its gate to pay for itself in wall-clock time (at half its channels it would save "
         "{:.1f} MMAC per image, less than gathering the kept weights and running the gate cost): left ungated "
         "(profitable_only)")


def architecture_of(model: nn.Module) -> str:
    """timm's name for a model instance."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise ModelError(f"{type(model).__name__} was not built by timm.create_model; pass a timm model name")
    return name


def _trace_at_size(model: nn.Module, img_size: int | None) -> tuple[fx.GraphModule, list[int]]:
    """Trace at timm's default input size (or `img_size` square), finding the input channels that run.

    timm's config says 3 channels whatever `in_chans` was; the first convolution usually says the truth, but a
    space-to-depth stem (TResNet) multiplies it, so a few candidates are run through the model first (a failed shape
    propagation would print torch.fx's traceback).
    """
    _, h, w = resolve_model_data_config(model)["input_size"]
    if img_size:
        h = w = img_size
    first = next(m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    candidates = list(dict.fromkeys(c for c in (first, 3, 1, first // 16, first // 4) if c > 0))
    errors = []
    for c in candidates:
        try:
            with torch.no_grad():
                model(torch.zeros(1, c, h, w))
        except Exception as e:  # a model reports an input it cannot take as RuntimeError, AssertionError, ValueError...
            errors.append(e)
            continue
        return trace(model, (c, h, w)), [c, h, w]
    raise input_error(model, (first, h, w), errors[0])


def plan_model(model: nn.Module, *, gates: str = "both", img_size: int | None = None,
               min_keep_share: float = MIN_KEEP_SHARE, profitable_only: bool = False,
               channel_mode: str = "channel", residual_outputs: bool = False) -> GatePlan:
    """Analyse a timm model and return its GatePlan without changing it.

    Args:
        model: a model built by `timm.create_model`.
        gates: "both" (LC-Net), "layer" (L-Net only) or "channel" (C-Net only).
        img_size: square input size to count FLOPs at; default: the model's pretrained input size.
        min_keep_share: share of channels a group with no shortcut around it always keeps.
        profitable_only: leave out the channel groups whose gate cannot pay for itself in wall-clock time at
            `img_size` (`dynamize.graph.cost.channel_gate_pays`: small maps, where gathering the kept weights costs
            more than the dropped channels save); they are listed in `plan.skipped`.
        channel_mode: "channel" (a C-Net keeps any subset of its channels) or "width" (a prefix of the channels,
            ordered by importance at conversion, at one of a few widths; groups that cannot be reordered keep
            per-channel decisions and `plan.skipped` says why).
        residual_outputs: also gate the output channels of the layer that ends each residual branch (the last
            convolution of a ResNet block, a mobile net's projection): the channels an image drops are not computed
            and the shortcut passes them on unchanged. Without it those layers always compute every channel, so a
            budget is met by thinning only the branches' inner layers. It doubles the number of C-Nets in a
            residual net: on Fashion-MNIST it gained ResNet-18 about a point near its smallest reachable fraction
            and cost MobileNetV2 1.5 pt there (docs/benchmarks.md).

    Raises:
        ModelError: the model cannot be traced, or has nothing to gate.
    """
    check_choice(gates, GATE_KINDS, "--gates", ModelError)
    check_choice(channel_mode, CHANNEL_MODES, "--channel-mode", ModelError)
    arch = architecture_of(model)
    check_cnn(model)
    model = copy.deepcopy(model).eval()
    gm, size = _trace_at_size(model, img_size)
    flops = node_flops(gm, size)
    g = Graph(gm)
    plan = GatePlan(architecture=arch, gates=gates, input_size=size, total_flops=sum(flops.values()),
                    channel_mode=channel_mode)

    blocks, plan.skipped = find_blocks(g)
    groups, skipped_groups = find_groups(g, blocks, residual_outputs)
    if gates in ("both", "layer") and not any(is_residual_add(n) for n in g.nodes):
        plan.skipped.append(Skipped("block", arch, _NO_ADDS))
    if gates == "layer":
        groups = []
    else:
        plan.skipped += skipped_groups
        groups = [_part_before_head(model, gr, blocks) or gr for gr in groups]
        swallowing = [gr for gr in groups if _swallows_blocks(model, gr, blocks)]
        plan.skipped += [Skipped("group", owner(gr.producer), _CROSSES) for gr in swallowing]
        groups = [gr for gr in groups if gr not in swallowing]
        if profitable_only:
            slow = {id(gr): share for gr in groups if (share := _unprofitable(g, gr, groups, flops)) is not None}
            plan.skipped += [Skipped("group", owner(gr.producer), _SLOW.format(slow[id(gr)]))
                             for gr in groups if id(gr) in slow]
            groups = [gr for gr in groups if id(gr) not in slow]
    gated_blocks: list[Block] = [] if gates == "channel" else blocks
    sites = [[b.add, *b.region] for b in gated_blocks] + [_changed(gr) for gr in groups]
    units = assign_units(model, gm, torch.zeros(1, *size), sites)
    block_units, group_units = units[:len(gated_blocks)], units[len(gated_blocks):]
    plan.none_args = {u.path: u.none_args for u in units if u is not None and u.none_args}

    names: set = set()
    block_names = {}
    for b, unit in zip(gated_blocks, block_units):
        if unit is None:
            plan.skipped.append(Skipped("block", owner(b.add), _TOP_LEVEL))
            continue
        entries = unit.entries(b.region)  # the branch's input as the unit sees it (maybe one of its arguments)
        if len(entries) != 1:
            plan.skipped.append(Skipped("block", owner(b.add), "its branch reads two of its module's arguments"))
            continue
        (fork,) = entries
        add, out = unit.own[b.add], unit.own[b.out]
        shortcut = input_node(add, 1) if add.args[0] is out else input_node(add, 0)
        name = block_names[id(b)] = _unique(owner(b.add), names)
        c = tensor_shape(b.fork)[1]
        hidden = gate_hidden(c)
        plan.blocks.append(BlockSite(
            name=name, unit=unit.path, add=add.name, fork=fork.name, branch_out=out.name,
            shortcut=shortcut.name, branch_nodes=[unit.name(n) for n in g.nodes if n in b.region],
            channels=c, hidden=hidden, flops=sum(flops.get(n.name, 0) for n in b.region),
            gate_flops=gate_flops(c, 1, hidden), pool_flops=pool_flops(tensor_shape(b.fork))))

    group_names = {}
    for gr, unit in zip(groups, group_units):
        if unit is None:
            plan.skipped.append(Skipped("group", owner(gr.producer), _TOP_LEVEL))
            continue
        name = group_names[id(gr)] = _unique(owner(gr.producer), names)
        in_ch = tensor_shape(gr.gate_input)[gr.axis]
        hidden = gate_hidden(in_ch)
        plan.groups.append(ChannelGroup(
            name=name, unit=unit.path, producer=unit.name(gr.producer),
            gate_input=input_node(unit.own[gr.producer]).name, gate_after=unit.name(gr.end),
            members=[unit.name(n) for n in gr.members], sinks=[unit.name(n) for n in gr.sinks],
            exits=[unit.name(n) for n in gr.exits], channels=gr.channels, in_channels=in_ch, axis=gr.axis,
            hidden=hidden, block=block_names.get(id(gr.block)), flops=sum(flops.get(n.name, 0) for n in
                                                                          gr.members + gr.sinks),
            gate_flops=gate_flops(in_ch, gr.channels, hidden), pool_flops=pool_flops(tensor_shape(gr.gate_input)),
            min_keep=0 if gr.block is not None else max(1, math.ceil(min_keep_share * gr.channels))))

    if channel_mode == "width":
        plan.skipped += assign_widths(plan, {u.path: u.gm for u in group_units if u is not None})

    block_of = {n: block_names[id(b)] for b in gated_blocks if id(b) in block_names for n in b.region}
    scaled_by: dict[fx.Node, list[str]] = {}
    for gr in groups:
        if id(gr) in group_names:
            for n in gr.members + gr.sinks:
                scaled_by.setdefault(n, []).append(group_names[id(gr)])
    plan.costs = [CostItem(node=n.name, flops=flops[n.name], block=block_of.get(n), groups=scaled_by.get(n, []))
                  for n in g.nodes if flops.get(n.name)]
    if not plan.blocks and not plan.groups:
        raise ModelError(f"{arch} has nothing dynamize can gate with --gates {gates}: {_why_nothing(plan.skipped)}"
                         f"; supported: {_SUPPORTED}")
    return plan


def _unprofitable(g: Graph, group: Group, groups: list[Group], flops: dict[str, int]) -> float | None:
    """MMACs per image that half of a group's channels would save, if that does not pay for its gate; else None."""
    macs = sum(flops.get(n.name, 0) for n in group.members + group.sinks) / 2 / group.channels
    layers = [m for m in (ops.module_of(g.gm, n) for n in group.members[1:]) if ops.is_depthwise(m)]
    upstream = any(group.producer in other.sinks for other in groups)
    producers = {other.producer for other in groups}
    gather = channel_gather_macs(_layer(g, group.producer), layers, [_layer(g, n) for n in group.sinks],
                                 group.channels, upstream, [n in producers for n in group.sinks])
    return None if channel_gate_pays(macs, gather, group.channels) else macs * group.channels / 2 / 1e6


def _layer(g: Graph, node: fx.Node) -> nn.Conv2d | nn.Linear:
    """The convolution or linear layer of a group's producer or sink (the op table says it is one)."""
    m = ops.module_of(g.gm, node)
    if not isinstance(m, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"{node.name} is not a convolution or linear layer")
    return m


def _why_nothing(skipped: list[Skipped]) -> str:
    """The most frequent reasons why residual adds and convolutions were not gated, as one clause."""
    counts = Counter((s.kind, s.reason) for s in skipped if s.reason != _NO_ADDS)
    nouns = {"block": ("add", "adds"), "group": ("convolution", "convolutions")}
    reasons = [f"{reason} ({n} {nouns[kind][n != 1]})" for (kind, reason), n in counts.most_common(3)]
    if any(s.reason == _NO_ADDS for s in skipped):
        reasons.insert(0, "no residual adds")
    return "; ".join(reasons) or ("no residual conv blocks or convolution channel groups visible to torch.fx (timm may "
                                  "mark its blocks as not traceable)")


def _swallows_blocks(model: nn.Module, group: Group, blocks: list[Block]) -> bool:
    """A group that runs from one block into another, across residual blocks that would then share its unit."""
    if not crosses_blocks(model, group.producer, _changed(group)):
        return False
    unit = common_unit(_changed(group))
    return any(is_within(common_unit([b.add, *b.region]), unit) for b in blocks)


def _part_before_head(model: nn.Module, group: Group, blocks: list[Block]) -> Group | None:
    """The part inside its producer's module of a group that runs from there into the model's head; None for others.

    A mobile net's last convolution reaches the head's 1x1 convolution through the global pool (MobileNetV3, LCNet,
    GhostNet, DLA, HGNet). Only the whole model holds all of that, and the whole model is never rewritten. The group
    ends where its channels leave the producer's module instead: the runtime widens the kept ones to every channel
    there (a dropped one reads as zero), and the pool and the head's convolution run on every channel, on a 1x1 map
    where they cost little. The FLOPs accounting counts them so: the group scales only its layers inside the module.
    """
    if group.axis != 1 or group.exits:
        return None
    unit = common_unit(_changed(group))
    if unit != ROOT and not _swallows_blocks(model, group, blocks):
        return None  # the group fits a unit as it is
    path = module_path(group.producer)
    below = path[path.index(unit) + 1:] if unit != ROOT else path
    if not below:
        return None  # the producer is a layer of the unit itself (a stem): no module to end in
    outer = below[0]  # the module just inside the unit that holds the producer (`blocks` in MobileNetV3)

    def within(n: fx.Node) -> bool:
        return outer in module_path(n)

    inside = [n for n in group.members if within(n)]
    if group.members[:len(inside)] != inside:
        return None
    sinks, frontier = [n for n in group.sinks if within(n)], [n for n in group.frontier if within(n)]
    after = [n for n in group.sinks if not within(n)]
    if not after or any((node_shape(input_node(n)) or ())[2:] != (1, 1) for n in after):
        return None  # not a head: the layers after the module would run on every channel of a larger map
    return Group(group.producer, inside, sinks, group.channels, group.axis, block=group.block, frontier=frontier)


def _changed(group: Group) -> list[fx.Node]:
    return [group.producer, *group.members, *group.sinks, *group.frontier, *group.exits]


def _unique(name: str, used: set) -> str:
    base, i = name, 1
    while name in used:
        i += 1
        name = f"{base}#{i}"
    used.add(name)
    return name


def convert(model: str | nn.Module, *, gates: str = "both", img_size: int | None = None,
            min_keep_share: float = MIN_KEEP_SHARE, profitable_only: bool = False, channel_mode: str = "channel",
            residual_outputs: bool = False, **timm_kwargs) -> DynamicNet:
    """Insert L-Net and/or C-Net gates into a timm CNN.

    Args:
        model: a timm model name, or a model built by `timm.create_model` (not modified).
        gates: "both" (LC-Net), "layer" (L-Net only) or "channel" (C-Net only).
        img_size: square input size to count FLOPs at; default: the model's pretrained input size.
        min_keep_share: share of channels a group with no shortcut around it always keeps.
        profitable_only: leave out channel gates that cannot pay for themselves in wall-clock time (see
            `plan_model`).
        channel_mode: "channel" or "width" (see `plan_model`); in width mode the copy's channels are reordered by
            importance, which leaves its function unchanged.
        residual_outputs: also gate the layers that end residual branches (see `plan_model`).
        **timm_kwargs: passed to `timm.create_model` when `model` is a name (e.g. num_classes, in_chans).

    Returns:
        A copy of the timm model with gates (a `DynamicNet`, with `.plan`); with its initial open gates it returns
        what the original returned.
    """
    if isinstance(model, str):
        model = create_base(model, **timm_kwargs)
    elif timm_kwargs:
        raise TypeError("timm keyword arguments apply only when `model` is a name")
    plan = plan_model(model, gates=gates, img_size=img_size, min_keep_share=min_keep_share,
                      profitable_only=profitable_only, channel_mode=channel_mode, residual_outputs=residual_outputs)
    if any(g.widths for g in plan.groups):
        model = copy.deepcopy(model)
        reorder(model, plan)
    return rewrite(model, plan)

