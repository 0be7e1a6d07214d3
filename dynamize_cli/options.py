"""Numeric options checked against the one table of ranges (`dynamize.ranges`) while the command line is parsed,
so that a bad value fails with one line before a command does any work."""
from collections.abc import Callable

import typer

from dynamize.ranges import check


def in_range(key: str) -> Callable:
    """A Typer callback that checks an option (each value of a repeatable one) against the range of `key`."""
    def callback(param: typer.CallbackParam, value):
        name = param.opts[0] if param.opts else key
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None:
                check(key, v, name)
        return value

    return callback
