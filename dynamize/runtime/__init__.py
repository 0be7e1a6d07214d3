"""The hard inference path (only the kept blocks and channels are computed) and the wall-clock bench."""
from .sliced import CHANNEL_MODES, compile_unit, use_runtime

__all__ = ["CHANNEL_MODES", "compile_unit", "use_runtime"]
