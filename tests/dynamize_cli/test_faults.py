"""Faults: a fine-tune killed with SIGKILL resumes to the same weights; Ctrl-C leaves a resumable checkpoint."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import make_image_folder
from safetensors.torch import load_file

ARGS = ["img_size=32", "in_chans=3", "epochs=2", "batch_size=4", "calib_size=6", "workers=0", "checkpoint_every=1"]


pytestmark = pytest.mark.slow  # subprocesses


def _cmd(data, out, resume=False):
    return [sys.executable, "-m", "dynamize_cli", "train", "test_resnet", "--data", str(data), "-o", str(out),
            *(["--resume"] if resume else []), *ARGS]


def _wait_for_step(out, step, proc, timeout=240):
    state = out / "checkpoints" / "last" / "state.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["progress"]["global_step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} (exit code {proc.poll()})")


def _weights(out):
    return load_file(str(out / "model.safetensors"))


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=8)
    subprocess.run(_cmd(data, tmp_path / "ref"), check=True, capture_output=True)
    proc = subprocess.Popen(_cmd(data, tmp_path / "run"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(tmp_path / "run", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "model.safetensors").exists()  # killed before the end: no final model
    done = subprocess.run(_cmd(data, tmp_path / "run", resume=True), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ref, resumed = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert ref.keys() == resumed.keys()
    assert all(torch.allclose(ref[k].float(), resumed[k].float(), atol=1e-5) for k in ref)
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp*"))


def test_ctrl_c_leaves_a_resumable_checkpoint_and_exits_130(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=8)
    proc = subprocess.Popen(_cmd(data, tmp_path / "run"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_step(tmp_path / "run", 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert len(err.strip().splitlines()) == 1 and "--resume" in err
    done = subprocess.run(_cmd(data, tmp_path / "run", resume=True), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
