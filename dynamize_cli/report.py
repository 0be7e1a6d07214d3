"""`dynamize report`: evaluate runs and their teachers, print the numbers, write report.json, report.md and plots."""
from collections.abc import Sequence
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from dynamize.io.atomic import check_output_dir
from dynamize.reporting import markdown as report_md
from dynamize.reporting.report import (
    FLOPS_DEFINITION,
    build_report,
    default_output,
    evaluate_runs,
    measure_latency,
    resolve_runs,
    run_names,
    static_entry,
    write_report,
)

from .options import in_range


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    t = Table(title=title, title_justify="left", show_header=any(header))
    for i, col in enumerate(header):
        t.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0, overflow="fold")
    for row in rows:
        t.add_row(*row)
    return t


def _print_run(entry: dict, console: Console) -> None:
    name = entry["name"]
    if entry["accuracy"] is None:
        console.print(_table(f"{name}: plan and FLOPs accounting", ("", ""), report_md.static_rows(entry)))
        console.print(_table(f"{name}: blocks", report_md.STATIC_BLOCK_HEADER, report_md.static_block_rows(entry)))
        return
    d = entry["data"]
    console.print(_table(f"{name} on {d['images']} images of {d['name']}", report_md.SUMMARY_HEADER,
                         report_md.summary_rows(entry)))
    console.print(_table(f"{name}: blocks (kept channels are means over all images, 0 when the block is skipped)",
                         report_md.BLOCK_HEADER, report_md.block_rows(entry)))


def report(
    runs: list[Path] | None = typer.Argument(None, metavar="RUN", help="run directories (default: the most recent "
                                                                      "run)"),
    data: str | None = typer.Option(None, help="data set (default: the one each run was fine-tuned on): "
                                                  "fashion-mnist, a timm dataset name, or an image folder"),
    data_dir: str | None = typer.Option(None, help="where the data set's files are"),
    output: Path | None = typer.Option(None, "-o", "--output", help="report directory (default: reports/NAME)"),
    static: bool = typer.Option(False, "--static", help="only the plan and its FLOPs accounting; needs no data"),
    limit: int = typer.Option(0, help="evaluate only the first N images of the evaluation split (0: all)",
                              callback=in_range("limit")),
    batch_size: int = typer.Option(64, help="evaluation batch size", callback=in_range("batch_size")),
    latency: bool = typer.Option(False, "--latency", help="also time dense vs dynamic at batch 1 and 32 "
                                                          "(dynamize bench)"),
) -> None:
    """Evaluate runs and their teachers: accuracy, per-image FLOPs, gate behaviour; writes report.json/.md + plots."""
    console = Console()
    runs = resolve_runs(runs or [])
    names = run_names(runs)
    out = output or default_output(names, static)
    check_output_dir(out)
    if static:
        evaluations, entries = [], [static_entry(run, name) for run, name in zip(runs, names)]
    else:
        with console.status(f"evaluating {len(runs)} run(s) and their teachers"):
            evaluations = evaluate_runs(runs, data, data_dir, limit, batch_size)
        entries = [ev.entry for ev in evaluations]
        if latency:
            with console.status("timing dense vs dynamic"):
                for run, entry in zip(runs, entries):
                    entry["latency"] = measure_latency(run)
    with console.status(f"writing {out}"):
        write_report(build_report(entries, static), evaluations, out)
    for entry in entries:
        _print_run(entry, console)
    if len(entries) > 1 and not static:
        console.print(_table("comparison, by FLOPs", report_md.COMPARISON_HEADER, report_md.comparison_rows(entries)))
    console.print(f"[dim]{FLOPS_DEFINITION}.[/dim]")
    console.print(f"wrote [bold]{out}[/bold] (report.json, report.md{', plots/' if evaluations else ''})")


def register(app: typer.Typer) -> None:
    app.command()(report)
