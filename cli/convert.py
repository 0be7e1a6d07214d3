"""`dynamize convert` and `dynamize inspect`."""
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

import dynamize
from dynamize.export import WEIGHTS, read_base_config, read_config
from dynamize.models import create_base
from dynamize.plan import GatePlan
from dynamize.runs import new_run_dir

from .tables import print_plan


def convert(
    model: str = typer.Argument(..., help="timm model name (e.g. resnet50) or a run directory of `dynamize train`"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="run directory (default: runs/MODEL)"),
    checkpoint: Optional[Path] = typer.Option(None, help=".safetensors (or .pth/.pt state dict) for the base model"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="timm's pretrained weights"),
    num_classes: Optional[int] = typer.Option(None, help="classifier size (default: timm's)"),
    in_chans: Optional[int] = typer.Option(None, help="input channels (default: timm's)"),
    img_size: Optional[int] = typer.Option(None, help="input size FLOPs are counted at (default: timm's)"),
    gates: str = typer.Option("both", help="both | layer | channel"),
) -> None:
    """Insert L-Net / C-Net gates into a timm CNN and write a run directory."""
    console = Console()
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
    if Path(model).is_dir():
        trained = read_base_config(model)
        checkpoint, pretrained = Path(model) / WEIGHTS, False
        kwargs = {"num_classes": trained["num_classes"], "in_chans": trained["in_chans"], **kwargs}
        model = trained["architecture"]
    with console.status(f"building {model}"):
        base = create_base(model, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    with console.status(f"tracing and gating {model}"):
        net = dynamize.convert(base, gates=gates, img_size=img_size)
    out = dynamize.save(net, output or new_run_dir(model), extra={"source": {"model": model, "checkpoint": str(
        checkpoint) if checkpoint else None, "pretrained": pretrained and checkpoint is None}})
    print_plan(net.plan, f"dynamize plan for {model}", console)
    console.print(f"wrote [bold]{out}[/bold]")


def inspect(run: Path = typer.Argument(..., help="run directory")) -> None:
    """Print the gate plan of a saved run."""
    plan = GatePlan.from_dict(read_config(run)["dynamize"]["plan"])
    print_plan(plan, f"dynamize plan of {run}", Console())


def register(app: typer.Typer) -> None:
    app.command()(convert)
    app.command()(inspect)
