"""Budget-controlled distillation on a tiny model and data set: the gates reach the budget in training, then settle."""
import json
import os
import signal

import pytest
import timm
import torch
from helpers import make_image_folder, randomize, run_gloo
from torch import nn

import dynamize
from dynamize.graph.cost import min_fraction
from dynamize.training.calibrate import mean_fraction
from dynamize.training.data import DataSpec, datasets, loader
from dynamize.training.distill import BudgetDistillationTask, configure_gates, param_groups
from dynamize.training.loop import Distributed, Interrupted, fit
from dynamize.training.recipe import load_recipe

SIZE = 32


def _setup(tmp_path, channel_mode="channel", **kw):
    folder = make_image_folder(tmp_path / "data", per_class=40)
    values = dict(model="test_resnet", data=str(folder), img_size=SIZE, in_chans=3, epochs=6, batch_size=8,
                  calib_size=24, workers=0, lr_backbone=1e-3, lr_gates=0.05, anneal_fraction=0.3)
    values.update(kw)
    recipe = load_recipe(None, **values)
    train, calib, _ = datasets(DataSpec(recipe.data, None, SIZE, 3), recipe.calib_size)
    teacher = randomize(timm.create_model("test_resnet", num_classes=3)).eval()
    student = dynamize.convert(teacher, img_size=SIZE, channel_mode=channel_mode)
    configure_gates(student, recipe.gates, recipe.gumbel_tau, recipe.static_gates)
    return recipe, train, loader(calib, 24), student, teacher


@pytest.mark.parametrize("channel_mode", ["channel", "width"])
def test_gates_reach_the_budget_in_training(tmp_path, channel_mode):
    recipe, train, calib, student, teacher = _setup(tmp_path, channel_mode, budget=0.4, settle_fraction=0.0)
    before = mean_fraction(student, calib)
    task = BudgetDistillationTask(student, teacher, recipe)
    history = fit(task, student, train, recipe, tmp_path / "run", param_groups(student, recipe))
    after = mean_fraction(student, calib)  # deterministic decisions, thresholds untouched: no calibration
    assert before > 0.99
    assert abs(after - 0.4) < 0.1 and abs(history[-1]["train_flops"] - 0.4) < 0.1


def test_settling_calibrates_once_then_freezes_the_gates(tmp_path):
    recipe, train, calib, student, teacher = _setup(tmp_path, budget=0.5, epochs=2, settle_fraction=0.5)
    calls, norm = [], next(m for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    settled_stats = {}

    def settle():  # the statistics at settling are the ones inference uses: they stay
        calls.append(1)
        settled_stats.update(mean=norm.running_mean.clone(), weight=norm.weight.detach().clone())

    task = BudgetDistillationTask(student, teacher, recipe, settle=settle)
    gate = next(g for _, _, g in student.gates())
    before = gate.mlp[-1].weight.clone()
    fit(task, student, train, recipe, tmp_path / "run", param_groups(student, recipe))
    assert calls == [1]
    assert task.settled and all(not g.learning and g.noise == 0.0 for _, _, g in student.gates())
    assert not (gate.mlp[-1].weight == before).all()  # it learned before settling
    assert torch.equal(norm.running_mean, settled_stats["mean"])
    assert not torch.equal(norm.weight, settled_stats["weight"])  # the backbone, norms' weights included, trains


class _StopAt(BudgetDistillationTask):
    """Presses Ctrl-C before a given step (None: never), as a user stopping the run would."""

    def __init__(self, *args, at=None, **kw):
        super().__init__(*args, **kw)
        self.at = at

    def on_step(self, step, total):
        super().on_step(step, total)
        if step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def _ddp_settling_worker(rank, world, root, stop_at):
    """Fine-tune through the settle (step 6 of 12) on every rank; when rank 0 stops at `stop_at`, resume on a fresh
    student and task, as `dynamize finetune --resume` does. Each rank saves its student."""
    recipe, train, _, student, teacher = _setup(root / f"rank{rank}", budget=0.5, epochs=2, settle_fraction=0.5)
    try:
        fit(_StopAt(student, teacher, recipe, at=stop_at if rank == 0 else None), student, train, recipe,
            root / "run", param_groups(student, recipe), ddp=Distributed(rank, world))
    except Interrupted:
        recipe, train, _, student, teacher = _setup(root / f"rank{rank}-again", budget=0.5, epochs=2,
                                                    settle_fraction=0.5)
        fit(BudgetDistillationTask(student, teacher, recipe), student, train, recipe, root / "run",
            param_groups(student, recipe), resume=True, ddp=Distributed(rank, world))
    torch.save({k: v.clone() for k, v in student.state_dict().items()}, root / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [None, 7], ids=["straight", "resumed-after-the-settle"])
def test_ddp_fine_tuning_goes_on_after_the_gates_settle(tmp_path, stop_at):
    """Settling freezes the gates, so their parameters get no gradient from then on: DDP must not wait for them,
    also when a resume after the settle freezes them before the first step."""
    run_gloo(_ddp_settling_worker, 2, tmp_path, stop_at)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 12


def test_static_gates_give_every_image_the_same_decisions(tmp_path):
    """The static baseline of the same method: the gates learn (their decisions move towards the budget) but
    ignore the image, also after save and load."""
    recipe, train, calib, student, teacher = _setup(tmp_path, budget=0.4, epochs=2, settle_fraction=0.0,
                                                    static_gates=True)
    task = BudgetDistillationTask(student, teacher, recipe)
    fit(task, student, train, recipe, tmp_path / "run", param_groups(student, recipe))
    dynamize.save(student, tmp_path / "static")
    loaded = dynamize.load(tmp_path / "static").eval()
    images = torch.cat([x for x, _ in calib])
    with torch.no_grad():
        loaded(images)
    decisions = torch.cat([g.decisions for _, _, g in loaded.gates()], dim=1)
    assert (decisions == decisions[:1]).all()
    assert decisions.float().mean() < 1.0  # it learned to drop something
    assert all((g.mlp[0].weight == 0).all() for _, _, g in loaded.gates())


def test_budget_penalty_grows_near_the_smallest_reachable_fraction(tmp_path):
    recipe, train, _, student, teacher = _setup(tmp_path)
    floor = min_fraction(student.plan, "both")
    near = load_recipe(None, **{**recipe.to_dict(), "budget": round(floor + 0.01, 3)})
    plain = load_recipe(None, **{**near.to_dict(), "floor_margin": 0.0})
    images, labels = next(iter(loader(train, 8)))
    losses = {}
    for name, r in (("near", near), ("plain", plain)):
        task = BudgetDistillationTask(student, teacher, r)
        torch.manual_seed(0)  # the same gate noise for both
        losses[name] = task(images, labels)
    assert losses["plain"]["budget_loss"] == losses["near"]["budget_loss"] > 0
    weight = BudgetDistillationTask(student, teacher, near).budget_weight
    assert weight > 1.5 * recipe.budget_weight
    extra = (weight - recipe.budget_weight) * losses["near"]["budget_loss"]
    assert (losses["near"]["loss"] - losses["plain"]["loss"]).item() == pytest.approx(extra.item(), rel=1e-4)
    far = BudgetDistillationTask(student, teacher, recipe)  # budget 0.5: the recipe's weight
    assert far.budget_weight == recipe.budget_weight
