"""flashattn_ext: hand-written CUDA FlashAttention kernels, a drop-in for torch SDPA's forward."""
from . import reference
from ._ops import build_info
from ._version import __version__
from .api import attention, resolve_algorithm
from .cache import PagedKVCache
from .global_tokens import GlobalTokens, global_tokens
from .kvcache import DecodeWorkspace, attention_with_kvcache, merge_states
from .varlen import attention_varlen
from .sdpa import reset_sdpa_stats, sdpa, sdpa_stats, sdpa_strict

__all__ = [
    "attention", "attention_varlen", "build_info", "reference", "resolve_algorithm", "reset_sdpa_stats", "sdpa", "sdpa_stats",
    "sdpa_strict", "__version__",
    "PagedKVCache", "DecodeWorkspace", "attention_with_kvcache", "merge_states", "GlobalTokens", "global_tokens",
]
