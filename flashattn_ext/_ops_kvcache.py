"""Fake (meta) impls and raw wrappers of ``flashattn_ext::kvcache_fwd`` and ``flashattn_ext::merge_states``
(csrc/api/kvcache.cpp). Use ``flashattn_ext.attention_with_kvcache`` / ``merge_states``, which validate first."""
import torch

from . import _ops

# hasattr: an extension built before these ops existed (or without head dims 64/128) must not break the import.
HAS_KVCACHE_OP = _ops._C is not None and hasattr(torch.ops.flashattn_ext, "kvcache_fwd")
HAS_MERGE_OP = _ops._C is not None and hasattr(torch.ops.flashattn_ext, "merge_states")


def _kvcache_fwd_fake(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale, window_left,
                      window_right, num_splits, workspace):
    # out as torch.empty_like(q), lse (B, Hq, Sq) contiguous float32, as the CUDA op allocates them.
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    return out, lse


def _merge_states_fake(o_a, lse_a, o_b, lse_b):
    return o_a.new_empty(o_a.shape), lse_a.new_empty(lse_a.shape, dtype=torch.float32)


if HAS_KVCACHE_OP:
    torch.library.register_fake("flashattn_ext::kvcache_fwd")(_kvcache_fwd_fake)
if HAS_MERGE_OP:
    torch.library.register_fake("flashattn_ext::merge_states")(_merge_states_fake)


def kvcache_fwd(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale, window_left, window_right,
                num_splits=0, workspace=None):
    """Raw op: C++ TORCH_CHECKs only (shapes, dtypes, layouts), no value checks."""
    return torch.ops.flashattn_ext.kvcache_fwd.default(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new,
                                                       float(scale), int(window_left), int(window_right),
                                                       int(num_splits), workspace)


def merge_states(o_a, lse_a, o_b, lse_b):
    return torch.ops.flashattn_ext.merge_states.default(o_a, lse_a, o_b, lse_b)
