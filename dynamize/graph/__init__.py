"""The model graph: trace a timm model, find where gates go (the GatePlan), insert them, and count FLOPs.

trace -> find -> units -> GatePlan -> rewrite; `cost` is the one FLOPs model; `ops` is the one op table.
"""
from .convert import convert, plan_model
from .cost import flops_fraction, flops_per_image
from .plan import GatePlan
from .rewrite import DynamicNet, DynamicUnit

__all__ = ["convert", "plan_model", "flops_fraction", "flops_per_image", "GatePlan", "DynamicNet", "DynamicUnit"]
