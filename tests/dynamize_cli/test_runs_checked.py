"""Every command that reads a run reads it in full first (through `dynamize.io.runs.check_run`): a run from a newer
dynamize, with a broken plan or one naming nodes the model lacks, or with missing, truncated or mismatched weights is
refused with exit code 2 and one line before any work, and nothing is written."""
import json
import shutil

import pytest
import timm
from safetensors.torch import save_file

from dynamize_cli.main import run

DAMAGES = ["newer version", "broken plan", "foreign node", "missing weights", "truncated weights", "other shapes"]
PLAN_DAMAGES = ("broken plan", "foreign node")  # a trained run has no plan
MESSAGES = {"newer version": "newer", "broken plan": "malformed", "foreign node": "names node 'nosuch'",
            "missing weights": "no model.safetensors",
            "truncated weights": "not a valid safetensors", "other shapes": "does not match"}

# command line per command; {run} is a damaged copy of the `source` run of the tiny CLI path, {out} must not appear.
COMMANDS = {
    "inspect": ("conv", ["inspect", "{run}"]),
    "finetune": ("conv", ["finetune", "{run}", "--budget", "0.6", "--data", "{data}", "-o", "{out}"]),
    "calibrate": ("ft", ["calibrate", "{run}", "--budget", "0.6", "-o", "{out}"]),
    "cascade": ("ft", ["cascade", "{run}", "--budget", "1.0", "-o", "{out}"]),
    "report": ("ft", ["report", "{run}", "--data", "{data}", "-o", "{out}"]),
    "report --static": ("ft", ["report", "{run}", "--static", "-o", "{out}"]),
    "bench": ("ft", ["bench", "{run}", "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--json", "{out}"]),
    "convert": ("teacher", ["convert", "{run}", "-o", "{out}"]),
    "train --checkpoint": ("teacher", ["train", "test_resnet", "--checkpoint", "{run}", "--data", "{data}",
                                       "-o", "{out}", "img_size=32", "in_chans=3", "calib_size=6"]),
}


def _damage(source, dest, damage):
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    config = json.loads((dest / "config.json").read_text())
    weights = dest / "model.safetensors"
    if damage == "newer version":
        config["dynamize"]["version"] = "99.0.0"
    elif damage == "broken plan":
        config["dynamize"]["plan"]["blocks"] = [{"name": "layer1.0"}]
    elif damage == "foreign node":  # well-formed, but not this model's graph (a hand-edited plan)
        config["dynamize"]["plan"]["groups"][0]["sinks"].append("nosuch")
    elif damage == "missing weights":
        weights.unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "other shapes":
        save_file(timm.create_model("test_resnet", num_classes=5).state_dict(), str(weights))
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _snapshot(*roots):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for r in roots for p in sorted(r.rglob("*"))}


@pytest.fixture(scope="module")
def damaged(tiny_runs, tmp_path_factory):
    root, data = tiny_runs
    bad = tmp_path_factory.mktemp("damaged")
    for source in ("conv", "ft", "teacher"):
        for damage in DAMAGES:
            if damage not in PLAN_DAMAGES or source != "teacher":
                _damage(root / source, bad / f"{source}-{damage.replace(' ', '-')}", damage)
    return root, data, bad


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_a_damaged_run(command, damage, damaged, tmp_path, monkeypatch, capsys):
    root, data, bad = damaged
    source, argv = COMMANDS[command]
    if damage in PLAN_DAMAGES and source == "teacher":
        pytest.skip("a trained run has no plan")
    out = tmp_path / "out"
    argv = [a.format(run=bad / f"{source}-{damage.replace(' ', '-')}", data=data, out=out) for a in argv]
    monkeypatch.chdir(tmp_path)
    before = _snapshot(root, bad)
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert MESSAGES[damage] in err, err
    assert not out.exists() and _snapshot(root, bad) == before and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["finetune", "report"])
def test_a_damaged_teacher_is_refused_before_any_work(command, damaged, tmp_path, capsys):
    root, data, bad = damaged
    ft = tmp_path / "ft"
    shutil.copytree(root / "ft", ft, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    config = json.loads((ft / "config.json").read_text())
    config["dynamize"]["teacher"] = str(bad / "conv-truncated-weights")
    (ft / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    argv = {"finetune": ["finetune", str(ft), "--budget", "0.6", "--data", str(data), "-o", str(out)],
            "report": ["report", str(ft), "--data", str(data), "-o", str(out)]}[command]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a valid safetensors" in err, err
    assert not out.exists()
