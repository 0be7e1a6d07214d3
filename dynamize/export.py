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
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a directory; choose another -o")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
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


def write_json(path: Path, obj: dict) -> None:
    """Write JSON to `path` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def model_config(model: nn.Module, extra: Optional[dict] = None) -> dict:
    """config.json content: timm's keys for the base model plus a versioned `dynamize` block."""
    plan: GatePlan = model.plan
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg = {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    return {
        "architecture": plan.architecture,
        "num_classes": model.num_classes,
        "in_chans": plan.input_size[0],
        "num_features": getattr(model, "num_features", None),
        "pretrained_cfg": cfg,
        "dynamize": {"version": __version__, "plan": plan.to_dict(), **(extra or {})},
    }


def save(model: nn.Module, path: Union[str, Path], extra: Optional[dict] = None) -> Path:
    """Save a gated model as a run directory (created or replaced atomically).

    Args:
        model: a model returned by `dynamize.convert` or `dynamize.load`.
        path: the run directory.
        extra: more keys for config.json's `dynamize` block (budget, recipe, provenance, ...).
    """
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = model_config(model, extra)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    return write_run(path, write)


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
