"""Calibration: thresholds moved so that the mean FLOPs fraction on held-out data meets the budget."""
import pytest
import timm
import torch
from helpers import randomize

import dynamize
from dynamize.training import calibrate as calibrate_module
from dynamize.training.calibrate import calibrate, mean_fraction
from dynamize.training.data import DataSpec, datasets, loader

SIZE = 32


@pytest.mark.parametrize("channel_mode", ["channel", "width"])
def test_calibration_meets_budget_on_its_split(image_folder, channel_mode):
    student = dynamize.convert(randomize(timm.create_model("test_resnet", num_classes=3)), img_size=SIZE,
                               channel_mode=channel_mode)
    with torch.no_grad():  # trained-looking gates: logits that vary with the input
        for _, _, gate in student.gates():
            gate.mlp[-1].weight.normal_(0, 2.0)
    _, calib, _ = datasets(DataSpec(str(image_folder), None, SIZE, 3), 30)
    data = loader(calib, 16)
    for budget in (0.5, 0.8):
        result = calibrate(student, data, budget)
        assert abs(mean_fraction(student, data) - budget) <= 0.02
        assert result["fraction"] == pytest.approx(mean_fraction(student, data))


def test_trained_thresholds_that_meet_the_budget_stay(monkeypatch):
    """A fraction that jumps when the thresholds move (one skipped block changes later decisions): calibration
    keeps the trained thresholds when they meet the budget within the tolerance, rather than land on a cliff."""
    student = dynamize.convert(randomize(timm.create_model("test_resnet", num_classes=3)), img_size=SIZE)
    labels = torch.zeros(100, dtype=torch.long)

    def landscape(model, data):
        t = float(next(g for _, _, g in model.gates()).threshold)
        frac, right = (0.2535, 1.0) if t == 0.0 else (0.2505, 0.8) if t > 0 else (0.32, 1.0)
        top5 = torch.zeros(100, 5, dtype=torch.long)
        top5[int(100 * right):, 0] = 1
        return {"fractions": torch.full((100,), frac), "top5": top5, "labels": labels}

    monkeypatch.setattr(calibrate_module, "predict", landscape)
    result = calibrate(student, [], 0.25)
    assert set(result["thresholds"].values()) == {0.0} and result["top1"] == 100.0


def test_the_search_keeps_away_from_a_cliff_that_bisection_falls_into(monkeypatch):
    """The trained thresholds miss the budget, a small move meets it, and a bigger move crosses a cliff (a block
    every image needs gets skipped: accuracy falls and the fraction rises) beyond which the fraction meets the
    budget again, with the accuracy lost. A bisection over the offset range lands beyond the cliff; the search
    keeps the small move."""
    student = dynamize.convert(randomize(timm.create_model("test_resnet", num_classes=3)), img_size=SIZE,
                               gates="layer")
    labels = torch.zeros(100, dtype=torch.long)

    def landscape(model, data):
        t = float(next(g for _, _, g in model.gates()).threshold)
        frac, right = ((0.32, 1.0) if t < 0 else (0.265, 1.0) if t == 0 else (0.252, 1.0) if t < 0.1 else
                       (0.29, 0.8) if t < 1 else (0.25, 0.8) if t < 2 else (0.2, 0.7))
        top5 = torch.zeros(100, 5, dtype=torch.long)
        top5[int(100 * right):, 0] = 1
        return {"fractions": torch.full((100,), frac), "top5": top5, "labels": labels}

    monkeypatch.setattr(calibrate_module, "predict", landscape)
    result = calibrate(student, [], 0.25)
    moved = {float(g.threshold) for _, _, g in student.gates()}
    assert len(moved) == 1 and 0 < moved.pop() < 0.1 and result["top1"] == 100.0


def test_single_layer_gates_move_when_every_common_offset_crosses_a_cliff(monkeypatch):
    """The first block is needed by every image and its gate sits just above its threshold: any common offset
    skips it. Moving another layer gate alone meets the budget at full accuracy."""
    student = dynamize.convert(randomize(timm.create_model("test_resnet", num_classes=3)), img_size=SIZE,
                               gates="layer")
    labels = torch.zeros(100, dtype=torch.long)

    def landscape(model, data):
        first, *others = [float(g.threshold) for _, _, g in model.gates()]
        frac, right = (0.29, 0.8) if first > 0 else (0.262 - 0.01 * sum(t > 0 for t in others), 1.0)
        top5 = torch.zeros(100, 5, dtype=torch.long)
        top5[int(100 * right):, 0] = 1
        return {"fractions": torch.full((100,), frac), "top5": top5, "labels": labels}

    monkeypatch.setattr(calibrate_module, "predict", landscape)
    result = calibrate(student, [], 0.25)
    first, *others = [float(g.threshold) for _, _, g in student.gates()]
    assert result["top1"] == 100.0 and abs(result["fraction"] - 0.25) <= 0.008
    assert first == 0 and sum(t > 0 for t in others) == 1 and result["moved"].startswith("layer:")


def test_a_setting_above_the_budget_needs_to_be_close(monkeypatch):
    """More FLOPs usually buy accuracy: a setting 0.007 above the budget (within the tolerance, but in its upper
    half) loses to a slightly less accurate one just below it."""
    student = dynamize.convert(randomize(timm.create_model("test_resnet", num_classes=3)), img_size=SIZE,
                               gates="layer")
    labels = torch.zeros(100, dtype=torch.long)

    def landscape(model, data):
        t = float(next(g for _, _, g in model.gates()).threshold)
        frac, right = (0.257, 1.0) if t <= 0 else (0.248, 0.99)
        top5 = torch.zeros(100, 5, dtype=torch.long)
        top5[int(100 * right):, 0] = 1
        return {"fractions": torch.full((100,), frac), "top5": top5, "labels": labels}

    monkeypatch.setattr(calibrate_module, "predict", landscape)
    result = calibrate(student, [], 0.25)
    assert result["fraction"] == pytest.approx(0.248, abs=1e-6) and result["top1"] == pytest.approx(99.0)


def test_a_gate_moved_alone_stops_where_it_keeps_no_image(monkeypatch):
    """Past its largest logit on the data a layer gate keeps no image, and moving it further changes nothing: its
    walk stops there, with the same choice as a walk through every step, in fewer evaluations."""
    logit = 0.5
    student = dynamize.convert(randomize(timm.create_model("test_resnet", num_classes=3)), img_size=SIZE,
                               gates="layer")
    with torch.no_grad():  # every image's keep logit is `logit`
        for _, _, gate in student.gates():
            gate.mlp[-1].weight.zero_()
            gate.mlp[-1].bias[0] = logit
    data = [(torch.randn(2, 3, SIZE, SIZE), torch.zeros(2, dtype=torch.long))]
    labels = torch.zeros(100, dtype=torch.long)
    evaluated = []

    def landscape(model, data):
        first, *others = [float(g.threshold) for _, _, g in model.gates()]
        evaluated.append((first, *others))
        skipped = sum(t >= logit for t in others)
        frac, right = (0.29, 0.8) if first > 0 else (0.262 - 0.01 * skipped, 1.0)
        top5 = torch.zeros(100, 5, dtype=torch.long)
        top5[int(100 * right):, 0] = 1
        return {"fractions": torch.full((100,), frac), "top5": top5, "labels": labels}

    monkeypatch.setattr(calibrate_module, "predict", landscape)
    results = []
    for ranges in (calibrate_module._logit_ranges, lambda *args: {}):  # with the stop, then without it
        monkeypatch.setattr(calibrate_module, "_logit_ranges", ranges)
        calibrate_module.set_thresholds(student, {"layer": 0.0})
        evaluated.clear()
        results.append(calibrate(student, data, 0.25))
        results[-1]["evaluations"] = len(set(evaluated))
    stopped, full = results
    assert stopped["thresholds"] == full["thresholds"] and stopped["top1"] == full["top1"] == 100.0
    assert stopped["tried"] == stopped["evaluations"] < full["evaluations"]
