"""Which module of the timm model each gate is inserted into, and the nodes of its site in that module's trace.

The whole model is traced once to find the gate sites. Each site is then rewritten inside the smallest module that
holds all of it (its *unit*, e.g. the residual block `layer1.0`), traced on its own, so that the converted model
stays the user's timm model object with only those modules swapped, and keeps timm's API and weight names.

A unit's own trace runs the same code as its part of the whole-model trace, so the two match node for node; the
match is checked, and so is the unit's trace against the unit itself on the inputs it really receives. A unit that
fails either check (or cannot be traced alone) hands its sites to its parent module. Sites that only the whole model
holds (a stem feeding the first block) are not gated.
"""
import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..errors import ModelError
from .trace import symbolic_trace, target_path

ROOT = ""


def module_path(node: fx.Node) -> list[str]:
    """The modules a node was created in, outermost first, without the module a `call_module` node calls."""
    path = [name for name, _ in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module" and path and path[-1] == node.target:
        path = path[:-1]
    return path


def common_unit(nodes: Iterable[fx.Node]) -> str:
    """The innermost module that every node was created in (ROOT if none)."""
    paths = [module_path(n) for n in nodes]
    common: list[str] = []
    for level in zip(*paths):
        if any(p != level[0] for p in level):
            break
        common.append(level[0])
    return common[-1] if common else ROOT


def crosses_blocks(model: nn.Module, producer: fx.Node, nodes: Iterable[fx.Node]) -> bool:
    """True if a channel group leaves the block its producer belongs to: the producer sits in a submodule of the
    group's common unit that holds other layers too (a block, not a conv-norm-act wrapper), like a mobile net's
    projection into the next block.
    """
    unit = common_unit([producer, *nodes])
    path = module_path(producer) + [target_path(producer)]
    child = path[path.index(unit) + 1 if unit != ROOT else 0]
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.get_submodule(child).modules())
    return layers > 1


def parent(unit: str) -> str:
    return unit.rpartition(".")[0]


def is_within(unit: str, ancestor: str) -> bool:
    return ancestor == ROOT or unit == ancestor or unit.startswith(ancestor + ".")


class UnitTrace:
    """One unit traced alone, matched node for node with its part of the whole-model graph.

    Attributes:
        path: the unit's module path in the model.
        gm: the unit's own trace.
        own: whole-model node -> the same node in the unit's trace.
        none_args: the unit's forward arguments that are None where the model calls it (fixed in the trace).
    """

    def __init__(self, path: str, gm: fx.GraphModule, own: dict[fx.Node, fx.Node], none_args: list[str]):
        self.path, self.gm, self.own, self.none_args = path, gm, own, none_args

    def name(self, node: fx.Node) -> str:
        """The unit's name for a node the unit computes."""
        return self.own[node].name

    def holds(self, nodes: Iterable[fx.Node]) -> bool:
        """True if the unit computes every node."""
        return all(n in self.own for n in nodes)

    def entries(self, nodes: Iterable[fx.Node]) -> set[fx.Node]:
        """The unit-side values (its nodes or arguments) that the unit's copies of `nodes` read from outside them."""
        inside = {self.own[n] for n in nodes}
        return {a for u in inside for a in u.all_input_nodes if a not in inside and a.op != "get_attr"}


def capture_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[tuple, dict]]:
    """The arguments every submodule receives in one evaluation pass of `model` on `example` (first call only)."""
    inputs: dict[str, tuple[tuple, dict]] = {}
    def keep(m, args, kwargs, name):
        if name not in inputs:
            inputs[name] = _clone((args, kwargs))

    handles = [m.register_forward_pre_hook(lambda m, args, kwargs, name=name: keep(m, args, kwargs, name),
                                           with_kwargs=True)
               for name, m in model.named_modules() if name and next(m.children(), None) is not None]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return inputs


def trace_unit(model: nn.Module, path: str, whole: fx.GraphModule,
               inputs: dict[str, tuple[tuple, dict]]) -> UnitTrace | None:
    """Trace the unit `path` of `model` alone and match it with the whole-model graph; None if they differ."""
    module = model.get_submodule(path)
    if path not in inputs:
        return None
    none_args = _none_args(module, *inputs[path])
    try:
        gm = symbolic_trace(module, none_args)
    except ModelError:
        return None
    region = [n for n in whole.graph.nodes if n.op not in ("placeholder", "output") and path in _all_paths(n)]
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    if len(region) != len(body):
        return None
    own: dict[fx.Node, fx.Node] = {}
    for r, u in zip(region, body):
        if r.op != u.op:
            return None
        if r.op in ("call_module", "get_attr"):
            if r.target != f"{path}.{u.target}":
                return None
        elif r.target != u.target:
            return None
        if not _same(r.args, u.args, own) or not _same(r.kwargs, u.kwargs, own):
            return None
        own[r] = u
    try:
        with torch.no_grad():
            args, kwargs = _clone(inputs[path])
            traced_out = gm.eval()(*args, **kwargs)
            args, kwargs = _clone(inputs[path])
            real_out = module.eval()(*args, **kwargs)
    except Exception:  # the trace took a Python branch that the real inputs do not (e.g. a list input)
        return None
    return UnitTrace(path, gm, own, none_args) if _equal(traced_out, real_out) else None


def _none_args(module: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """The forward arguments that are None in this call (given as None, or left at a None default)."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return []
    bound.apply_defaults()
    return [name for name, value in bound.arguments.items() if value is None]


def _all_paths(node: fx.Node) -> set[str]:
    return {name for name, _ in (node.meta.get("nn_module_stack") or {}).values()}


def _same(a: Any, b: Any, own: dict[fx.Node, fx.Node]) -> bool:
    """Do argument structures `a` (whole model) and `b` (unit) refer to the same values?"""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            return False
        return own[a] is b if a in own else b.op == "placeholder"
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y, own) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], own) for k in a)
    return type(a) is type(b) and a == b


def _clone(x: Any) -> Any:
    """A copy of nested arguments with every tensor cloned (a module may change its inputs in place)."""
    if torch.is_tensor(x):
        return x.clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _equal(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def assign_units(model: nn.Module, whole: fx.GraphModule, example: torch.Tensor,
                 sites: Sequence[Sequence[fx.Node]]) -> list[UnitTrace | None]:
    """The unit each site (the nodes it changes) is rewritten in, or None if only the whole model holds it."""
    inputs = capture_inputs(model, example)
    wanted = [common_unit(nodes) for nodes in sites]
    traces: dict[str, UnitTrace | None] = {}
    while True:
        # A unit inside another unit is rewritten as part of the outer one.
        units = sorted({w for w in wanted if w != ROOT}, key=len)
        wanted = [next((u for u in units if is_within(w, u)), w) if w != ROOT else w for w in wanted]
        moved = False
        for i, unit in enumerate(wanted):
            if unit == ROOT:
                continue
            if unit not in traces:
                traces[unit] = trace_unit(model, unit, whole, inputs)
            t = traces[unit]
            if t is None or not t.holds(sites[i]):
                wanted[i] = parent(unit) if "." in unit else ROOT
                moved = True
        if not moved:
            return [traces[w] if w != ROOT else None for w in wanted]
