"""Which module each gate site is rewritten in: the smallest module that holds it and traces like the whole model."""
import torch
from test_find import Basic, C, conv_bn
from torch import nn

from dynamize.graph.find import Graph, find_blocks, find_groups
from dynamize.graph.trace import trace
from dynamize.graph.units import assign_units, capture_inputs, common_unit

SIZE = (3, 16, 16)


class Net(nn.Module):
    """A stem into a plain conv layer (no shortcut), then residual blocks, then a head."""

    def __init__(self, blocks: nn.Module | None = None):
        super().__init__()
        self.stem, self.body = conv_bn(3, C), conv_bn()
        self.blocks = blocks if blocks is not None else nn.Sequential(Basic(), Basic())
        self.head = nn.Linear(C, 5)

    def forward(self, x):
        x = self.blocks(torch.relu(self.body(torch.relu(self.stem(x)))))
        return self.head(x.mean((2, 3)))


class OptionalShortcut(nn.Module):
    """A block with an optional argument that the model leaves at None; tracing it with a proxy there would take
    the wrong Python branch."""

    def __init__(self):
        super().__init__()
        self.inner = Basic()

    def forward(self, x, shortcut=None):
        y = self.inner.f2(torch.relu(self.inner.f1(x)))
        if shortcut is not None:
            return y + shortcut
        return y + x


class Twice(nn.Module):
    """Runs one block twice: the block's own trace holds one call, the whole graph two."""

    def __init__(self):
        super().__init__()
        self.shared = Basic()

    def forward(self, x):
        return self.shared(self.shared(x))


def sites(model: nn.Module):
    model.eval()
    gm = trace(model, SIZE)
    g = Graph(gm)
    blocks, _ = find_blocks(g)
    groups, _ = find_groups(g, blocks)
    return gm, blocks, groups


def test_each_block_is_rewritten_in_its_own_module():
    model = Net()
    gm, blocks, _ = sites(model)
    units = assign_units(model, gm, torch.zeros(1, *SIZE), [[b.add, *b.region] for b in blocks])
    assert [u.path for u in units] == ["blocks.0", "blocks.1"]
    for u, b in zip(units, blocks):
        assert u.holds(b.region) and u.own[b.add].name == "add"  # the unit's own names
        assert {n.op for n in u.entries(b.region)} == {"placeholder"}  # the branch reads the block's argument


def test_a_site_only_the_whole_model_holds_is_not_gated():
    model = Net()
    gm, _, groups = sites(model)
    stem = next(g for g in groups if g.producer.target == "stem.0")
    assert common_unit([stem.producer, *stem.sinks]) == ""  # the stem feeds `body`, a sibling module
    assert assign_units(model, gm, torch.zeros(1, *SIZE), [[stem.producer, *stem.members, *stem.sinks]]) == [None]


def test_arguments_left_at_none_are_traced_as_constants():
    model = Net(blocks=OptionalShortcut())
    gm, (block,), _ = sites(model)
    (unit,) = assign_units(model, gm, torch.zeros(1, *SIZE), [[block.add, *block.region]])
    assert unit.path == "blocks" and unit.none_args == ["shortcut"]
    x = torch.randn(2, C, 16, 16)
    with torch.no_grad():
        assert torch.equal(unit.gm(x), model.blocks(x))


def test_a_unit_that_does_not_match_hands_its_site_to_its_parent():
    model = Net(blocks=Twice())
    gm, blocks, _ = sites(model)
    assert [common_unit([b.add, *b.region]) for b in blocks] == ["blocks.shared", "blocks.shared"]
    units = assign_units(model, gm, torch.zeros(1, *SIZE), [[b.add, *b.region] for b in blocks])
    assert [u.path for u in units] == ["blocks", "blocks"]


def test_capture_inputs_keeps_each_modules_first_call():
    model = Net(blocks=Twice()).eval()
    x = torch.randn(1, *SIZE)
    inputs = capture_inputs(model, x)
    with torch.no_grad():
        first = model.body(torch.relu(model.stem(x))).relu()
    (arg,), kwargs = inputs["blocks.shared"]
    assert torch.equal(arg, first) and kwargs == {}
