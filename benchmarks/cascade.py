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

Which images escalate is decided by a score of the cheap model's softmax (`--scores`): the top probability, as
`dynamize cascade` does, or the margin between the top two, or the negative entropy; the least sure images escalate
first. "Either right" is the ceiling of any such rule: the share of images that the cheap model or the original
classifies correctly; "both averaged" runs the two on every image and averages their softmax (a cost of the cheap
model's FLOPs plus 1.0), what the two networks reach together with no budget at all.

    python benchmarks/cascade.py TEACHER [--runs RUN ...] [--pruned OUT=FRACTION ...] --budgets 0.2 0.25
        [--scores top margin entropy] [--seed S] [--json F]
"""
import argparse
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from budget_sweep import facts
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file
from static_baseline import prune_to
from torch import nn

from dynamize.graph.cost import flops_per_image
from dynamize.graph.rewrite import DynamicNet
from dynamize.io.runs import load, load_base, read_config
from dynamize.runtime.cascade import confidence, escalates, escalation_threshold
from dynamize.training.data import DataSpec, datasets, loader


def _margin(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.softmax(1).topk(2, 1).values
    return top2[:, 0] - top2[:, 1]


def _negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    return (logits.softmax(1) * logits.log_softmax(1)).sum(1)


# Scores of the cheap model's logits, higher = surer; "top" is what `dynamize cascade` uses.
SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"top": confidence, "margin": _margin,
                                                            "entropy": _negative_entropy}


@torch.no_grad()
def outputs(model: nn.Module, data, fraction: float = 1.0) -> dict[str, torch.Tensor]:
    """Per image: logits, label, correctness and FLOPs fraction of the original's (a gated model's own, else
    `fraction`)."""
    model.eval()
    logits, labels, flops = [], [], []
    for images, target in loader(data, 256):
        logits.append(model(images))
        labels.append(target)
        flops.append(flops_per_image(model) if isinstance(model, DynamicNet)
                     else torch.full((len(target),), fraction))
    out, label = torch.cat(logits), torch.cat(labels)
    return {"logits": out, "labels": label, "correct": out.argmax(1) == label, "flops": torch.cat(flops)}


def cascade(small: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], score: str, threshold: float) -> dict:
    """Accuracy and per-image cost of the cascade that escalates the images whose `score` is at or below a
    threshold."""
    escalate = escalates(SCORES[score](small["logits"]), threshold)
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
    parser.add_argument("--scores", nargs="+", choices=list(SCORES), default=["top"],
                        help="what ranks the images for escalation (top softmax probability by default)")
    parser.add_argument("--seed", type=int, default=0, help="the cheap models' seed: its calibration split")
    parser.add_argument("--json", type=Path, help="append one result line per model and budget here")
    args = parser.parse_args()
    console = Console(width=140)
    start = time.time()
    recipe = read_config(args.teacher)["dynamize"]["recipe"]
    spec = DataSpec(recipe["data"], recipe["data_dir"], recipe["img_size"], recipe["in_chans"])
    splits = datasets(spec, seed=args.seed)
    teacher_net = load_base(args.teacher)
    teacher = outputs(teacher_net, splits.evaluation)
    smalls: list[tuple[nn.Module, str, float]] = [(load(run), "dynamize " + "/".join(Path(run).parts[-3:]),
                                                    1.0) for run in args.runs]
    smalls += [pruned_model(teacher_net, p, (spec.in_chans, spec.img_size, spec.img_size)) for p in args.pruned]
    teacher_top1 = 100 * teacher["correct"].float().mean().item()
    table = Table("cheap model", "alone: top-1 % / FLOPs", "either right %", "both averaged %", "budget", "score",
                  "top-1 %", "FLOPs mean", "p5 / p50 / p95", "escalated",
                  title=f"Confidence cascade to the original ({teacher_top1:.2f}% alone)")
    for model, name, fraction in smalls:
        calib, test = outputs(model, splits.calib, fraction), outputs(model, splits.evaluation, fraction)
        alone = cascade(test, teacher, "top", float("-inf"))
        either = 100 * (test["correct"] | teacher["correct"]).float().mean().item()
        averaged = (test["logits"].softmax(1) + teacher["logits"].softmax(1)).argmax(1) == test["labels"]
        both = 100 * averaged.float().mean().item()
        for budget, score in itertools.product(args.budgets, args.scores):
            threshold = escalation_threshold(SCORES[score](calib["logits"]), calib["flops"], budget)
            r = cascade(test, teacher, score, threshold)
            table.add_row(name, f"{alone['top1']:.2f} / {alone['flops_mean']:.3f}", f"{either:.2f}", f"{both:.2f}",
                          f"{budget}", score, f"{r['top1']:.2f}", f"{r['flops_mean']:.3f}",
                          f"{r['p5']:.3f} / {r['p50']:.3f} / {r['p95']:.3f}", f"{r['escalated']:.3f}")
            if args.json:
                line = {"cheap": name, "alone": alone, "budget": budget, "score": score, "cascade": r,
                        "either_top1": either, "averaged_top1": both, "teacher_top1": teacher_top1,
                        "seconds": time.time() - start, **facts()}
                with open(args.json, "a") as f:
                    f.write(json.dumps(line) + "\n")
    console.print(table)


if __name__ == "__main__":
    main()
