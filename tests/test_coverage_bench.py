"""benchmarks/coverage.py's exactness check: what the converted model computes, not float32 rounding amplified."""
import importlib.util
from pathlib import Path

import timm
import torch
from helpers import randomize

from dynamize.runtime.layers import SlicedLayer

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py"


def _coverage():
    spec = importlib.util.spec_from_file_location("coverage_bench", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_chaotic_net_is_exact_on_the_fast_path():
    """Randomised efficientnetv2_rw_t at 64 px amplifies a 1e-7 change of its input to ~0.4 of its logits, so the
    fast path's folded norms (which round otherwise than conv-then-norm) were 0.57 off in float32: "wrong" in
    coverage, though every unit agrees with the masked graph to 1e-14 in float64. The check runs in float64."""
    model = randomize(timm.create_model("efficientnetv2_rw_t", num_classes=7)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        moved = model(x * (1 + 1e-7))
    assert (moved - ref).abs().max() > 1e-2 * ref.abs().max()  # the premise: float32 rounding alone is not 1e-5
    row = _coverage().check("efficientnetv2_rw_t", 64)
    assert row["exact"] and row["reloads"] and row["result"] == "gated", row


def test_a_float32_only_error_of_the_fast_path_is_wrong(monkeypatch):
    """The float64 check cannot see a fault of the float32 fast path alone; the float32 one must, on a net whose
    output float32 rounding barely moves."""
    forward = SlicedLayer.forward

    def off_in_float32(self, x, inp, out):
        y = forward(self, x, inp, out)
        return y * (1 + 1e-3) if y.dtype == torch.float32 else y

    coverage = _coverage()
    assert coverage.check("resnet18", 32)["result"] == "gated"
    monkeypatch.setattr(SlicedLayer, "forward", off_in_float32)
    row = coverage.check("resnet18", 32)
    assert row["result"] == "wrong" and row["float32_error"] > 10 * row["float32_rounding"], row
