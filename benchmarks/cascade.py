"""What per-image compute can win on a task: a small model that hands the images it is unsure of to the original.

`dynamize cascade` does this for a fine-tuned run; this benchmark also takes Torch-Pruning baselines as the cheap
model, and several budgets in one pass.

A confidence cascade is the simplest input-adaptive network: every image runs a cheap model, and the images whose
top softmax probability is at or below a threshold run the original (teacher) model as well. An escalated image costs
the cheap model's FLOPs plus all of the original's (nothing is reused). The threshold is chosen on the calibration
split (held out from training, as dynamize's own calibration) so that the mean cost there meets each budget, and
accuracy and cost are then measured on the evaluation split. Set against the dynamic and static models of the same
budget, it shows how much accuracy per-image allocation can buy on the task, and what shape of allocation buys it.

The cheap model is a fine-tuned dynamize run (`--runs`, at its own per-image FLOPs) or a Torch-Pruning baseline of
`static_baseline.py` (`--pruned OUT=FRACTION`: the teacher is pruned again to the same structure, which is
deterministic, and the fine-tuned weights are read from OUT's last checkpoint).

    python benchmarks/cascade.py TEACHER [--runs RUN ...] [--pruned OUT=FRACTION ...] --budgets 0.2 0.25
        [--seed S] [--json F]
"""
import argparse
import json
import time
from pathlib import Path

import torch
from budget_sweep import facts
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file
from static_baseline import prune_to
from torch import nn

from dynamize.io.runs import load, load_base, read_config
from dynamize.runtime.cascade import escalates, escalation_threshold
from dynamize.training.data import DataSpec, datasets, loader
from dynamize.training.evaluate import predict


def outputs(model: nn.Module, data, fraction: float = 1.0) -> dict[str, torch.Tensor]:
    """Per image: top softmax probability, correctness and FLOPs fraction of the original's (a gated model's own,
    else `fraction`)."""
    pred = predict(model, loader(data, 256))
    correct = pred["top5"][:, 0] == pred["labels"]
    return {"confidence": pred["confidence"], "correct": correct,
            "flops": pred.get("fractions", torch.full((len(correct),), fraction))}


def cascade(small: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], threshold: float) -> dict:
    """Accuracy and per-image cost of the cascade at a threshold."""
    escalate = escalates(small["confidence"], threshold)
    cost = small["flops"] + escalate.float()
    correct = torch.where(escalate, teacher["correct"], small["correct"])
    q = {f"p{p}": cost.quantile(p / 100).item() for p in (5, 50, 95)}
    return {"top1": 100 * correct.float().mean().item(), "flops_mean": cost.mean().item(), **q,
            "escalated": escalate.float().mean().item()}


def pruned_spec(spec: str) -> tuple[Path, float]:
    """`OUT=FRACTION` of a static_baseline.py run: its fine-tuned weights and the fraction it was pruned to."""
    out, _, asked = spec.rpartition("=")
    weights = Path(out) / "checkpoints" / "last" / "model.safetensors"
    try:
        fraction = float(asked)
    except ValueError:
        fraction = 0.0
    if not out or not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected OUT=FRACTION with 0 < FRACTION <= 1")
    if not weights.is_file():
        raise argparse.ArgumentTypeError(f"{spec!r}: no {weights} (not a finished static_baseline.py run)")
    return weights, fraction


def pruned_model(teacher: nn.Module, spec: tuple[Path, float], input_size) -> tuple[nn.Module, str, float]:
    """A Torch-Pruning baseline: the teacher pruned again to the same structure, with the run's fine-tuned weights;
    its name and FLOPs fraction."""
    weights, asked = spec
    model, fraction = prune_to(teacher, asked, input_size)
    model.load_state_dict(load_file(weights))
    return model, f"Torch-Pruning {weights.parents[2].name}", fraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path, help="the original model: a `dynamize train` run")
    parser.add_argument("--runs", nargs="*", default=[], help="fine-tuned dynamize runs as the cheap model")
    parser.add_argument("--pruned", nargs="*", default=[], type=pruned_spec,
                        help="OUT=FRACTION of static_baseline.py runs")
    parser.add_argument("--budgets", nargs="+", type=float, required=True, help="mean FLOPs fractions")
    parser.add_argument("--seed", type=int, default=0, help="the cheap models' seed: its calibration split")
    parser.add_argument("--json", type=Path, help="append one result line per model and budget here")
    args = parser.parse_args()
    console = Console(width=140)
    start = time.time()
    recipe = read_config(args.teacher)["dynamize"]["recipe"]
    spec = DataSpec(recipe["data"], recipe["data_dir"], recipe["img_size"], recipe["in_chans"])
    splits = datasets(spec, seed=args.seed)
    teacher_net = load_base(args.teacher)
    teacher = {name: outputs(teacher_net, split) for name, split in (("calib", splits.calib),
                                                                      ("test", splits.evaluation))}
    smalls: list[tuple[nn.Module, str, float]] = [(load(run), f"dynamize {Path(run).parent.name}/{Path(run).name}",
                                                    1.0) for run in args.runs]
    smalls += [pruned_model(teacher_net, p, (spec.in_chans, spec.img_size, spec.img_size)) for p in args.pruned]
    teacher_top1 = 100 * teacher["test"]["correct"].float().mean().item()
    table = Table("cheap model", "alone: top-1 % / FLOPs", "budget", "top-1 %", "FLOPs mean", "p5 / p50 / p95",
                  "escalated", title=f"Confidence cascade to the original ({teacher_top1:.2f}% alone)")
    for model, name, fraction in smalls:
        calib, test = outputs(model, splits.calib, fraction), outputs(model, splits.evaluation, fraction)
        alone = cascade(test, teacher["test"], float("-inf"))
        for budget in args.budgets:
            r = cascade(test, teacher["test"], escalation_threshold(calib["confidence"], calib["flops"], budget))
            table.add_row(name, f"{alone['top1']:.2f} / {alone['flops_mean']:.3f}", f"{budget}", f"{r['top1']:.2f}",
                          f"{r['flops_mean']:.3f}", f"{r['p5']:.3f} / {r['p50']:.3f} / {r['p95']:.3f}",
                          f"{r['escalated']:.3f}")
            if args.json:
                line = {"cheap": name, "alone": alone, "budget": budget, "cascade": r,
                        "teacher_top1": teacher_top1,
                        "seconds": time.time() - start, **facts()}
                with open(args.json, "a") as f:
                    f.write(json.dumps(line) + "\n")
    console.print(table)


if __name__ == "__main__":
    main()
