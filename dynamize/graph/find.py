"""Find the residual blocks and channel groups of a traced model. Reads the graph; never changes it.

See docs/architecture.md for the rules. In short: a residual block is an add whose one operand is computed from
the other operand's source x by a single-entry branch that contains convolutions; a channel group is the output
of a convolution that reaches only other convolutions through per-channel operations (the op table, `ops.py`), or,
when asked, the residual add of the block whose branch it ends.
"""
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import fx, nn

from . import ops
from .ops import Role
from .plan import Skipped
from .trace import input_node, is_in_place, node_shape


@dataclass
class Block:
    """A residual add `shortcut + F(x)` found in the whole-model graph."""
    add: fx.Node
    fork: fx.Node
    out: fx.Node
    shortcut: fx.Node
    region: set[fx.Node]


@dataclass
class Group:
    """A channel group found in the whole-model graph: a producer, its per-channel chain, the layers it feeds, and the
    residual adds it is added into (`exits`: the branch output of a block, added to the block's full-width shortcut)."""
    producer: fx.Node
    members: list[fx.Node]
    sinks: list[fx.Node]
    channels: int
    axis: int
    block: Block | None = None
    frontier: list[fx.Node] = field(default_factory=list)
    exits: list[fx.Node] = field(default_factory=list)

    @property
    def end(self) -> fx.Node:
        """The last node of the per-channel chain: the gate scales the channels here."""
        return self.members[-1]

    @property
    def gate_input(self) -> fx.Node:
        """The producer's input: the C-Net decides before the producer runs."""
        return input_node(self.producer)


def owner(node: fx.Node) -> str:
    """The innermost module a node was created in (its own module for `call_module` nodes)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


def is_residual_add(node: fx.Node) -> bool:
    """An add of two tensor nodes of the same 4-D shape."""
    if not ops.is_add(node) or node.kwargs or len(node.args) != 2:
        return False
    a, b = node.args
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return False
    shape = node_shape(a)
    return shape is not None and shape == node_shape(b) and len(shape) == 4


class Graph:
    """Reachability helpers over one traced graph."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self._ancestors: dict[fx.Node, set[fx.Node]] = {}
        output = self.nodes[-1]
        live = self.ancestors(output) | {output}
        # Side nodes compute nothing the output reads: shape asserts (`_assert(x.shape[1] == 2)`), in-place updates.
        # One that reads only a value and what that value is computed from hangs on it, and goes wherever the value
        # goes; an in-place update only if it changes that value.
        self.hanging: dict[fx.Node, list[fx.Node]] = {}
        for n in self.nodes:
            if n not in live:
                reads = {a for a in self.ancestors(n) if a in live and a.op != "get_attr"}
                latest = max(reads, key=self.order.__getitem__, default=None)
                if latest is None or not reads <= self.ancestors(latest) | {latest}:
                    continue
                if not is_in_place(n) or n.args[0] is latest:
                    self.hanging.setdefault(latest, []).append(n)

    def ancestors(self, node: fx.Node) -> set[fx.Node]:
        if node not in self._ancestors:
            seen, stack = set(), list(node.all_input_nodes)
            while stack:
                n = stack.pop()
                if n not in seen:
                    seen.add(n)
                    stack.extend(n.all_input_nodes)
            self._ancestors[node] = seen
        return self._ancestors[node]

    def owned_region(self, out: fx.Node) -> tuple[set[fx.Node], set[fx.Node]]:
        """The nodes used only to compute `out` (with the side nodes that hang on them), and the region's inputs."""
        region = {out, *self.hanging.get(out, ())}
        for n in sorted(self.ancestors(out), key=self.order.__getitem__, reverse=True):
            own = {n, *self.hanging.get(n, ())}
            if n.op != "placeholder" and n.users and all(u in region or u in own for u in n.users):
                region |= own
        entries = {i for n in region for i in n.all_input_nodes if i not in region and i.op != "get_attr"}
        return region, entries

    def count_convs(self, nodes) -> int:
        return sum(ops.is_conv(ops.module_of(self.gm, n)) for n in nodes)


def find_blocks(g: Graph) -> tuple[list[Block], list[Skipped]]:
    """Residual blocks, and the adds that were rejected with the reason."""
    blocks: list[Block] = []
    skipped: list[Skipped] = []
    taken: set[fx.Node] = set()
    for add in g.nodes:
        if not is_residual_add(add):
            continue
        best = None
        for out, other in (add.args, add.args[::-1]):
            if len(out.users) - len(g.hanging.get(out, ())) != 1:
                continue
            region, entries = g.owned_region(out)
            if len(entries) != 1:
                continue
            (fork,) = entries
            if other is not fork and fork not in g.ancestors(other):
                continue
            n_convs = g.count_convs(region)
            shortcut_nodes = (g.ancestors(other) | {other}) - g.ancestors(fork) - {fork}
            if n_convs == 0 or g.count_convs(shortcut_nodes) > 1 or g.count_convs(shortcut_nodes) >= n_convs:
                continue
            if best is None or n_convs > best[1]:
                best = (Block(add, fork, out, other, region), n_convs)
        if best is None:
            skipped.append(Skipped("block", owner(add), _why_not_block(add)))
            continue
        block = best[0]
        if block.region & taken or any(b.add in block.region for b in blocks):
            skipped.append(Skipped("block", owner(add), "nested inside another residual block"))
            continue
        taken |= block.region
        blocks.append(block)
    return blocks, skipped


def _why_not_block(add: fx.Node) -> str:
    if any(_is_shared_slice(a) for a in add.all_input_nodes):
        return "adds part of a branch output whose other channels go elsewhere (a dual-path block)"
    return "a sum of branches, not `shortcut(x) + F(x)`"


def _is_shared_slice(node: fx.Node) -> bool:
    """A slice `y[:, a:b]` of a tensor that other nodes read too."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    src, index = node.args
    return (isinstance(src, fx.Node) and len(src.users) > 1 and isinstance(index, tuple)
            and any(isinstance(i, slice) for i in index))


def _channels(node: fx.Node, axis: int) -> int | None:
    shape = node_shape(node)
    return shape[axis] if shape is not None and len(shape) == 4 else None


def _passes_channels(g: Graph, node: fx.Node, axis: int, channels: int, roles: tuple[Role, ...]) -> bool:
    """True if `node` has one of `roles`, reads one tensor and keeps the channel count."""
    return (_channels(node, axis) == channels and len(node.all_input_nodes) == 1
            and ops.role(g.gm, node, axis) in roles)


def _is_sink(g: Graph, node: fx.Node, src: fx.Node, axis: int, channels: int) -> bool:
    """True if `node` is a layer reading the group's channels as its input features."""
    if node.args[0] is not src or ops.role(g.gm, node, axis) is not Role.LAYER:
        return False
    m = ops.module_of(g.gm, node)  # a full convolution (axis 1) or a channels-last linear (axis -1)
    if isinstance(m, nn.Conv2d):
        return m.in_channels == channels
    return isinstance(m, nn.Linear) and m.in_features == channels


_ENDS_BRANCH = "ends a residual branch (gated with --residual-outputs)"


def _why_not(g: Graph, node: fx.Node) -> str:
    if ops.is_add(node):
        return "feeds a residual add"
    if node.op == "call_function" and node.target in ops.CONCAT_FUNCTIONS:
        return "feeds a concat"
    if node.op == "output":
        return "is a model output"
    m = ops.module_of(g.gm, node)
    if ops.is_conv(m) and m.groups > 1:
        return "feeds a grouped convolution"
    if ops.is_conv(m) and m.padding_mode != "zeros":
        return f"feeds a convolution with {m.padding_mode} padding"
    if ops.is_conv(m) and not ops.is_plain_conv(m):
        return f"feeds a {type(m).__name__}, whose weights are not sliceable"
    if isinstance(m, (nn.Linear, nn.Flatten)) or (m is None and "flatten" in str(node.target)):
        return "feeds the classifier"
    if ops.role(g.gm, node) is Role.CHANNELWISE:
        return f"feeds `{node.name}` beside other layers (parallel paths that normalise it)"
    # Named by the op, not the node, so that the same op repeated (`mul`, `mul_1`, ...) is one reason.
    op = getattr(node.target, "__name__", node.target)
    what = f"`{node.name}` ({type(m).__name__})" if m is not None else f"`{op}`"
    return f"feeds {what}, which dynamize cannot follow channel by channel (it may mix channels)"


def _follow(g: Graph, producer: fx.Node, axis: int, channels: int, adds: dict[fx.Node, fx.Node],
            residual_outputs: bool) -> Group | str:
    """Follow a producer's output through per-channel ops to the layers that read it: the group, or why there is
    none. `adds` maps a residual block's branch output to its add, where the group may end (an exit) with
    `residual_outputs`."""
    members = [producer]
    while len(members[-1].users) == 1:
        nxt = next(iter(members[-1].users))
        if not _passes_channels(g, nxt, axis, channels, (Role.ELEMENTWISE, Role.CHANNELWISE)):
            break
        members.append(nxt)
    sinks: list[fx.Node] = []
    frontier: list[fx.Node] = []
    exits: list[fx.Node] = []
    stack, seen = [members[-1]], set()
    while stack:
        src = stack.pop()
        for u in src.users:
            if u in seen:
                continue
            seen.add(u)
            if _is_sink(g, u, src, axis, channels):
                sinks.append(u)
                continue
            if adds.get(src) is u:
                if not residual_outputs:
                    return _ENDS_BRANCH
                exits.append(u)
                continue
            r = ops.role(g.gm, u, axis)
            keeps = _channels(u, axis) == channels
            if (r is Role.ELEMENTWISE and keeps and len(u.all_input_nodes) == 1) or r is Role.SQUEEZE:
                frontier.append(u)
                stack.append(u)
            elif r is Role.RESCALE and keeps:
                frontier.append(u)  # squeeze-excite rescaling of the group's own channels
                stack.append(u)
            else:
                return _why_not(g, u)
    if not sinks and not exits:
        return "reaches no convolution"
    return Group(producer, members, sinks, channels, axis, frontier=frontier, exits=exits)


def _producers(g: Graph) -> Iterator[tuple[fx.Node, int, tuple[int, ...]]]:
    """The layers whose output channels may form a group, with their channel axis and 4-D output shape."""
    for n in g.nodes:
        shape = node_shape(n)
        if shape is None or len(shape) != 4:
            continue
        if ops.role(g.gm, n, 1) is Role.LAYER:
            yield n, 1, shape
        elif ops.role(g.gm, n, -1) is Role.LAYER:
            yield n, -1, shape


def find_groups(g: Graph, blocks: list[Block], residual_outputs: bool = False) -> tuple[list[Group], list[Skipped]]:
    """Channel groups, each tagged with the residual block whose branch holds it, and the convs rejected.

    With `residual_outputs`, the output channels of a layer that ends a residual branch form a group too: an image
    that drops one of them adds nothing to that channel of the shortcut.
    """
    block_of = {n: b for b in blocks for n in b.region}
    adds = {b.out: b.add for b in blocks}
    groups: list[Group] = []
    skipped: list[Skipped] = []
    for producer, axis, shape in _producers(g):
        name = owner(producer)
        # A 1x1 convolution on a 1x1 map has too little work for a gate to save; a wider kernel there (a ResNet's
        # last stage at a small input) is a full convolution and is gated.
        if axis == 1 and shape[2:] == (1, 1) and ops.is_pointwise_conv(ops.module_of(g.gm, producer)):
            skipped.append(Skipped("group", name, "a 1x1 convolution on a 1x1 map (as in squeeze-excite and "
                                                  "heads): too little work to gate"))
            continue
        group = _follow(g, producer, axis, shape[axis], adds, residual_outputs)
        if isinstance(group, str):
            skipped.append(Skipped("group", name, group))
            continue
        block = block_of.get(producer)
        if any(block_of.get(n) is not block for n in group.members + group.sinks + group.frontier):
            skipped.append(Skipped("group", name, "crosses a residual block boundary"))
            continue
        group.block = block
        groups.append(group)
    return groups, skipped
