"""Fake (meta) impls of ``flashattn_ext::fa1_fwd`` / ``fa1_bwd`` and the autograd formula of ``fa1_fwd``: the
FlashAttention-1 forward and backward, kept for comparison with FA2.

Import this after ``_ops._C`` is set (e.g. at the bottom of ``_ops.py``): it reads ``_ops._C``.
"""
import torch

from . import _ops


def _fa1_fwd_fake(q, k, v, scale, window_left, window_right):
    # Same outputs as flashattn_ext::fwd: out as torch.empty_like(q), lse (B, Hq, Sq) contiguous float32.
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    return out, lse


def _fa1_bwd_fake(dout, q, k, v, out, lse, scale, window_left, window_right, dlse=None):
    # The CUDA op allocates each gradient with empty_like of its input.
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa1_setup_context(ctx, inputs, output):
    q, k, v, scale, window_left, window_right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.window = scale, (window_left, window_right)


def _fa1_backward(ctx, grad_out, grad_lse):
    # FA1's backward (Algorithm 4) from the saved (out, lse). grad_lse folds into D_i in the kernel
    # (d lse / d scores = P), so a loss may use the returned lse too.
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.flashattn_ext.fa1_bwd.default(grad_out, q, k, v, out, lse, ctx.scale, ctx.window[0],
                                                         ctx.window[1], grad_lse)
    return dq, dk, dv, None, None, None


def fa1_bwd(dout, q, k, v, out, lse, scale, window_left, window_right, dlse=None):
    """Raw FlashAttention-1 backward op: (dq, dk, dv) of fa1_fwd; autograd calls it through fa1_fwd."""
    return torch.ops.flashattn_ext.fa1_bwd.default(dout, q, k, v, out, lse, float(scale), int(window_left),
                                                   int(window_right), dlse)


# hasattr: an extension built before fa1_fwd / fa1_bwd existed must not break the import.
if _ops._C is not None and hasattr(torch.ops.flashattn_ext, "fa1_fwd"):
    torch.library.register_fake("flashattn_ext::fa1_fwd")(_fa1_fwd_fake)
    if hasattr(torch.ops.flashattn_ext, "fa1_bwd"):
        torch.library.register_fake("flashattn_ext::fa1_bwd")(_fa1_bwd_fake)
        torch.library.register_autograd("flashattn_ext::fa1_fwd", _fa1_backward, setup_context=_fa1_setup_context)
