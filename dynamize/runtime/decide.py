"""A channel group's decisions for a batch, and how the batch runs them (a cost model picks one of three layouts).

- full: every channel, multiplied by keep * scale (what the masked graph computes). No gathers; the right choice
  when the images of a batch together keep nearly every channel, or when gathering the weights would cost more than
  the skipped channels save (small maps, late stages).
- union: the channels kept by any image, shared by the whole batch; a per-image multiplier zeroes the channels an
  image dropped. Weights are gathered once.
- per image: each image on its own K channels (K: the most any image keeps; an image that keeps fewer pads with
  channels it dropped, multiplied by zero). Weights are gathered per image and the batch runs in one batched call
  (a batched matmul, or a convolution with one group per image), not in a Python loop over images.

A width-mode group (`WidthGate`) keeps prefixes: its batch runs the first channels up to its widest image's width,
and its layers slice their weights instead of gathering them.

The values that flow between the layers of a group are its *compact* tensors: [N, K, H, W] (or [N, H, W, K] for
channels-last groups), where channel j of image i is the group's channel `idx[i, j]` (`idx[0, j]` if shared).
"""
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..graph.gates import Gate, WidthGate

# Per image, a layer runs batch-1 convolutions (or a batched matmul of batch-1 products): slower per MAC than one
# convolution over the whole batch, the more so the smaller the map. Measured (1 and 2 threads, 3x3 and 1x1 layers of
# ResNet-50): ~1.05x at 56x56, ~1.2x at 28x28, ~1.4x at 14x14, ~1.85x at 7x7, i.e. about 1 + 6 / side.
PER_IMAGE_SIDE = 6.0


# Kept channel counts are rounded up to a multiple of this (padding with dropped channels at multiplier zero): the
# layers then see a few shapes over and over, so oneDNN reuses its compiled kernels instead of building new ones for
# every new channel count (~0.4 ms per convolution call), and channel blocks stay whole.
CHANNEL_BUCKET = 16


def _bucket(k: int, channels: int) -> int:
    """`k` kept channels rounded up to the bucket (at least one, at most every channel)."""
    return min(max(-(-k // CHANNEL_BUCKET) * CHANNEL_BUCKET, CHANNEL_BUCKET), channels)


@dataclass
class Kept:
    """One channel group's decisions for a batch, in the form its sliced layers consume.

    Attributes:
        axis: channel axis of the group's tensors (1 for NCHW, -1 for channels-last linears).
        channels: number of channels of the group.
        idx: [1, K] kept channels shared by the batch, [N, K] per image, or None for every channel.
        mult: [N, K] (or [N, channels]) keep * scale of the channels computed; zero where an image dropped one.
        channels_last: the model runs channels-last tensors; per-image layers hand full-width outputs back in it.
        width: set when the kept channels are the first `width` ones (width mode; `idx` is then `arange(width)`,
            for the layers that have no faster way): layers run on prefix slices of their weights, no gathers.
    """
    axis: int
    channels: int
    idx: torch.Tensor | None
    mult: torch.Tensor
    channels_last: bool = False
    width: int | None = None

    @property
    def per_image(self) -> bool:
        return self.idx is not None and self.idx.shape[0] > 1

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """`t` ([N, K]) shaped to broadcast over a compact tensor."""
        return t.reshape(t.shape[0], -1, 1, 1) if self.axis == 1 else t.reshape(t.shape[0], 1, 1, -1)


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-D tensor stored channels-last (and not also plain contiguous, as 1x1 maps are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def decisions(gate: Gate, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `gate(pooled)` returns in evaluation (decisions, scales), in about half its time: the MLP as fused
    functional calls whose tensors are read from the modules' own dictionaries (a gate on a small map costs as much
    as the layers it saves, and nn.Module's attribute lookup and assignment cost as much as its operators)."""
    if not gate.is_active:
        return gate(pooled)
    layers = gate.mlp._modules
    norm = cast(nn.LayerNorm, layers["1"])
    (w1, b1), (wn, bn), (w2, b2) = _weight_bias(layers["0"]), _weight_bias(norm), _weight_bias(layers["3"])
    h = torch.addmm(b1, pooled, w1.t())
    h = torch.layer_norm(h, norm.normalized_shape, wn, bn, norm.eps).relu_()
    out = torch.addmm(b2, h, w2.t())
    k = gate.keep_logits
    logit, scale = out[:, :k], out[:, k:].add_(1.0)
    keep = gate.forced.to(logit.dtype).expand(out.shape[0], gate.units) if gate.forced is not None else \
        gate.hard(logit)
    vars(gate).update(last_keep=keep, last_prob=None)  # plain attributes: no nn.Module.__setattr__
    return keep, scale


def _weight_bias(layer: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A gate layer's weight and bias, from its own parameter dictionary (no attribute lookup)."""
    params = cast(nn.Module, layer)._parameters
    return cast(torch.Tensor, params["weight"]), cast(torch.Tensor, params["bias"])


class Decide(nn.Module):
    """Runs a group's C-Net before its producer and turns the decisions into a `Kept`.

    Args:
        gate: the group's Gate (shared with the model: `forced`, `threshold` and `last_keep` work as usual).
        axis: channel axis of the group.
        macs: multiply-accumulates per channel and image of the group's layers (producer, norms, depthwise
            convolutions, sinks) when the producer's input has `area` pixels.
        area: pixels of the producer's input at which `macs` was counted.
        gather: cost of gathering the weights of one kept channel (producer filter, depthwise filter, sink input
            columns), in MACs (see `dynamize.graph.cost.channel_gather_macs`).
        mode: "auto" (cost model), "union" (never per image) or "split" (per image whenever the batch has several).
    """

    def __init__(self, gate: Gate, axis: int, macs: float, area: float, gather: float, mode: str):
        super().__init__()
        self.gate = gate
        self.axis, self.macs, self.area, self.gather, self.mode = axis, macs, area, gather, mode

    def forward(self, pooled: torch.Tensor, x: torch.Tensor, upstream: Kept | None = None) -> Kept:
        keep, scale = decisions(self.gate, pooled)
        mult = keep * scale
        n, c = keep.shape
        channels_last = upstream.channels_last if upstream is not None else is_channels_last(x)
        if isinstance(self.gate, WidthGate):  # prefixes: the batch's union is its widest image's prefix
            width = max(int(keep.sum(1).max()), 1)  # an image that keeps nothing runs one channel at zero
            if width == c:
                return Kept(self.axis, c, None, mult, channels_last)
            return Kept(self.axis, c, torch.arange(width, device=keep.device)[None], mult[:, :width], channels_last,
                        width)
        union = keep.amax(0) if n > 1 else keep[0]
        kept_union = _bucket(int(union.sum()), c)
        per_image_k = _bucket(int(keep.sum(1).max()), c) if n > 1 else kept_union
        layout = self._layout(x, n, c, kept_union, per_image_k)
        if layout == "full":
            return Kept(self.axis, c, None, mult, channels_last)
        # Kept channels first, in channel order (a stable sort), then dropped ones as padding with multiplier zero.
        if layout == "union":
            idx = union.sort(descending=True, stable=True).indices[:kept_union]
            return Kept(self.axis, c, idx[None], mult.index_select(1, idx), channels_last)
        idx = keep.sort(dim=1, descending=True, stable=True).indices[:, :per_image_k]
        return Kept(self.axis, c, idx, mult.gather(1, idx), channels_last)

    def _layout(self, x: torch.Tensor, n: int, c: int, kept_union: int, per_image_k: int) -> str:
        """"full", "union" or "per_image": the forced layout, or the cheapest for this batch's decisions."""
        if per_image_k == c:  # an image keeps (nearly) every channel: no layout saves anything
            return "full"
        if self.mode == "split" and n > 1:
            return "per_image"
        if self.mode != "auto":
            return "union" if kept_union < c else "full"
        area = x.shape[2] * x.shape[3] if self.axis == 1 else x.shape[1] * x.shape[2]
        macs = self.macs * area / self.area
        cost = {"full": n * c * macs, "union": n * kept_union * macs + kept_union * self.gather}
        if n > 1:
            slowdown = 1.0 + PER_IMAGE_SIDE / area ** 0.5
            cost["per_image"] = n * per_image_k * (macs * slowdown + self.gather)
        return min(cost, key=lambda layout: cost[layout])
