"""dynamize: make timm CNNs input-adaptive with LC-Net layer and channel gates.

The package is layered; each layer imports only from the ones before it (tests/test_layers.py checks this):
errors, version -> models (timm), ranges (of every number a user gives) -> graph (trace, find, plan, gates, rewrite,
cost) -> io (run directories) -> training | runtime -> reporting -> this module and the CLI.
"""
from pathlib import Path

from torch import nn

from .errors import DynamizeError
from .graph import GatePlan, flops_fraction, plan_model
from .graph import convert as _convert
from .graph.rewrite import DynamicNet
from .io import load as _load
from .io import save
from .runtime import use_runtime
from .runtime.cascade import Cascade, load_cascade
from .version import __version__


def convert(model: str | nn.Module, **kwargs) -> DynamicNet:
    """Insert L-Net and/or C-Net gates into a timm CNN (see `dynamize.graph.convert`).

    The result is a copy of the timm model (same class API, same weight names plus the gates'); in `eval()` without
    gradients it runs the fast runtime, which computes only the kept blocks and channels.
    """
    return use_runtime(_convert(model, **kwargs))


def load(path: str | Path) -> DynamicNet:
    """Rebuild a gated model from a run directory (see `dynamize.io.load`), with the fast runtime for inference."""
    return use_runtime(_load(path))


__all__ = ["convert", "plan_model", "save", "load", "load_cascade", "Cascade", "flops_fraction", "use_runtime",
           "GatePlan", "DynamizeError", "__version__"]
