"""The jobs behind the CLI: settling a gated model to its budget."""
from types import SimpleNamespace

import pytest
from rich.console import Console

from dynamize.training import jobs
from dynamize.training.recipe import Recipe


def test_settling_counts_the_settings_of_every_round(monkeypatch):
    """Settling repeats calibration while the fraction drifts off the budget; what it reports (and the progress it
    shows) covers every round, not only the last."""
    fractions = iter([0.9, 0.4, 0.45, 0.5])  # before settling, then after each round

    def calibrate(model, data, budget, progress):
        for n in (1, 2, 3):
            progress(n)
        return {"thresholds": {}, "fraction": budget, "top1": 0.0, "moved": "both", "tried": 3}

    monkeypatch.setattr(jobs, "calibrate", calibrate)
    monkeypatch.setattr(jobs, "mean_fraction", lambda model, data: next(fractions))
    monkeypatch.setattr(jobs, "reestimate_batchnorm", lambda model, data, images: None)
    shown: list[int] = []
    cal = jobs.settle(None, [], Recipe(budget=0.5), progress=shown.append)
    assert cal["tried"] == 9 and shown == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert cal["fraction"] == 0.5 and cal["trained_fraction"] == 0.9 and cal["seconds"] >= 0
    assert jobs._settled(cal).endswith("in 0 s, 9 threshold settings evaluated")


@pytest.mark.parametrize("trained, budget, floor, warned", [  # outcomes: docs/benchmarks.md
    (0.098, 0.05, 0.036, True),  # 77% of the FLOPs above the floor cut: ended at 85.2%
    (0.081, 0.05, 0.036, True),  # 69%: 88.9%
    (0.095, 0.05, 0.036, True),  # 76%: 87.8%
    (0.69, 0.3, 0.231, True),  # 85%: MobileNetV2's collapse
    (0.297, 0.25, 0.231, True),  # 71%: MobileNetV2 85.5%, although only 16% of all its FLOPs
    (0.064, 0.05, 0.036, False),  # 50%: 89.9%
    (0.066, 0.05, 0.036, False),  # 53%: 89.6%
    (0.269, 0.25, 0.231, False),  # 50%: MobileNetV2 89.3%
    (0.43, 0.3, 0.036, False),  # 33%: kept its accuracy
    (0.24, 0.25, 0.036, False),  # below the budget: nothing to cut
])
def test_settling_warns_when_calibration_cuts_much_of_what_the_gates_learned(monkeypatch, trained, budget, floor,
                                                                            warned):
    fractions = iter([trained, budget])
    monkeypatch.setattr(jobs, "min_fraction", lambda plan, kinds: floor)
    monkeypatch.setattr(jobs, "calibrate", lambda model, data, b, progress: {"fraction": b, "tried": 1})
    monkeypatch.setattr(jobs, "mean_fraction", lambda model, data: next(fractions))
    monkeypatch.setattr(jobs, "reestimate_batchnorm", lambda model, data, images: None)
    console = Console(record=True, width=400)
    jobs.settle(SimpleNamespace(plan=None), [], Recipe(budget=budget), console=console)
    text = console.export_text()
    assert ("warning:" in text) == warned
    if warned:
        assert f"will cut {jobs.calibration_cut(trained, budget, floor):.0%}" in text and "budget_weight" in text
        assert f"smallest reachable fraction {floor:.3f}" in text
