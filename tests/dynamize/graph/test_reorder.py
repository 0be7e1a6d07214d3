"""Width mode's reordering: channels sorted by importance, the model's function unchanged, unsafe groups left
per channel with the reason."""
import pytest
import timm
import torch
from helpers import randomize
from torch import nn

import dynamize
from dynamize.errors import ModelError
from dynamize.graph.reorder import find_edits
from dynamize.graph.trace import symbolic_trace


@pytest.fixture(scope="module")
def pair():
    base = randomize(timm.create_model("test_efficientnet", num_classes=5)).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    return base, dynamize.convert(base, img_size=64, channel_mode="width").eval(), before


def _edits(base, plan, group):
    edits = find_edits(symbolic_trace(base.get_submodule(group.unit), plan.none_args.get(group.unit, ())), group)
    assert isinstance(edits, list)
    return edits


def test_width_mode_orders_channels_by_importance_and_keeps_the_function(pair):
    base, net, _ = pair
    assert net.plan.channel_mode == "width" and all(g.widths for g in net.plan.groups)
    for group in net.plan.groups:
        unit = net.get_submodule(group.unit)
        sinks = [unit.get_submodule(e.module).weight for e in _edits(base, net.plan, group) if e.dim == 1]
        norms = sum(w.abs().transpose(0, 1).reshape(group.channels, -1).sum(1) for w in sinks)
        assert torch.all(norms[:-1] >= norms[1:]), group.name
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = base(x)
        assert (dynamize.use_runtime(net, None)(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert (dynamize.use_runtime(net)(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_the_copy_is_reordered_not_the_original(pair):
    base, net, before = pair
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    group = net.plan.groups[0]
    producer = f"{group.unit}.{_edits(base, net.plan, group)[0].module}"
    assert not torch.equal(base.get_submodule(producer).weight, net.get_submodule(producer).weight)


def test_groups_joined_by_a_product_stay_per_channel():
    base = randomize(timm.create_model("starnet_s050", num_classes=5)).eval()
    net = dynamize.convert(base, img_size=32, channel_mode="width").eval()
    reasons = {s.where: s.reason for s in net.plan.skipped if s.kind == "width"}
    joined = [g for g in net.plan.groups if g.name.endswith(("f1.conv", "f2.conv"))]
    assert joined and all(not g.widths and "shares a layer" in reasons[g.name] for g in joined)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = base(x)
        assert (net(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_unknown_channel_mode_is_refused():
    with pytest.raises(ModelError, match="--channel-mode must be one of channel, width"):
        dynamize.convert("test_resnet", img_size=32, channel_mode="prefix")


class SwishBody(nn.Module):
    """conv -> norm -> y * sigmoid(y) -> conv: a rescale whose factors are the group's own channels."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = self.bn(self.conv1(x))
        return self.conv2(y * torch.sigmoid(y))


class SwishNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pretrained_cfg = {"architecture": "swish", "input_size": (3, 16, 16)}
        self.body = SwishBody()

    def forward(self, x):
        return self.body(x).mean((2, 3))


def test_a_rescale_by_the_groups_own_channels_is_reordered_once():
    base = randomize(SwishNet()).eval()
    net = dynamize.convert(base, img_size=16, channel_mode="width").eval()
    assert [g.widths for g in net.plan.groups] == [[8, 16]]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = base(x)
        assert (dynamize.use_runtime(net, None)(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
