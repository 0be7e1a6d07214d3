"""`dynamize convert` / `inspect` through the real CLI entry point, good and bad input."""
import json

import pytest
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


def test_convert_with_checkpoint(tmp_path):
    base = timm.create_model("test_resnet", num_classes=4)
    save_file(base.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(base.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        assert run(["convert", "test_resnet", *ARGS, "--checkpoint", str(tmp_path / name),
                    "-o", str(tmp_path / f"run-{name}")]) == 0


def _bad_inputs(tmp_path):
    good = timm.create_model("test_resnet", num_classes=4)
    save_file(good.state_dict(), str(tmp_path / "ok.safetensors"))
    save_file(timm.create_model("test_resnet", num_classes=9).state_dict(), str(tmp_path / "other.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "file").write_text("x")
    out = str(tmp_path / "out")
    return {
        "unknown model": (["convert", "resnet5O", *ARGS, "-o", out], "resnet50"),
        "vision transformer": (["convert", "vit_tiny_patch16_224", "--no-pretrained", "-o", out],
                               "not a convolutional"),
        "pretrained offline": (["convert", "test_resnet", "--pretrained", "-o", out], "--checkpoint"),
        "mismatched checkpoint": (["convert", "test_resnet", *ARGS, "--checkpoint",
                                   str(tmp_path / "other.safetensors"), "-o", out], "does not match"),
        "corrupt safetensors": (["convert", "test_resnet", *ARGS, "--checkpoint",
                                 str(tmp_path / "corrupt.safetensors"), "-o", out], "not a valid safetensors"),
        "truncated safetensors": (["convert", "test_resnet", *ARGS, "--checkpoint",
                                   str(tmp_path / "truncated.safetensors"), "-o", out], "not a valid safetensors"),
        "output is a file": (["convert", "test_resnet", *ARGS, "-o", str(tmp_path / "file")], "not a directory"),
        "bad gates": (["convert", "test_resnet", *ARGS, "--gates", "all", "-o", out], "--gates"),
        "inspect non-run": (["inspect", str(tmp_path)], "config.json"),
    }


@pytest.mark.parametrize("case", ["unknown model", "vision transformer", "pretrained offline", "mismatched checkpoint",
                                  "corrupt safetensors", "truncated safetensors", "output is a file", "bad gates",
                                  "inspect non-run"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    argv, needle = _bad_inputs(tmp_path)[case]
    before = _files(tmp_path)
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert needle in err
    assert _files(tmp_path) == before
