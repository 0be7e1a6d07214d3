"""Run directories: a run keeps its decisions through save and load, and `check_run` refuses a run that cannot be
trusted (newer version, damaged plan, missing, truncated or mismatched weights) without loading its tensors."""
import json
import shutil

import pytest
import timm
import torch
from helpers import randomize, randomize_gates
from safetensors.torch import save_file

import dynamize
from dynamize.errors import RunError
from dynamize.graph.gates import WidthGate
from dynamize.io.runs import check_run, load_base
from dynamize.training.calibrate import set_thresholds
from dynamize.training.distill import configure_gates


@pytest.mark.parametrize("kinds, closed", [("layer", "channel"), ("channel", "layer")])
def test_one_kind_run_keeps_its_decisions_after_save_and_load(tmp_path, kinds, closed):
    net = randomize_gates(dynamize.convert(randomize(timm.create_model("test_resnet", num_classes=3)), img_size=32))
    configure_gates(net, kinds, 1.0)
    set_thresholds(net, {"layer": 3.5, "channel": 3.5})  # above the untrained gates' open logit (+3)
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        before = net.eval()(images)
        decisions = {name: gate.last_keep.clone() for _, name, gate in net.gates()}
        loaded = dynamize.load(dynamize.save(net, tmp_path / "run"))
        after = loaded(images)
    assert torch.allclose(before, after, atol=1e-5)
    assert all(torch.equal(gate.last_keep, decisions[name]) for _, name, gate in loaded.gates())
    untrained = [gate for kind, _, gate in loaded.gates() if kind == closed]
    assert untrained and not any(gate.is_active for gate in untrained)
    assert any(bool(gate.last_keep.all()) for gate in untrained)  # open (where their block runs)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    net = dynamize.convert(timm.create_model("test_resnet", num_classes=3), img_size=32)
    return dynamize.save(net, tmp_path_factory.mktemp("runs") / "good")


def _damaged(good_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    config = json.loads((run / "config.json").read_text())
    weights = run / "model.safetensors"
    if damage == "newer version":
        config["dynamize"]["version"] = "99.0.0"
    elif damage == "no version":
        del config["dynamize"]["version"]
    elif damage == "garbled version":
        config["dynamize"]["version"] = "x.y"
    elif damage == "plan":
        config["dynamize"]["plan"]["blocks"] = [{"name": "x"}]
    elif damage == "missing weights":
        weights.unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "other shapes":
        save_file(timm.create_model("test_resnet", num_classes=5).state_dict(), str(weights))
    (run / "config.json").write_text(json.dumps(config))
    return run


@pytest.mark.parametrize("damage, message", [("newer version", "newer"), ("plan", "malformed"),
                                             ("no version", "no valid dynamize version \\(None\\); write the run"),
                                             ("garbled version", "no valid dynamize version \\('x.y'\\)"),
                                             ("missing weights", "no model.safetensors"),
                                             ("truncated weights", "not a valid safetensors"),
                                             ("other shapes", "does not match")])
def test_check_run_refuses_what_cannot_be_trusted(good_run, tmp_path, damage, message):
    assert check_run(good_run).plan is not None
    with pytest.raises(RunError, match=message):
        check_run(_damaged(good_run, tmp_path, damage))


def test_width_run_round_trips_its_reordered_weights(tmp_path):
    base = randomize(timm.create_model("test_efficientnet", num_classes=3)).eval()
    net = randomize_gates(dynamize.convert(base, img_size=64, channel_mode="width")).eval()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        before = net(images)
        loaded = dynamize.load(dynamize.save(net, tmp_path / "run"))
        after = loaded(images)
        original, teacher = base(images), load_base(tmp_path / "run")(images)
    assert loaded.plan.to_dict() == net.plan.to_dict() and loaded.plan.channel_mode == "width"
    assert all(isinstance(loaded.channel_gate(g.name), WidthGate) for g in loaded.plan.groups if g.widths)
    assert torch.equal(before, after)
    # The original model inside the run is the reordered one: other weights, the same function.
    assert (teacher - original).abs().max() <= 1e-5 * original.abs().max()
