"""Bad input through the real CLI: exit code 2, one line on stderr saying what to do, no traceback, and no new or
changed file anywhere under the test's folders."""
import json
import pickle
import shutil
import struct

import pytest
import timm
import torch
from helpers import TINY_RECIPE, make_image_folder
from safetensors.torch import save_file

from dynamize_cli.main import run

CONVERT = ["convert", "test_resnet", "--no-pretrained", "--num-classes", "3", "--img-size", "32"]
TINY_SETS = [x for kv in TINY_RECIPE for x in ("--set", kv)]  # the first four set the input size


class _Code:
    """An object whose unpickling would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


@pytest.fixture(scope="module")
def world(tiny_runs, tmp_path_factory):
    """Bad files and folders next to good runs, built once."""
    root, data = tiny_runs
    bad = tmp_path_factory.mktemp("bad")
    good = timm.create_model("test_resnet", num_classes=3).state_dict()
    save_file(good, str(bad / "ok.safetensors"))
    save_file(timm.create_model("test_resnet", num_classes=9).state_dict(), str(bad / "other.safetensors"))
    raw = (bad / "ok.safetensors").read_bytes()
    (bad / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (bad / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    (bad / "empty.safetensors").write_bytes(b"")
    (bad / "pickle.safetensors").write_bytes(pickle.dumps(good))
    (bad / "huge-header.safetensors").write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
    torch.save({"weights": _Code()}, bad / "code.pth")
    (bad / "weights.txt").write_text("not weights")
    (bad / "file").write_text("a file, not a folder")
    for name, edit in {"no-config": None, "not-json": "{oops", "newer": "newer", "mismatch": "mismatch"}.items():
        run_dir = bad / name
        shutil.copytree(root / "conv", run_dir)
        config = run_dir / "config.json"
        if edit is None:
            config.unlink()
        elif edit == "newer":
            c = json.loads(config.read_text())
            c["dynamize"]["plan"]["version"] = 99
            config.write_text(json.dumps(c))
        elif edit == "mismatch":
            save_file(timm.create_model("test_resnet", num_classes=3).state_dict(), str(run_dir / "model.safetensors"))
        else:
            config.write_text(edit)
    (bad / "unknown-key.yaml").write_text("epochs: 1\nepoch_count: 3\n")
    (bad / "wrong-type.yaml").write_text("epochs: three\n")
    make_image_folder(bad / "one-class", classes=1, per_class=4)
    make_image_folder(bad / "corrupt-image", classes=2, per_class=4)
    (bad / "corrupt-image" / "train" / "class0" / "0.png").write_bytes(b"\x89PNG not really")
    (bad / "empty-data").mkdir()
    damaged = bad / "damaged-resume"
    shutil.copytree(root / "ft", damaged)
    (damaged / "checkpoints" / "last" / "state.json").write_text("{")
    truncated = bad / "truncated-optimizer"
    shutil.copytree(root / "ft", truncated)
    optimizer = truncated / "checkpoints" / "last" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    shutil.copytree(root / "ft", bad / "resumable")
    shutil.copytree(root / "teacher", bad / "teacher-resumable")
    make_image_folder(bad / "four-classes", classes=4, per_class=4)
    assert run([*CONVERT, "-o", str(bad / "random-head")]) == 0
    return root, data, bad


# (argv, text the error must contain); {conv} {ft} {teacher} {data} {bad} are filled in from the fixture.
CASES = {
    "unknown model": ([*CONVERT[:1], "resnet5O", *CONVERT[2:]], "resnet50"),
    "misspelled model": ([*CONVERT[:1], "mobilenet_v2", *CONVERT[2:]], "did you mean"),
    "non-CNN model": (["convert", "vit_tiny_patch16_224", "--no-pretrained"], "not a convolutional"),
    "pretrained offline": (["convert", "test_resnet", "--pretrained"], "--checkpoint"),
    "checkpoint for another head": ([*CONVERT, "--checkpoint", "{bad}/other.safetensors"], "does not match"),
    "truncated safetensors": ([*CONVERT, "--checkpoint", "{bad}/truncated.safetensors"], "not a valid safetensors"),
    "corrupt safetensors": ([*CONVERT, "--checkpoint", "{bad}/corrupt.safetensors"], "not a valid safetensors"),
    "empty safetensors": ([*CONVERT, "--checkpoint", "{bad}/empty.safetensors"], "not a valid safetensors"),
    "pickle named .safetensors": ([*CONVERT, "--checkpoint", "{bad}/pickle.safetensors"], "not a valid safetensors"),
    "huge safetensors header": ([*CONVERT, "--checkpoint", "{bad}/huge-header.safetensors"],
                                "not a valid safetensors"),
    "pickled code in .pth": ([*CONVERT, "--checkpoint", "{bad}/code.pth"], "loads safely"),
    "not a weights file": ([*CONVERT, "--checkpoint", "{bad}/weights.txt"], "not a weights file"),
    "missing checkpoint": ([*CONVERT, "--checkpoint", "{bad}/nothing.safetensors"], "does not exist"),
    "config.json missing": (["inspect", "{bad}/no-config"], "no config.json"),
    "config.json not JSON": (["inspect", "{bad}/not-json"], "not valid JSON"),
    "plan from a newer version": (["inspect", "{bad}/newer"], "newer"),
    "weights disagree with config": (["finetune", "{bad}/mismatch", "--budget", "0.5"], "does not match"),
    "budget 0": (["finetune", "{conv}", "--budget", "0"], "budget"),
    "budget -1": (["finetune", "{conv}", "--budget", "-1"], "budget"),
    "budget 1.5": (["finetune", "{conv}", "--budget", "1.5"], "budget"),
    "budget nan": (["finetune", "{conv}", "--budget", "nan"], "budget"),
    "budget abc": (["finetune", "{conv}", "--budget", "abc"], "'--budget'"),  # Typer's parse error names it so
    "unknown recipe": (["finetune", "{conv}", "--budget", "0.5", "--recipe", "nope"], "no recipe named"),
    "recipe escaping its folder": (["finetune", "{conv}", "--budget", "0.5", "--recipe", "../../etc/passwd"],
                                   "not a plain name"),
    "recipe file missing": (["finetune", "{conv}", "--budget", "0.5", "--recipe", "{bad}/none.yaml"],
                            "does not exist"),
    "recipe with unknown key": (["finetune", "{conv}", "--budget", "0.5", "--recipe", "{bad}/unknown-key.yaml"],
                                "'epoch_count'; did you mean 'epochs'?"),
    "recipe with wrong type": (["finetune", "{conv}", "--budget", "0.5", "--recipe", "{bad}/wrong-type.yaml"],
                               "epochs"),
    "override with unknown key": (["finetune", "{conv}", "--budget", "0.5", "--set", "epochz=1"],
                                  "'epochz'; did you mean 'epochs'?"),
    "RUN not a run directory": (["finetune", "{data}", "--budget", "0.5"], "not a dynamize run"),
    "data folder missing": (["finetune", "{conv}", "--budget", "0.5", "--data", "{bad}/missing"], "does not exist"),
    "data folder empty": (["finetune", "{conv}", "--budget", "0.5", "--data", "{bad}/empty-data"], "empty"),
    "data with one class": (["finetune", "{conv}", "--budget", "0.5", "--data", "{bad}/one-class"], "class"),
    "data with a corrupt image": (["finetune", "{conv}", "--budget", "0.5", "--data", "{bad}/corrupt-image"],
                                  "cannot read image"),
    "data with other classes than the model": (["finetune", "{conv}", "--budget", "0.5", "--data",
                                                "{bad}/four-classes"], "dynamize train test_resnet --checkpoint"),
    "teacher whose classifier was never trained": (["finetune", "{bad}/random-head", "--budget", "0.5", "--data",
                                                    "{data}"], "never trained"),
    "budget below what the gates reach": (["finetune", "{conv}", "--budget", "0.01", "--data", "{data}"],
                                          "smallest FLOPs fraction"),
    "budget below what the gates reach names what no gate controls": (["finetune", "{conv}", "--budget", "0.01",
                                                                        "--data", "{data}"], "no gate controls"),
    "budget below what layer gates reach": (["finetune", "{conv}", "--budget", "0.3", "--gates", "layer",
                                             "--data", "{data}"], "every layer gate closed"),
    "calibrate below what the gates reach": (["calibrate", "{ft}", "--budget", "0.01"], "smallest FLOPs fraction"),
    "input channels other than the run's": (["finetune", "{conv}", "--budget", "0.5", "--set", "in_chans=1"],
                                            "in_chans"),
    "class count of zero": ([*CONVERT[:4], "0"], "--num-classes"),
    "negative class count": ([*CONVERT[:4], "-3"], "--num-classes"),
    "input size of zero": ([*CONVERT, "--img-size", "0"], "--img-size"),
    "convert --gates of no kind": (["convert", "test_resnet", "--gates", "foo"],  # refused before fetching weights
                                   "--gates must be one of both, layer, channel, not 'foo'"),
    "finetune --gates of no kind": (["finetune", "{conv}", "--budget", "0.5", "--gates", "foo"],
                                    "--gates must be one of both, layer, channel, not 'foo'"),
    "output is a file": ([*CONVERT, "-o", "{bad}/file"], "not a directory"),
    "output on a read-only place": ([*CONVERT, "-o", "/proc/dynamize-run"], "cannot write"),
    "resume without a checkpoint": (["finetune", "{conv}", "--budget", "0.5", "--data", "{data}", "-o", "{bad}/new",
                                     "--resume"], "no checkpoint"),
    "resume from a damaged checkpoint": (["finetune", "{conv}", "--budget", "0.5", "--data", "{data}",
                                          "-o", "{bad}/damaged-resume", "--resume"], "damaged"),
    "calibrate a run that was not fine-tuned": (["calibrate", "{conv}", "--budget", "0.5"], "not fine-tuned"),
    "cascade of a run that was not fine-tuned": (["cascade", "{conv}", "--budget", "0.9"], "not fine-tuned"),
    "cascade budget not above the run's own": (["cascade", "{ft}", "--budget", "0.3"], "own FLOPs fraction"),
    "resume with another budget": (["finetune", "{conv}", "--budget", "0.5", "--data", "{data}",
                                    "-o", "{bad}/resumable", "--resume"], "budget=0.6, not 0.5"),
    "resume with another override": (["finetune", "{conv}", "--budget", "0.6", "--data", "{data}",
                                      "-o", "{bad}/resumable", "--resume", "--set", "epochs=4"], "epochs=1, not 4"),
    "resume a train run with another value": (["train", "test_resnet", "--data", "{data}", "-o",
                                               "{bad}/teacher-resumable", "--resume", "--set", "batch_size=4"],
                                              "batch_size=8, not 4"),
    "output holds a run, no --resume": (["finetune", "{conv}", "--budget", "0.6", "--data", "{data}",
                                         "-o", "{bad}/resumable"], "--resume"),
    "resume from a truncated optimizer state": (["finetune", "{conv}", "--budget", "0.6", "--data", "{data}",
                                                 "-o", "{bad}/truncated-optimizer", "--resume"], "damaged"),
    "convert onto an existing run": ([*CONVERT, "-o", "{conv}"], "already holds a run"),
    "finetune into its own input": (["finetune", "{conv}", "--budget", "0.5", "--data", "{data}", "-o", "{conv}"],
                                    "already holds a run"),
    "finetune onto its teacher": (["finetune", "{conv}", "--budget", "0.5", "--data", "{data}", "-o", "{teacher}"],
                                  "already holds a"),  # a training run (the teacher's checkpoints are there too)
    "calibrate onto an existing run": (["calibrate", "{ft}", "--budget", "0.7", "-o", "{conv}"], "already holds a run"),
    "cascade onto an existing run": (["cascade", "{ft}", "--budget", "0.9", "-o", "{conv}"], "already holds a run"),
    "finetune to a read-only place": (["finetune", "{conv}", "--budget", "0.5", "--data", "{data}", "-o",
                                       "/proc/dynamize-run", *TINY_SETS[4:]], "cannot write"),
    "train to a read-only place": (["train", "test_resnet", "--data", "{data}", "-o", "/proc/dynamize-run",
                                    *TINY_SETS], "cannot write"),
    "output under a file": ([*CONVERT, "-o", "{bad}/file/sub"], "is a file"),
    "timm data set without --data-dir": (["finetune", "{conv}", "--budget", "0.5", "--data", "torch/cifar10"],
                                         "needs --data-dir"),
    "misspelled fashion-mnist": (["finetune", "{conv}", "--budget", "0.5", "--data", "fashion_mnist"],
                                 "did you mean --data fashion-mnist"),
    "timm data set without its torch/ prefix": (["finetune", "{conv}", "--budget", "0.5", "--data", "cifar10"],
                                                "did you mean --data torch/cifar10 (with --data-dir"),
    "--budget and --set budget disagree": (["finetune", "{conv}", "--budget", "0.5", "--set", "budget=0.3"],
                                           "disagree"),
    "bench a run at another input size": (["bench", "{ft}", "--img-size", "64"], "a run at 32 px"),
    "bench a run on test images at another input size": (["bench", "{ft}", "--data", "{data}", "--img-size", "64"],
                                                         "leave out --img-size"),
    "Fashion-MNIST --data-dir without its files": (["finetune", "{conv}", "--budget", "0.5", "--data", "fashion-mnist",
                                                    "--data-dir", "{bad}/empty-data"], "not found in"),
}


def test_under_torchrun_only_the_first_rank_says_it(world, capsys, monkeypatch):
    """Every rank of a torchrun job meets the same bad input; the user reads one line, and every rank exits 2."""
    root = world[0]
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        assert run(["finetune", str(root / "conv"), "--budget", "1.5"]) == 2
        assert len(capsys.readouterr().err.splitlines()) == lines


def _snapshot(*roots):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for r in roots for p in sorted(r.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, world, capsys):
    root, data, bad = world
    argv, needle = CASES[case]
    argv = [a.format(conv=root / "conv", ft=root / "ft", teacher=root / "teacher", data=data, bad=bad) for a in argv]
    before = _snapshot(root, bad)
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and needle in err, err
    assert _snapshot(root, bad) == before
