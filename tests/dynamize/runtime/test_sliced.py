"""The hard inference path: equal to the masked graph, and really skipping work."""
import pytest
import timm
import torch
from helpers import randomize

import dynamize
from dynamize.runtime.bench import force_random, release
from dynamize.runtime.sliced import Kept, SlicedBatchNorm, SlicedDepthwise, SlicedLayer, use_runtime

# Residual blocks + conv groups; depthwise + squeeze-excite groups; channels-last Linear groups.
MODELS = [("resnet18", 32), ("test_efficientnet", 64), ("test_convnext", 32)]


@pytest.fixture(scope="module", params=MODELS, ids=[m for m, _ in MODELS])
def model(request):
    name, size = request.param
    net = dynamize.convert(randomize(timm.create_model(name, num_classes=7)), img_size=size).eval()
    return net, size


def _masked_and_fast(net, x, channels="auto"):
    """The model's output on the masked graph and on the runtime, with the same decisions."""
    with torch.no_grad():
        use_runtime(net, None)
        expected = net(x)
        use_runtime(net, channels)
        return expected, net(x)


@pytest.mark.parametrize("channels", ["union", "split", "auto"])
@pytest.mark.parametrize("batch", [1, 3])
def test_runtime_equals_masked_graph(model, channels, batch):
    net, size = model
    x = torch.randn(batch, 3, size, size)
    generator = torch.Generator().manual_seed(batch)
    try:
        for p in (0.3, 0.7):
            force_random(net, p, batch, generator)
            expected, got = _masked_and_fast(net, x, channels)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    finally:
        release(net)


def test_runtime_with_every_gate_closed(model):
    net, size = model
    x = torch.randn(2, 3, size, size)
    try:
        for _, _, gate in net.gates():
            gate.forced = torch.zeros(1)
        expected, got = _masked_and_fast(net, x)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    finally:
        release(net)


def test_training_and_gradients_use_the_masked_graph(model):
    net, size = model
    unit = next(u for _, u in net.units())
    calls = []
    handle = unit.masked.register_forward_hook(lambda *a: calls.append(1))
    try:
        net(torch.randn(1, 3, size, size))  # evaluation with gradients
        assert calls == [1]
        with torch.no_grad():
            net(torch.randn(1, 3, size, size))
        assert calls == [1]
    finally:
        handle.remove()


def test_skipped_branch_is_not_called():
    net = dynamize.convert(randomize(timm.create_model("resnet18", num_classes=7)), img_size=32).eval()
    batches = []
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        net(x)  # builds the fast path
        net.get_submodule("layer2.1").fast.get_submodule("lnets.layer2_1").branch.register_forward_hook(
            lambda m, args, out: batches.append(args[0].shape[0]))
        gate = net.block_gate("layer2.1")
        for forced in (torch.zeros(1), torch.tensor([[1.0], [0.0], [1.0]]), torch.ones(1)):
            gate.forced = forced
            net(x)
    gate.forced = None
    assert batches == [2, 3]  # never for the skipped batch; only the two images that keep the block


def _kept(idx, n=1, axis=1):
    idx = torch.tensor(idx)
    return Kept(axis, idx, torch.ones(n, len(idx)))


def test_sliced_conv_equals_dense_conv_on_kept_channels():
    conv = torch.nn.Conv2d(6, 8, 3, padding=1, stride=2)
    x = torch.randn(2, 6, 9, 9)
    inp, out = _kept([0, 2, 5], 2), _kept([1, 4, 6, 7], 2)
    masked = x * torch.zeros(6).index_fill(0, inp.idx, 1).reshape(1, -1, 1, 1)
    dense = conv(masked)[:, out.idx]
    sliced = SlicedLayer(conv)(x[:, inp.idx], inp, out)
    torch.testing.assert_close(sliced, dense, atol=1e-5, rtol=0)
    per_image = Kept(1, inp.idx, inp.mult, [(inp.idx, inp.mult[:1])] * 2)
    torch.testing.assert_close(torch.cat(SlicedLayer(conv)([x[i:i + 1, inp.idx] for i in range(2)], per_image,
                                                           Kept(1, out.idx, out.mult, [(out.idx, None)] * 2))),
                               dense, atol=1e-5, rtol=0)


def test_sliced_depthwise_and_batchnorm_equal_dense_on_kept_channels():
    dw, bn = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), randomize(torch.nn.BatchNorm2d(8)).eval()
    x = torch.randn(2, 8, 5, 5)
    kept = _kept([0, 3, 4], 2)
    torch.testing.assert_close(SlicedDepthwise(dw)(x[:, kept.idx], kept), dw(x)[:, kept.idx], atol=1e-5, rtol=0)
    torch.testing.assert_close(SlicedBatchNorm(bn)(x[:, kept.idx], kept), bn(x)[:, kept.idx], atol=1e-5, rtol=0)


def test_sliced_linear_on_channels_last():
    fc = torch.nn.Linear(6, 5)
    x = torch.randn(1, 4, 4, 6)
    inp, out = _kept([1, 2], axis=-1), _kept([0, 3], axis=-1)
    masked = x * torch.zeros(6).index_fill(0, inp.idx, 1)
    torch.testing.assert_close(SlicedLayer(fc)(x[..., inp.idx], inp, out), fc(masked)[..., out.idx],
                               atol=1e-5, rtol=0)


def test_auto_mode_runs_agreeing_images_together(model):
    net, size = model
    use_runtime(net, "auto")
    decisions = []
    for _, unit in net.units():
        for m in unit.fast.modules():
            if type(m).__name__ == "Decide":
                m.register_forward_hook(lambda mod, args, out: decisions.append(out.images))
    try:
        force_random(net, 0.5, 1, torch.Generator().manual_seed(0))  # one row: every image decides the same
        with torch.no_grad():
            net(torch.randn(4, 3, size, size))
    finally:
        release(net)
    assert decisions and all(images is None for images in decisions)
