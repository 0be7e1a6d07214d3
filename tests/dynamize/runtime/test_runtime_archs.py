"""The fast path equals the masked graph on every architecture of the conversion sweep, with mixed decisions.

Tolerance: 1e-4, relative to the output's magnitude where that exceeds 1. Random weights and norm statistics give some
architectures logits in the hundreds (dla34: ~500), where float32 rounding alone moves the masked graph itself by
~2e-4 from a float64 evaluation.
"""
import pytest
import timm
import torch
from helpers import ARCHS, NOT_GATEABLE, randomize

import dynamize
from dynamize.runtime import use_runtime
from dynamize.runtime.bench import force_random, release


@pytest.mark.slow
@pytest.mark.parametrize("channel_mode, residual_outputs", [("channel", False), ("width", False), ("channel", True)],
                         ids=["channel", "width", "residual-outputs"])
@pytest.mark.parametrize("name", sorted(set(ARCHS) - set(NOT_GATEABLE)))
def test_fast_path_equals_masked_graph(name, channel_mode, residual_outputs):
    size = ARCHS[name]
    net = dynamize.convert(randomize(timm.create_model(name, num_classes=7)), img_size=size,
                           channel_mode=channel_mode, residual_outputs=residual_outputs).eval()
    generator = torch.Generator().manual_seed(0)
    try:
        # Batch 1; batch 5 with the batch's union of channels and with per-image channels. Channels-last last, as
        # the bench runs it.
        for batch, mode, memory_format in [(1, "auto", torch.contiguous_format), (5, "union", torch.contiguous_format),
                                           (5, "split", torch.contiguous_format), (5, "auto", torch.channels_last)]:
            net = net.to(memory_format=memory_format)
            x = torch.randn(batch, 3, size, size, generator=generator).contiguous(memory_format=memory_format)
            force_random(net, 0.5, batch, generator)  # each image keeps its own half of the blocks and channels
            with torch.no_grad():
                expected = use_runtime(net, None)(x)
                got = use_runtime(net, mode)(x)
            tol = 1e-4 * max(1.0, expected.abs().max().item())
            torch.testing.assert_close(got, expected, atol=tol, rtol=0, msg=f"batch {batch}, {mode}")
    finally:
        release(net)
