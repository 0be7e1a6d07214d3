"""The generic training loop on a tiny model and data set: resume, Ctrl-C, NaN, DDP, plain progress lines."""
import io
import json
import os
import signal

import pytest
import timm
import torch
from helpers import make_image_folder, run_gloo
from rich.console import Console
from safetensors.torch import load_file, save_file
from timm.task import ClassificationTask

from dynamize.errors import RunError
from dynamize.training.data import DataSpec, datasets
from dynamize.training.loop import Distributed, Interrupted, TrainingError, fit, resume_recipe
from dynamize.training.recipe import load_recipe

SIZE = 32


def _recipe(folder, **kw):
    values = dict(model="test_resnet", data=str(folder), img_size=SIZE, in_chans=3, epochs=2, batch_size=8,
                  calib_size=6, workers=0, lr_backbone=1e-3, lr_gates=1e-2)
    values.update(kw)
    return load_recipe(None, **values)


class _Interrupting(ClassificationTask):
    """A task that presses Ctrl-C (or sends another signal) before a given step, through the loop's step hook."""

    def __init__(self, model, at, presses=1, signum=signal.SIGINT):
        super().__init__(model, verbose=False)
        self.at, self.presses, self.signum = at, presses, signum

    def on_step(self, step, total):
        if self.at is not None and step == self.at:
            for _ in range(self.presses):
                os.kill(os.getpid(), self.signum)


def _groups(model):
    return [{"params": list(model.parameters()), "lr": 1e-3, "weight_decay": 0.0}]


def _train_plain(folder, out, interrupt_at=None, resume=False, console=None, presses=1, signum=signal.SIGINT):
    recipe = _recipe(folder, checkpoint_every=2)
    train, _, _ = datasets(DataSpec(recipe.data, None, SIZE, 3), recipe.calib_size)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)

    fit(_Interrupting(model, interrupt_at, presses, signum), model, train, recipe, out, _groups(model), resume=resume,
        console=console)
    return model.state_dict()


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A folder data set and an uninterrupted run on it (weights, run directory), the reference of resumed runs."""
    root = tmp_path_factory.mktemp("loop")
    folder = make_image_folder(root / "data")
    return folder, _train_plain(folder, root / "ref"), root / "ref"


def test_a_second_ctrl_c_stops_at_once_and_the_run_resumes_from_its_last_periodic_checkpoint(uninterrupted,
                                                                                            tmp_path):
    """Inside a long step (a settle), waiting for the step to end would ignore the user for minutes."""
    image_folder, reference, _ = uninterrupted
    with pytest.raises(KeyboardInterrupt):
        _train_plain(image_folder, tmp_path / "b", interrupt_at=3, presses=2)
    state = json.loads((tmp_path / "b" / "checkpoints" / "last" / "state.json").read_text())
    assert state["progress"]["global_step"] <= 3  # stopped before step 3 ran: no checkpoint was written after it
    resumed = _train_plain(image_folder, tmp_path / "b", resume=True)
    assert _same(reference, resumed)


def test_resume_after_interrupt_matches_uninterrupted_run(uninterrupted, tmp_path):
    image_folder, reference, _ = uninterrupted
    with pytest.raises(Interrupted, match="resume"):
        _train_plain(image_folder, tmp_path / "b", interrupt_at=3)
    assert (tmp_path / "b" / "checkpoints" / "last" / "model.safetensors").is_file()
    text = io.StringIO()
    resumed = _train_plain(image_folder, tmp_path / "b", resume=True, console=Console(file=text, width=200))
    assert all(torch.allclose(reference[k].float(), resumed[k].float(), atol=1e-6) for k in reference)
    assert text.getvalue().startswith(f"resuming {tmp_path / 'b'} from its checkpoint at step 4 of 6\n")
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_sigterm_stops_after_the_step_with_a_checkpoint_as_ctrl_c_does(uninterrupted, tmp_path):
    """Batch schedulers and container runtimes send SIGTERM, then kill the job after a grace period."""
    image_folder, reference, _ = uninterrupted
    with pytest.raises(Interrupted, match="resume"):
        _train_plain(image_folder, tmp_path / "b", interrupt_at=3, signum=signal.SIGTERM)
    state = json.loads((tmp_path / "b" / "checkpoints" / "last" / "state.json").read_text())
    assert state["progress"]["global_step"] == 4  # the step under way finished and was checkpointed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is gone once it stops
    assert _same(reference, _train_plain(image_folder, tmp_path / "b", resume=True))


def test_ctrl_c_on_the_last_step_of_an_epoch_resumes_into_the_next(uninterrupted, tmp_path):
    image_folder, reference, ref_dir = uninterrupted
    steps = (36 - 6) // 8  # images in train/ minus the calibration split, per batch
    with pytest.raises(Interrupted):
        _train_plain(image_folder, tmp_path / "b", interrupt_at=steps - 1)  # the flag is honoured after the step
    assert not (tmp_path / "b" / "metrics.jsonl").read_text()  # the epoch's metrics are not written yet
    resumed = _train_plain(image_folder, tmp_path / "b", resume=True)
    assert _same(reference, resumed)
    ref, res = _metrics(ref_dir), _metrics(tmp_path / "b")
    assert [r["epoch"] for r in res] == [1, 2]
    for key in ("train_loss", "train_top1", "step"):
        assert [r[key] for r in res] == pytest.approx([r[key] for r in ref])


def test_resume_finds_a_checkpoint_left_between_two_renames(uninterrupted, tmp_path):
    image_folder, reference, _ = uninterrupted
    with pytest.raises(Interrupted):
        _train_plain(image_folder, tmp_path / "b", interrupt_at=3)
    ckpt = tmp_path / "b" / "checkpoints"
    (ckpt / "last").rename(ckpt / f".last.old-{os.getpid() + 1}")  # killed after the first rename of a checkpoint
    assert _same(reference, _train_plain(image_folder, tmp_path / "b", resume=True))
    assert sorted(p.name for p in ckpt.iterdir()) == ["last"]


def test_resume_refuses_a_changed_value_and_accepts_the_same(image_folder, tmp_path):
    with pytest.raises(Interrupted):
        _train_plain(image_folder, tmp_path / "b", interrupt_at=1)
    started = _recipe(image_folder, checkpoint_every=2)
    assert resume_recipe(tmp_path / "b", _recipe(image_folder, epochs=5), {"batch_size"}) == started
    with pytest.raises(RunError, match="epochs=2, not 5"):
        resume_recipe(tmp_path / "b", _recipe(image_folder, epochs=5), {"epochs", "batch_size"})


def test_without_a_terminal_each_epoch_is_one_plain_line_with_every_metric(image_folder, tmp_path):
    text = io.StringIO()
    _train_plain(image_folder, tmp_path / "a", console=Console(file=text, width=40, force_terminal=False))
    lines = text.getvalue().splitlines()
    assert len(lines) == 2  # one per epoch, not cut at the console width
    for line, row in zip(lines, _metrics(tmp_path / "a")):
        assert set(row) == {item.partition("=")[0] for item in line.split()}
        assert "…" not in line and "\x1b" not in line


def _ddp_worker(rank, world, folder, out, interrupt_at):
    """One rank of a DDP job; rank 0 alone is interrupted before step `interrupt_at` (None: never). Each rank writes
    its weights and what ended its training."""
    recipe = _recipe(folder)
    train, _, _ = datasets(DataSpec(recipe.data, None, SIZE, 3), recipe.calib_size)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    try:
        fit(_Interrupting(model, interrupt_at if rank == 0 else None), model, train, recipe, out, _groups(model),
            ddp=Distributed(rank, world))
        outcome = "finished"
    except Interrupted as e:
        outcome = str(e)
    except Exception as e:  # a rank that went on alone fails in the next all-reduce
        outcome = type(e).__name__
    (out.parent / f"rank{rank}.txt").write_text(outcome)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out.parent / f"rank{rank}.safetensors"))


def _outcomes(root):
    return [(root / f"rank{r}.txt").read_text() for r in (0, 1)]


@pytest.mark.slow
def test_two_process_gloo_ddp_keeps_ranks_identical(image_folder, tmp_path):
    run_gloo(_ddp_worker, 2, image_folder, tmp_path / "run", None)
    assert _outcomes(tmp_path) == ["finished"] * 2
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = timm.create_model("test_resnet", num_classes=3).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a if k.endswith("weight"))


@pytest.mark.slow
def test_an_interrupt_that_reaches_one_rank_stops_every_rank_at_the_same_step(image_folder, tmp_path):
    run_gloo(_ddp_worker, 2, image_folder, tmp_path / "run", 1)  # before step 1 of 2
    assert _outcomes(tmp_path) == ["interrupted at step 2; resume with --resume"] * 2


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
        fit(_NaNAfter(model, 2), model, train, recipe, tmp_path / "run", _groups(model))
    ckpt = load_file(str(tmp_path / "run" / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in ckpt.values())
