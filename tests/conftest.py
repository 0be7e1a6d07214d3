import os

import pytest
import torch
from helpers import TINY_RECIPE, make_image_folder

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


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
