"""Do a fine-tuned run's per-image decisions matter? Its accuracy with its own decisions against the same decisions
handed to other images.

Each evaluation batch runs twice: once as the run decides, and once with every gate forced to the decisions of
another image of the batch (one random permutation of the images per batch, the same for every gate, so each image
gets some other image's whole decision pattern). The second pass spends exactly the same FLOPs on the batch, spread
over the images at random instead of as the gates chose; the gap between the two accuracies is what the choice is
worth. Decisions that ignore the image (static gates) lose nothing by construction.

    python benchmarks/shuffled_decisions.py RUN [RUN ...] [--limit N] [--json OUT.jsonl]
"""
import argparse
import json
import time
from pathlib import Path

import torch
from budget_sweep import facts
from rich.console import Console
from rich.table import Table

from dynamize.graph.cost import flops_per_image
from dynamize.graph.rewrite import DynamicNet
from dynamize.io.runs import load, read_config
from dynamize.reporting.report import data_spec
from dynamize.runtime.bench import release
from dynamize.training.data import eval_dataset, first_images, loader


@torch.no_grad()
def own_and_shuffled(net: DynamicNet, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
                     ) -> dict[str, torch.Tensor]:
    """Per-image correctness and FLOPs fraction of one batch with its own decisions and with another image's."""
    logits = net(images)
    own = {"correct": logits.argmax(1) == labels, "flops": flops_per_image(net)}
    perm = torch.randperm(len(images), generator=generator)
    gates = [gate for _, _, gate in net.gates() if gate.is_active]
    decisions = [gate.decisions for gate in gates]
    try:
        for gate, keep in zip(gates, decisions):
            gate.forced = keep[perm]
        logits = net(images)
        shuffled = {"correct": logits.argmax(1) == labels, "flops": flops_per_image(net)}
    finally:
        release(net)
    return {**{f"own_{k}": v for k, v in own.items()}, **{f"shuffled_{k}": v for k, v in shuffled.items()}}


def measure(run: str, limit: int, seed: int = 0) -> dict:
    """Accuracy and FLOPs of `run` on its evaluation split, with its own and with shuffled decisions."""
    net = load(run).eval()
    config = read_config(run)
    ds = first_images(eval_dataset(data_spec(Path(run), config, None)), limit)
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {}
    for images, labels in loader(ds, 256):
        for key, value in own_and_shuffled(net, images, labels, generator).items():
            parts.setdefault(key, []).append(value)
    out = {key: torch.cat(value) for key, value in parts.items()}
    return {"run": run, "budget": config["dynamize"].get("budget"), "images": len(ds),
            "top1_own": 100 * out["own_correct"].float().mean().item(),
            "top1_shuffled": 100 * out["shuffled_correct"].float().mean().item(),
            "flops_own": out["own_flops"].mean().item(), "flops_shuffled": out["shuffled_flops"].mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="fine-tuned run directories")
    parser.add_argument("--limit", type=int, default=0, help="only the first N evaluation images (0: all)")
    parser.add_argument("--json", help="append one result line per run to this file")
    args = parser.parse_args()
    console = Console(width=140)
    table = Table("run", "budget", "images", "top-1 % own decisions", "top-1 % shuffled", "gap (pt)",
                  "FLOPs own / shuffled", title="Own decisions against another image's")
    for run in args.runs:
        start = time.time()
        r = measure(run, args.limit)
        r.update(facts(), seconds=time.time() - start)
        table.add_row(run, f"{r['budget']}", f"{r['images']:,}", f"{r['top1_own']:.2f}", f"{r['top1_shuffled']:.2f}",
                      f"{r['top1_own'] - r['top1_shuffled']:.2f}", f"{r['flops_own']:.3f} / {r['flops_shuffled']:.3f}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    console.print(table)


if __name__ == "__main__":
    main()
