"""Helpers shared by the tests: random-but-meaningful weights, tiny image folders, tiny run directories, DDP jobs."""
import os
import socket
from datetime import timedelta
from pathlib import Path

import timm
import torch
import torch.multiprocessing as mp

import dynamize


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Give norms random affine parameters and statistics, and layer scales and gains random values.

    timm zero-initialises the last norm (or, in NF nets, the last gain) of residual branches; without this a residual
    branch adds nothing and tests comparing outputs could not see a branch that was dropped or computed wrongly.
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
            if name.endswith(("gamma", "gain")):
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


# The architecture sweep of the conversion and runtime tests, name -> input size: a small architecture from each of
# 47 timm CNN families and variants. benchmarks/coverage.py measures coverage on a different list that no test names.
ARCHS = {
    "resnet18": 32, "resnet50d": 32, "resnext50_32x4d": 32, "seresnet18": 32, "ecaresnet26t": 32, "skresnet18": 32,
    "res2net50_14w_8s": 32, "resnest14d": 32, "nf_resnet26": 32, "resnetv2_18": 32, "regnetx_002": 32,
    "regnety_002": 32, "regnetz_005": 32, "mobilenetv1_100": 32, "mobilenetv2_100": 32, "mobilenetv3_small_100": 64,
    "mobilenetv4_conv_small_035": 32, "efficientnet_b0": 32, "tf_efficientnetv2_b0": 32, "tf_efficientnet_lite0": 32,
    "mixnet_s": 32, "mnasnet_100": 32, "fbnetv3_b": 32, "lcnet_050": 32, "hardcorenas_b": 32, "tinynet_e": 32,
    "ghostnet_100": 32, "ghostnetv2_100": 64, "rexnet_100": 32, "repghostnet_058": 32, "dla34": 32, "dpn68": 32,
    "densenet121": 32, "repvgg_a0": 32, "gernet_s": 32, "cspresnet50": 32, "cs3darknet_focus_s": 32, "darknet17": 32,
    "hrnet_w18_small": 64, "inception_v3": 75, "legacy_xception": 32, "selecsls42b": 64, "ese_vovnet19b_slim_dw": 32,
    "hgnetv2_b0": 32, "convnext_atto": 32, "convnextv2_atto": 32, "starnet_s050": 32,
}
# Architectures that are reported as not gateable, and why.
NOT_GATEABLE = {
    "dpn68": "dual-path blocks add a slice of the branch output and concatenate the rest; the convs feed grouped "
             "convolutions",
}

TINY_RECIPE = ["img_size=32", "in_chans=3", "epochs=1", "batch_size=8", "calib_size=6", "workers=0"]


CLASSES = 3


def randomize_gates(net: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Random last-layer keep weights, so decisions differ between images (scales stay 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, gate in net.gates():
            last = gate.mlp[-1]
            last.weight[:gate.keep_logits] = torch.randn(gate.keep_logits, last.in_features, generator=g) * 2
            last.bias[:gate.keep_logits] = 0.3
    return net


def make_runs(root: Path) -> dict:
    """An image folder, the base model, a converted run (the teacher) and a fine-tuned-looking run pointing at both.

    Seeded: module-scoped fixtures call it before the per-test seed, and the gates' unseeded hidden layers decide
    how much the decisions vary (a test of the report needs them to).
    """
    torch.manual_seed(0)
    data = make_image_folder(root / "data", classes=CLASSES, per_class=8)
    base = randomize(timm.create_model("test_resnet", num_classes=CLASSES)).eval()
    teacher_run = dynamize.save(dynamize.convert(base, img_size=32), root / "runs" / "converted")
    recipe = {"data": str(data), "data_dir": None, "img_size": 32, "in_chans": 3}
    dynamic_run = dynamize.save(randomize_gates(dynamize.convert(base, img_size=32)), root / "runs" / "tuned",
                                extra={"budget": 0.5, "recipe": recipe, "teacher": str(teacher_run.resolve())})
    return {"data": data, "base": base, "teacher_run": teacher_run, "run": dynamic_run}


def run_gloo(worker, world: int, *args) -> None:
    """Run `worker(rank, world, *args)` in `world` processes joined in one gloo process group: a CPU DDP job."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_in_gloo_group, args=(world, port, worker, args), nprocs=world, join=True)


def _in_gloo_group(rank, world, port, worker, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        worker(rank, world, *args)
    finally:
        torch.distributed.destroy_process_group()
