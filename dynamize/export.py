"""Run directories: `model.safetensors` (a plain state dict) + `config.json` (timm's config keys + the GatePlan).

A saved model is restored by building the base model with timm (random init, no download), replaying the plan and
loading the weights strictly: no pickles anywhere. Every write goes to a temporary name and is renamed into place.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .errors import OutputError, RunError
from .plan import GatePlan

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def write_run(path: Union[str, Path], write: Callable[[Path], None]) -> Path:
    """Create or replace the directory `path` atomically: `write` fills a temporary sibling that is then renamed.

    Raises:
        OutputError: `path` is a file, or its parent cannot be written.
    """
    path = Path(path)
    check_output_dir(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise OutputError(f"cannot write to {path.parent} ({e.strerror}); choose another -o") from None
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write one file through a temporary sibling and a rename, so no reader ever sees it half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def check_output_dir(path: Path) -> None:
    """Raise an OutputError if `path` exists as something other than a directory."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a directory; choose another -o")


def _timm_config(model: nn.Module, in_chans: int) -> dict:
    """timm's config keys for a model (as in a hub config.json)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    return {
        "architecture": cfg.get("architecture"),
        "num_classes": model.num_classes,
        "in_chans": in_chans,
        "num_features": getattr(model, "num_features", None),
        "pretrained_cfg": {k: v for k, v in cfg.items()
                           if isinstance(v, (str, int, float, bool, list, tuple, type(None)))},
    }


def model_config(model: nn.Module, extra: Optional[dict] = None) -> dict:
    """config.json content of a gated model: timm's keys plus a versioned `dynamize` block with the plan."""
    plan: GatePlan = model.plan
    return {**_timm_config(model, plan.input_size[0]),
            "dynamize": {"version": __version__, "plan": plan.to_dict(), **(extra or {})}}


def _write_files(path: Path, state: Dict[str, torch.Tensor], config: dict) -> Path:
    path = Path(path)
    check_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        write_file(path / WEIGHTS, lambda tmp: save_file({k: v.detach().contiguous() for k, v in state.items()},
                                                         str(tmp)))
        write_json(path / CONFIG, config)
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror}); choose another -o") from None
    return path


def save(model: nn.Module, path: Union[str, Path], extra: Optional[dict] = None) -> Path:
    """Save a gated model into the run directory `path` (created if needed; other files in it are kept).

    The weights are written before config.json and each file goes through a temporary name, so a crash leaves
    either the previous run or no config.json (not a run), never a config that points at half-written weights.

    Args:
        model: a model returned by `dynamize.convert` or `dynamize.load`.
        path: the run directory.
        extra: more keys for config.json's `dynamize` block (budget, recipe, provenance, ...).

    Raises:
        OutputError: `path` is a file or cannot be written.
    """
    return _write_files(path, model.state_dict(), model_config(model, extra))


def save_base(model: nn.Module, path: Union[str, Path], in_chans: int, extra: Optional[dict] = None) -> Path:
    """Save a plain timm model (no gates) as a run directory that `dynamize convert DIR` accepts."""
    config = {**_timm_config(model, in_chans), "dynamize": {"version": __version__, "kind": "base", **(extra or {})}}
    return _write_files(path, model.state_dict(), config)


def read_base_config(path: Union[str, Path]) -> dict:
    """config.json of a plain model's run directory (from `dynamize train`).

    Raises:
        RunError: not such a directory.
    """
    path = Path(path)
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise RunError(f"{path} is not a run directory with a readable {CONFIG}") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise RunError(f"{path / CONFIG} names no architecture")
    return config


def read_config(path: Union[str, Path]) -> dict:
    """Read and check a run directory's config.json.

    Raises:
        RunError: not a run directory, or config.json missing, not JSON or without a plan.
    """
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path} is not a run directory (expected a folder with {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise RunError(f"{path} has no {CONFIG}; it is not a dynamize run directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path / CONFIG} is not valid JSON ({e}); restore it or re-run `dynamize convert`") from None
    if not isinstance(config, dict) or not isinstance(config.get("dynamize"), dict) \
            or not isinstance(config["dynamize"].get("plan"), dict):
        raise RunError(f"{path / CONFIG} has no dynamize plan; it is not a dynamize run directory")
    return config


def load(path: Union[str, Path]) -> nn.Module:
    """Rebuild a gated model from a run directory: fresh timm base model, replayed plan, strict weights.

    Raises:
        RunError: the directory, its config or its weights are missing, damaged or disagree.
    """
    from .convert import apply_plan
    from .models import check_model_name, create_base, read_state_dict
    from .errors import ModelError

    path = Path(path)
    config = read_config(path)
    plan = GatePlan.from_dict(config["dynamize"]["plan"])
    try:
        check_model_name(plan.architecture)
        base = create_base(plan.architecture, num_classes=int(config["num_classes"]), in_chans=plan.input_size[0])
        state = read_state_dict(path / WEIGHTS)
    except (ModelError, KeyError, TypeError, ValueError) as e:
        raise RunError(f"cannot restore {path}: {e}") from None
    model = apply_plan(base, plan)
    if config.get("pretrained_cfg"):
        model.pretrained_cfg = model.default_cfg = config["pretrained_cfg"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise RunError(f"{path / WEIGHTS} does not match the plan in {path / CONFIG} (keys or shapes differ); "
                       "the two files come from different runs") from None
    model.run_config = config
    return model.eval()


def base_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The original model's state dict inside a gated model: gate parameters dropped, timm's key names restored."""
    out = {}
    for key, value in model.state_dict().items():
        if ".gate." in f".{key}" or key.split(".")[1] == "cnets":
            continue
        key = key[len("graph."):]
        if ".branch." in key:
            key = key.split(".branch.", 1)[1]
        out[key] = value
    return out
