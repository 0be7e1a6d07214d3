"""Helpers shared by the tests: random-but-meaningful weights, tiny image folders, tiny run directories."""
from pathlib import Path

import timm
import torch

import dynamize


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Give norms random affine parameters and statistics, and layer scales random values.

    timm zero-initialises the last norm of residual branches; without this a residual branch adds nothing and
    tests comparing outputs could not see a branch that was dropped or computed wrongly.
    """
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def make_image_folder(root, classes: int = 3, per_class: int = 12, size: int = 32, splits=("train", "val")):
    """A small image-folder data set whose classes differ in brightness pattern, so a model can learn them."""
    from PIL import Image
    g = torch.Generator().manual_seed(2)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                base = torch.zeros(size, size, 3)
                base[:, c * size // classes:(c + 1) * size // classes] = 0.8
                img = (base + 0.2 * torch.rand(size, size, 3, generator=g)).clamp(0, 1)
                Image.fromarray((img * 255).byte().numpy()).save(folder / f"{i}.png")
    return root


# The architecture sweep of the conversion and runtime tests, name -> input size. Families: ResNet/ResNet-D/ResNeXt/
# SE-ResNet, RegNet, MobileNetV2/V3, EfficientNet/V2, MixNet, GhostNet, ReXNet, DLA, DPN, CSP nets, Res2Net, HRNet,
# DenseNet, VGG, ConvNeXt, Xception, Inception, RepVGG, ...
ARCHS = {
    "resnet18": 64, "resnet50d": 64, "resnext50_32x4d": 64, "seresnet50": 64, "regnetx_002": 64, "regnety_002": 64,
    "mobilenetv2_100": 64, "mobilenetv3_small_100": 64, "efficientnet_b0": 64, "tf_efficientnetv2_b0": 64,
    "mixnet_s": 64, "ghostnet_100": 64, "rexnet_100": 64, "dla34": 64, "dpn68": 64, "cspresnet50": 64,
    "cspdarknet53": 64, "res2net50_14w_8s": 64, "hrnet_w18_small": 64, "densenet121": 64, "vgg11": 32,
    "convnext_atto": 64, "legacy_xception": 64, "inception_v3": 96, "repvgg_a0": 64, "selecsls42b": 64,
    "lcnet_050": 64, "mnasnet_100": 64, "tf_efficientnet_lite0": 64, "nf_resnet26": 64,
}
# Architectures that are reported as not gateable, and why.
NOT_GATEABLE = {
    "dpn68": "dual-path blocks sum slices of a shared tensor and feed grouped convolutions",
    "nf_resnet26": "timm marks NormFreeBlock as not traceable, so its blocks are opaque to torch.fx",
}

TINY_RECIPE = ["img_size=32", "in_chans=3", "epochs=1", "batch_size=8", "calib_size=6", "workers=0"]


CLASSES = 3


def randomize_gates(net: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Random last-layer keep weights, so decisions differ between images (scales stay 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, gate in net.gates():
            last = gate.mlp[-1]
            last.weight[:gate.units] = torch.randn(gate.units, last.in_features, generator=g) * 2
            last.bias[:gate.units] = 0.3
    return net


def make_runs(root: Path) -> dict:
    """An image folder, the base model, a converted run (the teacher) and a fine-tuned-looking run pointing at both."""
    data = make_image_folder(root / "data", classes=CLASSES, per_class=8)
    base = randomize(timm.create_model("test_resnet", num_classes=CLASSES)).eval()
    teacher_run = dynamize.save(dynamize.convert(base, img_size=32), root / "runs" / "converted")
    recipe = {"data": str(data), "data_dir": None, "img_size": 32, "in_chans": 3}
    dynamic_run = dynamize.save(randomize_gates(dynamize.convert(base, img_size=32)), root / "runs" / "tuned",
                                extra={"budget": 0.5, "recipe": recipe, "teacher": str(teacher_run.resolve())})
    return {"data": data, "base": base, "teacher_run": teacher_run, "run": dynamic_run}
