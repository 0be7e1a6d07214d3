"""FLOPs accounting against torch's FlopCounterMode on the original and on equivalently pruned models."""
import copy

import pytest
import timm
import torch
from torch import nn

import dynamize
from dynamize.graph.cost import count_flops, min_fraction, smallest_budget

SIZE = (3, 64, 64)


@pytest.fixture(scope="module")
def pair():
    base = timm.create_model("resnet18", num_classes=10).eval()
    return base, dynamize.convert(base, img_size=SIZE[1]).eval()


def test_static_table_sums_to_flop_counter(pair):
    base, net = pair
    total = count_flops(base, SIZE)
    assert abs(sum(c.flops for c in net.plan.costs) - total) <= 0.01 * total
    assert net.plan.total_flops == pytest.approx(total, rel=0.01)


def test_open_gates_cost_original_plus_gates(pair):
    _, net = pair
    frac = dynamize.flops_fraction(net, torch.randn(3, *SIZE))
    expected = 1 + net.plan.gate_flops / net.plan.total_flops
    assert torch.allclose(frac, torch.full((3,), expected))


def _sliced_conv(conv: nn.Conv2d, keep_out=None, keep_in=None) -> nn.Conv2d:
    out_ch = len(keep_out) if keep_out is not None else conv.out_channels
    in_ch = len(keep_in) if keep_in is not None else conv.in_channels
    return nn.Conv2d(in_ch, out_ch, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)


def test_forced_gates_match_pruned_model(pair):
    base, net = pair
    skipped_block, group = "layer2.1", "layer3.0.conv1"
    kept = torch.zeros(256)
    kept[:100] = 1
    net.block_gate(skipped_block).forced = torch.zeros(1)
    net.channel_gate(group).forced = kept
    try:
        frac = dynamize.flops_fraction(net, torch.randn(2, *SIZE))
    finally:
        net.block_gate(skipped_block).forced = None
        net.channel_gate(group).forced = None

    pruned = copy.deepcopy(base)
    block = pruned.layer2[1]
    block.conv1, block.bn1, block.conv2, block.bn2 = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
    b3 = pruned.layer3[0]
    b3.conv1 = _sliced_conv(b3.conv1, keep_out=range(100))
    b3.bn1 = nn.BatchNorm2d(100)
    b3.conv2 = _sliced_conv(b3.conv2, keep_in=range(100))
    running = [*net.plan.blocks, *(g for g in net.plan.groups if g.block != skipped_block)]
    gates = sum(s.gate_flops for s in running) + sum({s.pool: s.pool_flops for s in running}.values())
    expected = (count_flops(pruned.eval(), SIZE) + gates) / count_flops(base, SIZE)
    assert torch.allclose(frac, torch.full((2,), expected), rtol=1e-6)
    assert expected < 0.9


def test_gates_reading_one_tensor_pool_it_once(pair):
    _, net = pair
    block = next(b for b in net.plan.blocks if b.name == "layer1.0")
    group = next(g for g in net.plan.groups if g.name == "layer1.0.conv1")
    assert block.pool == group.pool  # the L-Net and the block's first C-Net both read the block input
    assert block.pool_flops == 64 * 16 * 16  # C x H x W additions at 64 px: after the stem, a 16x16 map
    unit = net.get_submodule("layer1.0")
    assert len(unit.pools) == 1
    mlps = sum(b.gate_flops for b in net.plan.blocks) + sum(g.gate_flops for g in net.plan.groups)
    pools = {s.pool: s.pool_flops for s in [*net.plan.blocks, *net.plan.groups]}
    assert net.plan.gate_flops == mlps + sum(pools.values()) < mlps + sum(
        s.pool_flops for s in [*net.plan.blocks, *net.plan.groups])


def test_a_branch_end_group_costs_its_kept_outputs():
    """With residual outputs gated, a block's last convolution costs its kept inputs x its kept outputs."""
    base = timm.create_model("resnet18", num_classes=10).eval()
    net = dynamize.convert(base, img_size=SIZE[1], residual_outputs=True).eval()
    inner, end = "layer3.0.conv1", "layer3.0.conv2"
    assert net.plan.groups[[g.name for g in net.plan.groups].index(end)].exits
    kept_inner, kept_end = torch.zeros(256), torch.zeros(256)
    kept_inner[:100], kept_end[:64] = 1, 1
    net.channel_gate(inner).forced, net.channel_gate(end).forced = kept_inner, kept_end
    try:
        frac = dynamize.flops_fraction(net, torch.randn(2, *SIZE))
    finally:
        net.channel_gate(inner).forced = net.channel_gate(end).forced = None

    b3 = base.layer3[0]
    full = count_flops(base, SIZE)
    conv1, conv2 = count_flops(b3.conv1, (128, 8, 8)), count_flops(b3.conv2, (256, 4, 4))
    thin1 = count_flops(_sliced_conv(b3.conv1, keep_out=range(100)), (128, 8, 8))
    thin2 = count_flops(_sliced_conv(b3.conv2, keep_in=range(100), keep_out=range(64)), (100, 4, 4))
    gates = net.plan.gate_flops
    assert torch.allclose(frac, torch.full((2,), (full - conv1 - conv2 + thin1 + thin2 + gates) / full), rtol=1e-6)


@pytest.mark.parametrize("gates", ["both", "layer", "channel"])
def test_smallest_budget_is_the_smallest_fraction_rounded_up_to_a_thousandth(gates):
    plan = dynamize.convert("test_resnet", num_classes=3, img_size=32, gates=gates).plan
    floor, budget = min_fraction(plan), smallest_budget(plan)
    assert floor <= budget < floor + 1e-3 and round(budget * 1000) == pytest.approx(budget * 1000)
