"""The jobs behind the CLI: settling a gated model to its budget."""
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
