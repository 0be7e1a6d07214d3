"""Runtime benchmark: dense timm models against dynamize's hard inference path on the CPU.

Times resnet50, mobilenetv3_large_100 and efficientnet_b0 at 224 px with forced random decisions at FLOPs fractions
0.3 / 0.5 / 0.7, at batch 1 and 32, with 2 torch threads; prints a table and writes JSON. Random weights (no
download): timing does not depend on the weights' values.

    .venv/bin/python benchmarks/runtime.py --json benchmarks/runtime.json
"""
import argparse
import platform
import time

import torch
from rich.console import Console

import dynamize
from dynamize.runtime.bench import bench, open_target, write_results
from dynamize_cli.bench import results_table

MODELS = ("resnet50", "mobilenetv3_large_100", "efficientnet_b0")
FRACTIONS = (0.3, 0.5, 0.7)
BATCH_SIZES = (1, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--fractions", nargs="+", type=float, default=FRACTIONS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=BATCH_SIZES)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per model and configuration")
    parser.add_argument("--json", default="runtime-bench.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=120)
    machine = platform.processor() or platform.machine()
    console.print(f"dynamize {dynamize.__version__}, torch {torch.__version__}, {machine}"
                  f", {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    results = []
    for model in args.models:
        for fraction in args.fractions:
            net, dense, size = open_target(model, fraction, args.img_size)
            for batch in args.batch_sizes:
                # Fewer passes at batch 32: each takes seconds, and the median of a few is already stable.
                repeats = args.repeats if batch < 8 else max(2, args.repeats // 2)
                results += bench(net, dense, model, [batch], size, fraction=fraction, repeats=repeats, warmup=1)
                console.print(results_table(results[-1:], f"{model} @ {fraction}"))
    console.print(results_table(results, f"Runtime: {args.img_size}px, {args.threads} threads, random decisions"))
    write_results(args.json, results)
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
