"""Escalation to the original model: which images escalate, what they answer and cost, and the budget's threshold."""
import pytest
import timm
import torch
from helpers import randomize, randomize_gates

import dynamize
from dynamize.graph.cost import flops_per_image, min_fraction
from dynamize.runtime.bench import bench
from dynamize.runtime.cascade import Cascade, confidence, escalation_threshold
from dynamize.training.evaluate import predict, summarize


def _cascade() -> Cascade:
    gated = randomize_gates(dynamize.convert(randomize(timm.create_model("test_resnet", num_classes=3)),
                                             img_size=32)).eval()
    torch.manual_seed(1)
    original = randomize(timm.create_model("test_resnet", num_classes=3)).eval()
    return Cascade(gated, original, float("-inf"))


@torch.no_grad()
def test_escalated_images_take_the_original_answer_and_pay_for_it():
    model = _cascade()
    images = torch.randn(8, 3, 32, 32)
    gated_logits = model.gated(images)
    gated_fractions = flops_per_image(model.gated)
    model.threshold = confidence(gated_logits).median().item()
    logits = model(images)
    escalated = model.escalated
    assert escalated.sum() == 4  # the median and the three below it
    torch.testing.assert_close(logits[~escalated], gated_logits[~escalated])
    torch.testing.assert_close(logits[escalated], model.original(images)[escalated], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits[escalated], gated_logits[escalated])
    torch.testing.assert_close(model.flops_per_image(), gated_fractions + escalated.float())


def test_the_threshold_escalates_the_least_confident_images_the_budget_pays_for():
    g = torch.Generator().manual_seed(0)
    confidences, fractions = torch.rand(100, generator=g), torch.full((100,), 0.2)
    threshold = escalation_threshold(confidences, fractions, 0.45)
    escalated = confidences <= threshold
    assert escalated.sum() == 25  # 0.2 + 25 / 100 = 0.45
    assert confidences[escalated].max() < confidences[~escalated].min()
    assert escalation_threshold(confidences, fractions, 0.205) == float("-inf")  # not even one image
    assert (confidences <= escalation_threshold(confidences, fractions, 1.2)).all()


def test_a_cascade_is_evaluated_with_its_escalations():
    model = _cascade()
    images = torch.randn(16, 3, 32, 32)
    alone = predict(model, [(images, torch.zeros(16, dtype=torch.long))])
    model.threshold = escalation_threshold(alone["confidence"], alone["fractions"], alone["fractions"].mean() + 0.25)
    result = summarize(predict(model, [(images, torch.zeros(16, dtype=torch.long))]))
    assert result["escalated"] == pytest.approx(0.25)
    assert result["flops_mean"] == pytest.approx(alone["fractions"].mean().item() + 0.25, abs=1e-6)
    assert result["adaptivity"]["p95"] > 1 > result["adaptivity"]["p5"]


@pytest.mark.parametrize("threshold", [float("-inf"), float("inf")])
def test_a_cascade_is_timed_with_what_its_images_cost(threshold):
    model = _cascade()
    model.threshold = threshold  # no image escalates, or every image does
    (result,) = bench(model, model.original, "cascade", [2], 32, repeats=2, warmup=0)
    most = 1 + model.plan.gate_flops / model.plan.total_flops  # every gate open
    assert min_fraction(model.plan) <= result.fraction - (threshold > 0) <= most
    assert (result.fraction > 1) == (threshold > 0)
