"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""


class DynamizeError(Exception):
    """Base class of every error that a user can fix; the message says how."""


class ModelError(DynamizeError):
    """The model name, architecture or weights cannot be used."""


class RunError(DynamizeError):
    """A run directory is missing, malformed or disagrees with its weights."""


class OutputError(DynamizeError):
    """An output path cannot be written."""
