"""Each runtime op on compact tensors equals the masked full-width op, shared and per image, NCHW and channels-last."""
import pytest
import torch
from helpers import randomize
from timm.layers import BatchNormAct2d, Conv2dSame

from dynamize.runtime.decide import Kept
from dynamize.runtime.layers import CompactPool, ScaleBy, SlicedDepthwise, SlicedLayer, SlicedNorm

N = 3


def _kept(rows, channels, axis=1, n=N, channels_last=False):
    """A Kept with these kept channels (one row: shared by the batch; N rows: per image), multipliers 1."""
    idx = torch.tensor(rows)
    return Kept(axis, channels, idx, torch.ones(n, idx.shape[1]), channels_last)


def _compact(x, kept):
    """The kept channels of a full-width tensor, as the runtime's compact tensor."""
    idx = kept.idx.expand(x.shape[0], -1)
    return torch.stack([x[i].index_select(kept.axis if kept.axis < 0 else 0, idx[i]) for i in range(x.shape[0])])


def _masked(x, kept):
    """x with the channels each image dropped set to zero."""
    mask = torch.zeros(x.shape[0], kept.channels).scatter_(1, kept.idx.expand(x.shape[0], -1), 1.0)
    return x * kept.view(mask)


SHARED_IN, PER_IMAGE_IN = [[0, 2, 5]], [[0, 2, 5], [1, 3, 4], [5, 4, 0]]
SHARED_OUT, PER_IMAGE_OUT = [[1, 4, 6, 7]], [[1, 4, 6, 7], [0, 1, 2, 3], [7, 5, 3, 1]]
LAYERS = {
    "conv3x3/2": lambda: torch.nn.Conv2d(6, 8, 3, padding=1, stride=2),
    "conv1x1": lambda: torch.nn.Conv2d(6, 8, 1, bias=False),
    "conv_same": lambda: Conv2dSame(6, 8, 3, stride=2),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("inp, out", [(SHARED_IN, None), (None, SHARED_OUT), (SHARED_IN, SHARED_OUT),
                                      (PER_IMAGE_IN, None), (None, PER_IMAGE_OUT), (PER_IMAGE_IN, PER_IMAGE_OUT),
                                      (SHARED_IN, PER_IMAGE_OUT), (PER_IMAGE_IN, SHARED_OUT)],
                         ids=["in", "out", "both", "in/image", "out/image", "both/image", "in+out/image",
                              "in/image+out"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_sliced_conv_equals_masked_conv(kind, inp, out, channels_last):
    conv = LAYERS[kind]()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(N, 6, 9, 9).contiguous(memory_format=fmt)
    inp = _kept(inp, 6, channels_last=channels_last) if inp else None
    out = _kept(out, 8, channels_last=channels_last) if out else None
    expected = conv(_masked(x, inp) if inp else x)
    if out:
        expected = _compact(expected, out)
    got = SlicedLayer(conv)(_compact(x, inp).contiguous(memory_format=fmt) if inp else x, inp, out)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("inp, out", [(SHARED_IN, None), (None, SHARED_OUT), (PER_IMAGE_IN, None),
                                      (None, PER_IMAGE_OUT), (PER_IMAGE_IN, PER_IMAGE_OUT)])
def test_sliced_linear_on_channels_last(inp, out):
    fc = torch.nn.Linear(6, 8)
    x = torch.randn(N, 4, 4, 6)
    inp = _kept(inp, 6, axis=-1) if inp else None
    out = _kept(out, 8, axis=-1) if out else None
    expected = fc(_masked(x, inp) if inp else x)
    if out:
        expected = _compact(expected, out)
    got = SlicedLayer(fc)(_compact(x, inp) if inp else x, inp, out)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_sliced_conv_folds_the_batchnorm_after_it():
    conv, bn = torch.nn.Conv2d(6, 8, 3, padding=1), randomize(torch.nn.BatchNorm2d(8)).eval()
    x = torch.randn(N, 6, 5, 5)
    out = _kept(PER_IMAGE_OUT, 8)
    torch.testing.assert_close(SlicedLayer(conv, bn)(x, None, out), _compact(bn(conv(x)), out), atol=1e-5, rtol=0)


def test_sliced_layer_on_a_tiny_map_runs_dense_on_scattered_inputs():
    conv = torch.nn.Conv2d(6, 8, 1)  # a squeeze-excite reduction: 1x1 map, where gathering costs more than it saves
    x = torch.randn(N, 6, 1, 1)
    inp = _kept(PER_IMAGE_IN, 6)
    torch.testing.assert_close(SlicedLayer(conv)(_compact(x, inp), inp, None), conv(_masked(x, inp)),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [SHARED_OUT, PER_IMAGE_OUT], ids=["shared", "per_image"])
def test_sliced_depthwise_and_norms_equal_dense_on_kept_channels(rows):
    dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    bn = randomize(torch.nn.BatchNorm2d(8)).eval()
    bn_act = randomize(BatchNormAct2d(8, act_layer=torch.nn.SiLU)).eval()
    x = torch.randn(N, 8, 5, 5)
    kept = _kept(rows, 8)
    compact = _compact(x, kept)
    torch.testing.assert_close(SlicedDepthwise(dw)(compact, kept), _compact(dw(x), kept), atol=1e-5, rtol=0)
    torch.testing.assert_close(SlicedDepthwise(dw, bn)(compact, kept), _compact(bn(dw(x)), kept), atol=1e-5, rtol=0)
    torch.testing.assert_close(SlicedNorm(bn_act)(compact, kept), _compact(bn_act(x), kept), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [SHARED_OUT, PER_IMAGE_OUT], ids=["shared", "per_image"])
def test_squeeze_excite_scale_and_gate_pool_read_kept_channels(rows):
    x, other = torch.randn(N, 8, 5, 5), torch.randn(N, 8, 1, 1)
    kept = _kept(rows, 8)
    torch.testing.assert_close(ScaleBy()(_compact(x, kept), other, kept), _compact(x * other, kept))
    torch.testing.assert_close(CompactPool(1)(_compact(x, kept), kept), _masked(x, kept).mean((2, 3)))
