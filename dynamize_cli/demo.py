"""`dynamize demo`: the whole path on Fashion-MNIST in a few minutes on a laptop CPU."""
from pathlib import Path

import typer
from rich.console import Console

import dynamize
from dynamize.io.runs import new_run_dir
from dynamize.models import create_base
from dynamize.training.jobs import finetune, train_base
from dynamize.training.recipe import load_recipe

from .options import in_range
from .tables import print_result

# Subsampled so that the demo finishes in minutes on 2 CPU cores; the benchmark uses the full data.
DEMO = ["train_subset=5000", "epochs=2", "calib_size=1000", "eval_subset=2000", "checkpoint_every=0"]


def demo(
    output: Path | None = typer.Option(None, "-o", "--output", help="where the demo's runs go (default: runs/demo, "
                                                                     "or runs/demo-2, ... if taken)"),
    budget: float = typer.Option(0.5, help="FLOPs budget for the dynamic model", callback=in_range("budget")),
) -> None:
    """Train a ResNet-18 teacher on Fashion-MNIST, convert it, fine-tune it at a FLOPs budget, and report."""
    console = Console()
    output = output or new_run_dir("demo")
    console.rule("1/3  train a ResNet-18 teacher on Fashion-MNIST (5,000 images, 2 epochs, 32 px)")
    teacher_recipe = load_recipe("fashion-mnist-resnet18", DEMO + ["lr_backbone=0.002", "weight_decay=0.05"])
    train_base(teacher_recipe, output / "teacher", console=console)
    console.rule("2/3  convert: insert L-Net and C-Net gates")
    base = create_base("resnet18", checkpoint=output / "teacher", num_classes=10, in_chans=1)
    dynamize.save(dynamize.convert(base, img_size=32), output / "resnet18")
    console.rule(f"3/3  fine-tune at budget {budget} (distillation from the teacher), then calibrate")
    recipe = load_recipe("fashion-mnist-resnet18", DEMO, budget=budget)
    result = finetune(output / "resnet18", recipe, output / f"resnet18-b{budget:.2f}", console=console)
    print_result(console, f"Fashion-MNIST test set (first {recipe.eval_subset} images)", result, budget)
    console.print(f"runs in [bold]{output}[/bold]; the teacher and the dynamic model were trained on a 5,000-image "
                  "subsample for speed (see docs/benchmarks.md for full runs)")


def register(app: typer.Typer) -> None:
    app.command()(demo)
