"""attention_varlen: packed variable-length sequences (flash-attn's ``flash_attn_varlen_func`` layout).

CUDA tensors go straight to the fwd op with its optional ``cu_seqlens_q/k, max_seqlen_q/k`` arguments (checked in
C++, csrc/host/sequences.h; the FA2 and Hopper (fa3) kernels follow each sequence through SeqInfo, no padding, one
launch). CPU tensors are checked here, values of cu_seqlens included, and run the reference once per sequence.
"""
import numbers

import torch

from . import _ops, validate
from .api import kernel_window
from .reference import attention_reference


def _check_cu_seqlens(cu, name, q):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}.dtype must be int32, got {validate._dtype_name(cu.dtype)}")
    if cu.device != q.device:
        raise ValueError(f"{name} must be on q's device ({q.device}), got {cu.device}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D of length batch + 1 >= 1, got shape {tuple(cu.shape)}")


def _check_max_seqlen(value, name):
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value) if isinstance(value, numbers.Integral) else value


def _check_packed_tensors(q, k, v):
    """check_tensors' rules for the packed (total, heads, head_dim) form (CPU path; C++ checks CUDA tensors)."""
    for name, t in zip(("q", "k", "v"), (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"q, k, v must be on the same device: q is on {q.device}, {name} is on {t.device}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_rows, heads, head_dim) for varlen, got shape "
                             f"{tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q and k/v must have the same head dim (last dim), got q {tuple(q.shape)} and k "
                         f"{tuple(k.shape)}")
    if q.shape[2] == 0:
        raise ValueError(f"head dim (last dim of q, k, v) must be >= 1, got shape {tuple(q.shape)}")
    if k.shape[1] < 1:
        raise ValueError(f"k and v must have at least one head (dim 1), got shape {tuple(k.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads Hq={q.shape[1]} must be a multiple of k/v heads Hkv={k.shape[1]} (GQA: query "
                         f"head h uses kv head h // (Hq // Hkv))")
    validate.check_dtypes(q, k, v, cuda=False)


def _check_cu_values(cu, name, total, max_seqlen, max_name):
    """What the CUDA op cannot check without a host read; free on CPU."""
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(cu[0])}")
    if bool((lengths < 0).any()):
        raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()}")
    if int(cu[-1]) != total:
        raise ValueError(f"{name}[-1] ({int(cu[-1])}) must equal the packed rows ({total})")
    if lengths.numel() and int(lengths.max()) > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is too small: the longest sequence has {int(lengths.max())} rows")
    return lengths.tolist()


def attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, scale=None, window=(-1, -1),
                               upcast=True):
    """(out (total_q, Hq, D), lse (Hq, total_q)): ``attention_reference`` once per sequence, in q's dtype (computed
    in float32 or float64; upcast=False: in q's dtype, the low-precision reference of the 2x rule).
    Differentiable. Each sequence's window is folded as attention() folds it. Reads cu_seqlens on the host."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, Sq_b, D)
        ks = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        vs = v[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        left, right = kernel_window(causal, window, qs.shape[2], ks.shape[2])
        o, lse = attention_reference(qs, ks, vs, scale=scale, window=(left, right), return_lse=True, upcast=upcast)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:
        return q.new_empty(q.shape), q.new_empty((q.shape[1], 0), dtype=torch.float32)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, scale=None,
                     window=(-1, -1), return_lse=False, deterministic=False, algorithm="auto"):
    """FlashAttention over a batch of sequences packed along the row dim, without padding.

    Args:
        q: (total_q, Hq, D); sequence b is rows ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]``.
        k, v: (total_k, Hkv, D), ``Hq % Hkv == 0`` (GQA as in attention()).
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 on q's device, prefix sums of the lengths starting at 0 and
            ending at total_q / total_k. Sequences of length 0 are allowed.
        max_seqlen_q, max_seqlen_k: ints >= the longest query / key sequence; they size the kernel grid (no host
            read of cu_seqlens on CUDA).
        causal, scale, window, deterministic, algorithm: as attention(), applied per sequence (bottom-right causal:
            query i of a sequence with lengths (Sq, Sk) sits at key position i + Sk - Sq). algorithm: as
            attention() ("auto" is the Hopper family on sm_90 for its head dims, FA2 otherwise); "fa1" raises
            ValueError (FA1 has no varlen kernels).

    Returns ``out`` (total_q, Hq, D) in q's dtype (as ``torch.empty_like(q)``), or ``(out, lse)`` with lse
    (Hq, total_q) float32, natural log, -inf for rows that see no key (their out is 0). Differentiable (out and
    lse) on CUDA (the family's backward, as attention()) and CPU (the reference per sequence).

    CUDA checks everything but the values of cu_seqlens (which would need a host read): cu_seqlens_q[0] == 0,
    non-decreasing, cu_seqlens_q[-1] == total_q (same for k) and every length <= max_seqlen are the caller's
    contract there (rows past max_seqlen are not computed); the CPU path checks them all.
    """
    max_seqlen_q = _check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    max_seqlen_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    if _ops.HAS_CUDA_EXT and isinstance(q, torch.Tensor) and q.is_cuda:
        # The C++ op checks the tensors, cu_seqlens' dtype / shape / device and batch * max_seqlen >= total.
        if type(cu_seqlens_q) is not torch.Tensor or type(cu_seqlens_k) is not torch.Tensor:
            _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q)  # raises the TypeError the op would not word
            _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q)
        scale, left, right = validate.scalar_args(q, causal, scale, window, return_lse, deterministic, algorithm)
        out, lse = _ops.FWD(q, k, v, scale, left, right, deterministic, algorithm, cu_seqlens_q, cu_seqlens_k,
                            max_seqlen_q, max_seqlen_k)
        return (out, lse) if return_lse else out

    _check_packed_tensors(q, k, v)
    if q.device.type != "cpu":
        raise ValueError(f"q, k, v are on {q.device}; attention_varlen runs on CUDA (with the built extension) or "
                         "CPU")
    _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q)
    _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    validate.check_bool(causal, "causal")
    validate.check_bool(return_lse, "return_lse")
    validate.check_bool(deterministic, "deterministic")
    validate.check_window(window)
    validate.check_algorithm(algorithm)
    if algorithm == "fa1":  # the C++ dispatch's message
        raise ValueError("algorithm='fa1' does not support varlen (attention_varlen); use algorithm='auto', 'fa2' "
                         "or 'fa3'")
    scale = validate.check_scale(scale, q.shape[-1])
    _check_cu_values(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q")
    _check_cu_values(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k")
    ref, lse = attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window)
    out = torch.empty_like(q).copy_(ref)  # same layout contract as the CUDA op; copy_ is differentiable
    return (out, lse) if return_lse else out
