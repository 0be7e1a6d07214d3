"""The jobs behind the CLI: settling a gated model to its budget."""
import pytest

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


def test_the_calibration_cut_is_a_share_of_what_the_gates_learned_to_spend():
    assert jobs.calibration_cut(0.098, 0.05) > jobs._MAX_CALIBRATION_CUT  # 85.2% at 0.05: warned
    assert jobs.calibration_cut(0.69, 0.3) > jobs._MAX_CALIBRATION_CUT  # MobileNetV2's collapse: warned
    assert jobs.calibration_cut(0.064, 0.05) < jobs._MAX_CALIBRATION_CUT  # 89.9% at 0.05: not warned
    assert jobs.calibration_cut(0.43, 0.3) < jobs._MAX_CALIBRATION_CUT  # kept its accuracy: not warned
    assert jobs.calibration_cut(0.24, 0.25) == 0.0  # below the budget: nothing to cut
    assert jobs.calibration_cut(0.08, 0.05) == pytest.approx(0.375)
