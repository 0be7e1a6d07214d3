"""The GatePlan as data: JSON round trip, refusal of other versions and malformed plans, its derived numbers."""
import json

import pytest

import dynamize
from dynamize.errors import RunError
from dynamize.graph.plan import PLAN_VERSION, BlockSite, ChannelGroup, CostItem, GatePlan, Skipped


def small_plan() -> GatePlan:
    """Two gates reading the same tensor `layer1.0:x` (one pooling), one in another unit."""
    block = BlockSite(name="layer1.0", unit="layer1.0", add="add", fork="x", branch_out="bn2", shortcut="x",
                      branch_nodes=["conv1", "bn1", "relu", "conv2", "bn2"], channels=8, hidden=8, flops=1000,
                      gate_flops=10, pool_flops=100)
    inner = ChannelGroup(name="layer1.0.conv1", unit="layer1.0", producer="conv1", gate_input="x", gate_after="relu",
                         members=["conv1", "bn1", "relu"], sinks=["conv2"], channels=8, in_channels=8, axis=1,
                         hidden=8, block="layer1.0", flops=900, gate_flops=20, pool_flops=100)
    outer = ChannelGroup(name="layer2.0.conv1", unit="layer2.0", producer="conv1", gate_input="x", gate_after="act1",
                         members=["conv1", "act1"], sinks=["conv2"], channels=16, in_channels=8, axis=1, hidden=8,
                         block=None, flops=500, gate_flops=30, pool_flops=50, min_keep=4)
    costs = [CostItem("stem", 200), CostItem("layer1_0_conv1", 900, "layer1.0", ["layer1.0.conv1"]),
             CostItem("layer2_0_conv1", 500, None, ["layer2.0.conv1"]), CostItem("fc", 400)]
    return GatePlan(architecture="tiny", gates="both", input_size=[3, 16, 16], total_flops=2000, blocks=[block],
                    groups=[inner, outer], costs=costs, skipped=[Skipped("group", "stem", "feeds a residual add")],
                    none_args={"layer2.0": ["shortcut"]})


def test_json_round_trip():
    plan = small_plan()
    again = GatePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.to_dict() == plan.to_dict()


@pytest.mark.parametrize("channel_mode", ["channel", "width"])
def test_json_round_trip_of_a_converted_model(channel_mode):
    plan = dynamize.convert("test_resnet", num_classes=3, img_size=32, channel_mode=channel_mode).plan
    assert GatePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_plan_of_an_earlier_version_2_reads_as_channel_mode():
    """Plans written before width mode have neither `channel_mode` nor `widths`: per-channel decisions."""
    d = small_plan().to_dict()
    del d["channel_mode"]
    for g in d["groups"]:
        del g["widths"]
    plan = GatePlan.from_dict(d)
    assert plan.channel_mode == "channel" and all(g.widths == [] for g in plan.groups)


def test_derived_numbers():
    plan = small_plan()
    assert plan.units == ["layer1.0", "layer2.0"]
    assert plan.gate_flops == 10 + 20 + 30 + 100 + 50  # the shared tensor is pooled once
    assert plan.controlled_flops == 1400
    assert plan.summary()["controlled_share"] == pytest.approx(0.7)


def test_largest_ungated_names_the_costliest_nodes_no_gate_controls():
    plan = small_plan()  # ungated: stem (200 of 2,000 FLOPs) and fc (400)
    assert plan.largest_ungated() == "fc 20.0%, stem 10.0%"
    assert plan.largest_ungated(1) == "fc 20.0%"
    plan.costs.append(CostItem("layer2_0_downsample_0", 600))  # named by its module path, as `skipped` names it
    plan.skipped.append(Skipped("group", "layer2.0.downsample.0", "feeds a residual add"))
    assert plan.largest_ungated(2) == "layer2.0.downsample.0 30.0%, fc 20.0%"
    plan.costs = [c for c in plan.costs if c.block or c.groups]
    assert plan.largest_ungated() == ""


@pytest.mark.parametrize("version, message", [(PLAN_VERSION + 1, "newer than this dynamize"),
                                              (PLAN_VERSION - 1, "older dynamize"), (None, "older dynamize")])
def test_other_versions_are_refused(version, message):
    d = small_plan().to_dict()
    if version is None:
        del d["version"]
    else:
        d["version"] = version
    with pytest.raises(RunError, match=message):
        GatePlan.from_dict(d)


@pytest.mark.parametrize("change", [
    lambda d: d.pop("architecture"),
    lambda d: d["blocks"][0].pop("fork"),
    lambda d: d["groups"][0].update(colour="red"),
    lambda d: d.update(version="two"),
    lambda d: d.update(costs=[["stem", 200]]),
])
def test_malformed_plans_are_refused(change):
    d = small_plan().to_dict()
    change(d)
    with pytest.raises(RunError, match="malformed"):
        GatePlan.from_dict(d)


def test_unknown_gate_kind_is_refused():
    d = small_plan().to_dict()
    d["gates"] = "all"
    with pytest.raises(RunError, match="unknown gates 'all'"):
        GatePlan.from_dict(d)


def test_unknown_channel_mode_is_refused():
    d = small_plan().to_dict()
    d["channel_mode"] = "narrow"
    with pytest.raises(RunError, match="unknown channel mode 'narrow'"):
        GatePlan.from_dict(d)
