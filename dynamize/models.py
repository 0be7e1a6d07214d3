"""Build timm base models and load user weights into them, with errors a user can act on."""
import contextlib
import difflib
import socket
from pathlib import Path

import timm
import torch
from torch import nn

from .errors import ModelError

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def check_model_name(name: str) -> None:
    """Raise a ModelError naming close matches if timm has no architecture `name`."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models('*resnet*')` lists names"
    raise ModelError(f"timm has no model named {name!r}{hint}")


def create_base(name: str, *, pretrained: bool = False, checkpoint: str | Path | None = None,
                **kwargs) -> nn.Module:
    """Create a timm model, with timm's pretrained weights or a user checkpoint.

    Raises:
        ModelError: unknown name, pretrained weights out of reach, or a checkpoint that does not fit.
    """
    check_model_name(name)
    offline = _offline_unless_hub_reachable() if pretrained and checkpoint is None else contextlib.nullcontext()
    try:
        with offline:
            model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot build {name} with {kwargs}: {str(e).splitlines()[0][:160]}") from None
    except Exception as e:  # hub/network errors come in many types (OSError, HTTPError, LocalEntryNotFoundError, ...)
        if pretrained:
            raise ModelError(f"cannot fetch pretrained weights for {name} ({type(e).__name__}); pass --checkpoint "
                             "FILE with weights you have, --no-pretrained, or go online") from None
        raise
    if checkpoint is not None:
        load_weights(model, read_state_dict(checkpoint))
    return model.eval()


@contextlib.contextmanager
def _offline_unless_hub_reachable(timeout: float = 3.0):
    """Put huggingface_hub in offline mode (cache only) when its host cannot be reached.

    Without this, an offline machine spends most of a minute in download retries before failing.
    """
    import huggingface_hub.constants as hub
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        reachable = True
    except OSError:
        reachable = False
    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE or not reachable
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict from .safetensors, or from .pth/.pt with torch's weights_only loader (no code runs).

    Raises:
        ModelError: missing, corrupt, truncated or unsupported file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise ModelError(f"checkpoint {path} is not a weights file; use .safetensors (or a .pth/.pt state dict)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"checkpoint {path} is not a valid safetensors file ({str(e)[:100]}); "
                             "re-export it or pass the original") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only rejects pickled code with UnpicklingError; truncation gives EOFError etc.
        raise ModelError(f"checkpoint {path} is not a plain state dict that loads safely "
                         f"({type(e).__name__}); convert it to .safetensors") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"checkpoint {path} does not hold a state dict of tensors")
    return obj


def load_backbone(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load weights for transfer learning: strict, except a classifier of another size, which stays as initialised.

    Raises:
        ModelError: anything but the classifier does not match.
    """
    head = model.get_classifier()  # type: ignore[operator]  # every timm model has it; nn.Module's stubs cannot know
    prefix = next(name for name, m in model.named_modules() if m is head)
    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items()
                  if not (k.startswith(prefix + ".") and k in own and own[k].shape != v.shape)}
    state_dict.update({k: v for k, v in own.items() if k.startswith(prefix + ".") and k not in state_dict})
    load_weights(model, state_dict)


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a state dict strictly, accepting the `module.` prefix that DDP adds.

    Raises:
        ModelError: keys or shapes do not match the model.
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError:
        own = model.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        wrong = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} with other shapes"
                  + (f", e.g. {(missing + unexpected + wrong)[0]}" if missing or unexpected or wrong else ""))
        raise ModelError(f"the checkpoint does not match {type(model).__name__} ({detail}); check --num-classes "
                         "and --in-chans, or the model name") from None
