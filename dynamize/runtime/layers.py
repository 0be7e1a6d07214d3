"""The runtime's version of each op of a channel group, by its role in the op table (`dynamize.graph.ops`).

Each module takes the group's compact tensors and `Kept` decisions (see `decide.py`) and computes, on the kept
channels only, what the masked graph computes: layers (`Role.LAYER`) gather the rows of their kept filters or input
channels from weights prepared once (`packing.py`), per-channel layers (`Role.CHANNELWISE`) their kept parameters,
and the squeeze-excite rescale (`Role.RESCALE`) its kept factors. Elementwise ops and the squeeze need no change.
Width-mode groups keep a prefix of their channels: every op slices instead of gathering (`PrefixCache`).
"""
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

from ..graph.cost import gather_macs
from .decide import Kept, is_channels_last
from .packing import Weights, folded, norm_affine


def _conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          groups: int) -> torch.Tensor:
    """`conv`'s convolution with other weights (sliced, folded, one group per image).

    Callers pass weights in the input's memory format where they have them: with a channels-last input, an NCHW
    weight costs 1.3x (7x7 maps) to 4x (2x2 maps) at batch 1, and oneDNN's own entry point
    (`torch.mkldnn_convolution`) reorders such a weight on every call (up to 10x).
    """
    padding: str | tuple[int, ...] = conv.padding
    if isinstance(conv, Conv2dSame):
        x, padding = pad_same(x, list(weight.shape[-2:]), list(conv.stride), list(conv.dilation)), (0, 0)
    return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, groups)


def _conv_gathered(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """`conv` with gathered NCHW weights and a channels-last input: in the format that copies less. The input and
    the output are converted on small maps with large weights (late stages), the weight otherwise."""
    if not _channels_last_input(x) or _channels_last_input(weight):
        return _conv(conv, x, weight, bias, groups=1)
    if is_channels_last(x) and weight.numel() > 2 * x.numel():
        return _conv(conv, x.contiguous(), weight, bias, groups=1).contiguous(memory_format=torch.channels_last)
    return _conv(conv, x, weight.contiguous(memory_format=torch.channels_last), bias, groups=1)


def _channels_last_input(x: torch.Tensor) -> bool:
    """A 4-D tensor whose memory is channels-last, 1x1 maps included (they are also plain contiguous). Its
    convolutions run fastest with channels-last weights: an NCHW weight takes a 2-7x slower kernel even on a 1x1
    map (measured: 512 channels at 1x1, 3x3 kernel: 3.3 ms against 0.46 ms)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] for idx [G, K]: [G, K, ...] (one index_select when the batch shares the channels)."""
    return t.index_select(0, idx[0]).unsqueeze(0) if idx.shape[0] == 1 else t[idx]


def _is_pointwise(layer: nn.Module) -> bool:
    """A layer that is one matrix product per pixel: a Linear, or a 1x1 convolution without stride or padding."""
    if isinstance(layer, nn.Linear):
        return True
    return bool(layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.groups == 1
                and (isinstance(layer, Conv2dSame) or layer.padding == (0, 0)))


class SlicedLayer(nn.Module):
    """A convolution or linear layer restricted to kept output channels (`out`) and/or kept inputs (`inp`).

    Args:
        layer: the model's layer.
        norm: the evaluation-mode BatchNorm right after it, folded into its weights (its node then runs only the
            norm's fused activation, if any).
        gathers_inputs: its inputs are a group's kept channels. A convolution then keeps an [in, out, kh, kw] copy
            of its weights, whose rows are the kept inputs' columns: gathering them from the [out, in, kh, kw]
            weight copies one kh x kw chunk at a time (3x3 convolutions at batch 1, gather and convolution
            together: 1.15-4x slower, measured on ResNet-18's shapes).
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, norm: nn.modules.batchnorm._BatchNorm | None = None,
                 gathers_inputs: bool = False):
        super().__init__()
        self.layer = layer
        self.pointwise = _is_pointwise(layer)
        self.packed = folded(layer, norm, transposed=self.pointwise or gathers_inputs)
        self.prefixes = PrefixCache()

    def forward(self, x: torch.Tensor, inp: Kept | None, out: Kept | None) -> torch.Tensor:
        packed = self.packed.get()
        if _is_prefix(inp) and _is_prefix(out):
            return self._prefix(x, packed, inp.width if inp else None, out.width if out else None)
        weight, bias = packed.weight, packed.bias
        in_idx = inp.idx if inp is not None else None
        out_idx = out.idx if out is not None else None
        if inp is not None and in_idx is not None and out_idx is None and \
                self._scatter_is_cheaper(x, inp, in_idx, packed.transposed is not None):
            x, in_idx = _scatter(x, inp), None
        layer = self.layer
        if in_idx is None and out_idx is None:
            if isinstance(layer, nn.Linear):
                return F.linear(x, weight, bias)
            use_cl = packed.channels_last is not None and _channels_last_input(x)
            return _conv(layer, x, packed.channels_last if use_cl and packed.channels_last is not None else weight,
                         bias, groups=1)
        if out_idx is not None and bias is not None:
            bias = _rows(bias, out_idx)  # [G, Ko]
        per_image = any(k is not None and k.per_image for k in (inp, out))
        # Outputs keep the input's memory format; per-image compact inputs come in the model's.
        model_cl = any(k is not None and k.channels_last for k in (inp, out))
        channels_last = model_cl if per_image else _channels_last_input(x)
        if self.pointwise or isinstance(layer, nn.Linear):
            return self._pointwise(x, _pointwise_weight(weight, packed.transposed, in_idx, out_idx), bias,
                                   channels_last)
        if in_idx is None and out_idx is not None and packed.channels_last is not None and channels_last:
            # Kept filters of the channels-last copy: rows of its [out, kh, kw, in] storage, still channels-last.
            weight = _rows(packed.channels_last.permute(0, 2, 3, 1), out_idx).permute(0, 1, 4, 2, 3)
        elif out_idx is None and in_idx is not None and packed.transposed is not None:
            # Kept inputs alone: rows of the [in, out, kh, kw] copy, then [G, out, K, kh, kw] contiguous as the
            # gather below makes it (a channels-last weight straight from the rows copies one float at a time).
            weight = _rows(packed.transposed, in_idx).transpose(1, 2).contiguous()
        else:
            weight = _gather(weight, in_idx, out_idx)
        if not per_image:
            return _conv_gathered(layer, x, weight[0], bias if bias is None else bias.reshape(-1))
        n = x.shape[0]
        bias = bias if bias is None else bias.expand(n, -1)  # [O] or [G, Ko]
        if channels_last:  # image by image: batch-1 channels-last convolutions run as fast as batched ones
            return torch.cat([_conv(layer, x[i:i + 1], weight[i if weight.shape[0] > 1 else 0],
                                    bias if bias is None else bias[i], groups=1) for i in range(n)])
        # One convolution group per image: the images side by side along the channels of a single NCHW image.
        y = _conv(layer, x.contiguous().reshape(1, -1, *x.shape[2:]), weight.reshape(-1, *weight.shape[2:]),
                  bias if bias is None else bias.reshape(-1), groups=n)
        return y.reshape(n, -1, *y.shape[2:])

    def _prefix(self, x: torch.Tensor, packed: Weights, inputs: int | None, outputs: int | None) -> torch.Tensor:
        """The layer on its first `inputs` input and `outputs` output channels (None: all), from cached slices."""
        channels_last = _channels_last_input(x)
        weight, bias = self.prefixes.get(packed, inputs, outputs, channels_last and not self.pointwise)
        if self.pointwise or isinstance(self.layer, nn.Linear):
            return self._pointwise(x, weight.reshape(1, weight.shape[0], -1), bias, channels_last)
        return _conv(self.layer, x, weight, bias, groups=1)

    def _scatter_is_cheaper(self, x: torch.Tensor, inp: Kept, in_idx: torch.Tensor, rows: bool) -> bool:
        """For a layer gated on its inputs only: is running it on all inputs (zeros for the dropped ones) cheaper
        than gathering the kept input columns of its weights (as rows of its transposed copy if `rows`)? True on
        tiny maps (squeeze-excite, late stages)."""
        k = in_idx.shape[1]
        pixels = x.shape[2] * x.shape[3] if inp.axis == 1 else x.shape[1] * x.shape[2]
        kernel = 1 if self.pointwise else self.layer.weight[0, 0].numel()
        gather = gather_macs(k, kernel, both=kernel > 1 and not rows)
        return x.shape[0] * pixels * (inp.channels - k) < in_idx.shape[0] * gather

    def _pointwise(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                   channels_last: bool) -> torch.Tensor:
        """A 1x1 convolution or linear as a matrix product, [G, Ko, Ki] weights (G = 1 or one per image).

        Computed as [N, pixels, Ki] x [Ki, Ko] for channels-last outputs (and linears), else as [Ko, Ki] x [N, Ki,
        pixels] for NCHW outputs; inputs stored the other way are read through a transposed view.
        """
        n = x.shape[0]
        if isinstance(self.layer, nn.Linear):
            return _matmul_rows(x.reshape(n, -1, x.shape[-1]), w, bias).reshape(*x.shape[:-1], -1)
        h, wd = x.shape[2:]
        if channels_last:
            y = _matmul_rows(x.permute(0, 2, 3, 1).reshape(n, h * wd, -1), w, bias)
            return y.reshape(n, h, wd, -1).permute(0, 3, 1, 2)
        xs = x.reshape(n, x.shape[1], -1) if x.is_contiguous() else x.permute(0, 2, 3, 1).reshape(n, h * wd, -1).mT
        if bias is None:
            y = torch.matmul(w, xs)
        else:  # the bias added by the product itself: one pass over the output less
            y = torch.baddbmm(bias.reshape(-1, bias.shape[-1], 1), w.expand(n, -1, -1), xs)
        return y.reshape(n, -1, h, wd)


def _is_prefix(kept: Kept | None) -> bool:
    """No decisions (every channel), or a prefix of the channels (width mode)."""
    return kept is None or kept.width is not None


class PrefixCache:
    """A layer's weights sliced to the first channels, per (inputs, outputs) width: a slice that is not already a
    contiguous view (kept inputs of a convolution) is copied once and reused while the prepared weights stay the same.
    At most `SIZE` slices are kept (a width-mode group has a few widths, so a layer meets a few pairs)."""

    SIZE = 16

    def __init__(self) -> None:
        self._source: Weights | None = None
        self._slices: dict[tuple[int | None, int | None, bool], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def get(self, packed: Weights, inputs: int | None, outputs: int | None,
            channels_last: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the first `inputs` input and `outputs` output channels, in the memory format asked."""
        if packed is not self._source:  # the weights were prepared again: every slice is stale
            self._source, self._slices = packed, {}
        key = (inputs, outputs, channels_last)
        if key not in self._slices:
            if len(self._slices) >= self.SIZE:
                self._slices.pop(next(iter(self._slices)))
            weight = packed.weight[:outputs, :inputs]
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            bias = packed.bias if packed.bias is None else packed.bias[:outputs]
            self._slices[key] = weight.contiguous(memory_format=fmt), bias
        return self._slices[key]


def _matmul_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[N, P, Ki] x [G, Ko, Ki]^T + bias ([Ko], or [G, Ko]): [N, P, Ko]; one matrix product when G = 1."""
    n, p, ki = x.shape
    if w.shape[0] == 1 and (bias is None or bias.dim() == 1 or bias.shape[0] == 1) and x.is_contiguous():
        x2, wt = x.reshape(n * p, ki), w[0].t()
        y = x2 @ wt if bias is None else torch.addmm(bias.reshape(1, -1), x2, wt)
        return y.reshape(n, p, -1)
    wt = w.transpose(1, 2).expand(n, -1, -1)
    return torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.reshape(-1, 1, bias.shape[-1]), x, wt)


def _pointwise_weight(weight: torch.Tensor, weight_t: torch.Tensor | None, in_idx: torch.Tensor | None,
                      out_idx: torch.Tensor | None) -> torch.Tensor:
    """[G, Ko, Ki] weights of a pointwise layer; kept inputs alone are gathered as rows of the transposed copy."""
    w = weight.reshape(weight.shape[0], -1)
    if in_idx is None:
        return w[None] if out_idx is None else _rows(w, out_idx)
    if out_idx is None:
        if weight_t is None:
            raise ValueError("gathering kept inputs needs the transposed weights: folded(..., transposed=True)")
        return _rows(weight_t.reshape(weight_t.shape[0], -1), in_idx).transpose(1, 2)
    w = _rows(w, out_idx)  # then the kept inputs, one float at a time: the rare 1x1 layer gated on both sides
    if in_idx.shape[0] == 1:
        return w.index_select(2, in_idx[0])
    return w.expand(in_idx.shape[0], -1, -1).gather(2, in_idx[:, None, :].expand(-1, w.shape[1], -1))


def _gather(weight: torch.Tensor, in_idx: torch.Tensor | None, out_idx: torch.Tensor | None) -> torch.Tensor:
    """Kept filters and kept input channels of a weight [out, in, ...]: [G, Ko, Ki, ...], G = 1 or N.

    Both kept sets at once are one gather of [kh * kw] chunks through a flat index.
    """
    o, i = weight.shape[:2]
    if in_idx is None:
        return weight[None] if out_idx is None else _rows(weight, out_idx)
    rows = out_idx if out_idx is not None else torch.arange(o, device=weight.device)[None]
    flat = rows[:, :, None] * i + in_idx[:, None, :]
    chunks = weight.reshape(o * i, -1)
    picked = chunks.index_select(0, flat.reshape(-1)) if flat.shape[0] == 1 else chunks[flat.reshape(flat.shape[0], -1)]
    return picked.reshape(flat.shape[0], flat.shape[1], flat.shape[2], *weight.shape[2:])


def _scatter(x: torch.Tensor, kept: Kept) -> torch.Tensor:
    """A compact tensor back at full width, zero on the channels that were not computed."""
    if kept.idx is None:
        return x
    shape = list(x.shape)
    shape[kept.axis] = kept.channels
    full = x.new_zeros(shape)
    if kept.axis == 1 and kept.channels_last:
        full = full.contiguous(memory_format=torch.channels_last)
    if kept.width is not None:
        full.narrow(kept.axis, 0, kept.width).copy_(x)
        return full
    if not kept.per_image:
        return full.index_copy_(kept.axis, kept.idx[0], x)
    return full.scatter_(kept.axis, kept.view(kept.idx).expand_as(x), x)


class FoldedConv(nn.Module):
    """A plain convolution with the evaluation-mode BatchNorm after it folded into its weights (all channels)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.conv = conv
        self.packed = folded(conv, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed.get()
        weight = packed.channels_last if packed.channels_last is not None and _channels_last_input(x) else packed.weight
        return _conv(self.conv, x, weight, packed.bias, groups=self.conv.groups)


class SlicedDepthwise(nn.Module):
    """A depthwise convolution (with the BatchNorm after it folded in, if any) on the kept channels only."""

    def __init__(self, conv: nn.Conv2d, norm: nn.modules.batchnorm._BatchNorm | None = None):
        super().__init__()
        self.conv = conv
        self.packed = folded(conv, norm)

    def forward(self, x: torch.Tensor, kept: Kept) -> torch.Tensor:
        weight, bias = self.packed.get()[:2]
        if kept.idx is None:
            return _conv(self.conv, x, weight, bias, groups=weight.shape[0])
        if kept.width is not None:
            return _conv(self.conv, x, weight[:kept.width], bias if bias is None else bias[:kept.width],
                         groups=kept.width)
        if not kept.per_image:
            return _conv(self.conv, x, weight.index_select(0, kept.idx[0]),
                         bias if bias is None else bias.index_select(0, kept.idx[0]), groups=kept.idx.shape[1])
        n, k = kept.idx.shape
        if is_channels_last(x):
            return torch.cat([_conv(self.conv, x[i:i + 1], weight.index_select(0, kept.idx[i]),
                                    bias if bias is None else bias.index_select(0, kept.idx[i]), groups=k)
                              for i in range(n)])
        idx = kept.idx.reshape(-1)  # one NCHW image of N * K channels
        y = _conv(self.conv, x.contiguous().reshape(1, n * k, *x.shape[2:]), weight.index_select(0, idx),
                  bias if bias is None else bias.index_select(0, idx), groups=n * k)
        return y.reshape(n, k, *y.shape[2:])


class SlicedNorm(nn.Module):
    """An evaluation-mode BatchNorm (with timm's fused drop + activation, if any) that no convolution absorbed, on
    the kept channels only."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.bn = bn
        self.packed = norm_affine(bn)

    def forward(self, x: torch.Tensor, kept: Kept) -> torch.Tensor:
        scale, shift = self.packed.get()
        if kept.width is not None:
            scale, shift = scale[None, :kept.width], shift[None, :kept.width]
        elif kept.idx is not None:
            scale, shift = _rows(scale, kept.idx), _rows(shift, kept.idx)
        else:
            scale, shift = scale[None], shift[None]
        scale, shift = kept.view(scale), kept.view(shift)
        x = torch.addcmul(shift, x, scale)
        if hasattr(self.bn, "act"):  # timm's BatchNormAct2d
            x = self.bn.get_submodule("act")(self.bn.get_submodule("drop")(x))
        return x


class Scale(nn.Module):
    """The C-Net's multiplication, on the kept channels: keep * scale per image."""

    def forward(self, x: torch.Tensor, kept: Kept) -> torch.Tensor:
        return x * kept.view(kept.mult)


class ScaleBy(nn.Module):
    """`x * other` where x is compact and `other` full-width (squeeze-excite): other's kept channels are picked."""

    def forward(self, x: torch.Tensor, other: torch.Tensor, kept: Kept) -> torch.Tensor:
        if kept.idx is None or other.shape[kept.axis] == 1:
            return x * other
        if kept.width is not None:
            return x * other.narrow(kept.axis, 0, kept.width)
        if not kept.per_image:
            return x * other.index_select(kept.axis, kept.idx[0])
        other = other.expand(x.shape[0], *other.shape[1:])
        shape = list(other.shape)
        shape[kept.axis] = kept.idx.shape[1]
        return x * other.gather(kept.axis, kept.view(kept.idx).expand(shape))


class Widen(nn.Module):
    """A group's compact tensor where it leaves the group into a residual add: full width, zero on the channels that
    were not computed (the shortcut passes them on)."""

    def forward(self, x: torch.Tensor, kept: Kept) -> torch.Tensor:
        return _scatter(x, kept)


class CompactPool(nn.Module):
    """A gate's pooled input read from a group's compact tensor: the pooled kept channels at full width, zero for
    the dropped ones (as the masked graph computes them)."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor, kept: Kept) -> torch.Tensor:
        pooled = x.mean((2, 3)) if self.axis == 1 else x.mean((1, 2))
        if kept.idx is None:
            return pooled
        if kept.width is not None:
            return F.pad(pooled, (0, kept.channels - kept.width))
        full = pooled.new_zeros(pooled.shape[0], kept.channels)
        if not kept.per_image:
            return full.index_copy_(1, kept.idx[0], pooled)
        return full.scatter_(1, kept.idx, pooled)
