import os

import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


TINY_RECIPE = ["img_size=32", "in_chans=3", "epochs=1", "batch_size=8", "calib_size=6", "workers=0"]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """A tiny data folder and the runs of the whole CLI path on it: teacher, converted, fine-tuned."""
    from dynamize_cli.main import run
    root = tmp_path_factory.mktemp("runs")
    data = make_image_folder(root / "data")
    assert run(["train", "test_resnet", "--data", str(data), "-o", str(root / "teacher"), *TINY_RECIPE]) == 0
    assert run(["convert", str(root / "teacher"), "--img-size", "32", "-o", str(root / "conv")]) == 0
    sets = [x for kv in TINY_RECIPE for x in ("--set", kv)]
    assert run(["finetune", str(root / "conv"), "--budget", "0.6", "--data", str(data), "-o", str(root / "ft"),
                *sets]) == 0
    return root, data
