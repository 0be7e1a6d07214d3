"""The op table: how each kind of graph node treats channels.

One table, read by the analysis (which ops a channel group may pass through), the FLOPs accounting (which nodes
scale with a group's kept channels) and the runtime (how to run each op on the kept channels only). A new
per-channel op is added here, once; the runtime maps each role to one implementation.
"""
import enum
import operator
from typing import TypeGuard

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.adaptive_avgmax_pool import AdaptiveAvgMaxPool2d
from torch import fx, nn

from .trace import target_path


class Role(enum.Enum):
    """What an op does to the channels of the one tensor it reads."""

    ELEMENTWISE = "elementwise"  # each value on its own, no parameters: activations, dropout, pooling
    CHANNELWISE = "channelwise"  # per-channel parameters: an evaluation-mode BatchNorm, a depthwise convolution
    LAYER = "layer"  # mixes channels: a full convolution, or a Linear over a channels-last 4-D tensor
    SQUEEZE = "squeeze"  # spatial mean with kept dims: the squeeze of squeeze-excite
    RESCALE = "rescale"  # x * s with s per channel: the excite of squeeze-excite


ELEMENTWISE_FUNCTIONS = frozenset({
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.hardtanh,
    F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.relu, torch.sigmoid,
    torch.tanh,
})
ELEMENTWISE_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous"})
ELEMENTWISE_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.ReLU, nn.ReLU6, nn.SiLU,
                       nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish,
                       nn.Hardtanh)
# Global (adaptive) pools that reduce each channel over space on its own and keep the tensor 4-D: a head's pool before
# its 1x1 convolution (timm's SelectAdaptivePool2d with pool_type "avg", "max" or "avgmax"). "catavgmax" concatenates
# its two pools and flatten=True makes the tensor 2-D: both are ops of their own in the trace, which stop a group.
# With return_indices a max pool returns a tuple; so does F.adaptive_max_pool2d, whose output then has no tensor shape
# and is not followed (as F.max_pool2d).
CHANNEL_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, AdaptiveAvgMaxPool2d)
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")
MUL_FUNCTIONS = (operator.mul, torch.mul)
CONCAT_FUNCTIONS = (torch.cat, torch.concat)


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a `call_module` node calls, else None."""
    return gm.get_submodule(target_path(node)) if node.op == "call_module" else None


def is_conv(m: nn.Module | None) -> TypeGuard[nn.Conv2d]:
    return isinstance(m, nn.Conv2d)


# Convolutions that run their `weight` as it is stored, so a subset of channels runs on a slice of it. Weight-
# standardising convolutions (StdConv2d, ScaledStdConv2d: NF nets, BiT) normalise each filter over all its inputs
# first, and a slice of the stored weight would compute something else.
_PLAIN_CONV_FORWARDS = (nn.Conv2d.forward, Conv2dSame.forward)


def is_plain_conv(m: nn.Module | None) -> TypeGuard[nn.Conv2d]:
    """A convolution with zero padding that convolves with its stored weight (the runtime can slice its filters)."""
    return isinstance(m, nn.Conv2d) and type(m).forward in _PLAIN_CONV_FORWARDS and m.padding_mode == "zeros"


def is_full_conv(m: nn.Module | None) -> bool:
    """A plain convolution over all input channels."""
    return is_plain_conv(m) and m.groups == 1


def is_pointwise_conv(m: nn.Module | None) -> TypeGuard[nn.Conv2d]:
    """A 1x1 convolution: on a 1x1 map, a linear layer on a pooled vector (squeeze-excite, a head)."""
    return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)


def is_depthwise(m: nn.Module | None) -> TypeGuard[nn.Conv2d]:
    """A plain depthwise convolution: one filter per channel, so it can run on any subset of channels."""
    return is_plain_conv(m) and 1 < m.groups == m.in_channels == m.out_channels


def is_running_batchnorm(m: nn.Module | None) -> bool:
    """A BatchNorm that normalises with running statistics in evaluation, optionally with timm's fused act."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.running_mean is None:
        return False
    act = getattr(m, "act", None)
    return act is None or is_elementwise_module(act)


def is_elementwise_module(m: nn.Module) -> bool:
    if isinstance(m, ELEMENTWISE_MODULES):
        return True
    if isinstance(m, CHANNEL_POOL_MODULES):
        return not getattr(m, "return_indices", False)
    # timm's own activation layers (Swish, HardSwish, GELU, ...) are elementwise by construction.
    return type(m).__module__.startswith("timm.layers.activations") and next(m.parameters(), None) is None


def is_squeeze(node: fx.Node) -> bool:
    """A spatial mean with kept dims (`x.mean((2, 3), keepdim=True)`), the first step of squeeze-excite."""
    if node.op == "call_method" and node.target == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.kwargs.get("keepdim") or (len(node.args) > 2 and node.args[2])
        axes = {dims} if isinstance(dims, int) else set(dims or ())  # type: ignore[arg-type]  # a tuple of ints
        return axes in ({2, 3}, {-2, -1}) and bool(keepdim)  # x.mean(1, keepdim=True) is no squeeze
    return False


def is_mul(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in MUL_FUNCTIONS and len(node.args) == 2


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in ADD_METHODS


def role(gm: fx.GraphModule, node: fx.Node, axis: int = 1) -> Role | None:
    """The role of `node` for a channel group whose channel axis is `axis`, or None if it mixes channels.

    CHANNELWISE and SQUEEZE apply to NCHW groups (axis 1) only; channels-last groups (ConvNeXt's MLP) pass only
    through elementwise ops between their linears.
    """
    m = module_of(gm, node)
    if m is not None:
        if is_elementwise_module(m):
            return Role.ELEMENTWISE
        if axis == 1 and (is_running_batchnorm(m) or is_depthwise(m)):
            return Role.CHANNELWISE
        if is_full_conv(m) and axis == 1:
            return Role.LAYER
        if isinstance(m, nn.Linear) and axis == -1:
            return Role.LAYER
        return None
    if node.op == "call_function":
        if node.target in ELEMENTWISE_FUNCTIONS:
            return Role.ELEMENTWISE
        if is_mul(node):
            return Role.RESCALE
        return None
    if node.op == "call_method":
        if node.target in ELEMENTWISE_METHODS:
            return Role.ELEMENTWISE
        if axis == 1 and is_squeeze(node):
            return Role.SQUEEZE
    return None
