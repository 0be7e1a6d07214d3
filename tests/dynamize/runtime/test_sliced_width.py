"""The hard inference path of width-mode C-Nets: equal to the masked graph, on prefix slices, with no gathers."""
import pytest
import timm
import torch
from helpers import randomize, randomize_gates
from test_sliced import assert_runtime_equals_masked_graph, assert_runtime_follows_weight_changes
from torch.utils._python_dispatch import TorchDispatchMode

import dynamize
from dynamize.graph.gates import WidthGate
from dynamize.runtime.bench import force_random, release
from dynamize.runtime.sliced import use_runtime

# Residual blocks + conv groups; depthwise + squeeze-excite groups (kept channels at min_keep); channels-last Linears.
MODELS = [("resnet18", 32), ("mobilenetv3_small_100", 32), ("test_convnext", 32)]


@pytest.fixture(scope="module", params=MODELS, ids=[m for m, _ in MODELS])
def model(request):
    name, size = request.param
    net = dynamize.convert(randomize(timm.create_model(name, num_classes=7)), img_size=size, channel_mode="width")
    assert any(g.widths for g in net.plan.groups)
    return net.eval(), size


def _mixed_widths(batch):
    def check(net):
        widths = [gate.last_keep.sum(1) for _, _, gate in net.gates() if isinstance(gate, WidthGate)]
        assert batch == 1 or any(len(w.unique()) > 1 for w in widths)
    return check


@pytest.mark.parametrize("batch, channels_last", [(1, False), (5, False), (5, True)])
def test_width_runtime_equals_masked_graph(model, batch, channels_last):
    # Each image at one of the two widths around the share kept: a batch mixes widths.
    assert_runtime_equals_masked_graph(*model, "auto", batch, channels_last, check=_mixed_widths(batch))


def test_width_runtime_follows_weight_changes(model):
    assert_runtime_follows_weight_changes(*model)  # the cached weight slices too


def test_width_runtime_equals_masked_graph_with_learned_decisions(model):
    net, size = model
    randomize_gates(net)
    x = torch.randn(5, 3, size, size)
    with torch.no_grad():
        expected, got = use_runtime(net, None)(x), use_runtime(net)(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_width_runtime_takes_no_gathers():
    """C-Nets only (an L-Net picks the images that keep its block), width mode: slices, never an index."""
    net = dynamize.convert(randomize(timm.create_model("resnet18", num_classes=7)), img_size=32, gates="channel",
                           channel_mode="width").eval()
    generator = torch.Generator().manual_seed(0)
    force_random(net, 0.5, 4, generator)
    x = torch.randn(4, 3, 32, 32)
    try:
        with torch.no_grad():
            net(x)  # prepares the weights and the slices of these widths
            with _Ops() as ops:
                net(x)
    finally:
        release(net)
    assert "convolution" in ops.names
    assert not ops.names & {"index_select", "gather", "index", "nonzero", "scatter", "index_copy"}
