"""`dynamize train` -> `convert DIR` -> `finetune` -> `calibrate` / `cascade` through the CLI on tiny folder data."""
import json
import shutil

import pytest
import torch

from dynamize import load, load_cascade
from dynamize_cli.main import run


def test_finetune_writes_a_complete_run(tiny_runs):
    root, _ = tiny_runs
    config = json.loads((root / "ft" / "config.json").read_text())
    d = config["dynamize"]
    assert d["budget"] == 0.6 and d["recipe"]["epochs"] == 1 and d["provenance"]["date"]
    assert abs(d["calibration"]["fraction"] - 0.6) < 0.25  # a 6-image calibration split is coarse
    assert (root / "ft" / "model.safetensors").is_file()
    assert len((root / "ft" / "metrics.jsonl").read_text().splitlines()) == 1
    assert (root / "ft" / "checkpoints" / "last" / "state.json").is_file()


def test_calibrate_writes_a_new_run(tiny_runs, capsys):
    root, _ = tiny_runs
    assert run(["calibrate", str(root / "ft"), "--budget", "0.8", "-o", str(root / "cal")]) == 0
    config = json.loads((root / "cal" / "config.json").read_text())
    assert config["dynamize"]["budget"] == 0.8 and config["dynamize"]["parent"].endswith("ft")
    tried = config["dynamize"]["calibration"]["tried"]
    assert tried >= 1 and f"{tried} threshold settings evaluated" in " ".join(capsys.readouterr().out.split())


def test_resume_with_the_same_values_continues_quietly(tiny_runs, tmp_path, capsys):
    root, data = tiny_runs
    shutil.copytree(root / "ft", tmp_path / "ft")
    argv = ["finetune", str(root / "conv"), "--budget", "0.6", "-o", str(tmp_path / "ft"), "--resume"]
    assert run([*argv, "--set", "epochs=1", "--data", str(data)]) == 0  # the values it was started with
    assert "was started with" not in capsys.readouterr().err
    assert len((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()) == 1  # nothing left to train
    assert run([*argv, "--set", "epochs=2"]) == 2
    assert "epochs=1, not 2" in capsys.readouterr().err


def test_train_takes_overrides_with_set_and_trailing(tiny_runs, tmp_path):
    _, data = tiny_runs
    out = tmp_path / "t"
    assert run(["train", "test_resnet", "--data", str(data), "-o", str(out), "--set", "epochs=2", "--set",
                "batch_size=16", "img_size=32", "in_chans=3", "calib_size=6", "workers=0"]) == 0
    recipe = json.loads((out / "config.json").read_text())["dynamize"]["recipe"]
    assert (recipe["epochs"], recipe["batch_size"], recipe["img_size"]) == (2, 16, 32)


def test_cascade_spends_the_budget_on_escalations_and_is_rebuilt(tiny_runs, capsys):
    root, _ = tiny_runs
    own = json.loads((root / "ft" / "config.json").read_text())["dynamize"]["calibration"]["fraction"]
    assert run(["cascade", str(root / "ft"), "--budget", "1.0", "-o", str(root / "casc")]) == 0
    settings = json.loads((root / "casc" / "config.json").read_text())["dynamize"]["cascade"]
    escalated = settings["eval"]["escalated"]
    assert settings["budget"] == 1.0 and 0 < escalated < 1
    assert settings["eval"]["flops_mean"] > own
    assert f"{escalated:.1%} of the images escalated" in capsys.readouterr().out
    cascade = load_cascade(root / "casc")
    assert cascade.threshold == settings["threshold"]
    images = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(cascade.gated(images), load(root / "ft")(images))
    assert run(["report", str(root / "casc"), str(root / "ft"), "-o", str(root / "casc-report")]) == 0
    report = json.loads((root / "casc-report" / "report.json").read_text())["runs"]
    reported = report[0]["cascade"]  # the escalations re-done apart, from the report's own pass
    assert reported["escalated"] == escalated and reported["accuracy"]["top1"] == settings["eval"]["top1"]
    assert reported["mean_fraction"] == pytest.approx(settings["eval"]["flops_mean"], abs=1e-6)
    assert report[1]["cascade"] is None
    compared = (root / "casc-report" / "report.md").read_text().split("## Comparison")[1]
    assert f"| casc (with escalation) | 1.00 | {reported['accuracy']['top1']:.2f} |" in compared
    assert run(["bench", str(root / "casc"), "--batch-size", "1", "--repeats", "1", "--warmup", "0"]) == 0
    assert run(["calibrate", str(root / "casc"), "--budget", "0.8", "-o", str(root / "casc-cal")]) == 0
    assert "cascade" not in json.loads((root / "casc-cal" / "config.json").read_text())["dynamize"]  # a stale threshold



def test_train_resume_without_output_continues_a_train_run_only(tiny_runs, tmp_path, monkeypatch, capsys):
    """A newer run of another kind under runs/ is not taken for the train run to continue."""
    root, data = tiny_runs
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root / "ft", tmp_path / "runs" / "ft")  # a fine-tuned run, with its checkpoint
    assert run(["train", "test_resnet", "--data", str(data), "--resume"]) == 2
    assert "no `dynamize train test_resnet` run with a checkpoint under runs/" in capsys.readouterr().err
    shutil.copytree(root / "teacher", tmp_path / "runs" / "test_resnet-base")
    (tmp_path / "runs" / "ft" / "checkpoints" / "last" / "state.json").touch()  # newer than the train run's
    assert run(["train", "test_resnet", "--data", str(data), "--resume"]) == 0
    assert "wrote runs/test_resnet-base" in " ".join(capsys.readouterr().out.split())
