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
        frac, right = (0.2565, 1.0) if t == 0.0 else (0.2505, 0.8) if t > 0 else (0.32, 1.0)
        top5 = torch.zeros(100, 5, dtype=torch.long)
        top5[int(100 * right):, 0] = 1
        return {"fractions": torch.full((100,), frac), "top5": top5, "labels": labels}

    monkeypatch.setattr(calibrate_module, "predict", landscape)
    result = calibrate(student, [], 0.25)
    assert result["offsets"] == {"layer": 0.0, "channel": 0.0} and result["top1"] == 100.0
