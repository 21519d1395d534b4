"""The op table: loads the compiled extension and gives every op a Python face (fake impl, raw wrapper).

Importing ``flashattn_ext._C`` runs its TORCH_LIBRARY block (csrc/host/ops.cpp), which defines
``torch.ops.flashattn_ext.{fwd, fwd_global, bwd, kvcache_fwd, merge_states}`` and registers fwd's autograd (in
C++, so a call that needs no gradient runs no Python kernel). ``fwd`` and ``bwd`` serve every kernel family: their
``algorithm`` argument ("auto", "fa2", "fa1", "fa3") is resolved in C++ with the device's compute capability;
their optional ``cu_seqlens_q/k, max_seqlen_q/k`` arguments select packed variable-length sequences
(attention_varlen). The package
must still import without the extension (CPU reference path, docs, tests), so a missing or broken extension only
disables the CUDA path.
"""
import importlib
import warnings

import torch

from ._build_config import ALGORITHMS, HEAD_DIMS  # noqa: F401  (ALGORITHMS: validate.check_algorithm)

# Head dims the kernels are instantiated for when the extension cannot tell us (not built yet).
DEFAULT_HEAD_DIMS = HEAD_DIMS

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


def _has_op(name):
    return HAS_CUDA_EXT and hasattr(torch.ops.flashattn_ext, name)


HAS_BWD = _has_op("bwd")
HAS_KVCACHE_OP = _has_op("kvcache_fwd")  # defined when head dim 64 or 128 is compiled in
HAS_MERGE_OP = _has_op("merge_states")
HAS_FWD_GLOBAL = _has_op("fwd_global")


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


# ---- fake impls: output metadata exactly as the CUDA ops allocate it (opcheck compares strides) ------------

def _fwd_fake(q, k, v, scale, window_left, window_right, deterministic=False, algorithm="auto", cu_seqlens_q=None,
              cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    # out = torch.empty_like(q): q's strides when q is dense, otherwise dense in q's dim order; lse contiguous fp32,
    # (B, Hq, Sq) padded or (Hq, total_q) varlen.
    out = torch.empty_like(q)
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    return out, lse


def _fwd_global_fake(q, k, v, global_k, global_v, global_pos, scale, window_left, window_right, global_causal,
                     algorithm="auto"):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, scale, window_left, window_right, deterministic, dlse=None,
              algorithm="auto", cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    # Each gradient is empty_like of its input, for every family.
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _kvcache_fwd_fake(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale, window_left,
                      window_right, num_splits, workspace, q_pos=None):
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    return out, lse


def _merge_states_fake(o_a, lse_a, o_b, lse_b):
    return o_a.new_empty(o_a.shape), lse_a.new_empty(lse_a.shape, dtype=torch.float32)


# The forward op itself, looked up once: attention()'s hot path calls it without walking torch.ops each time.
FWD = torch.ops.flashattn_ext.fwd.default if _has_op("fwd") else None

for _name, _fake in (("fwd", _fwd_fake), ("fwd_global", _fwd_global_fake), ("bwd", _bwd_fake),
                     ("kvcache_fwd", _kvcache_fwd_fake), ("merge_states", _merge_states_fake)):
    if _has_op(_name):  # an extension built without an op (e.g. no decode head dim) still imports
        torch.library.register_fake(f"flashattn_ext::{_name}")(_fake)


# ---- raw wrappers: C++ checks only; use flashattn_ext.attention / attention_with_kvcache / merge_states ----

def fwd(q, k, v, scale, window_left, window_right, deterministic=False, algorithm="auto", cu_seqlens_q=None,
        cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    """Forward of every family. ``deterministic`` only selects the backward (bitwise reproducible dQ).
    With cu_seqlens_q/k: packed varlen sequences (attention_varlen)."""
    return torch.ops.flashattn_ext.fwd.default(q, k, v, float(scale), int(window_left), int(window_right),
                                               bool(deterministic), algorithm, cu_seqlens_q, cu_seqlens_k,
                                               int(max_seqlen_q), int(max_seqlen_k))


def fwd_global(q, k, v, global_k, global_v, global_pos, scale, window_left, window_right, global_causal,
               algorithm="auto"):
    """fwd (padded self-attention, Hopper family) counting the gathered global keys global_k/v (B, Hkv, G, D) at
    positions global_pos (B, G) int32 (-1: padding) on top of each row's window; no autograd
    (flashattn_ext/global_tokens.py owns it)."""
    return torch.ops.flashattn_ext.fwd_global.default(q, k, v, global_k, global_v, global_pos, float(scale),
                                                      int(window_left), int(window_right), bool(global_causal),
                                                      algorithm)


def bwd(dout, q, k, v, out, lse, scale, window_left, window_right, deterministic=False, dlse=None,
        algorithm="auto", cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    """(dq, dk, dv) of fwd; autograd calls it through fwd's registered backward."""
    return torch.ops.flashattn_ext.bwd.default(dout, q, k, v, out, lse, float(scale), int(window_left),
                                               int(window_right), bool(deterministic), dlse, algorithm,
                                               cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))


def kvcache_fwd(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale, window_left, window_right,
                num_splits=0, workspace=None, q_pos=None):
    """Attention against a KV cache: C++ checks of shapes, dtypes and layouts; no value checks. q_pos: optional
    (B, Sq) int32, the key position of each query row (default bottom-right aligned; not with k_new)."""
    return torch.ops.flashattn_ext.kvcache_fwd.default(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new,
                                                       float(scale), int(window_left), int(window_right),
                                                       int(num_splits), workspace, q_pos)


def merge_states(o_a, lse_a, o_b, lse_b):
    return torch.ops.flashattn_ext.merge_states.default(o_a, lse_a, o_b, lse_b)
