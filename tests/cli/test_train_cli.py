"""`dynamize train` -> `convert DIR` -> `finetune` -> `calibrate` through the CLI on a tiny folder data set."""
import json

import pytest

from conftest import make_image_folder
from dynamize_cli.main import run

TINY = ["img_size=32", "in_chans=3", "epochs=1", "batch_size=8", "calib_size=6", "workers=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = make_image_folder(root / "data")
    assert run(["train", "test_resnet", "--data", str(data), "-o", str(root / "teacher"), *TINY]) == 0
    assert run(["convert", str(root / "teacher"), "--img-size", "32", "-o", str(root / "conv")]) == 0
    sets = [x for kv in TINY for x in ("--set", kv)]
    assert run(["finetune", str(root / "conv"), "--budget", "0.6", "--data", str(data),
                "-o", str(root / "ft"), *sets]) == 0
    return root, data


def test_finetune_writes_a_complete_run(runs):
    root, _ = runs
    config = json.loads((root / "ft" / "config.json").read_text())
    d = config["dynamize"]
    assert d["budget"] == 0.6 and d["recipe"]["epochs"] == 1 and d["provenance"]["date"]
    assert abs(d["calibration"]["fraction"] - 0.6) < 0.25  # a 6-image calibration split is coarse
    assert (root / "ft" / "model.safetensors").is_file()
    assert len((root / "ft" / "metrics.jsonl").read_text().splitlines()) == 1
    assert (root / "ft" / "checkpoints" / "last" / "state.json").is_file()


def test_calibrate_writes_a_new_run(runs):
    root, data = runs
    assert run(["calibrate", str(root / "ft"), "--budget", "0.8", "-o", str(root / "cal")]) == 0
    config = json.loads((root / "cal" / "config.json").read_text())
    assert config["dynamize"]["budget"] == 0.8 and config["dynamize"]["parent"].endswith("ft")


def _count(path):
    return sorted(p for p in path.rglob("*"))


@pytest.mark.parametrize("argv, needle", [
    (["finetune", "{conv}", "--budget", "0"], "budget"),
    (["finetune", "{conv}", "--budget", "-1"], "budget"),
    (["finetune", "{conv}", "--budget", "1.5"], "budget"),
    (["finetune", "{conv}", "--budget", "nan"], "budget"),
    (["finetune", "{conv}", "--budget", "abc"], "budget"),
    (["finetune", "{conv}", "--budget", "0.5", "--recipe", "nope"], "no recipe named"),
    (["finetune", "{conv}", "--budget", "0.5", "--set", "epochz=1"], "epochz"),
    (["finetune", "{conv}", "--budget", "0.5", "--set", "epochs=many"], "epochs"),
    (["finetune", "{data}", "--budget", "0.5"], "not a dynamize run"),
    (["finetune", "{conv}", "--budget", "0.5", "--data", "{root}/missing"], "does not exist"),
    (["finetune", "{conv}", "--budget", "0.5", "--data", "{root}/empty"], "empty"),
    (["calibrate", "{conv}", "--budget", "0.5"], "not fine-tuned"),
])
def test_bad_input(runs, argv, needle, capsys):
    root, data = runs
    (root / "empty").mkdir(exist_ok=True)
    argv = [a.format(conv=root / "conv", data=data, root=root) for a in argv]
    before = _count(root)
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err
    assert _count(root) == before
