"""`dynamize bench`: wall-clock time of the dense model against the gated runtime."""
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from dynamize.runtime.bench import BenchResult, open_target, write_results
from dynamize.runtime.bench import bench as run_bench

from .options import in_range


def results_table(results: list[BenchResult], title: str) -> Table:
    """Measured speedup next to the speedup the FLOPs promise."""
    t = Table(title=title, title_justify="left")
    for col in ("model", "batch", "FLOPs fraction", "dense ms", "dynamic ms", "speedup", "ideal", "achieved/ideal"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        t.add_row(r.model, str(r.batch_size), f"{r.fraction:.3f}", f"{r.dense_ms:.1f}", f"{r.dynamic_ms:.1f}",
                  f"{r.speedup:.2f}x", f"{r.ideal:.2f}x", f"{r.speedup / r.ideal:.2f}")
    return t


def bench(
    target: str = typer.Argument(..., metavar="RUN|MODEL", help="run directory, or timm model name with --fraction"),
    fraction: float | None = typer.Option(None, help="force random decisions with this FLOPs fraction, in (0, 1]",
                                          callback=in_range("fraction")),
    batch_size: list[int] = typer.Option([1, 32], "--batch-size", "-b", help="batch size (repeatable)",
                                         callback=in_range("batch_size")),
    img_size: int | None = typer.Option(None, help="square input size (default: the plan's)",
                                        callback=in_range("img_size")),
    threads: int | None = typer.Option(None, help="torch threads (default: torch's)", callback=in_range("threads")),
    repeats: int = typer.Option(10, help="timed passes per model and configuration", callback=in_range("repeats")),
    warmup: int = typer.Option(2, help="untimed passes first", callback=in_range("warmup")),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last", help="memory format of both"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the results to this JSON file"),
) -> None:
    """Time the original dense model against the dynamic one: median ms, speedup, ideal (1 / FLOPs fraction)."""
    console = Console()
    if threads:
        torch.set_num_threads(threads)
    with console.status(f"loading {target}"):
        net, dense, size = open_target(target, fraction, img_size)
    with console.status(f"timing {target}"):
        results = run_bench(net, dense, target, batch_size, size, fraction=fraction, repeats=repeats,
                            warmup=warmup, channels_last=channels_last)
    decisions = "learned decisions" if fraction is None else f"random decisions at FLOPs fraction {fraction}"
    console.print(results_table(results, f"dynamize bench: {decisions}, {size}px, {torch.get_num_threads()} threads"))
    if json_out is not None:
        write_results(json_out, results)
        console.print(f"wrote [bold]{json_out}[/bold]")


def register(app: typer.Typer) -> None:
    app.command()(bench)
