"""Residual blocks and channel groups found in small hand-written models."""
import pytest
import torch
from timm.layers import SelectAdaptivePool2d, StdConv2d
from torch import nn

from dynamize.graph.find import Graph, find_blocks, find_groups, owner
from dynamize.graph.trace import trace

C = 8


def conv_bn(cin: int = C, cout: int = C, k: int = 3, conv=nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class Basic(nn.Module):
    """`x + F(x)`, F = conv-bn-relu-conv-bn, with an optional 1x1 projection as the shortcut."""

    def __init__(self, cin: int = C, project: bool = False):
        super().__init__()
        self.f1, self.f2 = conv_bn(cin, C), conv_bn()
        self.proj = conv_bn(cin, C, 1) if project else nn.Identity()

    def forward(self, x):
        return self.proj(x) + self.f2(torch.relu(self.f1(x)))


class BranchSum(nn.Module):
    """RepVGG-style: a 3x3 and a 1x1 branch summed, no identity path."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(k=3), conv_bn(k=1)

    def forward(self, x):
        return self.a(x) + self.b(x)


class Nested(nn.Module):
    """A residual block whose branch holds another residual block."""

    def __init__(self):
        super().__init__()
        self.pre, self.inner, self.post = conv_bn(), Basic(), conv_bn()

    def forward(self, x):
        return x + self.post(self.inner(self.pre(x)))


class Asserting(nn.Module):
    """A branch that asserts on a shape (selective-kernel nets): the assert has no users but belongs to the branch."""

    def __init__(self):
        super().__init__()
        self.f1, self.f2 = conv_bn(), conv_bn()

    def forward(self, x):
        y = self.f1(x)
        torch._assert(y.shape[1] == C, "channels")
        return x + self.f2(torch.relu(y))


class DualPath(nn.Module):
    """DPN-style: the branch output is split between a residual sum and a dense concat."""

    def __init__(self):
        super().__init__()
        self.f = conv_bn(C, C + 4)

    def forward(self, x):
        y = self.f(x)
        return torch.cat([x + y[:, :C], y[:, C:]], dim=1)


def analyse(module: nn.Module, size=(C, 16, 16)):
    g = Graph(trace(module.eval(), size))
    blocks, skipped = find_blocks(g)
    return g, blocks, skipped


def names(nodes) -> set[str]:
    return {n.name for n in nodes}


def test_plain_add_is_a_block_with_identity_shortcut():
    g, blocks, skipped = analyse(nn.Sequential(Basic(), Basic()))
    assert len(blocks) == 2 and not skipped
    first = blocks[0]
    assert first.fork.op == "placeholder" and first.shortcut.args == (first.fork,)  # the Identity projection
    assert g.count_convs(first.region) == 2 and first.add not in first.region and first.out in first.region
    assert blocks[1].fork is blocks[0].add  # the second block reads the first one's output


def test_projection_shortcut_stays_outside_the_branch():
    g, (block,), _ = analyse(Basic(cin=4, project=True), size=(4, 16, 16))
    assert g.count_convs(block.region) == 2
    assert block.shortcut.target == "proj.1" and block.shortcut not in block.region


def test_branch_sum_is_rejected_with_the_reason():
    _, blocks, skipped = analyse(BranchSum())
    assert not blocks
    assert [(s.kind, s.reason) for s in skipped] == [("block", "a sum of branches, not `shortcut(x) + F(x)`")]


def test_nested_block_keeps_the_inner_one():
    _, blocks, skipped = analyse(Nested())
    assert [owner(b.add) for b in blocks] == ["inner"]
    assert [(s.where, s.reason) for s in skipped] == [("add_1", "nested inside another residual block")]


def test_side_nodes_of_the_branch_belong_to_it():
    _, (block,), skipped = analyse(Asserting())
    assert not skipped
    assert any(n.target is torch._assert for n in block.region)


def test_dual_path_add_names_the_reason():
    _, blocks, skipped = analyse(DualPath())
    assert not blocks and "dual-path" in skipped[0].reason


def test_channel_group_inside_a_block():
    g, blocks, _ = analyse(Basic())
    groups, skipped = find_groups(g, blocks)
    (group,) = groups
    assert group.producer.target == "f1.0" and names(group.sinks) == {"f2_0"} and group.block is blocks[0]
    assert group.end.name == "relu"  # the gate scales after the activation
    assert [s.reason for s in skipped] == ["ends a residual branch (gated with --residual-outputs)"]  # f2


def test_a_branch_end_is_a_group_only_when_asked():
    g, blocks, _ = analyse(nn.Sequential(Basic(), Basic()))
    groups, skipped = find_groups(g, blocks, residual_outputs=True)
    assert not skipped
    ends = [gr for gr in groups if gr.exits]
    assert [e.producer.target for e in ends] == ["0.f2.0", "1.f2.0"]
    assert [e.exits for e in ends] == [[b.add] for b in blocks] and all(not e.sinks for e in ends)
    assert [e.block for e in ends] == blocks
    without, _ = find_groups(g, blocks)
    assert len(without) == len(groups) - 2


def test_weight_standardised_sink_is_not_grouped():
    model = nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(conv=StdConv2d))
    g, blocks, _ = analyse(model)
    groups, skipped = find_groups(g, blocks)
    assert not groups
    assert "StdConv2d, whose weights are not sliceable" in skipped[0].reason


class ChannelMean(nn.Module):
    """Divides by the mean over channels between two convs (ConvNeXt-V2's global response norm does)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(), conv_bn()

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y / y.mean(1, keepdim=True))


def test_a_mean_over_channels_stops_a_group():
    g, blocks, _ = analyse(ChannelMean())
    groups, skipped = find_groups(g, blocks)
    assert not groups
    assert skipped[0].reason == "feeds `mean`, which dynamize cannot follow channel by channel (it may mix channels)"


class InPlace(nn.Module):
    """Scales the branch output in place (NF nets' skipinit gain), or with `other`, another value in place."""

    def __init__(self, other: bool = False):
        super().__init__()
        self.other = other
        self.f1, self.f2 = conv_bn(), conv_bn()
        self.gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        y = self.f1(x)
        z = self.f2(torch.relu(y))
        if self.other:
            y.add_(z)
        else:
            z.mul_(self.gain)
        return x + z


def test_an_in_place_update_belongs_to_the_value_it_changes():
    _, (block,), _ = analyse(InPlace())
    assert any(n.target == "mul_" for n in block.region)
    _, blocks, _ = analyse(InPlace(other=True))  # y.add_(z) reads the branch output but changes y
    assert not blocks


class PooledTail(nn.Module):
    """A residual block on a 1x1 map (ResNet's last stage at a small input), then a squeeze-excite-like pair of 1x1
    convolutions on the pooled vector."""

    def __init__(self):
        super().__init__()
        self.block = Basic()
        self.reduce, self.expand = nn.Conv2d(C, 4, 1), nn.Conv2d(4, C, 1)

    def forward(self, x):
        return self.expand(torch.relu(self.reduce(self.block(x))))


def test_a_full_convolution_on_a_1x1_map_is_gated_a_pointwise_one_is_not():
    g, blocks, _ = analyse(PooledTail(), size=(C, 1, 1))
    groups, skipped = find_groups(g, blocks)
    assert [group.producer.target for group in groups] == ["block.f1.0"]
    pointwise = "a 1x1 convolution on a 1x1 map (as in squeeze-excite and heads)"
    assert [(s.where, s.reason.split(":")[0]) for s in skipped if "1x1 map" in s.reason] == [
        ("reduce", pointwise), ("expand", pointwise)]


class PooledHead(nn.Module):
    """A mobile net's head: the last convolution, timm's global pool and a 1x1 convolution on the pooled 1x1 map (or,
    flattened, a linear classifier)."""

    def __init__(self, pool_type: str, flatten: bool = False):
        super().__init__()
        self.conv = conv_bn()
        self.pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=flatten)
        width = C * self.pool.feat_mult()
        self.head = nn.Linear(width, 4) if flatten else nn.Conv2d(width, 4, 1)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.conv(x))))


@pytest.mark.parametrize("pool_type", ["avg", "max", "avgmax"])
def test_a_global_pool_passes_each_channel_on(pool_type):
    g, blocks, _ = analyse(PooledHead(pool_type))
    groups, _ = find_groups(g, blocks)
    assert [(gr.producer.target, names(gr.sinks)) for gr in groups] == [("conv.0", {"head"})]


# "catavgmax" concatenates an average and a max pool (functional ones, followed up to the concat); flatten=True
# flattens the pooled map for a linear classifier.
@pytest.mark.parametrize("pool_type, flatten, reason", [("catavgmax", False, "feeds a concat"),
                                                        ("avg", True, "feeds the classifier")])
def test_a_global_pool_that_concatenates_or_flattens_stops_a_group(pool_type, flatten, reason):
    g, blocks, _ = analyse(PooledHead(pool_type, flatten))
    groups, skipped = find_groups(g, blocks)
    assert not groups and [s.reason for s in skipped if s.where == "conv.0"] == [reason]
