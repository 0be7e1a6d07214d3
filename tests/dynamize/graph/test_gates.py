"""Gate behaviour: skipped branches are not executed; mixed batches match per-image results."""
import pytest
import timm
import torch
from helpers import randomize

from dynamize.graph import convert, flops_fraction
from dynamize.graph.gates import ChannelGate, WidthGate, width_choices


@pytest.fixture(scope="module")
def net():
    return convert(randomize(timm.create_model("resnet18", num_classes=10)), img_size=64).eval()


def _branch_conv(net, block):
    return net.get_submodule(f"{block}.conv1")


def test_skipped_branch_is_not_executed(net):
    calls = []
    handle = _branch_conv(net, "layer2.1").register_forward_hook(lambda *a: calls.append(1))
    gate = net.block_gate("layer2.1")
    try:
        gate.forced = torch.zeros(1)
        with torch.no_grad():
            net(torch.randn(2, 3, 64, 64))
        assert calls == []
        gate.forced = None
        with torch.no_grad():
            net(torch.randn(2, 3, 64, 64))
        assert calls == [1]
    finally:
        handle.remove()
        gate.forced = None


def test_mixed_batch_equals_per_image_decisions(net):
    gate = net.block_gate("layer3.0")
    x = torch.randn(2, 3, 64, 64)
    try:
        with torch.no_grad():
            gate.forced = torch.tensor([[1.0], [0.0]])
            mixed = net(x)
            gate.forced = torch.ones(1)
            kept = net(x)
            gate.forced = torch.zeros(1)
            skipped = net(x)
    finally:
        gate.forced = None
    assert torch.allclose(mixed[0], kept[0], atol=1e-5) and torch.allclose(mixed[1], skipped[1], atol=1e-5)
    assert not torch.allclose(kept[1], skipped[1], atol=1e-3)
    frac = flops_fraction(net, x)  # the decisions of a normal pass: all open
    assert torch.allclose(frac, frac[:1].expand(2))


def test_training_decisions_are_hard_with_gradients():
    net = convert(randomize(timm.create_model("test_resnet", num_classes=5)), img_size=32).train()
    out = net(torch.randn(4, 3, 32, 32))
    _, _, gate = next(iter(net.gates()))
    assert set(gate.last_keep.detach().unique().tolist()) <= {0.0, 1.0}
    out.sum().backward()
    assert gate.mlp[-1].weight.grad is not None and gate.mlp[-1].weight.grad.abs().sum() > 0


def test_a_group_without_a_shortcut_never_loses_all_of_its_channels():
    net = convert(randomize(timm.create_model("test_efficientnet", num_classes=5)), img_size=64).eval()
    unguarded = [g for g in net.plan.groups if g.min_keep]
    assert unguarded and all(g.block is None and g.min_keep >= max(1, g.channels // 4) for g in unguarded)
    assert all(g.min_keep == 0 for g in net.plan.groups if g.block is not None)  # a shortcut carries the signal
    for _, _, gate in net.gates():
        gate.threshold.fill_(100.0)  # far above any logit: every gate closed
    x = torch.randn(3, 3, 64, 64)
    net.train()
    net(x)  # training decisions keep the minimum too
    kept_train = {g.name: net.channel_gate(g.name).last_keep.detach().sum(1) for g in unguarded}
    net.eval()
    with torch.no_grad():
        out = net(x)
    for g in unguarded:
        assert (net.channel_gate(g.name).last_keep.sum(1) == g.min_keep).all()
        assert (kept_train[g.name] == g.min_keep).all()
    assert out.std() > 0  # the signal still reaches the head


def test_a_frozen_gate_that_skips_every_image_leaves_the_shortcut_untouched():
    """The unit's in-place activation after the add must not write into the block's input (autograd needs it)."""
    net = convert(randomize(timm.create_model("resnet18", num_classes=5)), img_size=32).train()
    gate = net.block_gate("layer2.1")  # identity shortcut: the block's input comes from an in-place ReLU
    gate.mlp.requires_grad_(False)  # frozen, as in the settle phase: skipped images never enter the branch
    gate.forced = torch.zeros(1)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("training", [True, False])
def test_width_gate_decisions_are_prefixes_at_its_widths(training):
    widths = width_choices(40, min_keep=3)
    gate = WidthGate(6, widths, 8, min_keep=3).train(training)
    torch.nn.init.normal_(gate.mlp[-1].weight, std=3.0)  # logits that differ between buckets and images
    keep, scale = gate(torch.randn(64, 6))
    kept = keep.detach().sum(1).round()  # straight-through values are 0/1 up to rounding
    assert keep.shape == scale.shape == (64, 40)
    torch.testing.assert_close(keep.detach(), gate.prefixes(kept), atol=1e-6, rtol=0)  # prefixes only
    assert set(kept.int().tolist()) <= set(widths) and len(set(kept.tolist())) > 1
    if training:  # the nested straight-through decisions carry a gradient to every bucket's logit
        (keep * torch.arange(40.0)).sum().backward()
        assert (gate.mlp[-1].weight.grad[:gate.keep_logits].abs().sum(1) > 0).all()
        assert torch.equal(gate.last_prob, gate.last_prob.cummin(1).values)  # nested: never rises with the channel


def test_width_choices_are_few_multiples_of_8_or_16_above_min_keep():
    assert width_choices(64) == [0, 8, 16, 24, 32, 40, 48, 56, 64]
    assert width_choices(72, min_keep=18) == [32, 48, 64, 72]
    wide = width_choices(2048)
    assert len(wide) == 9 and all(w % 16 == 0 for w in wide)
    assert width_choices(8, min_keep=2) == []  # the first step is every channel: nothing to choose


def test_width_channel_gate_starts_open():
    gate = ChannelGate(6, 24, 8, widths=width_choices(24)).eval()
    x = torch.randn(2, 24, 3, 3)
    assert torch.equal(gate(torch.randn(2, 6), x), x)
