"""Prepared weights: BatchNorm folded exactly, built once, rebuilt when the weights they come from change."""
import pytest
import torch
from helpers import randomize

from dynamize.runtime.packing import Packed, folded


def test_folded_conv_equals_conv_then_norm():
    conv, bn = torch.nn.Conv2d(4, 6, 3, padding=1), randomize(torch.nn.BatchNorm2d(6)).eval()
    packed = folded(conv, bn).get()
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, packed.weight, packed.bias, padding=1), bn(conv(x)),
                               atol=1e-5, rtol=0)
    assert packed.channels_last is None and packed.transposed is None


def test_channels_last_copy_for_a_channels_last_model():
    conv = torch.nn.Conv2d(4, 6, 3).to(memory_format=torch.channels_last)
    packed = folded(conv).get()
    assert packed.weight.is_contiguous()  # gathers read the NCHW copy
    assert packed.channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(packed.channels_last, conv.weight)


def test_transposed_copy_for_input_gathers():
    fc = torch.nn.Linear(5, 3)
    packed = folded(fc, transposed=True).get()
    assert torch.equal(packed.weight, fc.weight) and torch.equal(packed.bias, fc.bias)
    assert torch.equal(packed.transposed, fc.weight.t()) and packed.transposed.is_contiguous()


def test_packed_is_built_once_and_rebuilt_when_a_source_changes():
    conv = torch.nn.Conv2d(2, 2, 1)
    builds = []
    packed = Packed(lambda: (conv.weight,), lambda w: builds.append(1) or w.sum().item())
    first = packed.get()
    assert packed.get() == first and len(builds) == 1
    with torch.no_grad():
        conv.weight.add_(1.0)  # in place: an optimizer step, or load_state_dict's copy_
    assert packed.get() == pytest.approx(first + 4) and len(builds) == 2
    conv.weight = torch.nn.Parameter(torch.zeros(2, 2, 1, 1))  # a new tensor: .to(), assign=True loads
    assert packed.get() == 0 and len(builds) == 3
