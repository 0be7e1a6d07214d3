"""`dynamize bench`: wall-clock time of the dense model against the gated runtime."""
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch.utils.data import Subset

from dynamize.io.runs import read_config
from dynamize.reporting.report import data_spec
from dynamize.runtime.bench import BenchResult, open_target, write_results
from dynamize.runtime.bench import bench as run_bench
from dynamize.training.data import DataError, DataSpec, eval_dataset, loader

from .options import in_range

# Images drawn from the test split per batch size: each timed pass picks its batch among them.
IMAGES_PER_BATCH = 4


def timing_cells(r: BenchResult) -> list[str]:
    """Reference ms, dynamic ms and their ratio, each as a median with its 10th-90th percentiles."""
    return [f"{r.dense_ms:.1f} ({r.dense_p10:.1f}-{r.dense_p90:.1f})",
            f"{r.dynamic_ms:.1f} ({r.dynamic_p10:.1f}-{r.dynamic_p90:.1f})",
            f"{r.speedup:.2f}x ({r.speedup_p10:.2f}-{r.speedup_p90:.2f})"]


def results_table(results: list[BenchResult], title: str) -> Table:
    """Measured speedup next to the speedup the FLOPs promise; medians with the 10th-90th percentiles."""
    t = Table(title=title, title_justify="left")
    for col in ("model", "batch", "FLOPs fraction", "dense ms", "dynamic ms", "speedup", "ideal", "achieved/ideal"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        t.add_row(r.model, str(r.batch_size), f"{r.fraction:.3f}", *timing_cells(r), f"{r.ideal:.2f}x",
                  f"{r.speedup / r.ideal:.2f}")
    return t


def sample_images(target: str, data: str, count: int, in_chans: int, img_size: int) -> tuple[torch.Tensor, int]:
    """`count` images of the evaluation split of `data` (seeded sample), and their size.

    A run directory reads them as its fine-tuning recipe did (size, normalisation); a model name at `img_size`.

    Raises:
        DataError: the data set cannot be read or is empty.
    """
    path = Path(target)
    spec = data_spec(path, read_config(path), data) if path.is_dir() else DataSpec(data, None, img_size, in_chans)
    ds = eval_dataset(spec)
    if len(ds) == 0:
        raise DataError(f"the evaluation split of {data} has no images")
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:count].tolist()
    images = torch.cat([x for x, _ in loader(Subset(ds, pick), batch_size=64)])
    return images, spec.img_size


def bench(
    target: str = typer.Argument(..., metavar="RUN|MODEL", help="run directory, or timm model name with --fraction"),
    fraction: float | None = typer.Option(None, help="force random decisions with this FLOPs fraction, in (0, 1]",
                                          callback=in_range("fraction")),
    data: str | None = typer.Option(None, help="time on images of this data set's test split (fashion-mnist, a "
                                               "timm dataset name, or an image folder) instead of random ones"),
    batch_size: list[int] = typer.Option([1, 32], "--batch-size", help="batch size (repeatable)",
                                         callback=in_range("batch_size")),
    img_size: int | None = typer.Option(None, help="square input size of a model name (default: timm's); a run is "
                                                   "timed at its own", callback=in_range("img_size")),
    threads: int | None = typer.Option(None, help="torch threads (default: torch's)", callback=in_range("threads")),
    repeats: int = typer.Option(10, help="timed passes per model and configuration", callback=in_range("repeats")),
    warmup: int = typer.Option(2, help="untimed passes first", callback=in_range("warmup")),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last", help="memory format of both"),
    profitable_only: bool = typer.Option(False, "--profitable-only", help="a model name is converted without the "
                                         "channel gates that cannot pay for themselves (see `convert`)"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the results to this JSON file"),
) -> None:
    """Time the original dense model against the dynamic one (the fast path of `dynamize.load`).

    Median ms with 10th-90th percentiles, speedup, ideal (1 / FLOPs fraction). New images (and forced decisions) every
    pass."""
    console = Console()
    if threads:
        torch.set_num_threads(threads)
    with console.status(f"loading {target}"):
        net, dense, size = open_target(target, fraction, img_size, profitable_only)
        images = None
        if data is not None:
            images, size = sample_images(target, data, IMAGES_PER_BATCH * max(batch_size), net.plan.input_size[0],
                                       size)
    with console.status(f"timing {target}"):
        results = run_bench(net, dense, target, batch_size, size, fraction=fraction, repeats=repeats,
                            warmup=warmup, channels_last=channels_last, images=images,
                            images_name=data or "random")
    decisions = "learned decisions" if fraction is None else f"random decisions at FLOPs fraction {fraction}"
    on = f"test images of {data}" if data else "random images"
    used = torch.get_num_threads()
    console.print(results_table(results, f"dynamize bench: {decisions}, {on}, {size}px, {used} "
                                         f"{'thread' if used == 1 else 'threads'}, {repeats} "
                                         f"{'pass' if repeats == 1 else 'passes'}"))
    if json_out is not None:
        write_results(json_out, results)
        console.print(f"wrote [bold]{json_out}[/bold]")


def register(app: typer.Typer) -> None:
    app.command()(bench)
