"""dynamize: make timm CNNs input-adaptive with LC-Net layer and channel gates."""
__version__ = "0.1.0"

from .convert import convert, plan_model
from .errors import DynamizeError
from .export import load, save
from .flops import flops_fraction
from .plan import GatePlan

__all__ = ["convert", "plan_model", "save", "load", "flops_fraction", "GatePlan", "DynamizeError", "__version__"]
