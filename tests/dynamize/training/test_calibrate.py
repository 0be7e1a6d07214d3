"""Calibration: thresholds moved so that the mean FLOPs fraction on held-out data meets the budget."""
import pytest
import timm
import torch
from helpers import randomize

import dynamize
from dynamize.training.calibrate import calibrate, mean_fraction
from dynamize.training.data import DataSpec, datasets, loader

SIZE = 32


def test_calibration_meets_budget_on_its_split(image_folder):
    student = dynamize.convert(randomize(timm.create_model("test_resnet", num_classes=3)), img_size=SIZE)
    with torch.no_grad():  # trained-looking gates: logits that vary with the input
        for _, _, gate in student.gates():
            gate.mlp[-1].weight.normal_(0, 2.0)
    _, calib, _ = datasets(DataSpec(str(image_folder), None, SIZE, 3), 30)
    data = loader(calib, 16)
    for budget in (0.5, 0.8):
        result = calibrate(student, data, budget)
        assert abs(mean_fraction(student, data) - budget) <= 0.02
        assert result["fraction"] == pytest.approx(mean_fraction(student, data))
