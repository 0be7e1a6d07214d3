"""Tracing: in-place calls survive dead-code elimination, timm's NormFreeBlock is traced through, shapes are kept."""
import timm
import torch
from timm.models.nfnet import NormFreeBlock
from torch import nn

from dynamize.graph.trace import node_shape, symbolic_trace, trace


class InPlace(nn.Module):
    """Scales its conv's output in place and ignores the result of the call, like NormFreeBlock's skipinit gain."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        out = self.conv(x)
        out.mul_(self.gain)
        return out + x


def test_in_place_calls_are_kept():
    module = InPlace().eval()
    gm = symbolic_trace(module)
    assert any(n.target == "mul_" for n in gm.graph.nodes)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(gm(x), module(x))


def test_norm_free_block_is_traced_through_and_exact():
    block = NormFreeBlock(16, 16, skipinit=True, act_layer=nn.ReLU).eval()
    with torch.no_grad():
        block.skipinit_gain.fill_(0.7)
        block.conv3.gain.normal_()
    gm = symbolic_trace(block)
    assert sum(isinstance(gm.get_submodule(n.target), nn.Conv2d) for n in gm.graph.nodes if n.op == "call_module") == 3
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(gm(x), block(x))


def test_shapes_are_propagated():
    gm = trace(timm.create_model("test_resnet").eval(), (3, 32, 32))
    assert node_shape(next(iter(gm.graph.nodes))) == (1, 3, 32, 32)
    assert node_shape(next(n for n in gm.graph.nodes if n.op == "output").args[0]) == (1, 1000)
