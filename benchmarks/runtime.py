"""Runtime benchmark: the wall-clock targets of the runtime (issue 11), dense timm models against the fast path.

Each configuration converts a random-init timm model (timing does not depend on the weights' values) at 224 px,
without the channel gates that cannot pay for themselves (`profitable_only`; `--all-gates` keeps them), and times
it with `dynamize.runtime.bench.bench`, the code behind `dynamize bench`: dense and dynamic passes alternate in one
process, every pass draws new random images and new random decisions at the FLOPs fraction asked, and the speedup
is the median over passes of dense / dynamic time, with its 10th and 90th percentiles. Learned runs (`--runs`, e.g.
the Fashion-MNIST sweep) are timed with their learned decisions on test images of `--data`.

    PYTHONPATH=. .venv/bin/python benchmarks/runtime.py --threads 1 --models none --json docs/runtime-learned.json \\
        --runs ~/.cache/dynamize/sweeps/resnet18/r3/LC-b0.50 ~/.cache/dynamize/sweeps/resnet18/r3/LC-b0.25

`--against-pruned` also times each learned run against the static model of the same mean FLOPs: its dense twin
pruned by Torch-Pruning to the run's budget (`static_baseline.prune_to`; the pruned weights do not matter for timing).
A cascade run (`dynamize cascade`) is timed as a cascade, against its original model and, with `--against-pruned`,
against the original pruned to the cascade's budget.

`--compare-modes` times the C-Nets' two channel modes side by side instead (`dynamize convert --channel-mode`):
per-channel decisions (gathered weights) against width mode (prefix slices), each against its own dense passes, over
every model, fraction and batch size of the targets:

    PYTHONPATH=. .venv/bin/python benchmarks/runtime.py --threads 1 --compare-modes --json docs/runtime-modes.json
"""
import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import dynamize
from dynamize.io.runs import read_config
from dynamize.runtime.bench import BenchResult, bench, open_target
from dynamize.runtime.cascade import CASCADE
from dynamize_cli.bench import IMAGES_PER_BATCH, sample_images, timing_cells


@dataclass(frozen=True)
class Target:
    """A configuration and what it must reach: `share` of the ideal speedup, or `dense` (speedup >= threshold)."""
    model: str
    fraction: float
    batch: int
    kind: str
    threshold: float

    def met(self, r: BenchResult) -> bool:
        return self.measured(r) >= self.threshold

    def measured(self, r: BenchResult) -> float:
        return r.speedup / r.ideal if self.kind == "share" else r.speedup

    def __str__(self) -> str:
        return f">= {self.threshold} x ideal" if self.kind == "share" else f">= {self.threshold}x (not slower)"


TARGETS = [
    Target("resnet50", 0.5, 1, "share", 0.8),
    Target("resnet50", 0.5, 32, "share", 0.6),
    *[Target(m, 0.9, b, "dense", 0.97) for m in ("resnet50", "mobilenetv3_large_100", "efficientnet_b0")
      for b in (1, 32)],
    Target("mobilenetv3_large_100", 0.5, 1, "share", 0.6),
    Target("efficientnet_b0", 0.5, 1, "share", 0.6),
]


def table(rows: list[tuple[BenchResult, str, str]], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("model", "batch", "FLOPs fraction", "dense ms (p10-p90)", "dynamic ms (p10-p90)",
                "speedup (p10-p90)", "ideal", "share of ideal", "target", "met"):
        t.add_column(col, justify="left" if col in ("model", "target") else "right")
    for r, target, met in rows:
        t.add_row(r.model, str(r.batch_size), f"{r.fraction:.3f}", *timing_cells(r), f"{r.ideal:.2f}x",
                  f"{r.speedup / r.ideal:.2f}", target, met)
    return t


def pruned_table(rows: list[BenchResult], title: str) -> Table:
    """Learned runs against the Torch-Pruning model of the same mean FLOPs (the `dense_*` fields of `rows`); at batch
    size 1 also the cheapest and the dearest third of the images (their mean FLOPs fraction and median time)."""
    t = Table(title=title, title_justify="left")
    for col in ("model", "batch", "dynamic FLOPs fraction", "Torch-Pruning ms (p10-p90)", "dynamic ms (p10-p90)",
                "static / dynamic time (p10-p90)", "cheapest third: FLOPs, ms", "dearest third: FLOPs, ms"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        thirds = [f"{f:.3f}, {ms:.1f}" for f, ms in r.by_cost()] if r.batch_size == 1 else ["–", "–"]
        t.add_row(r.model, str(r.batch_size), f"{r.fraction:.3f}", *timing_cells(r), *thirds)
    return t


def modes_table(results: dict[tuple[str, float, int, str], BenchResult], title: str) -> Table:
    """Channel and width mode side by side, per model, fraction asked and batch size."""
    t = Table(title=title, title_justify="left")
    for col in ("model", "fraction asked", "batch", "channel: FLOPs fraction", "channel: speedup (p10-p90)",
                "width: FLOPs fraction", "width: speedup (p10-p90)", "width / channel time"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for (model, fraction, batch, mode), r in results.items():
        if mode != "channel" or (model, fraction, batch, "width") not in results:
            continue
        w = results[model, fraction, batch, "width"]
        t.add_row(model, f"{fraction}", str(batch), f"{r.fraction:.3f}",
                  f"{r.speedup:.2f}x ({r.speedup_p10:.2f}-{r.speedup_p90:.2f})", f"{w.fraction:.3f}",
                  f"{w.speedup:.2f}x ({w.speedup_p10:.2f}-{w.speedup_p90:.2f})", f"{w.dynamic_ms / r.dynamic_ms:.2f}")
    return t


def compare_modes(targets: list[Target], args: argparse.Namespace, console: Console) -> list[dict]:
    """Time every model, fraction and batch size of `targets` in both channel modes; print them side by side."""
    models = list(dict.fromkeys(t.model for t in targets))
    fractions = sorted({t.fraction for t in targets})
    batches = sorted({t.batch for t in targets})
    results: dict[tuple[str, float, int, str], BenchResult] = {}
    for model in models:
        for fraction in fractions:
            for mode in ("channel", "width"):
                net, dense, size = open_target(model, fraction, args.img_size, profitable_only=not args.all_gates,
                                               channel_mode=mode)
                for r in bench(net, dense, f"{model} ({mode})", batches, size, fraction=fraction,
                               repeats=args.repeats, warmup=args.warmup):
                    results[model, fraction, r.batch_size, mode] = r
                console.print(modes_table(results, f"{model} @ {fraction}"))
    console.print(modes_table(results, f"Channel vs width mode: {args.img_size} px, {torch.get_num_threads()} "
                                       f"threads, {args.repeats} passes, random decisions"))
    return [{**r.to_dict(), "channel_mode": mode, "fraction_asked": fraction}
            for (_, fraction, _, mode), r in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per model and configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--models", nargs="+", help="only the targets of these models")
    parser.add_argument("--all-gates", action="store_true", help="convert with every gate, also those that cannot "
                                                                  "pay for themselves (default: profitable_only)")
    parser.add_argument("--runs", nargs="*", default=[], help="learned run directories to time on test images")
    parser.add_argument("--data", default="fashion-mnist", help="data set whose test images the runs are timed on")
    parser.add_argument("--against-pruned", action="store_true", help="also time each run against its dense twin "
                                                                       "pruned by Torch-Pruning to the run's budget")
    parser.add_argument("--compare-modes", action="store_true", help="time channel and width mode side by side")
    parser.add_argument("--json", default="runtime-bench.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = {"date": started, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu": platform.processor() or platform.machine(), "dynamize": dynamize.__version__,
               "plan": "every gate" if args.all_gates else "profitable_only"}
    console.print(machine)
    rows: list[tuple[BenchResult, str, str]] = []
    pruned: list[BenchResult] = []
    records = []
    targets = [t for t in TARGETS if not args.models or t.model in args.models]
    if args.compare_modes:
        records = compare_modes(targets, args, console)
        Path(args.json).write_text(json.dumps({"machine": machine, "results": records}, indent=1))
        console.print(f"wrote {args.json}")
        return
    for model, fraction in dict.fromkeys((t.model, t.fraction) for t in targets):
        net, dense, size = open_target(model, fraction, args.img_size, profitable_only=not args.all_gates)
        for target in (t for t in targets if (t.model, t.fraction) == (model, fraction)):
            (r,) = bench(net, dense, model, [target.batch], size, fraction=fraction, repeats=args.repeats,
                         warmup=args.warmup)
            met = "yes" if target.met(r) else "no"
            rows.append((r, str(target), met))
            records.append({**r.to_dict(), "target": str(target), "measured": target.measured(r), "met": met})
            console.print(table(rows[-1:], f"{model} @ {fraction}"))
    for run in args.runs:
        net, dense, size = open_target(run, None, None)
        name = f"{net.plan.architecture} {Path(run).parent.name}/{Path(run).name} (learned)"
        images, size = sample_images(run, args.data, IMAGES_PER_BATCH * 32, net.plan.input_size[0], size)
        for r in bench(net, dense, name, [1, 32], size, repeats=args.repeats, warmup=args.warmup, images=images,
                       images_name=args.data):
            rows.append((r, "", ""))
            records.append(r.to_dict())
            console.print(table(rows[-1:], name))
        if args.against_pruned:
            from static_baseline import prune_to  # Torch-Pruning: the benchmark-only extra, needed for this only

            info = read_config(run)["dynamize"]
            budget = (info.get(CASCADE) or {}).get("budget", info.get("budget"))  # a cascade's, with escalations
            if budget is None:
                raise SystemExit(f"error: {run} has no budget (not a fine-tuned run); --against-pruned needs one")
            static, got = prune_to(dense, budget, net.plan.input_size)
            against = bench(net, static, f"{name} vs Torch-Pruning {got:.3f}", [1, 32], size, repeats=args.repeats,
                            warmup=args.warmup, images=images, images_name=args.data)
            pruned.extend(against)
            records.extend({**r.to_dict(), "reference": "torch-pruning", "reference_fraction": got} for r in against)
            console.print(pruned_table(against, name))
    console.print(table(rows, f"Runtime: {args.img_size} px (runs: their own size), {torch.get_num_threads()} "
                              f"threads, {args.repeats} passes, started {started}"))
    if pruned:
        console.print(pruned_table(pruned, f"Learned runs against Torch-Pruning at the same mean FLOPs, started "
                                           f"{started}"))
    Path(args.json).write_text(json.dumps({"machine": machine, "results": records}, indent=1))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
