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


def _fwd_fake(q, k, v, scale, window_left, window_right):
    # Must mirror the CUDA op exactly (opcheck compares strides): it also uses empty_like, which keeps q's
    # strides when q is dense and otherwise makes dense strides in q's dim order; lse is contiguous fp32.
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    return out, lse


if HAS_CUDA_EXT:
    torch.library.register_fake("flashattn_ext::fwd")(_fwd_fake)


def fwd(q, k, v, scale, window_left, window_right):
    """Raw forward op: no argument checks beyond the C++ TORCH_CHECKs; use flashattn_ext.attention."""
    return torch.ops.flashattn_ext.fwd.default(q, k, v, float(scale), int(window_left), int(window_right))


def fa1_fwd(q, k, v, scale, window_left, window_right):
    """Raw FlashAttention-1 forward op (kept for comparison with FA2); use attention(..., algorithm="fa1")."""
    return torch.ops.flashattn_ext.fa1_fwd.default(q, k, v, float(scale), int(window_left), int(window_right))


from . import _ops_fa1  # noqa: E402,F401  registers fa1_fwd's fake impl; needs _C set above
