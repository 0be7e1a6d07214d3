"""Numeric options checked against the one table of ranges (`dynamize.ranges`), and options with a few allowed
words checked against them, while the command line is parsed, so that a bad value fails with one line before a
command does any work."""
from collections.abc import Callable, Sequence

import typer

from dynamize.ranges import check, check_choice


def in_range(key: str) -> Callable:
    """A Typer callback that checks an option (each value of a repeatable one) against the range of `key`."""
    def callback(param: typer.CallbackParam, value):
        name = param.opts[0] if param.opts else key
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None:
                check(key, v, name)
        return value

    return callback


def one_of(choices: Sequence[str]) -> Callable:
    """A Typer callback that refuses a value outside `choices`, worded as the range checks are, so that an option
    that several commands share (`--gates`) is refused alike by all of them."""
    def callback(param: typer.CallbackParam, value):
        return value if value is None else check_choice(value, choices, param.opts[0])

    return callback
