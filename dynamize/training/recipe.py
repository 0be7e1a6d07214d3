"""Recipes: YAML training configs in `recipes/`, validated on load and overridable with `key=value`.

Values are parsed as YAML scalars (never evaluated as code), recipe names cannot leave the recipe folder, and every
number is checked against the same table of ranges as the CLI options (`dynamize.ranges`).
"""
import difflib
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import timm
import yaml
from timm.optim import list_optimizers

from ..errors import DynamizeError
from ..graph.plan import GATE_KINDS
from ..ranges import RANGES, check, check_choice

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"  # package data: dynamize/recipes/*.yaml
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "constant")


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
    floor_margin: float = 0.05  # closer than this to the smallest reachable fraction, budget_weight grows
    bounds_weight: float = 10.0
    shaping_weight: float = 1.0
    temperature: float = 2.0
    anneal_fraction: float = 0.3
    bounds_fraction: float = 0.5
    noise_final: float = 0.0
    settle_fraction: float = 0.2
    bn_images: int = 2000
    gumbel_tau: float = 1.0
    static_gates: bool = False  # gates that ignore the image: the static baseline of the same method
    label_smoothing: float = 0.0
    seed: int = 0
    train_subset: int = 0
    calib_size: int | None = None  # None: 10% of the training split, at least 100 and at most 2,000 images
    eval_subset: int = 0
    checkpoint_every: int = 0
    workers: int = 1

    def validate(self) -> "Recipe":
        """Check ranges (the table in `dynamize.ranges`) and choices; raise an error naming the bad key."""
        check_choice(self.gates, GATE_KINDS, "gates", RecipeError)
        if self.opt not in list_optimizers():
            raise RecipeError(f"opt must be an optimizer timm knows (e.g. adamw, sgd), not {self.opt!r}")
        check_choice(self.sched, SCHEDULES, "sched", RecipeError)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in RANGES and value is not None:
                check(f.name, value, f"recipe key {f.name!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _typed(key: str, value, kind) -> Any:
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


def _merged(name_or_path: str | Path | None, overrides: list[str] | None, values: dict) -> dict:
    """The raw key -> value mapping of a recipe file, then `key=value` overrides, then explicit values (an option
    and an override of the same key must agree)."""
    data: dict = {}
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
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} must look like key=value")
        try:
            data[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            data[key.strip()] = raw
    overridden = {item.partition("=")[0].strip() for item in overrides or []}
    for key, value in values.items():
        if value is not None and key in overridden and data[key] != value:
            raise RecipeError(f"--{key.replace('_', '-')} {value} and --set {key}={data[key]} disagree; give one of "
                              "them")
        if value is not None:
            data[key] = value
    return data


def load_recipe(name_or_path: str | Path | None = None, overrides: list[str] | None = None,
                **values) -> Recipe:
    """Load a recipe, apply `key=value` overrides and explicit values (None: not given), and validate.

    Raises:
        RecipeError / RangeError: unknown recipe, unreadable YAML, unknown keys, wrong types or out-of-range values.
    """
    data = _merged(name_or_path, overrides, values)
    known = {f.name: f.type for f in fields(Recipe)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(f"unknown recipe key {unknown[0]!r}; {hint}known keys: {', '.join(known)}")
    return Recipe(**{k: _typed(k, v, known[k]) for k, v in data.items()}).validate()


def given_keys(name_or_path: str | Path | None = None, overrides: list[str] | None = None, **values) -> set[str]:
    """The keys that a recipe file, overrides and explicit values (None: not given) set: what a user asked for."""
    return set(_merged(name_or_path, overrides, values))


# timm modules of depthwise-separable mobile nets: they fine-tune alike (see recipes/fashion-mnist-mobilenet.yaml).
_MOBILE_MODULES = {"efficientnet", "mobilenetv3", "mobilenetv5", "ghostnet", "rexnet", "hardcorenas", "fbnetv3",
                   "tinynet", "mnasnet"}


def _family(architecture: str) -> str | None:
    """The training family of an architecture: "mobile" for depthwise-separable mobile nets, else timm's module
    (resnet, regnet, ...). The models of one family train alike."""
    module = next((m for m in timm.list_modules() if architecture in timm.list_models(module=m)), None)
    return "mobile" if module in _MOBILE_MODULES else module


def default_recipe(architecture: str, img_size: int, data: str | None = None, folder: Path = RECIPE_DIR) -> Path:
    """The recipe in `folder` that fits a run best: the same data set first, then the same family (ResNets,
    mobile nets, ...), then a mobile recipe only for a mobile net, then the closest input size.

    Args:
        architecture: the run's timm architecture.
        img_size: the input size the run is planned at.
        data: the run's data set, if known.
    """
    family = _family(architecture)

    def fit(path: Path) -> tuple:
        r = load_recipe(path)
        theirs = _family(r.model)
        return (data is not None and r.data == data, theirs == family, (theirs == "mobile") == (family == "mobile"),
                -abs(math.log(r.img_size / img_size)), path.stem)

    recipes = sorted(folder.glob("*.yaml"))
    if not recipes:
        raise RecipeError(f"no recipes in {folder}; reinstall dynamize or pass --recipe PATH")
    return max(recipes, key=fit)
