"""The jobs behind `dynamize train`, `finetune` and `calibrate`: wire data, models, losses and the training loop."""
import contextlib
import datetime
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from rich.console import Console
from timm.task import ClassificationTask
from torch import nn
from torch.utils.data import DataLoader

from ..graph.cost import min_fraction
from ..graph.rewrite import DynamicNet
from ..io.runs import load, load_base, load_teacher, save, save_base
from ..models import create_base, load_backbone, read_state_dict
from ..runtime import use_runtime
from ..runtime.cascade import CASCADE, Cascade, escalation_threshold
from ..version import __version__
from .batchnorm import reestimate_batchnorm
from .calibrate import TOLERANCE, calibrate, mean_fraction
from .data import loader, num_classes
from .distill import BudgetDistillationTask, configure_gates, param_groups
from .evaluate import evaluate, predict
from .loop import fit, init_distributed
from .preflight import check_calibrate, check_cascade, check_finetune, check_train
from .recipe import Recipe, RecipeError

# Beyond this share of the FLOPs the gates learned to spend above the floor, calibration does the cutting the gates
# did not learn. Measured (docs/benchmarks.md), the share above the floor cut and the outcome: ResNet-18 at 0.3 from
# 0.43 (33%) kept its accuracy; at 0.05 (floor 0.036) from 0.064-0.068 (50-56%) 89.1-89.9%, from 0.081-0.098 (69-77%)
# 85.2-88.9%; MobileNetV2 (floor 0.231) at 0.3 from 0.69 (85%) collapsed, at 0.25 from 0.269 (50%) 89.3% and from
# 0.297 (71%) 85.5%. Counted from zero instead of the floor, the last cut was 16% and looked harmless.
_MAX_CALIBRATION_CUT = 2 / 3


def calibration_cut(trained: float, budget: float, floor: float) -> float:
    """The share of the FLOPs the gates reached in training above the smallest reachable fraction (what they control)
    that calibration must cut to meet the budget (0 if none)."""
    return max(0.0, (trained - budget) / (trained - floor)) if trained > floor else 0.0


def provenance() -> dict:
    """Who made a run, when and how: recorded in config.json."""
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "dynamize": __version__, "torch": torch.__version__, "command": " ".join(sys.argv)}


def _on_split(prefix: str, data):
    """The per-epoch evaluation of the training loop: metrics on a held-out split, keys prefixed, flat."""
    def run(model: nn.Module) -> dict:
        metrics = evaluate(model, data)
        flat = {**{k: v for k, v in metrics.items() if k != "adaptivity"},
                **{f"flops_{k}": v for k, v in metrics.get("adaptivity", {}).items() if k in ("spread", "patterns")}}
        return {f"{prefix}_{k}": v for k, v in flat.items()}
    return run


def train_base(recipe: Recipe, out: Path, resume: bool = False, console: Console | None = None,
               init: Path | None = None) -> dict:
    """Fit a plain timm model on the recipe's data (a teacher when no pretrained weights are at hand).

    Args:
        init: weights to start from (e.g. ImageNet weights): a weights file or a run directory (of `dynamize train`
            or `dynamize convert`: its original model); a classifier of another size is re-initialised.
    """
    console = console or Console()
    ddp = init_distributed()
    data = check_train(recipe, out, resume, init)
    if ddp.main:
        console.print(data.describe(), highlight=False, soft_wrap=True)
    train, calib, test = data
    torch.manual_seed(recipe.seed)
    model = create_base(recipe.model, num_classes=num_classes(train), in_chans=recipe.in_chans)
    if init is not None:
        load_backbone(model, load_base(init).state_dict() if Path(init).is_dir() else read_state_dict(init))
    groups = [{"params": list(model.parameters()), "lr": recipe.lr_backbone, "weight_decay": recipe.weight_decay}]
    history = fit(ClassificationTask(model, criterion=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing),
                                     verbose=False), model, train, recipe, out, groups, resume=resume, ddp=ddp,
                  console=console, evaluate=_on_split("calib", loader(calib, 256)))
    if not ddp.main:
        return {}
    result = {"eval": evaluate(model, loader(test, 256)), "history": history}
    save_base(model, out, recipe.in_chans, {"recipe": recipe.to_dict(), "splits": data.sizes(),
                                            "eval": result["eval"], "provenance": provenance()})
    return result


@contextlib.contextmanager
def _settling(console: Console | None, text: str) -> Iterator[Callable[[int], None]]:
    """A status line for settling that counts the threshold settings evaluated: a calibration can take minutes."""
    if console is None:
        yield lambda evaluated: None
        return
    with console.status(text) as status:
        yield lambda evaluated: status.update(f"{text} ({evaluated} threshold settings evaluated)")


def settle(model: DynamicNet, calib: DataLoader, recipe: Recipe, console: Console | None = None,
           progress: Callable[[int], None] | None = None) -> dict:
    """Bring a gated model to the budget for inference: BatchNorm re-estimated, thresholds calibrated on held-out
    data, BatchNorm re-estimated for the calibrated decisions, repeated while the fraction drifts off the budget.

    Args:
        console: where to warn when the gates reached far more than the budget in training.
        progress: called with the number of threshold settings evaluated (see `calibrate`).

    Returns:
        The calibration (see `calibrate`), with the fraction the gates reached before it, the threshold settings
        evaluated over all rounds ("tried") and the wall time in seconds.
    """
    started = time.perf_counter()
    before = mean_fraction(model, calib)
    floor = min_fraction(model.plan, recipe.gates) if console is not None else 0.0  # only the warning needs it
    cut = calibration_cut(before, recipe.budget, floor)
    if console is not None and cut > _MAX_CALIBRATION_CUT:
        console.print(f"[yellow]warning:[/yellow] the gates reached a FLOPs fraction of {before:.3f} in training, "
                      f"above the budget {recipe.budget:.3f}; calibration will cut {cut:.0%} of what they learned to "
                      f"spend above the smallest reachable fraction {floor:.3f}, and accuracy may drop: raise "
                      f"budget_weight (now {recipe.budget_weight:g}) or floor_margin (now {recipe.floor_margin:g}), "
                      "train longer, or choose a budget further above that fraction")
    reestimate_batchnorm(model, calib, recipe.bn_images)
    tried = 0

    def counted(evaluated: int) -> None:
        if progress is not None:
            progress(tried + evaluated)

    for _ in range(3):
        cal = calibrate(model, calib, recipe.budget, progress=counted)
        tried += cal["tried"]
        reestimate_batchnorm(model, calib, recipe.bn_images)
        cal["fraction"] = mean_fraction(model, calib)
        if abs(cal["fraction"] - recipe.budget) <= TOLERANCE:
            break
    return {**cal, "trained_fraction": before, "tried": tried, "seconds": time.perf_counter() - started}


def _settled(cal: dict) -> str:
    """One line on a settle: where it left the fraction, from where, and what it cost."""
    return (f"settled at FLOPs fraction {cal['fraction']:.3f} (gates had reached {cal['trained_fraction']:.3f}) in "
            f"{cal['seconds']:.0f} s, {cal['tried']} threshold settings evaluated")


def finetune(run: Path, recipe: Recipe, out: Path, resume: bool = False, console: Console | None = None) -> dict:
    """Budget-controlled distillation of a converted run into `out`: gate learning, settling at the calibrated
    thresholds (see `distill.py`), and a final calibration to the budget.

    Returns the calibration result and the eval-split metrics of the final model and its teacher.
    """
    console = console or Console()
    ddp = init_distributed()
    inputs = check_finetune(run, recipe, out, resume)
    if ddp.main:
        console.print(inputs.splits.describe(), highlight=False, soft_wrap=True)
    student = use_runtime(load(run))  # evaluation and calibration run the fast path, as the user's model will
    teacher = load_teacher(run)
    config = inputs.run.config
    train, calib, test = inputs.splits
    configure_gates(student, recipe.gates, recipe.gumbel_tau, recipe.static_gates)
    calib_loader = loader(calib, 256)

    def settle_gates() -> None:
        with _settling(console, "settling: calibrating thresholds and re-estimating BatchNorm") as progress:
            cal = settle(student, calib_loader, recipe, console, progress)
        console.print(f"{_settled(cal)}; now tuning the backbone with frozen gates")

    task = BudgetDistillationTask(student, teacher, recipe, settle=settle_gates)
    if ddp.main and task.budget_weight != recipe.budget_weight:
        console.print(f"budget {recipe.budget:g} lies {recipe.budget - task.floor:.3f} above the smallest reachable "
                      f"fraction {task.floor:.3f}: budget penalty weight {task.budget_weight:.3g} (budget_weight "
                      f"{recipe.budget_weight:g} scaled up within floor_margin {recipe.floor_margin:g})",
                      highlight=False)
    history = fit(task, student, train, recipe, out, param_groups(student, recipe), resume=resume,
                  evaluate=_on_split("calib", calib_loader), ddp=ddp, console=console)
    if not ddp.main:
        return {}
    with _settling(console, "calibrating gate thresholds to the budget") as progress:
        cal = settle(student, calib_loader, recipe, progress=progress)
    console.print(_settled(cal))
    result = {"calibration": cal, "eval": evaluate(student, loader(test, 256)),
              "teacher_eval": evaluate(teacher, loader(test, 256)), "history": history}
    save(student, out, {"budget": recipe.budget, "gates_trained": recipe.gates, "recipe": recipe.to_dict(),
                        "teacher": str(Path(config["dynamize"].get("teacher", run)).resolve()),
                        "parent": str(Path(run).resolve()), "splits": inputs.splits.sizes(), "calibration": cal,
                        "eval": result["eval"], "teacher_eval": result["teacher_eval"], "provenance": provenance()})
    return result


def recalibrate(run: Path, budget: float, out: Path, data: str | None = None,
                data_dir: str | None = None, console: Console | None = None) -> dict:
    """Re-target a fine-tuned run to another budget by moving its gate thresholds; writes a new run."""
    checked, recipe, splits = check_calibrate(run, budget, out, data, data_dir)
    _, calib, test = splits
    model = use_runtime(load(run))
    with _settling(console, f"calibrating gate thresholds to {budget:.2f}") as progress:
        cal = settle(model, loader(calib, 256), recipe, progress=progress)
    if console is not None:
        console.print(_settled(cal))
    result = {"calibration": cal, "eval": evaluate(model, loader(test, 256))}
    carried = {k: v for k, v in checked.info.items() if k not in ("version", "plan", CASCADE)}
    save(model, out, {**carried, "budget": budget, "recipe": recipe.to_dict(), "parent": str(Path(run).resolve()),
                      "splits": splits.sizes(), "calibration": cal, "eval": result["eval"],
                      "provenance": provenance()})
    return result


def cascade(run: Path, budget: float, out: Path, data: str | None = None, data_dir: str | None = None) -> dict:
    """Give a fine-tuned run an escalation exit to its original model (see `dynamize.runtime.cascade`), with the
    threshold that meets `budget` on the calibration split; writes a new run that `load_cascade` rebuilds.

    Returns the threshold and the evaluation-split metrics of the cascade, of the gated network alone and of the
    original model.

    Raises:
        RunError / RecipeError / DataError / OutputError: as `check_cascade`; RecipeError also when the gated
            network alone spends the budget on the calibration split.
    """
    checked, _, splits = check_cascade(run, budget, out, data, data_dir)
    _, calib, test = splits
    model = Cascade(use_runtime(load(run)), load_teacher(run), float("-inf"))
    alone = predict(model, loader(calib, 256))
    model.threshold = escalation_threshold(alone["confidence"], alone["fractions"], budget)
    if model.threshold == float("-inf"):
        raise RecipeError(f"{run} alone costs {alone['fractions'].mean().item():.3f} of the FLOPs on the calibration "
                          f"split, which leaves no room in budget {budget} to escalate even one image")
    result = {"threshold": model.threshold, "eval": evaluate(model, loader(test, 256)),
              "gated_eval": evaluate(model.gated, loader(test, 256)),
              "teacher_eval": evaluate(model.original, loader(test, 256))}
    carried = {k: v for k, v in checked.info.items() if k not in ("version", "plan")}
    save(model.gated, out, {**carried, CASCADE: {"threshold": model.threshold, "budget": budget,
                                                 "eval": result["eval"], "provenance": provenance()}})
    return result
