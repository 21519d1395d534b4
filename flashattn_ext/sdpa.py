"""``sdpa``: a drop-in for ``torch.nn.functional.scaled_dot_product_attention`` that runs flashattn_ext where it
can and torch SDPA everywhere else, counting which path each call took.

Path selection is decided from arguments and tensor metadata only (no data-dependent checks, no sync).
``sdpa_stats()`` reports the counts; under ``with sdpa_strict():`` a fallback raises instead of running.
"""
import contextlib
import math
import numbers

import torch
import torch.nn.functional as F

from . import _ops, validate
from .api import attention

PATH = "flashattn_ext"
FALLBACK = "fallback"

# Stable reason keys (the fallback_reasons dict of sdpa_stats()).
REASONS = {
    "attn_mask": "an attn_mask is given (boolean and additive masks run on torch SDPA only)",
    "dropout": "dropout_p != 0 (flashattn_ext has no dropout)",
    "arguments": "an argument has a type or value flashattn_ext does not take (torch SDPA decides what it means)",
    "shape": "q/k/v are not 4-D (B, H, S, D) with equal batch and equal k/v shapes (incl. value head dim)",
    "gqa": "query heads != key/value heads without enable_gqa=True, or not a multiple (torch SDPA raises or "
           "broadcasts)",
    "scale": "scale is not a finite positive number",
    "empty": "an input has a zero-size dimension",
    "device": "tensors are not on cpu/cuda, or not on one device",
    "dtype": "dtype not supported on this device (CUDA: float16/bfloat16), or q/k/v dtypes differ",
    "extension": "the CUDA extension flashattn_ext._C is not built or failed to load",
    "capability": "GPU compute capability < 8.0",
    "head_dim": "head dim not instantiated in the CUDA kernels (build_info()['head_dims'])",
    "layout": "memory layout the kernels cannot read (last dim not contiguous, strides not multiples of 8, or "
              "data not 16-byte aligned)",
    "grad": "inputs require grad and no CUDA backward is available",
    "causal": "causal alignment not expressible as a flashattn_ext window",
    "position_bias": "an additive position bias is given (transformers integration)",
}

_counts = {PATH: 0, FALLBACK: 0}
_reasons = {}
# A plain module global (not a ContextVar / thread-local) so torch.compile can read it; strictness is process-wide.
_strict_depth = 0


class SdpaFallbackError(RuntimeError):
    """Raised under ``sdpa_strict()`` when a call would fall back to torch SDPA. ``.reason`` is the key."""

    def __init__(self, reason, detail):
        self.reason = reason
        super().__init__(f"flashattn_ext would fall back to torch SDPA (reason {reason!r}): {detail}")


def sdpa_stats():
    """Calls per path since the last reset: ``{"flashattn_ext": n, "fallback": n, "fallback_reasons": {key: n}}``.

    ``flashattn_ext`` counts calls served by ``flashattn_ext.attention`` (the CUDA kernels, or on CPU the
    pure-PyTorch reference). Calls traced by torch.compile are not counted (the count would run at trace time).
    """
    return {PATH: _counts[PATH], FALLBACK: _counts[FALLBACK], "fallback_reasons": dict(_reasons)}


def reset_sdpa_stats():
    """Zero all counters."""
    _counts[PATH] = 0
    _counts[FALLBACK] = 0
    _reasons.clear()


@contextlib.contextmanager
def sdpa_strict():
    """Inside this block, a call to ``sdpa`` (or the transformers integration) that would fall back to torch SDPA
    raises ``SdpaFallbackError`` (a RuntimeError) naming the reason instead. Process-wide; nests."""
    global _strict_depth
    _strict_depth += 1
    try:
        yield
    finally:
        _strict_depth -= 1


def _record(path, reason=None, detail=None):
    """Count one call; under sdpa_strict a fallback raises before anything runs."""
    if path == FALLBACK and _strict_depth > 0:
        raise SdpaFallbackError(reason, detail or REASONS.get(reason, reason))
    if torch.compiler.is_compiling():
        return
    _counts[path] += 1
    if path == FALLBACK:
        _reasons[reason] = _reasons.get(reason, 0) + 1


def _is_positive_finite(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def runtime_fallback(q, k, v, scale):
    """None if ``attention(q, k, v, scale=scale, ...)`` accepts these tensors (any causal/window), else
    ``(reason, detail)``. Shared by ``sdpa`` and the transformers integration. GQA divisibility is checked here;
    whether GQA is *allowed* is the caller's rule."""
    tensors = (q, k, v)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "arguments", "query, key and value must all be tensors"
    if any(t.is_nested or t.layout != torch.strided for t in tensors):
        return "shape", "nested or non-strided tensors"
    if any(t.dim() != 4 for t in tensors):
        return "shape", f"q/k/v must be 4-D, got {q.dim()}-D/{k.dim()}-D/{v.dim()}-D"
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        return "shape", (f"need k.shape == v.shape, equal batch and head dim; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        return "gqa", f"query heads {q.shape[1]} not a multiple of key/value heads {k.shape[1]}"
    if scale is not None and not _is_positive_finite(scale):
        return "scale", f"scale={scale!r}"
    if any(t.numel() == 0 for t in tensors):
        return "empty", f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}"
    if k.device != q.device or v.device != q.device or q.device.type not in validate.DEVICE_TYPES:
        return "device", f"q on {q.device}, k on {k.device}, v on {v.device}"
    cuda = q.device.type == "cuda"
    try:
        validate.check_dtypes(q, k, v, cuda=cuda)
    except TypeError as e:
        return "dtype", str(e)
    try:
        validate.check_tensors(q, k, v)  # last-dim contiguity, which the CPU path needs too
    except ValueError as e:
        return "layout", str(e)
    if not cuda:
        return None  # the CPU reference path takes everything else
    if not _ops.HAS_CUDA_EXT:
        return "extension", REASONS["extension"] + f" ({_ops._IMPORT_ERROR})"
    try:
        validate.check_cuda_runtime(q.device)
    except ValueError as e:
        return "capability", str(e)
    if q.shape[-1] not in _ops.SUPPORTED_HEAD_DIMS:
        return "head_dim", f"head dim {q.shape[-1]} not in {list(_ops.SUPPORTED_HEAD_DIMS)}"
    try:
        validate.check_cuda_layout(q, k, v)
    except ValueError as e:
        return "layout", str(e)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and not _ops.HAS_BWD:
        return "grad", "torch.ops.flashattn_ext has no bwd op"
    return None


def _plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """``(q, k, v, causal, window)`` for attention(), or ``(reason, detail)`` for a fallback."""
    if attn_mask is not None:
        return "attn_mask", REASONS["attn_mask"]
    try:
        no_dropout = float(dropout_p) == 0.0
    except (TypeError, ValueError):
        return "arguments", f"dropout_p={dropout_p!r}"
    if not no_dropout:
        return "dropout", f"dropout_p={dropout_p}"
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return "arguments", f"is_causal={is_causal!r}, enable_gqa={enable_gqa!r} (bools expected)"
    reason = runtime_fallback(query, key, value, scale)
    if reason is not None:
        return reason
    Hq, Hkv = query.shape[1], key.shape[1]
    if Hq != Hkv and not enable_gqa:
        return "gqa", f"query heads {Hq} != key/value heads {Hkv} and enable_gqa=False"
    if not is_causal:
        return query, key, value, False, (-1, -1)
    # SDPA's is_causal is top-left: query i sees keys j <= i. Ours is bottom-right: query i sits at p = i + Sk - Sq
    # and, with window right r, sees j <= p + r = i + (Sk - Sq) + r.
    Sq, Sk = query.shape[2], key.shape[2]
    if Sq == Sk:  # the alignments coincide
        return query, key, value, True, (-1, -1)
    if Sq < Sk:
        # j <= i would need r = Sq - Sk < 0, which a window cannot say. But keys j >= Sq are seen by no query
        # (i < Sq), so drop them: over the first Sq keys top-left == bottom-right. The slice is a view (same
        # strides, same data_ptr), so the kernel layout checks above still hold.
        return query, key[:, :, :Sq], value[:, :, :Sq], True, (-1, -1)
    # Sq > Sk: r = Sq - Sk > 0 gives exactly j <= i; every row sees key 0, so no row is empty (as in SDPA).
    return query, key, value, False, (-1, Sq - Sk)


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention`` with the same signature and semantics, run by
    ``flashattn_ext.attention`` when it can take the call, otherwise by torch SDPA itself.

    Semantics are SDPA's, not ``attention()``'s: ``is_causal`` is TOP-LEFT aligned (query ``i`` sees keys
    ``j <= i``) for every ``Sq``/``Sk``; it is translated to our bottom-right masks exactly (``Sq == Sk``: the
    same; ``Sq < Sk``: keys ``>= Sq`` are dropped, none is visible; ``Sq > Sk``: window right ``= Sq - Sk``).
    ``enable_gqa=False`` with fewer key/value heads than query heads goes to torch SDPA, which raises (or
    broadcasts a single kv head) exactly as it would have.

    flashattn_ext runs the call when all of these hold:
      * ``attn_mask is None`` -- boolean and additive masks are supported ONLY by falling back to torch SDPA;
      * ``dropout_p == 0``;
      * 4-D ``(B, H, S, D)`` inputs, ``k.shape == v.shape`` (value head dim == query head dim), equal batch,
        ``Hq == Hkv`` or (``enable_gqa=True`` and ``Hq % Hkv == 0``), no zero-size dim;
      * ``scale`` is None or finite and positive;
      * CUDA: the extension is built, compute capability >= 8.0, float16/bfloat16, head dim in
        ``build_info()["head_dims"]``, a layout the kernels read (``validate.check_cuda_layout``), and if grad
        is needed, a CUDA backward op exists. CPU (float16/bfloat16/float32/float64, contiguous last dim):
        the pure-PyTorch reference path of ``attention()``, computed in float32 (float64 stays float64).
    Anything else calls ``torch.nn.functional.scaled_dot_product_attention`` unchanged.

    The output is ``(B, Hq, Sq, D)`` in query's dtype; on the flashattn_ext path its memory layout follows
    ``attention()`` (that of ``empty_like(query)``). ``sdpa_stats()`` counts calls per path and fallback
    reason; under ``with flashattn_ext.sdpa_strict():`` a fallback raises ``RuntimeError`` naming its reason.
    """
    plan = _plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if len(plan) == 2:
        reason, detail = plan
        _record(FALLBACK, reason, detail)
        kwargs = {} if enable_gqa is False else {"enable_gqa": enable_gqa}  # torch < 2.5 has no enable_gqa
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, **kwargs)
    q, k, v, causal, window = plan
    _record(PATH)
    return attention(q, k, v, causal=causal, scale=scale, window=window)
