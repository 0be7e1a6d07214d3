"""The hard inference path: equal to the masked graph, and really skipping work."""
import copy

import pytest
import timm
import torch
from helpers import randomize
from timm.layers import BatchNormAct2d

import dynamize
from dynamize.graph.cost import GATHER_MACS
from dynamize.runtime import decide as decide_module
from dynamize.runtime.bench import force_random, release
from dynamize.runtime.decide import Decide
from dynamize.runtime.layers import SlicedLayer, Widen
from dynamize.runtime.sliced import use_runtime

# Residual blocks + conv groups; depthwise + squeeze-excite groups; channels-last Linear groups; a ResNet and a mobile
# net (squeeze-excite, projections into residual adds) with the layers that end residual branches gated too; a mobile
# net whose last convolution's channels leave their block for the global pool and the head.
MODELS = [("resnet18", 32, False), ("test_efficientnet", 64, False), ("test_convnext", 32, False),
          ("resnet18", 32, True), ("mobilenetv3_small_050", 32, True), ("mobilenetv3_small_100", 64, False)]
# Groups a model must have for the tests to cover them (at 32 px MobileNetV3's last convolution runs on a 1x1 map and
# is not gated).
COVERED = {"mobilenetv3_small_100": "blocks.5.0.conv"}


@pytest.fixture(scope="module", params=MODELS, ids=[f"{m}{'-residual-outputs' * r}" for m, _, r in MODELS])
def model(request):
    name, size, residual_outputs = request.param
    net = dynamize.convert(randomize(timm.create_model(name, num_classes=7)), img_size=size,
                           residual_outputs=residual_outputs).eval()
    assert any(g.exits for g in net.plan.groups) == residual_outputs
    if name in COVERED:
        assert COVERED[name] in {g.name for g in net.plan.groups}
    return net, size


@pytest.fixture(autouse=True)
def exact_counts(monkeypatch):
    """Kept channel counts as they are: the tiny test models have groups smaller than a bucket."""
    monkeypatch.setattr(decide_module, "CHANNEL_BUCKET", 1)


def _masked_and_fast(net, x, channels="auto"):
    """The model's output on the masked graph and on the runtime, with the same decisions."""
    with torch.no_grad():
        use_runtime(net, None)
        expected = net(x)
        use_runtime(net, channels)
        return expected, net(x)


@pytest.mark.parametrize("channels, batch, channels_last", [
    ("union", 1, False), ("union", 3, False), ("split", 3, False), ("auto", 1, True), ("auto", 3, True),
    ("split", 3, True)])
def test_runtime_equals_masked_graph(model, channels, batch, channels_last):
    assert_runtime_equals_masked_graph(*model, channels, batch, channels_last)


def assert_runtime_equals_masked_graph(net, size, channels, batch, channels_last, check=lambda net: None):
    """The runtime computes what the masked graph computes, with random decisions keeping 0.3 and 0.7 of the
    units; `check(net)` inspects each pass's decisions."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    generator = torch.Generator().manual_seed(batch)
    try:
        for p in (0.3, 0.7):
            force_random(net, p, batch, generator)
            expected, got = _masked_and_fast(net, x, channels)
            check(net)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    finally:
        release(net)
        net.to(memory_format=torch.contiguous_format)


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


def test_runtime_follows_weight_changes(model):
    assert_runtime_follows_weight_changes(*model)


def assert_runtime_follows_weight_changes(net, size):
    """After in-place weight updates and `load_state_dict`, the runtime computes with the new weights."""
    x = torch.randn(2, 3, size, size)
    try:
        force_random(net, 0.5, 2, torch.Generator().manual_seed(0))
        _masked_and_fast(net, x)  # prepares (folds, transposes) the weights
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    m.weight.mul_(1.5)  # an in-place update, as an optimizer step makes
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.mul_(2.0)
        expected, got = _masked_and_fast(net, x)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        net.load_state_dict({k: v * 0.5 if v.is_floating_point() else v for k, v in net.state_dict().items()})
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


def test_a_loaded_model_runs_the_fast_path_in_evaluation(model, tmp_path):
    net, size = model
    loaded = dynamize.load(dynamize.save(net, tmp_path / "run")).eval()
    calls = []
    for _, unit in loaded.units():
        unit.fast.register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        loaded(torch.randn(2, 3, size, size))
    assert len(calls) == len(list(loaded.units()))


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


def test_a_skipped_block_leaves_its_input_alone():
    net = dynamize.convert(randomize(timm.create_model("resnet18", num_classes=7)), img_size=32).eval()
    unit, gate = net.get_submodule("layer1.1"), net.block_gate("layer1.1")
    x = torch.randn(2, 64, 8, 8)
    before = x.clone()
    gate.forced = torch.zeros(1)
    try:
        with torch.no_grad():
            out = unit(x)  # the unit's in-place ReLU runs on what the skipped block returns
    finally:
        gate.forced = None
    assert torch.equal(x, before) and torch.equal(out, before.relu())


def _decisions(model, batch, forced_rows):
    """The Kept of every Decide of the model's fast path for one pass with the given forced decisions."""
    net, size = model
    out = []
    hooks = [m.register_forward_hook(lambda mod, args, kept: out.append(kept))
             for _, unit in net.units() for m in unit.fast.modules() if isinstance(m, Decide)]
    try:
        force_random(net, 0.5, forced_rows, torch.Generator().manual_seed(0))
        with torch.no_grad():
            net(torch.randn(batch, 3, size, size))
    finally:
        release(net)
        for h in hooks:
            h.remove()
    return out


def test_auto_mode_runs_agreeing_images_together(model):
    use_runtime(model[0], "auto")
    kept = _decisions(model, batch=4, forced_rows=1)  # one row: every image decides the same
    assert kept and not any(k.per_image for k in kept)


def test_split_mode_runs_disagreeing_images_per_image(model):
    use_runtime(model[0], "split")
    try:
        kept = _decisions(model, batch=4, forced_rows=4)
    finally:
        use_runtime(model[0], "auto")
    # Per image wherever a group runs several images (a block kept by one image runs its groups on that one).
    assert kept and all(k.per_image for k in kept if k.idx is not None and k.mult.shape[0] > 1)
    assert any(k.per_image for k in kept)


def _called(gm):
    """Types of the modules a unit graph calls, its residual branches included."""
    types = [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    for m in gm.modules():
        branch = getattr(m, "branch", None)
        if isinstance(branch, torch.fx.GraphModule) and branch is not gm:
            types += [type(branch.get_submodule(n.target)) for n in branch.graph.nodes if n.op == "call_module"]
    return types


def test_norms_are_folded_and_no_ops_dropped():
    net = dynamize.convert(randomize(timm.create_model("test_efficientnet", num_classes=7)), img_size=64).eval()
    masked = [t for _, unit in net.units() for t in _called(unit.masked)]
    fast = [t for _, unit in net.units() for t in _called(unit.fast)]
    # The norms after the gated convolutions are folded into them; their SiLU activations still run.
    assert fast.count(BatchNormAct2d) < masked.count(BatchNormAct2d) and torch.nn.SiLU in fast
    assert torch.nn.Identity in masked and torch.nn.Identity not in fast


def test_norms_outside_the_units_are_folded():
    """The stem's norm (outside every unit) is folded in evaluation without gradients; the masked path (which BN
    re-estimation uses) and a copy of the model still call it."""
    net = dynamize.convert(randomize(timm.create_model("resnet18", num_classes=7)), img_size=32).eval()
    calls = []
    net.bn1.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    expected, got = _masked_and_fast(net, x)
    assert calls == [1]  # the masked pass called it, the fast pass did not
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    with torch.no_grad(), net.masked_path():
        net(x)
    copied = copy.deepcopy(net)
    with torch.no_grad():
        copied.bn1.weight.mul_(2)  # a copy folds its own norm, not the original's
        assert not torch.allclose(copied(x), got)
    assert calls == [1, 1]


def test_a_group_that_leaves_its_block_runs_on_its_kept_channels():
    """MobileNetV3's last convolution computes only its kept filters; they are widened to every channel where they
    leave the block, for the global pool and the head."""
    net = dynamize.convert(randomize(timm.create_model("mobilenetv3_small_100", num_classes=7)), img_size=64).eval()
    unit = net.get_submodule("blocks.5.0")
    with torch.no_grad():
        net(torch.randn(1, 3, 64, 64))  # builds the fast path
    called = _called(unit.fast)
    assert called.count(SlicedLayer) == 1 and called.count(Widen) == 1


@pytest.mark.parametrize("residual_outputs", [False, True], ids=["sink-gated-on-inputs", "sink-gated-on-both-sides"])
def test_a_group_prices_its_sinks_gather_as_the_sink_gathers(residual_outputs):
    """A block's second convolution, a sink of the first's group, copies whole rows of its transposed weights when
    only its inputs are gated and chunks when its outputs are a group of their own: the layout choice prices it so."""
    base = timm.create_model("resnet18", num_classes=7)
    net = dynamize.convert(base, img_size=32, residual_outputs=residual_outputs).eval()
    use_runtime(net)
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32))
    (decide,) = [m for _, unit in net.units() for name, m in unit.fast.named_modules()
                 if isinstance(m, Decide) and name.endswith("decide_layer3_0_conv1")]
    conv1, conv2 = base.layer3[0].conv1, base.layer3[0].conv2
    sink = GATHER_MACS["chunks" if residual_outputs else "rows"]
    assert decide.gather == conv1.weight[0].numel() * GATHER_MACS["rows"] + conv2.weight[:, 0].numel() * sink
