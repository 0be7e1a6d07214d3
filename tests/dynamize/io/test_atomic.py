"""Run directories and checkpoints are written all or nothing, and a write killed between its two renames is
recovered: the newest complete version comes back under its name."""
import json
import os

import pytest
import timm
import torch
from safetensors.torch import load_file

import dynamize
from dynamize.errors import RunError
from dynamize.io.atomic import newest_complete, write_dir
from dynamize.io.runs import check_run


def _fill(text):
    def write(tmp):
        (tmp / "a.txt").write_text(text)
        (tmp / "b.txt").write_text(text)
    return write


def test_a_written_run_is_readable_as_the_umask_allows(tmp_path):
    """Not private to its writer (mkdtemp and safetensors create 0700 / 0600), so a shared run can be read."""
    umask = os.umask(0o022)
    try:
        dynamize.save(dynamize.convert("test_resnet", num_classes=3, img_size=32), tmp_path / "run")
    finally:
        os.umask(umask)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644}


def test_write_dir_replaces_as_one_step_and_keeps_chosen_entries(tmp_path):
    path = tmp_path / "run"
    write_dir(path, _fill("one"))
    (path / "metrics.jsonl").write_text("kept")
    write_dir(path, _fill("two"), keep=lambda entry: entry.name == "metrics.jsonl")
    assert sorted(p.name for p in path.iterdir()) == ["a.txt", "b.txt", "metrics.jsonl"]
    assert (path / "a.txt").read_text() == "two" and (path / "metrics.jsonl").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary or old directory left


def test_a_write_that_fails_half_way_leaves_the_old_version_whole(tmp_path):
    path = tmp_path / "run"
    write_dir(path, _fill("one"))

    def half(tmp):
        (tmp / "a.txt").write_text("two")
        raise KeyboardInterrupt  # killed between the two files

    with pytest.raises(KeyboardInterrupt):
        write_dir(path, half)
    assert [(path / n).read_text() for n in ("a.txt", "b.txt")] == ["one", "one"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _killed_between_renames(path, new: bool):
    """The state a process leaves when killed after renaming `path` away and before renaming the new version in."""
    write_dir(path, _fill("one"))
    old = path.with_name(f".{path.name}.old-{os.getpid() + 1}")
    path.rename(old)
    if new:
        tmp = path.with_name(f".{path.name}.tmp-x")
        tmp.mkdir()
        _fill("two")(tmp)
        (tmp / ".complete").touch()
    return old


@pytest.mark.parametrize("new, text", [(False, "one"), (True, "two")])
def test_newest_complete_version_is_restored(tmp_path, new, text):
    path = tmp_path / "run"
    _killed_between_renames(path, new)
    assert newest_complete(path) == path
    assert (path / "a.txt").read_text() == text and not (path / ".complete").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_save_after_a_kill_between_renames_finds_the_run(tmp_path):
    net = dynamize.convert(timm.create_model("test_resnet", num_classes=3), img_size=32)
    run = dynamize.save(net, tmp_path / "run")
    run.rename(tmp_path / f".run.old-{os.getpid() + 1}")
    with pytest.raises(RunError):
        check_run(run)  # a reader that does not restore finds nothing ...
    dynamize.save(net, run, extra={"budget": 0.5})  # ... a writer restores the old version first, then replaces it
    assert json.loads((run / "config.json").read_text())["dynamize"]["budget"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_saving_a_run_never_pairs_new_weights_with_an_old_config(tmp_path, monkeypatch):
    net = dynamize.convert(timm.create_model("test_resnet", num_classes=3), img_size=32)
    run = dynamize.save(net, tmp_path / "run", extra={"budget": 0.9})
    before = load_file(str(run / "model.safetensors"))
    with torch.no_grad():
        next(net.parameters()).add_(1.0)

    def crash(*_):
        raise KeyboardInterrupt  # killed after the weights were written, before config.json

    monkeypatch.setattr("dynamize.io.runs.write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        dynamize.save(net, run, extra={"budget": 0.5})
    after = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((run / "config.json").read_text())["dynamize"]["budget"] == 0.9
    check_run(run)
