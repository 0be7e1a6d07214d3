"""Budget sweep on Fashion-MNIST: ResNet-18 teacher, then LC / L-only / C-only fine-tuned at budgets 0.3, 0.5, 0.7.

Prints a table (top-1 on the test set, measured mean / p95 FLOPs fraction, training time) and writes it as JSON.
Runs are kept under --root, so an interrupted sweep skips what it already finished.

    .venv/bin/python benchmarks/budget_sweep.py --root runs/sweep --json docs/budget_sweep.json
"""
import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import dynamize
from dynamize.io.runs import CONFIG
from dynamize.models import create_base
from dynamize.training.jobs import finetune, train_base
from dynamize.training.recipe import load_recipe

RECIPE = "fashion-mnist-resnet18"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("runs/sweep"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per run")
    ap.add_argument("--train-subset", type=int, default=6000, help="fine-tuning images per run (0 = all)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--gates", nargs="+", default=["both", "layer", "channel"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    console = Console()

    teacher_dir, conv_dir = args.root / "teacher", args.root / "resnet18"
    t0 = time.time()
    if not (teacher_dir / CONFIG).is_file():
        recipe = load_recipe(RECIPE, [f"epochs={args.teacher_epochs}", "lr_backbone=0.002", "weight_decay=0.05",
                                      "workers=1"])
        train_base(recipe, teacher_dir, console=console)
    teacher_time = time.time() - t0
    if not (conv_dir / CONFIG).is_file():
        base = create_base("resnet18", checkpoint=teacher_dir, num_classes=10, in_chans=1)
        dynamize.save(dynamize.convert(base, img_size=32), conv_dir)

    rows = []
    for gates in args.gates:
        for budget in args.budgets:
            out = args.root / f"resnet18-{gates}-b{budget:.2f}"
            start = time.time()
            if not (out / CONFIG).is_file():
                recipe = load_recipe(RECIPE, [f"epochs={args.epochs}", f"train_subset={args.train_subset}",
                                              "workers=1", "checkpoint_every=0"], budget=budget, gates=gates)
                finetune(conv_dir, recipe, out, console=console)
            d = json.loads((out / CONFIG).read_text())["dynamize"]
            rows.append({"gates": gates, "budget": budget, "top1": d["eval"]["top1"],
                         "teacher_top1": d["teacher_eval"]["top1"], "flops_mean": d["eval"]["flops_mean"],
                         "flops_p95": d["eval"]["flops_p95"], "train_seconds": time.time() - start})
            console.print(rows[-1])

    table = Table(title=f"Fashion-MNIST ResNet-18 budget sweep (teacher {teacher_time:.0f} s)")
    for col in ("gates", "budget", "top-1 %", "teacher top-1 %", "drop pt", "FLOPs mean", "FLOPs p95", "time s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["gates"], f"{r['budget']:.1f}", f"{r['top1']:.2f}", f"{r['teacher_top1']:.2f}",
                      f"{r['teacher_top1'] - r['top1']:.2f}", f"{r['flops_mean']:.3f}", f"{r['flops_p95']:.3f}",
                      f"{r['train_seconds']:.0f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"teacher_seconds": teacher_time, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
