"""Recipes: YAML training configs in `recipes/`, validated on load and overridable with `key=value`.

Values are parsed as YAML scalars (never evaluated as code), and recipe names cannot leave the recipe folder.
"""
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from ..errors import DynamizeError
from ..graph.plan import GATE_KINDS

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"  # package data: dynamize/recipes/*.yaml
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RecipeError(DynamizeError):
    """A recipe that is missing, unreadable or has unknown or mistyped keys."""


@dataclass
class Recipe:
    """Everything a training run needs besides the model weights. See recipes/*.yaml for commented examples."""
    model: str = "resnet18"
    data: str = "fashion-mnist"
    data_dir: str | None = None
    img_size: int = 32
    in_chans: int = 1
    budget: float = 0.5
    gates: str = "both"
    epochs: int = 3
    batch_size: int = 128
    opt: str = "adamw"
    sched: str = "cosine"
    warmup_epochs: float = 0.0
    lr_backbone: float = 1e-3
    lr_gates: float = 1e-3
    weight_decay: float = 0.05
    task_weight: float = 1.0
    distill_weight: float = 1.0
    budget_weight: float = 10.0
    bounds_weight: float = 10.0
    shaping_weight: float = 1.0
    temperature: float = 2.0
    anneal_fraction: float = 0.3
    bounds_fraction: float = 0.5
    noise_final: float = 0.0
    settle_fraction: float = 0.2
    bn_images: int = 2000
    gumbel_tau: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    train_subset: int = 0
    calib_size: int = 2000
    eval_subset: int = 0
    checkpoint_every: int = 0
    workers: int = 1

    def validate(self) -> "Recipe":
        """Check ranges and choices; raise a RecipeError naming the bad key."""
        check_budget(self.budget, key="budget")
        if self.gates not in GATE_KINDS:
            raise RecipeError(f"gates must be one of {', '.join(GATE_KINDS)}, not {self.gates!r}")
        for key in ("epochs", "batch_size", "img_size", "in_chans", "calib_size"):
            if getattr(self, key) < 1:
                raise RecipeError(f"{key} must be at least 1, not {getattr(self, key)}")
        for key in ("lr_backbone", "lr_gates", "weight_decay", "task_weight", "distill_weight", "budget_weight",
                    "bounds_weight", "shaping_weight", "noise_final", "bn_images", "warmup_epochs",
                    "label_smoothing", "train_subset", "eval_subset", "checkpoint_every", "workers"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise RecipeError(f"{key} must be a finite number >= 0, not {value}")
        for key in ("temperature", "gumbel_tau"):
            if not getattr(self, key) > 0:
                raise RecipeError(f"{key} must be > 0, not {getattr(self, key)}")
        for key in ("anneal_fraction", "bounds_fraction"):
            if not 0 < getattr(self, key) <= 1:
                raise RecipeError(f"{key} must be in (0, 1], not {getattr(self, key)}")
        if not 0 <= self.settle_fraction < 1:
            raise RecipeError(f"settle_fraction must be in [0, 1), not {self.settle_fraction}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def check_budget(value, key: str = "--budget") -> float:
    """A budget is a fraction of the original FLOPs in (0, 1]."""
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{key} must be a number in (0, 1], not {value!r}") from None
    if not (0 < budget <= 1):  # also rejects NaN
        raise RecipeError(f"{key} must be in (0, 1] (a fraction of the original FLOPs), not {value}")
    return budget


def _typed(key: str, value, kind) -> object:
    """Check one value against the field's type, accepting ints where floats are expected."""
    base = [t for t in getattr(kind, "__args__", (kind,)) if t is not type(None)][0]
    if value is None and type(None) in getattr(kind, "__args__", ()):
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise RecipeError(f"recipe key {key!r} must be {base.__name__}, not {type(value).__name__} ({value!r})")
    return value


def recipe_path(name_or_path: str) -> Path:
    """Resolve `--recipe`: a path to a .yaml file, or a plain name of one in the recipe folder."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        return path
    if not _NAME.match(name_or_path):
        raise RecipeError(f"recipe name {name_or_path!r} is not a plain name; pass a path to a .yaml file")
    path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
        raise RecipeError(f"no recipe named {name_or_path!r}; known recipes: {known}")
    return path


def load_recipe(name_or_path: str | Path | None = None, overrides: list[str] | None = None,
                **values) -> Recipe:
    """Load a recipe, apply `key=value` overrides and explicit values, and validate.

    Raises:
        RecipeError: unknown recipe, unreadable YAML, unknown keys, wrong types or out-of-range values.
    """
    data = {}
    if name_or_path is not None:
        path = recipe_path(str(name_or_path))
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise RecipeError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path} must be a mapping of keys to values")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like key=value")
        try:
            data[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            data[key.strip()] = raw
    data.update({k: v for k, v in values.items() if v is not None})
    known = {f.name: f.type for f in fields(Recipe)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RecipeError(f"unknown recipe key {unknown[0]!r}; known keys: {', '.join(known)}")
    hints = {f.name: f for f in fields(Recipe)}
    typed = {k: _typed(k, v, hints[k].type) for k, v in data.items()}
    return Recipe(**typed).validate()
