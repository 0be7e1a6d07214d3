"""`dynamize train`, `finetune`, `calibrate` and `cascade`."""
from pathlib import Path

import typer
from rich.console import Console

from dynamize.errors import RunError
from dynamize.graph.plan import GATE_KINDS
from dynamize.io.runs import GATED, RUNS, check_run, latest_run, new_run_dir
from dynamize.training.jobs import cascade as cascade_job
from dynamize.training.jobs import finetune as finetune_job
from dynamize.training.jobs import recalibrate, train_base
from dynamize.training.loop import CHECKPOINT, resume_recipe
from dynamize.training.preflight import finetune_recipe
from dynamize.training.recipe import given_keys, load_recipe

from .options import in_range, one_of
from .tables import print_result

RECIPE_HELP = "recipe name (in recipes/) or path to a YAML file"


def _resumable_train_run(model: str) -> Path:
    """The run under runs/ that `dynamize train MODEL` wrote last by default (its output, runs/MODEL-base*), with a
    checkpoint to resume from; a run of another kind is never taken for it."""
    runs = [p for p in RUNS.glob(f"{model}-base*") if (p / CHECKPOINT).is_dir()]
    if not runs:
        raise RunError(f"no `dynamize train {model}` run with a checkpoint under {RUNS}/ to resume; pass its "
                       "directory with -o")
    return max(runs, key=lambda p: (p / CHECKPOINT).stat().st_mtime)


def train(
    model: str = typer.Argument(..., metavar="MODEL", help="timm model name"),
    data: str | None = typer.Option(None, help="fashion-mnist, a timm dataset name, or an image folder"),
    data_dir: str | None = typer.Option(None, help="where the data set's files are"),
    recipe: str | None = typer.Option(None, help=RECIPE_HELP),
    checkpoint: Path | None = typer.Option(None, help="weights to start from: a weights file or a run directory "
                                                      "(its original model); another-sized head is re-initialised"),
    output: Path | None = typer.Option(None, "-o", "--output", help="run directory (default: runs/MODEL-base)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run's last checkpoint"),
    sets: list[str] | None = typer.Option(None, "--set", help="recipe override key=value (repeatable)"),
    overrides: list[str] | None = typer.Argument(None, metavar="KEY=VALUE", help="more recipe overrides"),
) -> None:
    """Fit a plain timm model on a data set (a teacher, when no pretrained weights are at hand)."""
    overrides = [*(sets or []), *(overrides or [])]
    asked = dict(model=model, data=data, data_dir=data_dir)
    r = load_recipe(recipe, overrides, **asked)
    out = output or (_resumable_train_run(model) if resume else new_run_dir(f"{model}-base"))
    if resume:
        r = resume_recipe(out, r, given_keys(recipe, overrides, **asked))
    console = Console()
    result = train_base(r, out, resume=resume, console=console, init=checkpoint)
    if result:
        print_result(console, f"trained {model}", result, name=model)
        console.print(f"wrote [bold]{out}[/bold]; next: dynamize convert {out}")


def finetune(
    run: Path | None = typer.Argument(None, metavar="RUN", help="converted run directory (default: the most recent "
                                                                "run)"),
    budget: float = typer.Option(..., help="target fraction of the original FLOPs, 0 < B <= 1",
                                 callback=in_range("budget")),
    data: str | None = typer.Option(None, help="fashion-mnist, a timm dataset name, or an image folder (default: "
                                               "the data the run was trained on, if it records one)"),
    data_dir: str | None = typer.Option(None, help="where the data set's files are"),
    recipe: str | None = typer.Option(None, help=RECIPE_HELP + " (default: the one that fits the run's model, data "
                                                 "and input size)"),
    gates: str | None = typer.Option(None, help="train only layer | channel gates, or both",
                                     callback=one_of(GATE_KINDS)),
    output: Path | None = typer.Option(None, "-o", "--output", help="run directory (default: RUN-bB)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the output run's last checkpoint"),
    overrides: list[str] | None = typer.Option(None, "--set", help="recipe override key=value (repeatable)"),
) -> None:
    """Fine-tune a converted run under a FLOPs budget by distilling from the original model."""
    run = run or latest_run()
    r, keys = finetune_recipe(check_run(run, GATED), recipe, overrides, budget=budget, data=data, data_dir=data_dir,
                              gates=gates)
    suffix = f"-b{r.budget:.2f}" + ("" if r.gates == "both" else f"-{r.gates}")
    out = output or Path(str(run) + suffix)
    if resume:
        r = resume_recipe(out, r, keys)
    console = Console()
    result = finetune_job(run, r, out, resume=resume, console=console)
    if result:
        print_result(console, f"fine-tuned {run} at budget {r.budget:.2f}", result, r.budget)
        console.print(f"wrote [bold]{out}[/bold]")


def calibrate(
    run: Path = typer.Argument(..., metavar="RUN", help="fine-tuned run directory"),
    budget: float = typer.Option(..., help="new target fraction of the original FLOPs, 0 < B <= 1",
                                 callback=in_range("budget")),
    data: str | None = typer.Option(None, help="data set (default: the one the run was trained on)"),
    data_dir: str | None = typer.Option(None, help="where the data set's files are"),
    output: Path | None = typer.Option(None, "-o", "--output", help="new run directory (default: RUN-cB)"),
) -> None:
    """Re-target a fine-tuned run to another budget by calibrating its gate thresholds (no retraining)."""
    out = output or Path(f"{run}-c{budget:.2f}")
    console = Console()
    result = recalibrate(run, budget, out, data, data_dir, console)
    print_result(console, f"calibrated {run} to budget {budget:.2f}", result, budget)
    console.print(f"wrote [bold]{out}[/bold]")


def cascade(
    run: Path = typer.Argument(..., metavar="RUN", help="fine-tuned run directory"),
    budget: float = typer.Option(..., help="mean fraction of the original FLOPs for the gated network and the "
                                           "escalations together, above the run's own, <= 1",
                                 callback=in_range("budget")),
    data: str | None = typer.Option(None, help="data set (default: the one the run was trained on)"),
    data_dir: str | None = typer.Option(None, help="where the data set's files are"),
    output: Path | None = typer.Option(None, "-o", "--output", help="new run directory (default: RUN-eB)"),
) -> None:
    """Add an escalation exit: the images the fine-tuned run is least sure of also run the original model.

    As many images escalate as the budget pays for (no retraining)."""
    out = output or Path(f"{run}-e{budget:.2f}")
    console = Console()
    with console.status(f"choosing the escalation threshold for budget {budget:.2f}"):
        result = cascade_job(run, budget, out, data, data_dir)
    print_result(console, f"{run} with escalation to the original at budget {budget:.2f}",
                 result, budget, name="cascade")
    console.print(f"{result['eval']['escalated']:.1%} of the images escalated (top softmax probability at or below "
                  f"{result['threshold']:.4f}) and ran the original model too")
    console.print(f"wrote [bold]{out}[/bold]")


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": False})(train)
    app.command()(finetune)
    app.command()(calibrate)
    app.command()(cascade)
