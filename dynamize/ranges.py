"""The allowed range of every number a user gives dynamize (and the one check of a word against its choices), in one
table that the CLI options and the recipe keys both read, so that `--img-size 0` and `img_size: 0` in a recipe are
refused alike, before anything is written.

Upper bounds are far beyond any sensible value; they are there so that a typo such as 10**9 fails at once with one
line instead of exhausting memory an hour later.
"""
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import DynamizeError

_COUNT = 2**31 - 1  # counts of images or steps: anything a data set can hold


class RangeError(DynamizeError):
    """A number outside its range, a value that is not a number where one is expected, or a word that is not one of
    an option's choices."""


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of ints or floats (NaN and infinities are never inside)."""
    kind: type
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = value < self.high if self.high_open else value <= self.high
        return above_low and below_high

    def __str__(self) -> str:
        low, high = (f"{x:d}" if self.kind is int else f"{x:g}" for x in (self.low, self.high))
        interval = f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        return f"an integer in {interval}" if self.kind is int else f"in {interval}"


def _count(low: int = 0, high: int = _COUNT) -> Range:
    return Range(int, low, high)


FRACTION = Range(float, 0.0, 1.0, low_open=True)  # a share of the original FLOPs

# Every numeric CLI option and recipe key, by name (an option's name is its Python parameter name).
RANGES: dict[str, Range] = {
    # model shape
    "img_size": _count(8, 4096),
    "in_chans": _count(1, 1024),
    "num_classes": _count(1, 100_000),
    # data and schedule; 0 means "all" for the subsets and "never" for checkpoint_every
    "batch_size": _count(1, 65_536),
    "epochs": _count(1, 10_000),
    "calib_size": _count(1),
    "train_subset": _count(),
    "eval_subset": _count(),
    "limit": _count(),
    "checkpoint_every": _count(),
    "workers": _count(0, 256),
    "seed": _count(0, 2**32 - 1),
    "warmup_epochs": Range(float, 0.0, 10_000.0),
    # budgets
    "budget": FRACTION,
    "fraction": FRACTION,
    "anneal_fraction": FRACTION,
    "bounds_fraction": FRACTION,
    "settle_fraction": Range(float, 0.0, 1.0, high_open=True),
    # optimisation and losses
    "lr_backbone": Range(float, 0.0, 10.0),
    "lr_gates": Range(float, 0.0, 10.0),
    "weight_decay": Range(float, 0.0, 10.0),
    "task_weight": Range(float, 0.0, 1000.0),
    "distill_weight": Range(float, 0.0, 1000.0),
    "budget_weight": Range(float, 0.0, 1000.0),
    "floor_margin": Range(float, 0.0, 1.0),
    "bounds_weight": Range(float, 0.0, 1000.0),
    "shaping_weight": Range(float, 0.0, 1000.0),
    "noise_final": Range(float, 0.0, 10.0),
    "bn_images": _count(),
    "temperature": Range(float, 0.0, 100.0, low_open=True),
    "gumbel_tau": Range(float, 0.0, 100.0, low_open=True),
    "label_smoothing": Range(float, 0.0, 1.0, high_open=True),
    # benchmark
    "threads": _count(1, 1024),
    "repeats": _count(1, 10_000),
    "warmup": _count(0, 10_000),
}


def check_choice(value, choices: Sequence[str], name: str, error: type[DynamizeError] = RangeError):
    """Return `value` if it is one of `choices`; the one wording of that check for options, recipe keys and the
    library's arguments alike.

    Raises:
        `error` (RangeError by default): the value is not one of the choices.
    """
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def check(key: str, value, name: str | None = None):
    """Return `value` if it lies in the range of `key`.

    Args:
        key: the entry of RANGES.
        value: the number to check.
        name: how the message names the value (e.g. `--img-size`, `recipe key 'img_size'`); default: the key.

    Raises:
        RangeError: the value is outside the range, NaN or infinite, or not a number of the right kind.
    """
    allowed = RANGES[key]
    if value not in allowed:
        raise RangeError(f"{name or key} must be {allowed}, not {value!r}")
    return value
