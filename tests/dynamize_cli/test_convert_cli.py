"""`dynamize convert` / `inspect` through the real CLI entry point, good and bad input."""
import json

import timm
import torch
from safetensors.torch import save_file

from dynamize_cli.main import run

ARGS = ["--no-pretrained", "--num-classes", "4", "--img-size", "32"]


def _files(path):
    return sorted(p.relative_to(path) for p in path.rglob("*"))


def test_convert_writes_run_and_inspect_reads_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["convert", "test_resnet", *ARGS, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "blocks gated" in printed and "Not gated" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 4
    assert config["dynamize"]["plan"]["blocks"]
    assert run(["inspect", str(out)]) == 0
    assert "channel groups gated" in capsys.readouterr().out


def test_convert_profitable_only_records_the_gates_it_leaves_out(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["convert", "mobilenetv3_small_100", "--no-pretrained", "--img-size", "224", "--profitable-only",
                "-o", str(out)]) == 0
    capsys.readouterr()
    skipped = json.loads((out / "config.json").read_text())["dynamize"]["plan"]["skipped"]
    assert any("pay for itself" in s["reason"] for s in skipped)


def test_convert_with_checkpoint(tmp_path):
    base = timm.create_model("test_resnet", num_classes=4)
    save_file(base.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(base.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        assert run(["convert", "test_resnet", *ARGS, "--checkpoint", str(tmp_path / name),
                    "-o", str(tmp_path / f"run-{name}")]) == 0
