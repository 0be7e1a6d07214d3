"""Timm-aware torch.fx tracing with shape propagation.

Tracing honours timm's no-trace registries so that every architecture timm can trace is traceable here, and
treats whole convolutions, norms and activations as leaves: those are the units that gates scale or skip.
"""
from collections.abc import Sequence

import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from timm.layers.adaptive_avgmax_pool import AdaptiveAvgMaxPool2d
from timm.models.nfnet import NormFreeBlock
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import ModelError

# Leaves are the units the plan reasons about; timm subclasses them (Conv2dSame, BatchNormAct2d, ...). timm's "avgmax"
# pool is one too: traced through, it is the sum of two pools of the same tensor, which no group can follow.
_LEAF_TYPES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, AdaptiveAvgMaxPool2d)
# No-trace modules that are traced all the same, because what made timm list them does not apply here. NormFreeBlock:
# its in-place `out.mul_(skipinit_gain)` has no users, so torch.fx's dead-code elimination drops it
# (pytorch/pytorch#68301); `symbolic_trace` keeps in-place calls, and `units.py` checks each unit's trace against the
# module itself.
_TRACED_ANYWAY = (NormFreeBlock,)


class TimmTracer(fx.Tracer):
    """A tracer that keeps timm's no-trace modules and functions, and gate-relevant layers, as leaves."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self._notrace = tuple(m for m in get_notrace_modules() if m not in _TRACED_ANYWAY)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _LEAF_TYPES) or (self._notrace and isinstance(m, self._notrace)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(module: nn.Module, none_args: Sequence[str] = ()) -> fx.GraphModule:
    """Trace a module with `TimmTracer`, without dead code. The same module code always gives the same node names.

    Args:
        none_args: forward arguments fixed to None while tracing (a block called without its optional shortcut).

    Raises:
        ModelError: the module has data-dependent control flow that torch.fx cannot follow.
    """
    tracer = TimmTracer()
    try:
        graph = tracer.trace(module, concrete_args={name: None for name in none_args} or None)
    except Exception as e:  # torch.fx raises plain TraceError/TypeError/etc. for untraceable code
        raise ModelError(
            f"{type(module).__name__} cannot be traced by torch.fx ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]}); dynamize supports timm CNNs that timm itself can trace") from None
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    # Unused split outputs would otherwise look like extra consumers; in-place calls change their input.
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or is_in_place(n))
    gm.recompile()
    return gm


def input_node(node: fx.Node, i: int = 0) -> fx.Node:
    """The `i`-th argument of `node`, a tensor the op reads (fx types arguments as any constant or container)."""
    arg = node.args[i]
    if not isinstance(arg, fx.Node):
        raise TypeError(f"argument {i} of node {node.name} is {arg!r}, not a node")
    return arg


def target_path(node: fx.Node) -> str:
    """The path of the module a `call_module` node calls, or of the attribute a `get_attr` node reads."""
    if not isinstance(node.target, str):
        raise TypeError(f"node {node.name} ({node.op}) names no module or attribute")
    return node.target


def is_in_place(node: fx.Node) -> bool:
    """A tensor method that changes its tensor in place (`x.mul_(g)`), whose effect outlives its unused result."""
    target = node.target
    return node.op == "call_method" and isinstance(target, str) and target.endswith("_") and not target.startswith("_")


def trace(model: nn.Module, input_size: Sequence[int]) -> fx.GraphModule:
    """Trace a model and annotate every node with its output shape for one image of `input_size` (C, H, W).

    Raises:
        ModelError: the model cannot be traced, or does not run at that input size.
    """
    gm = symbolic_trace(model)
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, *input_size))
    except RuntimeError as e:
        raise input_error(model, input_size, e) from None
    finally:
        gm.train(was_training)
    return gm


def input_error(model: nn.Module, input_size: Sequence[int], error: Exception) -> ModelError:
    """The error for a model that raised `error` on one image of `input_size`, with what to change."""
    cause = str(error.__cause__ or error).splitlines()[0][:120]
    hint = "pass a larger --img-size" if "size" in cause else "check --in-chans and --img-size"
    return ModelError(f"{type(model).__name__} does not run at input size {tuple(input_size)} ({cause}); {hint}")


def check_cnn(model: nn.Module) -> None:
    """Raise a ModelError for models that are not convolutional networks (vision transformers, MLP mixers)."""
    from timm.layers import Attention
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    if n_convs <= 1 or any(isinstance(m, (Attention, nn.MultiheadAttention)) for m in model.modules()):
        raise ModelError(f"{type(model).__name__} is not a convolutional network (it has {n_convs} convolution"
                         f"{'s' if n_convs != 1 else ''} and/or attention layers); dynamize gates timm CNNs such as "
                         "ResNet, RegNet, MobileNet, EfficientNet, DenseNet, VGG and ConvNeXt")


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The traced output shape of a node, or None if it is not a single tensor."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def tensor_shape(node: fx.Node) -> tuple[int, ...]:
    """The traced output shape of a node that computes a single tensor."""
    shape = node_shape(node)
    if shape is None:
        raise TypeError(f"node {node.name} has no traced tensor shape")
    return shape
