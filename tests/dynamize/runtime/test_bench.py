"""The benchmark's results: what the cheap and the dear images of a batch-1 run cost."""
import pytest

from dynamize.runtime.bench import BenchResult


def test_by_cost_splits_the_passes_by_their_flops():
    passes = [(0.1, 2.0), (0.5, 4.0), (0.2, 3.0), (0.9, 9.0), (0.3, 1.0), (0.7, 8.0)]
    r = BenchResult("m", 1, 0.45, 5.0, 4.0, 5.0, 5.0, 1.0, 9.0, 1.2, 1.0, 1.5, 6, 1, "learned", "test", passes)
    cheap, dear = r.by_cost()
    assert cheap == (pytest.approx(0.15), 2.5) and dear == (pytest.approx(0.8), 8.5)
    assert r.to_dict()["passes"] == passes
