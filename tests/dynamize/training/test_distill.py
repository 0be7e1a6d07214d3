"""Budget-controlled distillation on a tiny model and data set: the penalty moves the FLOPs toward the target."""
import timm
from helpers import randomize

import dynamize
from dynamize.training.calibrate import mean_fraction
from dynamize.training.data import DataSpec, datasets, loader
from dynamize.training.distill import BudgetDistillationTask, configure_gates, param_groups
from dynamize.training.loop import fit
from dynamize.training.recipe import load_recipe

SIZE = 32


def _recipe(folder, **kw):
    values = dict(model="test_resnet", data=str(folder), img_size=SIZE, in_chans=3, epochs=2, batch_size=8,
                  calib_size=6, workers=0, lr_backbone=1e-3, lr_gates=1e-2)
    values.update(kw)
    return load_recipe(None, **values)


def _student_teacher(classes=3):
    teacher = randomize(timm.create_model("test_resnet", num_classes=classes)).eval()
    return dynamize.convert(teacher, img_size=SIZE), teacher


def test_budget_penalty_moves_flops_toward_target(image_folder, tmp_path):
    recipe = _recipe(image_folder, budget=0.3, epochs=3, budget_weight=20.0, lr_gates=0.2, anneal_fraction=0.2)
    train, calib, _ = datasets(DataSpec(recipe.data, None, SIZE, 3), recipe.calib_size)
    student, teacher = _student_teacher()
    configure_gates(student, "both", 1.0)
    task = BudgetDistillationTask(student, teacher, recipe)
    before = mean_fraction(student, loader(calib, 16))
    history = fit(task, student, train, recipe, tmp_path / "run", param_groups(student, recipe))
    after = mean_fraction(student, loader(calib, 16))
    assert before > 0.99
    assert history[-1]["train_flops"] < history[0]["train_flops"] - 0.05 and after < before - 0.02
