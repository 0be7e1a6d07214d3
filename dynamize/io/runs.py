"""Run directories: `model.safetensors` (a plain state dict) + `config.json` (timm's config keys + a `dynamize` block).

A gated model is restored NNCF-style: build the base model with timm (random init, no download), replay the plan
recorded in config.json, load the weights strictly. No pickles anywhere. A run is written as one step (a temporary
directory renamed into place), and every command that reads a run checks it in full through `check_run` first.
"""
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ModelError, OutputError, RunError
from ..graph.convert import convert
from ..graph.plan import GatePlan
from ..graph.rewrite import DynamicNet, rewrite
from ..models import check_model_name, create_base
from ..version import __version__
from .atomic import check_output_dir, write_dir, write_json

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
RUNS = Path("runs")
GATED, BASE = "gated", "base"
_M = TypeVar("_M", bound=nn.Module)


@dataclass
class Run:
    """A checked run directory: its config, its plan (gated runs) and the names and shapes of its weights."""
    path: Path
    config: dict
    plan: GatePlan | None

    @property
    def kind(self) -> str:
        return GATED if self.plan is not None else BASE

    @property
    def info(self) -> dict:
        """The `dynamize` block of config.json."""
        return self.config["dynamize"]

    @property
    def architecture(self) -> str:
        return self.config["architecture"]

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def in_chans(self) -> int:
        return int(self.config["in_chans"])

    @property
    def gate_plan(self) -> GatePlan:
        """The plan of a gated run.

        Raises:
            RunError: the run holds a plain model.
        """
        if self.plan is None:
            raise RunError(_plain_model(self.path))
        return self.plan

    @property
    def teacher(self) -> Path:
        """The run holding this run's original model (the teacher of its fine-tuning): recorded, or the run itself."""
        return Path(self.info.get("teacher", self.path))


def _plain_model(path: Path) -> str:
    return f"{path} holds a plain model (from `dynamize train`), not a gated one; run `dynamize convert {path}` first"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def read_config(path: str | Path) -> dict:
    """Read a run directory's config.json and check what it needs to be used: JSON, a dynamize block, the version.

    Raises:
        RunError: not a run directory, config.json unreadable or without a version, or written by a newer dynamize.
    """
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path} is not a run directory (expected a folder with {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise RunError(f"{path} has no {CONFIG}; it is not a dynamize run directory") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path / CONFIG} is not valid JSON ({e}); restore it or write the run again") from None
    if not isinstance(config, dict) or not isinstance(config.get("dynamize"), dict):
        raise RunError(f"{path / CONFIG} has no dynamize block; it is not a dynamize run directory")
    version = config["dynamize"].get("version")
    if not isinstance(version, str) or not _version_tuple(version):  # a damaged or hand-edited config
        raise RunError(f"{path / CONFIG} has no valid dynamize version ({version!r}); write the run again")
    if _version_tuple(version) > _version_tuple(__version__):
        raise RunError(f"{path} was written by dynamize {version}, newer than this one ({__version__}); "
                       "upgrade dynamize")
    for key, kind in (("architecture", str), ("num_classes", int), ("in_chans", int)):
        if not isinstance(config.get(key), kind):
            raise RunError(f"{path / CONFIG} has no valid {key!r}; write the run again")
    return config


def check_run(path: str | Path, kind: str | None = None) -> Run:
    """Check a run directory in full without loading its tensors: config, version, plan, and that the weights file
    is valid safetensors whose keys and shapes are exactly those of the model the config describes.

    Every command that reads a run calls this first, so a damaged run fails at once with one line.

    Args:
        kind: GATED or BASE to require that kind of run; None for either.

    Raises:
        RunError: anything is missing, damaged, from a newer dynamize, of the wrong kind, or does not match.
    """
    path = Path(path)
    config = read_config(path)
    plan = GatePlan.from_dict(config["dynamize"]["plan"]) if "plan" in config["dynamize"] else None
    run = Run(path, config, plan)
    if kind == GATED and plan is None:
        raise RunError(_plain_model(path))
    if kind == BASE and plan is not None:
        raise RunError(f"{path} holds a gated model; expected a plain model from `dynamize train`")
    found = _weights_header(path / WEIGHTS)
    expected = {k: tuple(v.shape) for k, v in _build(run, device="meta").state_dict().items()}
    if found != expected:
        missing, unexpected = set(expected) - set(found), set(found) - set(expected)
        wrong = [k for k in expected.keys() & found.keys() if expected[k] != found[k]]
        detail = ", ".join(f"{len(v)} {what}" for v, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                               (wrong, "with other shapes")) if v)
        raise RunError(f"{path / WEIGHTS} does not match {path / CONFIG} ({detail}, e.g. "
                       f"{sorted(missing | unexpected | set(wrong))[0]}); the two files come from different runs")
    return run


def _weights_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a safetensors file, from its header only."""
    if not path.is_file():
        raise RunError(f"{path.parent} has no {WEIGHTS}; the run is incomplete: write it again")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{path} is not a valid safetensors file ({str(e)[:100]}); it is damaged or truncated: "
                       "write the run again") from None


def _base(run: Run, device: str | torch.device = "cpu") -> nn.Module:
    """The timm model a run's config describes, freshly initialised (on the meta device: shapes only)."""
    try:
        check_model_name(run.architecture)
        with torch.device(device):
            return create_base(run.architecture, num_classes=run.num_classes, in_chans=run.in_chans)
    except ModelError as e:
        raise RunError(f"cannot rebuild {run.path}: {e}") from None


def _build(run: Run, device: str | torch.device = "cpu") -> nn.Module:
    """The model a run describes, with freshly initialised weights (on the meta device: shapes only)."""
    base = _base(run, device)
    return rewrite(base, run.plan) if run.plan is not None else base


def _load(run: Run, model: _M) -> _M:
    """`model`, built as the run describes, with the run's weights and config, in evaluation mode."""
    try:
        model.load_state_dict(load_file(str(run.path / WEIGHTS)), strict=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RunError(f"cannot load {run.path / WEIGHTS} ({str(e)[:100]}); write the run again") from None
    if run.config.get("pretrained_cfg"):
        model.pretrained_cfg = model.default_cfg = run.config["pretrained_cfg"]
    model.run_config = run.config  # type: ignore[assignment]  # nn.Module's __setattr__ is typed for tensors only
    return model.eval()


def _load_gated(run: Run) -> DynamicNet:
    return _load(run, rewrite(_base(run), run.gate_plan))


def load(path: str | Path) -> DynamicNet:
    """Rebuild a gated model from a run directory: fresh timm base model, replayed plan, strict weights.

    Raises:
        RunError: the directory, its config or its weights are missing, damaged or disagree.
    """
    return _load_gated(check_run(path, GATED))


def load_base(path: str | Path) -> nn.Module:
    """The plain timm model of a run: a `dynamize train` run as it is, or the original weights inside a gated run.

    Raises:
        RunError: the run is missing, damaged or disagrees with its weights.
    """
    run = check_run(path)
    if run.plan is None:
        return _load(run, _base(run))
    model = _load_gated(run)
    base = create_base(run.architecture, num_classes=run.num_classes, in_chans=run.in_chans)
    base.load_state_dict(model.base_state_dict(), strict=True)
    base.pretrained_cfg = base.default_cfg = model.pretrained_cfg
    return base.eval()


def load_teacher(run: str | Path) -> nn.Module:
    """The original model of a gated run (the teacher of its fine-tuning): the run recorded as `teacher` in its
    config.json, or the original weights inside the run itself."""
    teacher = Run(Path(run), read_config(run), None).teacher
    if not teacher.is_dir():
        raise RunError(f"the teacher run {teacher} recorded in {Path(run) / CONFIG} is gone")
    return load_base(teacher)


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


def _write_run(path: str | Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        write_json(tmp / CONFIG, config)

    return write_dir(path, write, keep=lambda entry: entry.name not in (CONFIG, WEIGHTS))


def save(model: DynamicNet, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save a gated model as the run directory `path`, as one step (other files of an existing run are kept).

    Args:
        model: a model returned by `dynamize.convert` or `dynamize.load`.
        path: the run directory.
        extra: more keys for config.json's `dynamize` block (budget, recipe, provenance, ...).

    Raises:
        OutputError: `path` is a file or cannot be written.
    """
    plan: GatePlan = model.plan
    config = {**_timm_config(model, plan.input_size[0]),
              "dynamize": {"version": __version__, "kind": GATED, "plan": plan.to_dict(), **(extra or {})}}
    return _write_run(path, model.state_dict(), config)


def save_base(model: nn.Module, path: str | Path, in_chans: int, extra: dict[str, Any] | None = None
              ) -> Path:
    """Save a plain timm model (no gates) as a run directory that `dynamize convert DIR` accepts."""
    config = {**_timm_config(model, in_chans), "dynamize": {"version": __version__, "kind": BASE, **(extra or {})}}
    return _write_run(path, model.state_dict(), config)


def new_run_dir(name: str, root: Path = RUNS) -> Path:
    """`runs/NAME`, or `runs/NAME-2`, `-3`, ... if taken: a default output never replaces an earlier run."""
    path, i = root / name, 1
    while path.exists():
        i += 1
        path = root / f"{name}-{i}"
    return path


def check_unused(path: str | Path) -> None:
    """Refuse an output directory that already holds a run: a new run written there would replace it and keep its
    other files (checkpoints, metrics), and a fine-tune into its own input would overwrite its teacher.

    Raises:
        OutputError: `path` is a file or holds a run.
    """
    check_output_dir(path)
    if (Path(path) / CONFIG).is_file():
        raise OutputError(f"{path} already holds a run; choose another -o, or delete {path} first")


def latest_run(root: Path = RUNS, accept: Callable[[Path], bool] = lambda p: True) -> Path:
    """The most recently written run directory under `root` (that `accept` accepts).

    Raises:
        RunError: there is none.
    """
    runs = [p for p in root.glob("*") if (p / CONFIG).is_file() and accept(p)] if root.is_dir() else []
    if not runs:
        raise RunError(f"no run directory under {root}/; run `dynamize convert MODEL` first or pass RUN")
    return max(runs, key=lambda p: (p / CONFIG).stat().st_mtime)




def convert_to_run(source: str, out: str | Path | None = None, *, checkpoint: Path | None = None,
                   pretrained: bool = True, num_classes: int | None = None, in_chans: int | None = None,
                   img_size: int | None = None, gates: str = "both", profitable_only: bool = False,
                   channel_mode: str = "channel", residual_outputs: bool = False) -> tuple[DynamicNet, Path]:
    """Convert a timm model name, or the run directory of a `dynamize train` run, into a gated run directory.

    A trained run passes on what it was trained with: its weights, classes, input channels, input size and data
    (recorded as `data` in the new config.json, which `dynamize finetune` takes as its defaults).

    Returns:
        The gated model and the run directory it was saved to (default: runs/MODEL, never an existing one).

    Raises:
        ModelError / RunError: unknown model, bad weights, or a damaged run.
        OutputError: `out` is a file or already holds a run.
    """
    if out is not None:
        check_unused(out)
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
    extra: dict[str, Any] = {}
    name = source
    if Path(source).is_dir():
        run = check_run(source, BASE)
        recipe = run.info.get("recipe") or {}
        checkpoint, pretrained = Path(source) / WEIGHTS, False
        kwargs = {"num_classes": run.num_classes, "in_chans": run.in_chans, **kwargs}
        img_size = img_size or recipe.get("img_size")
        name = run.architecture
        extra["data"] = {k: recipe.get(k) for k in ("data", "data_dir", "img_size", "in_chans") if k in recipe}
    base = create_base(name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    net = convert(base, gates=gates, img_size=img_size, profitable_only=profitable_only, channel_mode=channel_mode,
                  residual_outputs=residual_outputs)
    default_classes = (getattr(base, "pretrained_cfg", None) or {}).get("num_classes")
    extra["source"] = {"model": source, "checkpoint": str(checkpoint) if checkpoint else None,
                       "pretrained": pretrained and checkpoint is None}
    # Distilling from a classifier that was never trained would pull the student toward random logits.
    extra["head_trained"] = checkpoint is not None or (pretrained and num_classes in (None, default_classes))
    out = Path(out) if out is not None else new_run_dir(name)
    return net, save(net, out, extra)
