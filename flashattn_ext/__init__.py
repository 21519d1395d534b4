"""flashattn_ext: hand-written CUDA FlashAttention kernels, a drop-in for torch SDPA's forward."""
from . import reference
from ._ops import build_info
from ._version import __version__
from .api import attention, resolve_algorithm

__all__ = ["attention", "build_info", "reference", "resolve_algorithm", "__version__"]
