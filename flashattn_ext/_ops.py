"""Loads the compiled extension and gives its ops a Python face (fake impls, thin call wrappers).

Importing ``flashattn_ext._C`` runs its TORCH_LIBRARY block, which defines ``torch.ops.flashattn_ext.*``.
The package must still import without it (CPU reference path, docs, tests), so a missing or broken
extension only disables the CUDA path.
"""
import importlib
import warnings

import torch

# Head dims the kernels are instantiated for when the extension cannot tell us (not built yet).
DEFAULT_HEAD_DIMS = (32, 64, 96, 128, 256)

_IMPORT_ERROR = None
try:
    # import_module (not `from . import _C`) so a missing .so is a ModuleNotFoundError naming it
    _C = importlib.import_module("flashattn_ext._C")
except ImportError as e:
    if not (isinstance(e, ModuleNotFoundError) and e.name == "flashattn_ext._C"):
        # _C is there but does not load (e.g. built against another torch): not silent
        warnings.warn(f"flashattn_ext._C failed to import ({e}); the CUDA path is disabled", stacklevel=2)
    _C = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

HAS_CUDA_EXT = _C is not None


def build_info() -> dict:
    """What the compiled extension was built with, or a dict with ``built=False`` and the import error."""
    if _C is None:
        return {
            "built": False,
            "error": _IMPORT_ERROR,
            "hint": "install from source on a machine with nvcc and a CUDA build of torch (see README)",
            "cuda_archs": "",
            "head_dims": [],
            "dtypes": [],
            "cuda_version": "",
        }
    info = dict(_C.build_info())
    info["built"] = True
    return info


# Read once at import: validate.py runs inside torch.compile graphs, where calling into pybind would break
# the graph, but reading a module-level tuple is free.
SUPPORTED_HEAD_DIMS = tuple(int(d) for d in (build_info().get("head_dims") or DEFAULT_HEAD_DIMS))


def _fwd_fake(q, k, v, scale, window_left, window_right, deterministic=False):
    # Must mirror the CUDA op exactly (opcheck compares strides): it also uses empty_like, which keeps q's
    # strides when q is dense and otherwise makes dense strides in q's dim order; lse is contiguous fp32.
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    return out, lse


def _bwd_fake(dout, q, k, v, out, lse, scale, window_left, window_right, deterministic, dlse=None):
    # The CUDA op allocates each gradient with empty_like of its input.
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, scale, window_left, window_right = inputs[:6]
    ctx.deterministic = bool(inputs[6]) if len(inputs) > 6 else False
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.window = scale, (window_left, window_right)


def _fwd_backward(ctx, grad_out, grad_lse):
    # The backward needs only (q, k, v, out, lse) (any forward that saved them could reuse it). grad_lse is
    # folded into Delta by the kernel (d lse / d scores = P), so attention(..., return_lse=True) is fully
    # differentiable.
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.flashattn_ext.bwd.default(grad_out, q, k, v, out, lse, ctx.scale, ctx.window[0],
                                                     ctx.window[1], ctx.deterministic, grad_lse)
    return (dq, dk, dv) + (None,) * (len(ctx.needs_input_grad) - 3)


if HAS_CUDA_EXT:
    torch.library.register_fake("flashattn_ext::fwd")(_fwd_fake)
    if hasattr(torch.ops.flashattn_ext, "bwd"):  # an extension built before the backward existed still imports
        torch.library.register_fake("flashattn_ext::bwd")(_bwd_fake)
        # Autograd on the op itself (not an autograd.Function around it), so torch.compile(fullgraph=True)
        # traces forward and backward as two custom ops.
        torch.library.register_autograd("flashattn_ext::fwd", _fwd_backward, setup_context=_fwd_setup_context)

HAS_BWD = HAS_CUDA_EXT and hasattr(torch.ops.flashattn_ext, "bwd")


def fwd(q, k, v, scale, window_left, window_right, deterministic=False):
    """Raw forward op: no argument checks beyond the C++ TORCH_CHECKs; use flashattn_ext.attention.
    ``deterministic`` only selects the backward (bitwise reproducible dQ, no atomics)."""
    return torch.ops.flashattn_ext.fwd.default(q, k, v, float(scale), int(window_left), int(window_right),
                                               bool(deterministic))


def bwd(dout, q, k, v, out, lse, scale, window_left, window_right, deterministic=False, dlse=None):
    """Raw backward op: (dq, dk, dv) of fwd; autograd calls it through fwd's registered backward."""
    return torch.ops.flashattn_ext.bwd.default(dout, q, k, v, out, lse, float(scale), int(window_left),
                                               int(window_right), bool(deterministic), dlse)


def fa1_fwd(q, k, v, scale, window_left, window_right):
    """Raw FlashAttention-1 forward op (kept for comparison with FA2); use attention(..., algorithm="fa1")."""
    return torch.ops.flashattn_ext.fa1_fwd.default(q, k, v, float(scale), int(window_left), int(window_right))


from . import _ops_fa1  # noqa: E402,F401  registers fa1_fwd's fake impl; needs _C set above
