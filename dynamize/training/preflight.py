"""Checks that run before a training job writes anything.

Every input a job would refuse later (a damaged or newer run, a teacher whose classifier was never trained, data that
does not fit the model, a budget the gates cannot reach, an output that is in the way) is refused here, with one
line, while the output path is still untouched: a long job never starts on input it will refuse.
"""
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError, RunError
from ..graph.cost import smallest_budget
from ..graph.plan import GatePlan
from ..io.atomic import check_output_dir
from ..io.runs import GATED, Run, check_run, check_unused
from .data import DataSpec, Splits, datasets, num_classes
from .loop import CHECKPOINT, checkpoint_recipe
from .recipe import Recipe, RecipeError, default_recipe, given_keys, load_recipe


@dataclass
class FinetuneInputs:
    """What `finetune` works on, checked: the converted run, its teacher and the data splits."""
    run: Run
    teacher: Run
    splits: Splits


def data_spec(recipe: Recipe) -> DataSpec:
    return DataSpec(recipe.data, recipe.data_dir, recipe.img_size, recipe.in_chans)


def splits(recipe: Recipe) -> Splits:
    """The recipe's training, calibration and evaluation splits."""
    return datasets(data_spec(recipe), recipe.calib_size, recipe.train_subset, recipe.seed, recipe.eval_subset)


def check_output(out: Path, resume: bool) -> None:
    """The output must be a directory or nothing; a run in progress is continued only with `resume`, and a finished
    run (the input run itself, say) is never written over.

    Raises:
        OutputError / RunError: `out` is a file, holds another run or its checkpoint without `resume`, or has no
            checkpoint to resume.
    """
    if resume:
        check_output_dir(out)
        checkpoint_recipe(out)
    elif (out / CHECKPOINT).exists():
        raise OutputError(f"{out} already holds a training run (checkpoints/); continue it with --resume, or choose "
                          "another -o")
    else:
        check_unused(out)


def check_reachable(plan: GatePlan, budget: float, kinds: str) -> None:
    """Refuse a budget below what the trained gates can reach with every one of them closed.

    Raises:
        RecipeError: the budget is below the plan's smallest reachable FLOPs fraction.
    """
    floor = smallest_budget(plan, kinds)
    if budget < floor:
        which = "" if kinds == "both" else f"{kinds} "
        ungated = plan.largest_ungated()
        raise RecipeError(f"budget {budget} is below {floor:.3f}, the smallest FLOPs fraction {plan.architecture} "
                          f"reaches with every {which}gate closed (the rest of its FLOPs is not under {which}gate "
                          f"control{'; no gate controls ' + ungated if ungated else ''}); choose a budget of at "
                          f"least {floor:.3f}")


def check_teacher(run: Run) -> Run:
    """The run holding `run`'s original model (the run itself for a converted run), checked in full.

    Raises:
        RunError: the recorded teacher run is gone or damaged.
    """
    if not run.teacher.is_dir():
        raise RunError(f"the teacher run {run.teacher} recorded in {run.path} is gone")
    return run if run.teacher == run.path else check_run(run.teacher)


def _retrain_hint(run: Run, data: str) -> str:
    return (f"train a classifier for the data first: `dynamize train {run.architecture} --checkpoint {run.path} "
            f"--data {data}` (it keeps the backbone), then `dynamize convert` the trained run")


def finetune_recipe(run: Run, name_or_path: str | Path | None = None, overrides: list[str] | None = None,
                    **asked) -> tuple[Recipe, set[str]]:
    """The recipe of a fine-tuning of `run`, and the keys the user gave (what `--resume` must agree with).

    From weakest to strongest: the recipe (by default the shipped one that fits the run's model, data and input
    size); the data the run records (a converted `dynamize train` run passes on its data set, and with the input
    channels its normalisation) and the plan's input size; `key=value` overrides; the values in `asked` (None: not
    given). The model is always the run's own.
    """
    recorded = run.info.get("data") or {}
    chans, size = run.gate_plan.input_size[:2]
    name = name_or_path or default_recipe(run.architecture, size, asked.get("data") or recorded.get("data"))
    overridden = {o.partition("=")[0].strip() for o in overrides or []}
    other_data = asked.get("data") is not None or "data" in overridden  # the recorded data_dir is not its folder
    defaults = {"data": recorded.get("data"), "data_dir": None if other_data else recorded.get("data_dir"),
                "in_chans": chans, "img_size": size}
    values = {**{k: v for k, v in defaults.items() if k not in overridden},
              **{k: v for k, v in asked.items() if v is not None}, "model": run.architecture}
    keys = given_keys(name_or_path, overrides, **asked) | {"model"}
    return load_recipe(name, overrides, **values), keys


def check_finetune(run: str | Path, recipe: Recipe, out: str | Path, resume: bool = False) -> FinetuneInputs:
    """Everything `finetune` needs, checked before any output exists.

    Raises:
        RunError: the run or its teacher is damaged, from a newer dynamize or not a converted run; the teacher's
            classifier was never trained; the data's classes differ from the model's.
        RecipeError: the recipe's input channels differ from the run's, or its budget cannot be reached.
        DataError: the data is missing or malformed.
        OutputError: the output is in the way.
    """
    checked = check_run(run, GATED)
    teacher = check_teacher(checked)
    if not teacher.info.get("head_trained", True):
        raise RunError(f"the classifier of {teacher.path} was never trained (converted with --no-pretrained and no "
                       "--checkpoint, or with a new --num-classes), and distilling from it would teach random "
                       f"logits; {_retrain_hint(teacher, recipe.data)}")
    if recipe.in_chans != checked.in_chans:
        raise RecipeError(f"in_chans={recipe.in_chans}, but {checked.path} takes {checked.in_chans}-channel input")
    check_reachable(checked.gate_plan, recipe.budget, recipe.gates)
    check_output(Path(out), resume)
    data = splits(recipe)
    classes = num_classes(data.train)
    for model in {id(checked): checked, id(teacher): teacher}.values():
        if classes != model.num_classes:
            raise RunError(f"{recipe.data} has {classes} classes but {model.path} has a {model.num_classes}-class "
                           f"classifier; {_retrain_hint(model, recipe.data)}")
    return FinetuneInputs(checked, teacher, data)


def check_train(recipe: Recipe, out: str | Path, resume: bool = False, init: str | Path | None = None) -> Splits:
    """Everything `train` needs, checked before any output exists; returns the data splits.

    Raises:
        RunError: `init` is a damaged run directory.
        DataError / OutputError: as `check_finetune`.
    """
    if init is not None and Path(init).is_dir():
        check_run(init)
    check_output(Path(out), resume)
    return splits(recipe)


def calibrate_recipe(run: Run, budget: float, data: str | None = None, data_dir: str | None = None) -> Recipe:
    """The recipe a fine-tuned run was trained with, pointed at another budget (and data, if given).

    Raises:
        RunError: the run was not fine-tuned.
        RecipeError: its recorded recipe is not valid here.
    """
    values = run.info.get("recipe")
    if not values:
        raise RunError(f"{run.path} was not fine-tuned (no recipe in config.json); run `dynamize finetune` first")
    return load_recipe(None, **{**values, "data": data or values.get("data"),
                                "data_dir": data_dir or (values.get("data_dir") if not data else None),
                                "budget": budget})


def check_calibrate(run: str | Path, budget: float, out: str | Path, data: str | None = None,
                    data_dir: str | None = None) -> tuple[Run, Recipe, Splits]:
    """Everything `calibrate` needs, checked before any output exists: the run, its recipe at `budget`, the data.

    Raises:
        RunError / RecipeError / DataError / OutputError: as `check_finetune`.
    """
    checked = check_run(run, GATED)
    recipe = calibrate_recipe(checked, budget, data, data_dir)
    check_reachable(checked.gate_plan, budget, checked.info.get("gates_trained", recipe.gates))
    check_unused(out)
    data_splits = splits(recipe)
    classes = num_classes(data_splits.train)
    if classes != checked.num_classes:
        raise RunError(f"{recipe.data} has {classes} classes but {checked.path} has a {checked.num_classes}-class "
                       "classifier; pass the data set the run was trained on with --data")
    return checked, recipe, data_splits


def check_cascade(run: str | Path, budget: float, out: str | Path, data: str | None = None,
                  data_dir: str | None = None) -> tuple[Run, Recipe, Splits]:
    """Everything `cascade` needs, checked before any output exists: what `calibrate` needs, the original model, and
    a budget above the run's own FLOPs fraction (what is left over pays for escalations).

    Raises:
        RunError: as `check_calibrate`, or the teacher run is gone or damaged.
        RecipeError: the budget leaves nothing for escalation.
    """
    checked = check_run(run, GATED)
    check_teacher(checked)
    own = (checked.info.get("calibration") or {}).get("fraction", checked.info.get("budget"))
    if own is not None and budget <= own:
        raise RecipeError(f"budget {budget} is not above {checked.path}'s own FLOPs fraction ({own:.3f}), and each "
                          f"escalated image adds the original model's cost to it; choose a budget above {own:.3f}, "
                          "or a run fine-tuned at a lower budget")
    return check_calibrate(run, budget, out, data, data_dir)
