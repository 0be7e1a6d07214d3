"""`dynamize convert` / `inspect` through the real CLI entry point, good and bad input."""
import json

import timm
import torch
from safetensors.torch import save_file

from dynamize.version import __version__
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


def test_convert_residual_outputs_records_the_branch_end_groups(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["convert", "test_resnet", *ARGS, "--residual-outputs", "-o", str(out)]) == 0
    capsys.readouterr()
    plan = json.loads((out / "config.json").read_text())["dynamize"]["plan"]
    ends = [g for g in plan["groups"] if g["exits"]]
    assert ends and {g["block"] for g in ends} == {b["name"] for b in plan["blocks"]}


def test_convert_with_checkpoint(tmp_path):
    base = timm.create_model("test_resnet", num_classes=4)
    save_file(base.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(base.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        assert run(["convert", "test_resnet", *ARGS, "--checkpoint", str(tmp_path / name),
                    "-o", str(tmp_path / f"run-{name}")]) == 0


def test_convert_width_mode_is_recorded_and_replayed(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["convert", "test_efficientnet", *ARGS, "--channel-mode", "width", "-o", str(out)]) == 0
    assert "groups in width mode" in capsys.readouterr().out
    plan = json.loads((out / "config.json").read_text())["dynamize"]["plan"]
    assert plan["channel_mode"] == "width" and all(g["widths"] for g in plan["groups"])
    assert run(["inspect", str(out)]) == 0


def test_convert_refuses_an_unknown_channel_mode_in_one_line(tmp_path, capsys):
    assert run(["convert", "test_resnet", *ARGS, "--channel-mode", "narrow", "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--channel-mode must be one of channel, width" in err
    assert not (tmp_path / "run").exists()


def test_version_is_printed(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dynamize {__version__}"
