"""Weights prepared once for the sliced layers, and rebuilt only when the weights they come from change.

A sliced layer gathers the rows of its kept channels from a prepared copy of its weights: BatchNorm folded into the
convolution that feeds it (exact in evaluation: the norm is an affine map per channel), and a transposed copy where
input channels are gathered, so that every gather copies whole contiguous rows. Preparing costs one pass over the
weights; the v1 runtime paid for it (and for four BatchNorm parameter gathers) on every call.

A prepared entry remembers the storage and version counter of every tensor it was built from. Moving the model
(`.to()`), loading weights (`load_state_dict` copies in place) or an optimizer step changes one of them, and the
next call rebuilds the entry, so the runtime always computes with the model's current weights.
"""
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn


def _key(tensors: Sequence[torch.Tensor | None]) -> list:
    return [(t.data_ptr(), t._version) if t is not None else None for t in tensors]


def _own(module: nn.Module, *names: str) -> tuple[torch.Tensor | None, ...]:
    """The module's parameters or buffers `names`, read from its own dictionaries: a prepared value is checked on
    every call, and nn.Module's attribute lookup would cost more than the check."""
    params, buffers = module._parameters, module._buffers
    return tuple(params[n] if n in params else buffers.get(n) for n in names)


class Packed:
    """A value computed from some tensors, cached until one of them changes.

    Args:
        sources: returns the tensors the value is built from (looked up on every call: a module's parameters can be
            replaced by new tensors).
        build: computes the value from them.
    """

    def __init__(self, sources: Callable[[], Sequence[torch.Tensor | None]], build: Callable[..., object]):
        self.sources, self.build = sources, build
        self._key: list | None = None
        self._value: object = None

    def get(self):
        tensors = self.sources()
        key = _key(tensors)
        if key != self._key:
            with torch.no_grad():
                self._value = self.build(*tensors)
            self._key = key
        return self._value


def norm_affine(bn: nn.modules.batchnorm._BatchNorm) -> Packed:
    """(scale, shift) per channel of an evaluation-mode BatchNorm: `bn(x) == x * scale + shift` before its act."""
    def build(mean, var, weight, bias):
        scale = torch.rsqrt(var + bn.eps)
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale
        return scale, shift if bias is None else shift + bias
    return Packed(lambda: _own(bn, "running_mean", "running_var", "weight", "bias"), build)


class Weights(NamedTuple):
    """A layer's prepared weights.

    Attributes:
        weight: [out, in, ...] with the norm folded in, contiguous (NCHW for convolutions): gathers read it.
        bias: [out], or None when neither the layer nor the norm has one.
        transposed: [in, out, ...] contiguous copy, if asked for: gathers of kept inputs copy its rows.
        channels_last: `weight` stored channels-last, if the layer's own weight is (a model converted with
            `.to(memory_format=torch.channels_last)`): full-width convolutions then run without converting it.
    """
    weight: torch.Tensor
    bias: torch.Tensor | None
    transposed: torch.Tensor | None
    channels_last: torch.Tensor | None


def folded(layer: nn.Conv2d | nn.Linear, bn: nn.modules.batchnorm._BatchNorm | None = None,
           transposed: bool = False) -> Packed:
    """`Weights` of `layer` with `bn` (if any) folded in, plus the copies a sliced layer reads."""
    def build(weight, bias, *norm):
        channels_last = weight.dim() == 4 and weight[0, 0].numel() > 1 and not weight.is_contiguous() \
            and weight.is_contiguous(memory_format=torch.channels_last)
        if bn is not None:
            scale, shift = norm_affine(bn).build(*norm)
            weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
            bias = shift if bias is None else bias * scale + shift
        weight = weight.contiguous()
        return Weights(weight, bias, weight.transpose(0, 1).contiguous() if transposed else None,
                       weight.contiguous(memory_format=torch.channels_last) if channels_last else None)
    if bn is None:
        return Packed(lambda: _own(layer, "weight", "bias"), build)
    return Packed(lambda: _own(layer, "weight", "bias") + _own(bn, "running_mean", "running_var", "weight", "bias"),
                  build)
