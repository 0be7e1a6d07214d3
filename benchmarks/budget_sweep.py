"""Accuracy at a FLOPs budget: a cached teacher converted once, then fine-tuned with LC / L-only / C-only gates at
each budget, calibrated, and evaluated on the whole test split (accuracy, FLOPs mean and per-image spread).

    python benchmarks/teachers.py resnet18           # once: the teacher (see that script)
    python benchmarks/budget_sweep.py ~/.cache/dynamize/teachers/resnet18-fmnist32 --budgets 0.5 0.25 \
        --gates both layer channel --root /tmp/sweep --json docs/results/resnet18-sweep.jsonl [key=value ...]

Runs are kept under --root, so an interrupted sweep resumes what it had not finished. Each finished run is printed
and appended to --json as one line (with the command, date, machine and wall time).
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dynamize.io.runs import CONFIG, check_run, convert_to_run, read_config
from dynamize.training.jobs import finetune
from dynamize.training.preflight import finetune_recipe

NAMES = {"both": "LC", "layer": "L-only", "channel": "C-only"}


def facts() -> dict:
    """When, where and how a result line was measured."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}


def row_of(run: Path, gates: str, budget: float, seconds: float) -> dict:
    """One result line from a finished run's config.json."""
    d = read_config(run)["dynamize"]
    e, a = d["eval"], d["eval"]["adaptivity"]
    residual_outputs = any(g.get("exits") for g in d["plan"]["groups"])
    return {"run": str(run), "gates": NAMES[gates], "budget": budget, "residual_outputs": residual_outputs,
            "top1": e["top1"],
            "teacher_top1": d["teacher_eval"]["top1"], "drop": d["teacher_eval"]["top1"] - e["top1"],
            "flops_mean": e["flops_mean"], "p5": a["p5"], "p50": a["p50"], "p95": a["p95"], "spread": a["spread"],
            "patterns": a["patterns"], "entropy_bits": a["pattern_entropy_bits"],
            "trained_fraction": d["calibration"].get("trained_fraction"), "seconds": seconds,
            "recipe": {k: d["recipe"].get(k) for k in ("epochs", "train_subset", "lr_backbone", "lr_gates",
                                                       "settle_fraction", "static_gates", "seed",
                                                       "budget_weight", "floor_margin")},
            **facts()}


def table(rows: list[dict]) -> Table:
    t = Table(title="budget sweep (test split)")
    for col in ("gates", "budget", "top-1 %", "teacher", "drop pt", "FLOPs mean", "p5 / p50 / p95", "spread",
                "patterns", "min"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["gates"], f"{r['budget']:.2f}", f"{r['top1']:.2f}", f"{r['teacher_top1']:.2f}", f"{r['drop']:.2f}",
                  f"{r['flops_mean']:.3f}", f"{r['p5']:.3f} / {r['p50']:.3f} / {r['p95']:.3f}", f"{r['spread']:.3f}",
                  str(r["patterns"]), f"{r['seconds'] / 60:.0f}")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher", type=Path, help="a `dynamize train` run")
    ap.add_argument("--recipe", default=None,
                    help="recipe name or path (default: the one `dynamize finetune` chooses for the model and data)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--gates", nargs="+", default=["both", "layer", "channel"], choices=sorted(NAMES))
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--channel-mode", default="channel", choices=("channel", "width"),
                    help="C-Net mode of the conversion (a root holds one conversion: use one root per mode)")
    ap.add_argument("--residual-outputs", action="store_true",
                    help="also gate the layers that end residual branches (`dynamize convert --residual-outputs`)")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per finished run")
    ap.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    args = ap.parse_args()
    console = Console(width=160)
    conv = args.root / "converted"
    if not (conv / CONFIG).is_file():
        convert_to_run(str(args.teacher), conv, channel_mode=args.channel_mode, residual_outputs=args.residual_outputs)
    converted = check_run(conv)
    rows = []
    for gates in args.gates:
        for budget in args.budgets:
            out = args.root / f"{NAMES[gates]}-b{budget:.2f}"
            start = time.time()
            if not (out / CONFIG).is_file():
                recipe, _ = finetune_recipe(converted, args.recipe, args.overrides, budget=budget, gates=gates)
                finetune(conv, recipe, out, resume=(out / "checkpoints").is_dir(), console=console)
            rows.append(row_of(out, gates, budget, time.time() - start))
            console.print(json.dumps(rows[-1]))
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                with open(args.json, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    console.print(table(rows))


if __name__ == "__main__":
    main()
