"""Accuracy and adaptivity: the per-image FLOPs spread and decision patterns of a model with known decisions."""
import math

import pytest
import timm
import torch
from helpers import randomize

import dynamize
from dynamize.training.evaluate import STATIC_SPREAD, adaptivity, predict, summarize


def test_adaptivity_of_forced_known_decisions():
    net = dynamize.convert(randomize(timm.create_model("test_resnet", num_classes=3)), img_size=32).eval()
    block = net.plan.blocks[-1]
    gate = net.block_gate(block.name)
    gate.forced = torch.tensor([[0.0], [1.0], [1.0], [1.0]])  # one image of four skips the last block
    images = torch.randn(4, 3, 32, 32)
    try:
        pred = predict(net, [(images, torch.zeros(4, dtype=torch.long))])
    finally:
        gate.forced = None
    f = pred["fractions"]
    assert f[1] == f[2] == f[3] and f[0] < f[1]
    inner = [g for g in net.plan.groups if g.block == block.name]  # their C-Nets do not run either
    saved = (block.flops + sum(g.gate_flops for g in inner)) / net.plan.total_flops
    assert (f[1] - f[0]).item() == pytest.approx(saved, rel=1e-5)
    a = summarize(pred)["adaptivity"]
    assert a["patterns"] == 2
    assert a["pattern_entropy_bits"] == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))
    assert a["p5"] == pytest.approx(torch.quantile(f, 0.05).item()) and a["spread"] > 0


def test_same_compute_for_every_image_is_called_nearly_static():
    a = adaptivity(torch.full((100,), 0.5) + torch.linspace(0, STATIC_SPREAD / 2, 100), torch.zeros(100))
    assert a["nearly_static"] and a["patterns"] == 1 and a["pattern_entropy_bits"] == 0
    assert f"{a['pattern_entropy_bits']:.1f}" == "0.0"  # printed as such, not as -0.0
    assert not adaptivity(torch.linspace(0.2, 0.6, 100))["nearly_static"]
