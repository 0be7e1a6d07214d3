"""Apply a GatePlan to a timm model. Follows the plan; never decides what to gate.

Each unit named by the plan (a module, usually a residual block) is traced on its own and replaced by a
`DynamicUnit`: the same children under the same names, plus the gates, running the rewritten graph. Everything else
is the user's timm model object, so `forward_features`, `forward_head`, `reset_classifier`, `pretrained_cfg` and the
weight names work as before. The model's class becomes a subclass of its timm class that adds `DynamicNet`'s
methods (`plan`, `gates()`, ...).
"""
import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import fx, nn

from ..errors import RunError
from .gates import ChannelGate, Gate, GatedResidual, GatePool
from .plan import BlockSite, ChannelGroup, GatePlan
from .trace import symbolic_trace


def gate_key(name: str) -> str:
    """A gate's key in its unit's `lnets` / `cnets` / `pools` (module paths contain dots)."""
    return name.replace(".", "_").replace("#", "_").replace(":", "_")


# The runtime layer registers how to build a unit's fast inference graph (dynamize.runtime.sliced.compile_unit) and
# the graph of the whole model around its units (compile_shell).
_FastPathCompiler = Callable[["DynamicUnit", list[ChannelGroup], str], Callable[..., torch.Tensor]]
_ShellCompiler = Callable[["DynamicNet"], Callable[..., torch.Tensor] | None]
_fast_path_compiler: _FastPathCompiler | None = None
_shell_compiler: _ShellCompiler | None = None


def set_fast_path_compiler(compiler: _FastPathCompiler, shell: _ShellCompiler) -> None:
    """Register the functions that build a unit's hard inference path (see `DynamicUnit.set_fast_path`) and the
    model's graph around its units (see `DynamicNet.set_fast_shell`)."""
    global _fast_path_compiler, _shell_compiler
    _fast_path_compiler, _shell_compiler = compiler, shell


_M = TypeVar("_M", bound=nn.Module)


def submodule(root: nn.Module, path: str, cls: type[_M]) -> _M:
    """`root.get_submodule(path)`, which the plan says is a `cls`."""
    module = root.get_submodule(path)
    if not isinstance(module, cls):
        raise TypeError(f"{path!r} is a {type(module).__name__}, not a {cls.__name__}")
    return module


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    new.output(new.graph_copy(graph, {}))
    return new


class DynamicUnit(nn.Module):
    """A module of the timm model with its gates: the original children and weights under their own names, plus
    `pools`, `lnets` (GatedResidual per block) and `cnets` (ChannelGate per group), run by the rewritten graph.

    In evaluation without gradients, a unit with a fast path (`set_fast_path`) runs the runtime's graph, which
    computes only the kept channels; training and gradients always run the masked graph. The graphs are kept as
    data and turned into callables on first use (and again after a copy), so a copy runs its own weights.
    """

    def __init__(self, original: nn.Module, blocks: list[BlockSite], groups: list[ChannelGroup],
                 none_args: Sequence[str] = ()):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, p in original._parameters.items():
            if p is not None:
                self.register_parameter(name, p)
        for name, b in original._buffers.items():
            if b is not None:
                self.register_buffer(name, b, persistent=name not in original._non_persistent_buffers_set)
        self.original_type = type(original).__name__
        self.runtime_mode: str | None = None
        self.runtime_groups: list[ChannelGroup] = []
        self.pools = nn.ModuleDict()
        self.lnets = nn.ModuleDict()
        self.cnets = nn.ModuleDict()
        traced = symbolic_trace(original, none_args)
        for n in traced.graph.nodes:  # constants the tracer stored on its own root
            if n.op == "get_attr" and not _has_attr(self, n.target):
                self.register_buffer(n.target, getattr(traced, n.target), persistent=False)
        self._graph, self._branches = _insert_gates(self, _copy_graph(traced.graph), blocks, groups)

    def _assemble(self) -> None:
        self.__dict__["_masked"] = fx.GraphModule(self, _copy_graph(self._graph), f"Gated{self.original_type}")
        for key, graph in self._branches.items():
            submodule(self.lnets, key, GatedResidual).set_branch(fx.GraphModule(self, _copy_graph(graph), "Branch"))

    @property
    def masked(self) -> fx.GraphModule:
        """The gated graph: dropped channels multiplied by zero, skipped branches not called (training path)."""
        if "_masked" not in self.__dict__:
            self._assemble()
        return self.__dict__["_masked"]

    def set_fast_path(self, mode: str | None, groups: list[ChannelGroup]) -> None:
        """Run the runtime's hard inference path in evaluation without gradients (mode None: never)."""
        self.runtime_mode, self.runtime_groups = mode, list(groups)
        self.__dict__.pop("_fast", None)

    @property
    def fast(self) -> Callable[..., torch.Tensor]:
        """The hard inference path, built on first use."""
        if "_fast" not in self.__dict__:
            if _fast_path_compiler is None:
                raise RuntimeError("no fast path compiler is registered; import dynamize.runtime")
            if self.runtime_mode is None:
                raise RuntimeError("this unit has no fast path; see set_fast_path")
            self.__dict__["_fast"] = _fast_path_compiler(self, self.runtime_groups, self.runtime_mode)
        return self.__dict__["_fast"]

    def forward(self, *args, **kwargs):
        if self.runtime_mode is not None and not self.training and not torch.is_grad_enabled():
            return self.fast(*args, **kwargs)
        return self.masked(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_masked", None)
        state.pop("_fast", None)
        return state


def _has_attr(module: nn.Module, target: str) -> bool:
    obj = module
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _insert_gates(unit: DynamicUnit, graph: fx.Graph, blocks: list[BlockSite],
                  groups: list[ChannelGroup]) -> tuple[fx.Graph, dict[str, fx.Graph]]:
    """Insert pools and C-Nets into `graph` and outline each block's branch; returns the graph and the branches.

    Raises:
        RunError: the plan names nodes this graph does not have (a plan from another architecture or timm version).
    """
    nodes: dict[str, fx.Node] = {n.name: n for n in graph.nodes}
    replaced: dict[str, fx.Node] = {}  # nodes whose users now read a gate's output instead

    def node(name: str) -> fx.Node:
        if name in replaced:
            return replaced[name]
        if name not in nodes:
            raise RunError(f"the gate plan names node {name!r}, which {unit.original_type} does not have here "
                           "(a plan from another architecture or timm version); re-run `dynamize convert`")
        return nodes[name]

    pools: dict[str, fx.Node] = {}

    def pool(name: str, axis: int) -> fx.Node:
        """One pooled feature per gate input, shared by every gate that reads it."""
        if name not in pools:
            src = node(name)
            unit.pools[gate_key(name)] = GatePool(axis)
            first_op = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first_op) if src.op == "placeholder" else graph.inserting_after(src):
                pools[name] = graph.call_module(f"pools.{gate_key(name)}", (src,))
        return pools[name]

    gate_nodes: dict[str, fx.Node] = {}
    for grp in groups:
        for name in (grp.producer, *grp.members, *grp.sinks, *grp.exits):  # read by the cost model and the runtime
            node(name)
        key = gate_key(grp.name)
        unit.cnets[key] = ChannelGate(grp.in_channels, grp.channels, grp.hidden, grp.axis, grp.min_keep, grp.widths)
        pooled = pool(grp.gate_input, grp.axis)
        after = node(grp.gate_after)
        with graph.inserting_after(after):
            gated = graph.call_module(f"cnets.{key}", (pooled, after))
        after.replace_all_uses_with(gated, delete_user_cb=lambda user: user is not gated)
        gate_nodes[grp.gate_after] = replaced[grp.gate_after] = gated

    branches: dict[str, fx.Graph] = {}
    for blk in blocks:
        fork, add = node(blk.fork), node(blk.add)
        for name in blk.branch_nodes:
            node(name)  # a name this graph lacks raises the plan-mismatch error
        region = {nodes[name] for name in blk.branch_nodes}  # a gate's own input is the original node
        region |= {gate_nodes[name] for name in blk.branch_nodes if name in gate_nodes}
        region |= {p for p in pools.values() if p.args[0] in region}
        order = {n: i for i, n in enumerate(graph.nodes)}
        inside = sorted(region, key=order.__getitem__)
        outside = sorted({a for n in inside for a in n.all_input_nodes if a not in region}, key=order.__getitem__)
        sub = fx.Graph()
        env = {fork: sub.placeholder("x")}
        extras = [a for a in outside if a is not fork and a.op != "get_attr"]
        if any(a not in pools.values() for a in extras):
            raise RunError(f"the branch of {blk.name} in the gate plan reads more than its input; re-run "
                           "`dynamize convert`")
        env.update({a: sub.placeholder(a.name) for a in extras})
        env.update({a: sub.node_copy(a) for a in outside if a.op == "get_attr"})
        for n in inside:
            env[n] = sub.node_copy(n, lambda a: env[a])
        sub.output(env[node(blk.branch_out)])
        key = gate_key(blk.name)
        unit.lnets[key] = GatedResidual(blk.channels, blk.hidden)
        branches[key] = sub
        pooled = pool(blk.fork, 1)
        with graph.inserting_before(add):
            gated = graph.call_module(f"lnets.{key}", (fork, node(blk.shortcut), pooled, *extras))
        add.replace_all_uses_with(gated)
        replaced[blk.add] = gated
        graph.erase_node(add)
        for n in reversed(inside):
            graph.erase_node(n)
    graph.lint()
    return graph, branches


class DynamicNet(nn.Module):
    """The methods a gated timm model gains. A converted model is an instance of its own timm class and of this
    (its class is `Dynamic<TimmClass>(DynamicNet, TimmClass)`; this class adds methods, no __init__, and no state
    beyond the runtime's switch and its cached shell graph, which copies do not share).

    Attributes:
        plan: the GatePlan the model was built from.
    """

    plan: GatePlan

    def block_gate(self, name: str) -> Gate:
        """The L-Net gate of a block named in the plan."""
        block = next(b for b in self.plan.blocks if b.name == name)
        return submodule(self, _path(block.unit, "lnets", block.name), GatedResidual).gate

    def channel_gate(self, name: str) -> Gate:
        """The C-Net gate of a channel group named in the plan."""
        group = next(g for g in self.plan.groups if g.name == name)
        return submodule(self, _path(group.unit, "cnets", group.name), ChannelGate).gate

    def gates(self) -> Iterator[tuple[str, str, Gate]]:
        """All gates, L-Nets first, as (kind, name, Gate); kind is "layer" or "channel"."""
        for b in self.plan.blocks:
            yield "layer", b.name, self.block_gate(b.name)
        for g in self.plan.groups:
            yield "channel", g.name, self.channel_gate(g.name)

    def units(self) -> Iterator[tuple[str, DynamicUnit]]:
        """The rewritten modules, as (module path, DynamicUnit)."""
        for path in self.plan.units:
            yield path, submodule(self, path, DynamicUnit)

    @contextlib.contextmanager
    def masked_path(self) -> Iterator[None]:
        """Run the masked graph even in evaluation without gradients (e.g. to re-estimate BatchNorm statistics,
        which the runtime's sliced layers and folded norms do not update)."""
        saved = [(unit, unit.runtime_mode) for _, unit in self.units()]
        shell = self.__dict__.get("fast_shell", False)
        for unit, _ in saved:
            unit.runtime_mode = None
        self.__dict__["fast_shell"] = False
        try:
            yield
        finally:
            for unit, mode in saved:
                unit.runtime_mode = mode
            self.__dict__["fast_shell"] = shell

    def set_fast_shell(self, enabled: bool) -> None:
        """In evaluation without gradients, run the model's code around its units as a graph with the norms that
        follow convolutions folded in (the stem, ungated blocks, the head); the units run their own paths."""
        self.__dict__["fast_shell"] = enabled
        self.__dict__.pop("_shell_graph", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.__dict__.get("fast_shell") and not self.training and not torch.is_grad_enabled():
            shell = self._shell()
            if shell is not None:
                return shell(x)
        return super().forward(x)

    def _shell(self) -> Callable[..., torch.Tensor] | None:
        """The shell graph, built on first use (None while it is traced, or if the model's code cannot be)."""
        if "_shell_graph" not in self.__dict__:
            if _shell_compiler is None:
                raise RuntimeError("no fast path compiler is registered; import dynamize.runtime")
            self.__dict__["_shell_graph"] = None  # tracing calls forward: the model's own code then
            self.__dict__["_shell_graph"] = _shell_compiler(self)
        return self.__dict__["_shell_graph"]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_shell_graph", None)  # a copy builds its own, around its own modules
        return state

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The original timm model's weights (no gates), under timm's names."""
        gate_prefixes = tuple(f"{path}.{kind}." for path in self.plan.units for kind in ("lnets", "cnets", "pools"))
        return {k: v for k, v in self.state_dict().items() if not k.startswith(gate_prefixes)}


def _path(unit: str, kind: str, name: str) -> str:
    return f"{unit}.{kind}.{gate_key(name)}"


_CLASSES: dict[type[nn.Module], type[DynamicNet]] = {}


def _dynamic_class(cls: type[nn.Module]) -> type[DynamicNet]:
    if issubclass(cls, DynamicNet):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Dynamic{cls.__name__}", (DynamicNet, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def rewrite(model: nn.Module, plan: GatePlan) -> DynamicNet:
    """Replay a plan on a copy of a timm model (the model itself is left untouched) and return the gated copy.

    Raises:
        RunError: the plan names modules or nodes this model does not have.
    """
    net = copy.deepcopy(model)
    for path in plan.units:
        try:
            original = net.get_submodule(path)
        except AttributeError:
            raise RunError(f"the gate plan names module {path!r}, which {plan.architecture} does not have; "
                           "re-run `dynamize convert`") from None
        unit = DynamicUnit(original, [b for b in plan.blocks if b.unit == path],
                           [g for g in plan.groups if g.unit == path], plan.none_args.get(path, ()))
        parent, _, leaf = path.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, unit)
    net.__class__ = _dynamic_class(type(net))
    assert isinstance(net, DynamicNet)  # what the class swap made it
    net.plan = plan
    return net.train(model.training)
