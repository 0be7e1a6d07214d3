"""`dynamize convert` and `dynamize inspect`."""
from pathlib import Path

import typer
from rich.console import Console

from dynamize.graph.plan import CHANNEL_MODES, GATE_KINDS
from dynamize.io.runs import check_run, convert_to_run

from .options import in_range, one_of
from .tables import print_plan


def convert(
    model: str = typer.Argument(..., metavar="MODEL|RUN", help="timm model name (e.g. resnet50) or a run directory "
                                                             "of `dynamize train`"),
    output: Path | None = typer.Option(None, "-o", "--output", help="run directory (default: runs/MODEL)"),
    checkpoint: Path | None = typer.Option(None, help=".safetensors (or .pth/.pt state dict) for the base model"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="timm's pretrained weights"),
    num_classes: int | None = typer.Option(None, help="classifier size (default: timm's)",
                                           callback=in_range("num_classes")),
    in_chans: int | None = typer.Option(None, help="input channels (default: timm's)", callback=in_range("in_chans")),
    img_size: int | None = typer.Option(None, help="input size FLOPs are counted at (default: timm's)",
                                        callback=in_range("img_size")),
    gates: str = typer.Option("both", help="both | layer | channel", callback=one_of(GATE_KINDS)),
    profitable_only: bool = typer.Option(False, "--profitable-only", help="leave out the channel gates that cannot "
                                         "pay for themselves in wall-clock time at --img-size (listed as skipped)"),
    channel_mode: str = typer.Option("channel", help="channel (a C-Net keeps any channels) | width (channels ordered "
                                     "by importance, a C-Net keeps a prefix at one of a few widths: no gathers)",
                                     callback=one_of(CHANNEL_MODES)),
    residual_outputs: bool = typer.Option(False, "--residual-outputs", help="also gate the output channels of the "
                                          "layer that ends each residual branch (the shortcut passes the dropped "
                                          "channels on); measured to help ResNet-18 near its smallest reachable "
                                          "fraction and to hurt MobileNetV2, whose gates' cost it doubles"),
) -> None:
    """Insert L-Net / C-Net gates into a timm CNN and write a run directory."""
    console = Console()
    with console.status(f"building, tracing and gating {model}"):
        net, out = convert_to_run(model, output, checkpoint=checkpoint, pretrained=pretrained,
                                  num_classes=num_classes, in_chans=in_chans, img_size=img_size, gates=gates,
                                  profitable_only=profitable_only, channel_mode=channel_mode,
                                  residual_outputs=residual_outputs)
    print_plan(net.plan, f"dynamize plan for {net.plan.architecture}", console)
    console.print(f"wrote [bold]{out}[/bold]")


def inspect(run: Path = typer.Argument(..., metavar="RUN", help="run directory")) -> None:
    """Print the gate plan of a saved run (its config and weights are checked, the tensors are not loaded)."""
    checked = check_run(run)
    console = Console()
    if checked.plan is None:
        channels = f"{checked.in_chans} input channel{'s' if checked.in_chans != 1 else ''}"
        console.print(f"{run}: a plain {checked.architecture} ({checked.num_classes} classes, {channels}); convert it "
                      f"with `dynamize convert {run}`")
        return
    print_plan(checked.plan, f"dynamize plan of {run}", console)


def register(app: typer.Typer) -> None:
    app.command()(convert)
    app.command()(inspect)
