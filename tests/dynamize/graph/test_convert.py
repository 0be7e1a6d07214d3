"""Conversion over many timm families: exact outputs with open gates, save/load round trip, or a named reason."""
import pytest
import timm
import torch
from helpers import ARCHS, NOT_GATEABLE, randomize
from test_find import Basic
from timm.layers import SpaceToDepth
from torch import nn

import dynamize
from dynamize.errors import ModelError

# Architectures with residual adds that get no L-Net, and why.
NO_LAYER_GATE = {
    "rexnet_100": "its residual adds only part of the channels (x[:, :C] += shortcut), not shortcut + F(x)",
}
# Architectures that get no C-Net group, and why.
NO_CHANNEL_GATE = {
    "resnext50_32x4d": "every 1x1 conv feeds a grouped conv or the residual add",
    "regnetx_002": "every 1x1 conv feeds a grouped conv or the residual add",
    "regnety_002": "every 1x1 conv feeds a grouped conv or the residual add",
    "regnetz_005": "every 1x1 conv feeds a grouped conv or the residual add",
    "skresnet18": "selective-kernel paths are stacked and re-weighted; the other convs feed the residual add",
    "nf_resnet26": "weight-standardised convolutions (ScaledStdConv2d): their stored weights cannot be sliced",
    "mixnet_s": "mixed kernels split channels between convolutions",
    "ghostnet_100": "ghost modules concatenate, the rest feeds residual adds",
    "ghostnetv2_100": "ghost modules concatenate, the rest feeds residual adds",
    "repghostnet_058": "every conv feeds a grouped conv or a residual add",
    "repvgg_a0": "every conv feeds a branch sum",
    "res2net50_14w_8s": "hierarchical splits consume every 1x1 conv output",
    "hgnetv2_b0": "the convs feed concats and residual adds",
    "convnextv2_atto": "the MLP's global response norm mixes its channels; the rest feeds residual adds",
}


@pytest.mark.slow
@pytest.mark.parametrize("channel_mode", ["channel", "width"])
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_convert_exact_and_round_trip(name, channel_mode, tmp_path):
    """Open gates compute what the model did, also in width mode, whose channels are reordered (and saved so)."""
    size = ARCHS[name]
    base = randomize(timm.create_model(name, num_classes=7)).eval()
    if name in NOT_GATEABLE:
        with pytest.raises(ModelError, match="nothing dynamize can gate"):
            dynamize.convert(base, img_size=size, channel_mode=channel_mode)
        return
    net = dynamize.convert(base, img_size=size, channel_mode=channel_mode).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref, out = base(x), net(x)
        masked = dynamize.use_runtime(net, None)(x)
        dynamize.use_runtime(net)
    # The gated graph computes what the model did; reordered channels (width mode) sum in another order, which moves
    # float32 results as much as float32 rounding moves the model itself (fbnetv3_b: 2e-5; float64: 4e-15).
    exact = 1e-5 if channel_mode == "channel" else 1e-4
    assert (masked - ref).abs().max() <= exact * ref.abs().max()
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()  # so does the fast path, its norms folded: rounding

    plan = net.plan
    has_residual = not any("no residual adds" in s.reason for s in plan.skipped)
    if has_residual and name not in NO_LAYER_GATE:
        assert plan.blocks, f"{name} has residual adds but no L-Net"
    if name not in NO_CHANNEL_GATE:
        assert plan.groups, f"{name} got no C-Net group"

    dynamize.save(net, tmp_path / "run")
    loaded = dynamize.load(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    assert loaded.plan.to_dict() == plan.to_dict()


def test_convert_by_name_keeps_timm_attributes():
    net = dynamize.convert("test_resnet", num_classes=5, in_chans=1, img_size=32)
    assert net.num_classes == 5 and net.plan.input_size == [1, 32, 32]
    assert net.pretrained_cfg["architecture"] == "test_resnet"


def test_convert_does_not_touch_the_original():
    base = timm.create_model("test_resnet", num_classes=5).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    net = dynamize.convert(base, img_size=32)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("gates", ["layer", "channel"])
def test_gate_kinds(gates):
    net = dynamize.convert("test_resnet", num_classes=5, img_size=32, gates=gates)
    assert bool(net.plan.blocks) == (gates == "layer") and bool(net.plan.groups) == (gates == "channel")


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ModelError, match="resnet50"):
        dynamize.convert("resnet5O")


def test_vision_transformer_is_refused():
    with pytest.raises(ModelError, match="not a convolutional network"):
        dynamize.convert("vit_tiny_patch16_224", img_size=224)


class SpaceToDepthNet(nn.Module):
    """TResNet's stem: space-to-depth turns 3 channels into 48, so the first convolution's 48 inputs mislead."""

    def __init__(self):
        super().__init__()
        self.pretrained_cfg = {"architecture": "s2d", "input_size": (3, 64, 64)}
        self.stem = nn.Sequential(SpaceToDepth(4), nn.Conv2d(48, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Basic()

    def forward(self, x):
        return self.block(self.stem(x)).mean((2, 3))


def test_space_to_depth_stem_is_traced_at_its_real_input_channels(capfd):
    plan = dynamize.plan_model(SpaceToDepthNet().eval(), img_size=32)
    assert plan.input_size == [3, 32, 32] and [b.unit for b in plan.blocks] == ["block"]
    assert capfd.readouterr().err == ""  # the channel counts that do not run leave no traceback behind


def test_nothing_to_gate_names_the_reasons():
    with pytest.raises(ModelError, match="nothing dynamize can gate with --gates both: no residual adds; .*GroupNorm"):
        dynamize.convert("test_efficientnet_gn", img_size=32)


def test_too_small_input_names_the_fix(capfd):
    with pytest.raises(ModelError, match="does not run at input size .*; pass a larger --img-size"):
        dynamize.convert("test_convnext", img_size=2)
    assert "Traceback" not in capfd.readouterr().err


def test_norm_free_blocks_get_layer_gates():
    base = randomize(timm.create_model("test_nfnet", num_classes=3)).eval()
    net = dynamize.convert(base, img_size=32).eval()
    assert net.plan.blocks and all(u.original_type == "NormFreeBlock" for _, u in net.units())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = base(x)
        assert (net(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100", "seresnet18"])
def test_residual_outputs_gate_every_branch_end_and_stay_exact(name):
    """Each residual branch's last layer gets a C-Net whose channels end in the add; open gates change nothing, and
    width mode keeps those groups per-channel (their order is the shortcut's)."""
    base = randomize(timm.create_model(name, num_classes=7)).eval()
    net = dynamize.convert(base, img_size=32, residual_outputs=True).eval()
    plain = dynamize.plan_model(base, img_size=32)
    ends = [g for g in net.plan.groups if g.exits]
    # Every L-gated block's branch end is gated, but a 1x1 convolution on a 1x1 map (mobilenetv2's last blocks at
    # 32 px) is too little work to gate.
    small = {s.where for s in net.plan.skipped if "1x1 map" in s.reason}
    blocks = {b.name for b in net.plan.blocks}
    assert blocks - {g.block for g in ends} == blocks & {w.rpartition(".")[0] for w in small}
    assert {g.name for g in net.plan.groups} - {g.name for g in ends} == {g.name for g in plain.groups}
    assert all(g.block is not None and g.min_keep == 0 for g in ends)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = base(x)
        assert (dynamize.use_runtime(net, None)(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    width = dynamize.plan_model(base, img_size=32, residual_outputs=True, channel_mode="width")
    per_channel = {s.where for s in width.skipped if "residual shortcut" in s.reason}
    assert per_channel == {g.name for g in ends} and not any(g.widths for g in width.groups if g.exits)


def test_profitable_only_leaves_out_channel_gates_on_small_maps():
    model = timm.create_model("mobilenetv3_small_100")
    every = dynamize.plan_model(model, img_size=224)
    profitable = dynamize.plan_model(model, img_size=224, profitable_only=True)
    left_out = {s.where for s in profitable.skipped if "pay for itself" in s.reason}
    assert left_out and {g.name for g in profitable.groups} == {g.name for g in every.groups} - left_out
    assert profitable.blocks == every.blocks
    # A ResNet's channels at 224 px are worth gating: every group stays.
    resnet = timm.create_model("resnet18")
    assert len(dynamize.plan_model(resnet, img_size=224, profitable_only=True).groups) == \
        len(dynamize.plan_model(resnet, img_size=224).groups)


@pytest.mark.parametrize("global_pool", ["avg", "max", "avgmax"])
def test_the_convolution_before_the_global_pool_is_gated_inside_its_block(global_pool):
    """MobileNetV3's last convolution reaches the head's 1x1 convolution through the global pool, outside its block:
    its group ends where its channels leave the block, its FLOPs come under gate control (the head's, which runs on
    every channel, do not), and open gates change nothing."""
    base = randomize(timm.create_model("mobilenetv3_small_100", num_classes=7, global_pool=global_pool)).eval()
    net = dynamize.convert(base, img_size=64).eval()
    group = next(g for g in net.plan.groups if g.name == "blocks.5.0.conv")
    assert group.unit == "blocks.5.0" and not group.sinks and group.min_keep > 0
    assert not [s for s in net.plan.skipped if s.where == group.name]
    scaled = {c.node: c.groups for c in net.plan.costs}
    assert scaled["blocks_5_0_conv"] == [group.name] and scaled["conv_head"] == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = base(x)
        masked = dynamize.use_runtime(net, None)(x)
        fast = dynamize.use_runtime(net)(x)
    assert (masked - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (fast - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_a_concatenating_global_pool_leaves_the_convolution_before_it_ungated():
    plan = dynamize.plan_model(timm.create_model("mobilenetv3_small_100", global_pool="catavgmax"), img_size=64)
    assert "blocks.5.0.conv" not in {g.name for g in plan.groups}
    assert [s.reason for s in plan.skipped if s.where == "blocks.5.0.conv"] == ["feeds a concat"]
