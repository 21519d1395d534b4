"""Fake (meta) impl of ``flashattn_ext::fa1_fwd``, the FlashAttention-1 forward kept for comparison.

Import this after ``_ops._C`` is set (e.g. at the bottom of ``_ops.py``): it reads ``_ops._C``.
"""
import torch

from . import _ops


def _fa1_fwd_fake(q, k, v, scale, window_left, window_right):
    # Same outputs as flashattn_ext::fwd: out as torch.empty_like(q), lse (B, Hq, Sq) contiguous float32.
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    return out, lse


# hasattr: an extension built before fa1_fwd existed must not break the import.
if _ops._C is not None and hasattr(torch.ops.flashattn_ext, "fa1_fwd"):
    torch.library.register_fake("flashattn_ext::fa1_fwd")(_fa1_fwd_fake)
