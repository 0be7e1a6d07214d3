"""Fine-tuning mechanics on a tiny model and data set: budget penalty, calibration, resume, DDP."""
import os
import signal

import pytest
import timm
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from timm.task import ClassificationTask

import dynamize
from conftest import randomize
from dynamize.data import DataSpec, datasets, loader
from dynamize.distill import BudgetDistillationTask, budget_target, configure_gates
from dynamize.evaluate import calibrate, mean_fraction
from dynamize.recipes import load_recipe
from dynamize.train import Distributed, Interrupted, TrainingError, fit

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
    history = fit(task, student, train, recipe, tmp_path / "run",
                  on_step=lambda p: setattr(task, "target", budget_target(p, recipe.budget, recipe.anneal_fraction)))
    after = mean_fraction(student, loader(calib, 16))
    assert before > 0.99
    assert history[-1]["train_flops"] < history[0]["train_flops"] - 0.05 and after < before - 0.02


def test_calibration_meets_budget_on_its_split(image_folder):
    student, _ = _student_teacher()
    with torch.no_grad():  # trained-looking gates: logits that vary with the input
        for _, _, gate in student.gates():
            gate.mlp[-1].weight.normal_(0, 2.0)
    _, calib, _ = datasets(DataSpec(str(image_folder), None, SIZE, 3), 30)
    data = loader(calib, 16)
    for budget in (0.5, 0.8):
        result = calibrate(student, data, budget)
        assert abs(mean_fraction(student, data) - budget) <= 0.02
        assert result["fraction"] == pytest.approx(mean_fraction(student, data))


def _train_plain(folder, out, interrupt_at=None, resume=False):
    recipe = _recipe(folder, checkpoint_every=2)
    train, _, _ = datasets(DataSpec(recipe.data, None, SIZE, 3), recipe.calib_size)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)

    def on_step(progress):
        if interrupt_at is not None and round(progress * 2 * (len(train) // 8)) == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)

    fit(ClassificationTask(model, verbose=False), model, train, recipe, out, resume=resume, on_step=on_step)
    return model.state_dict()


def test_resume_after_interrupt_matches_uninterrupted_run(image_folder, tmp_path):
    reference = _train_plain(image_folder, tmp_path / "a")
    with pytest.raises(Interrupted, match="resume"):
        _train_plain(image_folder, tmp_path / "b", interrupt_at=3)
    assert (tmp_path / "b" / "checkpoints" / "last" / "model.safetensors").is_file()
    resumed = _train_plain(image_folder, tmp_path / "b", resume=True)
    assert all(torch.allclose(reference[k].float(), resumed[k].float(), atol=1e-6) for k in reference)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def _ddp_worker(rank, world, folder, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    recipe = _recipe(folder)
    train, _, _ = datasets(DataSpec(recipe.data, None, SIZE, 3), recipe.calib_size)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    fit(ClassificationTask(model, verbose=False), model, train, recipe, out, ddp=Distributed(rank, world))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out.parent / f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def test_two_process_gloo_ddp_keeps_ranks_identical(image_folder, tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(2, image_folder, tmp_path / "run", port), nprocs=2, join=True)
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = timm.create_model("test_resnet", num_classes=3).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a if k.endswith("weight"))


class _NaNAfter(ClassificationTask):
    """A task whose loss turns NaN at a given step, as a diverging run's would."""

    def __init__(self, model, step):
        super().__init__(model, verbose=False)
        self.calls, self.step = 0, step

    def forward(self, input, target):
        out = super().forward(input, target)
        self.calls += 1
        if self.calls > self.step:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(image_folder, tmp_path):
    recipe = _recipe(image_folder, checkpoint_every=1)
    train, _, _ = datasets(DataSpec(recipe.data, None, SIZE, 3), recipe.calib_size)
    model = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(TrainingError, match="at step 2"):
        fit(_NaNAfter(model, 2), model, train, recipe, tmp_path / "run")
    ckpt = load_file(str(tmp_path / "run" / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in ckpt.values())
