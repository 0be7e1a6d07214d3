"""`dynamize train` -> `convert DIR` -> `finetune` -> `calibrate` through the CLI on a tiny folder data set."""
import json

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


def test_calibrate_writes_a_new_run(tiny_runs):
    root, _ = tiny_runs
    assert run(["calibrate", str(root / "ft"), "--budget", "0.8", "-o", str(root / "cal")]) == 0
    config = json.loads((root / "cal" / "config.json").read_text())
    assert config["dynamize"]["budget"] == 0.8 and config["dynamize"]["parent"].endswith("ft")
