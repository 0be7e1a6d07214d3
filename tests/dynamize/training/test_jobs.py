"""The jobs behind the CLI: settling a gated model to its budget."""
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


@pytest.mark.parametrize("trained, budget, warned", [
    (0.098, 0.05, True),  # cut 49%: ended at 85.2% (docs/benchmarks.md)
    (0.081, 0.05, True),  # cut 38%: 88.9%, not warned by the old gap of 0.25 above the budget
    (0.69, 0.3, True),  # MobileNetV2's collapse
    (0.064, 0.05, False),  # cut 22%: 89.9%
    (0.43, 0.3, False),  # cut 30%: kept its accuracy
    (0.24, 0.25, False),  # below the budget: nothing to cut
])
def test_settling_warns_when_calibration_cuts_much_of_what_the_gates_learned(monkeypatch, trained, budget, warned):
    fractions = iter([trained, budget])
    monkeypatch.setattr(jobs, "calibrate", lambda model, data, b, progress: {"fraction": b, "tried": 1})
    monkeypatch.setattr(jobs, "mean_fraction", lambda model, data: next(fractions))
    monkeypatch.setattr(jobs, "reestimate_batchnorm", lambda model, data, images: None)
    console = Console(record=True, width=400)
    jobs.settle(None, [], Recipe(budget=budget), console=console)
    text = console.export_text()
    assert ("warning:" in text) == warned
    if warned:
        assert f"will cut {jobs.calibration_cut(trained, budget):.0%}" in text and "budget_weight" in text
