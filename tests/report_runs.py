"""Tiny run directories for the report tests: a converted teacher run and a "fine-tuned" run whose gates vary."""
from pathlib import Path

import timm
import torch

import dynamize
from conftest import make_image_folder, randomize

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
