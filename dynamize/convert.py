"""`dynamize.convert`: a timm model in, the same model with L-Net / C-Net gates out."""
import copy
from typing import Optional, Sequence, Union

from timm.data import resolve_model_data_config
from torch import nn

from .analyse import analyse
from .errors import ModelError
from .models import create_base
from .plan import GATE_KINDS, GatePlan
from .rewrite import DynamicNet, rewrite
from .trace import check_cnn, trace

_SUPPORTED = ("timm CNNs: ResNet/ResNeXt/SE-ResNet, RegNet, MobileNet, EfficientNet, MixNet, GhostNet, ReXNet, DLA, "
              "CSP nets, HRNet, DenseNet, VGG, ConvNeXt, ...")


def architecture_of(model: nn.Module) -> str:
    """timm's name for a model instance."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise ModelError(f"{type(model).__name__} was not built by timm.create_model; pass a timm model name")
    return name


def default_input_size(model: nn.Module, img_size: Optional[int] = None) -> Sequence[int]:
    """(C, H, W) that FLOPs are counted at: timm's default for the model, or `img_size` square."""
    _, h, w = resolve_model_data_config(model)["input_size"]
    c = next(m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d))  # timm's cfg says 3 regardless
    return (c, img_size, img_size) if img_size else (c, h, w)


def plan_model(model: nn.Module, *, gates: str = "both", img_size: Optional[int] = None) -> GatePlan:
    """Analyse a timm model and return its GatePlan without changing it.

    Raises:
        ModelError: the model cannot be traced, or has nothing to gate.
    """
    if gates not in GATE_KINDS:
        raise ModelError(f"--gates must be one of {', '.join(GATE_KINDS)}, not {gates!r}")
    arch = architecture_of(model)
    check_cnn(model)
    size = default_input_size(model, img_size)
    plan = analyse(trace(copy.deepcopy(model), size), arch, size, gates)
    if not plan.blocks and not plan.groups:
        raise ModelError(f"{arch} has nothing dynamize can gate with --gates {gates}: no residual conv blocks or "
                         "convolution channel groups visible to torch.fx (timm may mark its blocks as not traceable)"
                         f"; supported: {_SUPPORTED}")
    return plan


def apply_plan(model: nn.Module, plan: GatePlan) -> DynamicNet:
    """Replay a plan on a model (which is left untouched) and return the gated model."""
    base = copy.deepcopy(model)
    return rewrite(trace(base, plan.input_size), plan, base)


def convert(model: Union[str, nn.Module], *, gates: str = "both", img_size: Optional[int] = None,
            **timm_kwargs) -> DynamicNet:
    """Insert L-Net and/or C-Net gates into a timm CNN.

    Args:
        model: a timm model name, or a model built by `timm.create_model` (not modified).
        gates: "both" (LC-Net), "layer" (L-Net only) or "channel" (C-Net only).
        img_size: square input size to count FLOPs at; default: the model's pretrained input size.
        **timm_kwargs: passed to `timm.create_model` when `model` is a name (e.g. num_classes, in_chans).

    Returns:
        The gated model, with `.plan`; with its initial open gates it returns what the original returned.
    """
    if isinstance(model, str):
        model = create_base(model, **timm_kwargs)
    elif timm_kwargs:
        raise TypeError("timm keyword arguments apply only when `model` is a name")
    return apply_plan(model, plan_model(model, gates=gates, img_size=img_size)).train(model.training)
