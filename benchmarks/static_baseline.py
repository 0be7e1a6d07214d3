"""The static baseline a dynamic model must beat: the same teacher pruned by Torch-Pruning to the same FLOPs.

The teacher (a `dynamize train` run) is pruned with Torch-Pruning's MetaPruner (L1 magnitude importance, channels of
coupled layers removed together, the classifier kept), with the pruning ratio bisected until the pruned model's FLOPs
(torch's FlopCounterMode, as dynamize counts them) are the asked fraction of the teacher's. It is then fine-tuned
exactly as `dynamize finetune` fine-tunes: the same recipe (epochs, optimiser, learning rates, data, seed) and timm's
logit distillation from the same teacher, and evaluated on the test split.

Torch-Pruning is a benchmark-only dependency: `pip install -e '.[bench]'`.

    python benchmarks/static_baseline.py TEACHER_RUN --fraction 0.25 -o /tmp/static-0.25 [key=value ...]
"""
import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch_pruning as tp
from budget_sweep import facts
from rich.console import Console
from timm.task import LogitDistillationTask
from torch import nn

from dynamize.graph.cost import count_flops
from dynamize.io.runs import load_base
from dynamize.training.data import DataSpec, datasets, loader
from dynamize.training.evaluate import evaluate
from dynamize.training.loop import fit
from dynamize.training.recipe import load_recipe


def prune_to(model: nn.Module, fraction: float, input_size, iters: int = 14) -> tuple[nn.Module, float]:
    """A copy of `model` pruned so that its FLOPs are `fraction` of the original's (bisection on the ratio)."""
    full = count_flops(model, input_size)
    example = torch.zeros(1, *input_size)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(iters):
        ratio = (lo + hi) / 2
        pruned = copy.deepcopy(model).eval()
        head: nn.Module = pruned.get_classifier()  # type: ignore[operator]  # every timm model has one
        pruner = tp.pruner.MetaPruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[head])
        pruner.step()
        got = count_flops(pruned, input_size) / full
        if best is None or abs(got - fraction) < abs(best[1] - fraction):
            best = (pruned, got)
        lo, hi = (ratio, hi) if got > fraction else (lo, ratio)
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path, help="a `dynamize train` run (the teacher of the dynamic runs)")
    parser.add_argument("--fraction", type=float, required=True, help="FLOPs fraction to prune to")
    parser.add_argument("--recipe", default="fashion-mnist-resnet18")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="append the result as one JSON line here")
    parser.add_argument("overrides", nargs="*", help="recipe overrides key=value (as given to dynamize finetune)")
    args = parser.parse_args()
    console = Console(width=120)
    start = time.time()
    recipe = load_recipe(args.recipe, args.overrides, budget=args.fraction)
    teacher = load_base(args.teacher).eval()
    size = (recipe.in_chans, recipe.img_size, recipe.img_size)
    student, fraction = prune_to(teacher, args.fraction, size)
    console.print(f"pruned to a FLOPs fraction of {fraction:.4f} (asked {args.fraction})")
    train, calib, test = datasets(DataSpec(recipe.data, recipe.data_dir, recipe.img_size, recipe.in_chans),
                                  recipe.calib_size, recipe.train_subset, recipe.seed, recipe.eval_subset)
    task = LogitDistillationTask(student.train(), teacher, criterion=nn.CrossEntropyLoss(
        label_smoothing=recipe.label_smoothing), distill_loss_weight=recipe.distill_weight,
        task_loss_weight=recipe.task_weight, temperature=recipe.temperature, verbose=False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(student.parameters()), "lr": recipe.lr_backbone, "weight_decay": recipe.weight_decay}]
    fit(task, student, train, recipe, args.output, groups, console=console)
    test_loader = loader(test, 256)
    result = {"method": "torch-pruning (L1, MetaPruner)", "fraction": fraction, "asked": args.fraction,
              "eval": evaluate(student, test_loader), "teacher_eval": evaluate(teacher, test_loader),
              "recipe": recipe.to_dict(), "seconds": time.time() - start, **facts()}
    console.print(f"static {fraction:.3f}: top-1 {result['eval']['top1']:.2f} (teacher "
                  f"{result['teacher_eval']['top1']:.2f}), {result['seconds'] / 60:.1f} min")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
