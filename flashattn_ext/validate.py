"""Argument checks of flashattn_ext.attention, run before any kernel.

Errors are TypeError (wrong kind of object / dtype) or ValueError (wrong value / shape / layout), and each
message starts with the argument it is about. CUDA tensors are checked by the fwd op itself
(csrc/host/checks.h, same messages), so attention() on CUDA runs only ``scalar_args`` here; the full set below
serves the CPU path, sdpa's fallback decisions and the tests (e.g. the CUDA layout rules on CPU tensors).
"""
import math
import numbers

import torch

from . import _ops

CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CUDA_DTYPES = (torch.float16, torch.bfloat16)
DEVICE_TYPES = ("cpu", "cuda")
MIN_CAPABILITY = (8, 0)  # mma.sync m16n8k16 bf16 + cp.async: Ampere or newer
_NAMES = ("q", "k", "v")


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def check_tensors(q, k, v):
    """Types, devices, ranks and shapes; shared by the CPU and CUDA paths."""
    for name, t in zip(_NAMES, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"q, k, v must be on the same device: q is on {q.device}, {name} is on {t.device}")
    if q.device.type not in DEVICE_TYPES:
        raise ValueError(f"q, k, v are on {q.device}; supported devices are cpu and cuda")
    for name, t in zip(_NAMES, (q, k, v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seqlen, head_dim), got shape {tuple(t.shape)}")
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"q and k must have the same batch size, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[3] != D:
        raise ValueError(
            f"q and k/v must have the same head dim (last dim), got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if D == 0:
        raise ValueError(f"head dim (last dim of q, k, v) must be >= 1, got shape {tuple(q.shape)}")
    Hkv = k.shape[1]
    if Hkv < 1:
        raise ValueError(f"k and v must have at least one head (dim 1), got shape {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(
            f"q heads Hq={Hq} must be a multiple of k/v heads Hkv={Hkv} (GQA: query head h uses kv head "
            f"h // (Hq // Hkv))"
        )
    for name, t in zip(_NAMES, (q, k, v)):
        if t.size(-1) != 1 and t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {tuple(t.stride())}; "
                f"call {name}.contiguous()"
            )


def check_dtypes(q, k, v, cuda):
    allowed = CUDA_DTYPES if cuda else CPU_DTYPES
    where = "CUDA" if cuda else "CPU"
    if q.dtype not in allowed:
        raise TypeError(
            f"q.dtype must be one of {[_dtype_name(d) for d in allowed]} on {where}, got {_dtype_name(q.dtype)}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(
                f"{name}.dtype ({_dtype_name(t.dtype)}) must equal q.dtype ({_dtype_name(q.dtype)})"
            )


def check_algorithm(algorithm):
    if algorithm not in _ops.ALGORITHMS:  # the C++ op checks the same on CUDA
        raise ValueError(f"algorithm must be one of {_ops.ALGORITHMS}, got {algorithm!r}")


def scalar_args(q, causal, scale, window, return_lse, deterministic, algorithm):
    """The CUDA hot path's only Python checks: the arguments the op receives converted (scale None -> 1/sqrt(D),
    causal folded into the window, which the op takes as two ints). Returns ``(scale, left, right)``. The common
    case (bools, a tuple of two ints, a float or None) costs a few type tests; anything else takes the full
    checks for their error messages."""
    if type(causal) is not bool or type(return_lse) is not bool or type(deterministic) is not bool:
        check_bool(causal, "causal")
        check_bool(return_lse, "return_lse")
        check_bool(deterministic, "deterministic")
    if type(algorithm) is not str:
        check_algorithm(algorithm)  # the op checks the name itself
    if not (type(window) is tuple and len(window) == 2 and type(window[0]) is int and type(window[1]) is int
            and window[0] >= -1 and window[1] >= -1):
        check_window(window)
    left, right = int(window[0]), int(window[1])
    if causal:
        right = 0  # causal: no key right of the query position (min(right, 0) when a window is given)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif type(scale) is not float:
        scale = check_scale(scale, q.shape[-1])
    return scale, left, right  # the op checks that scale is finite and positive


def check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_scale(scale, head_dim):
    """Returns the softmax scale as a float: 1/sqrt(head_dim) when None."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be None or a positive float, got {type(scale).__name__}")
    scale = float(scale)
    # Positive, as the C++ op requires (a negative scale has no use in attention).
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return scale


def check_window(window):
    if not isinstance(window, (tuple, list)):
        raise TypeError(f"window must be a tuple (left, right) of ints, got {type(window).__name__}")
    if len(window) != 2:
        raise ValueError(f"window must have exactly 2 entries (left, right), got {len(window)}")
    for side, w in zip(("left", "right"), window):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window {side} must be an int, got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"window {side} must be >= -1 (-1 = unbounded), got {w}")


def _device_capability(device):
    return torch.cuda.get_device_capability(device)


def check_cuda_runtime(device):
    """The extension is importable and the GPU is new enough."""
    if not _ops.HAS_CUDA_EXT:
        info = _ops.build_info()
        raise RuntimeError(
            "q, k, v are CUDA tensors but the flashattn_ext CUDA extension (flashattn_ext._C) is not built or "
            f"failed to load ({info['error']}); {info['hint']}. CPU tensors use the pure-PyTorch reference path."
        )
    if torch.compiler.is_compiling():  # decided at run time of the real call; C++ re-checks it
        return
    cap = tuple(_device_capability(device))
    if cap < MIN_CAPABILITY:
        raise ValueError(
            f"q, k, v are on {device} with compute capability {cap[0]}.{cap[1]}; flashattn_ext needs "
            f"compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ampere or newer)"
        )


def _data_ptr(t):
    if torch.compiler.is_compiling():
        return None
    try:
        return t.data_ptr()
    except RuntimeError:  # fake / functional tensors have no storage; the C++ op checks at run time
        return None


def check_cuda_layout(q, k, v, head_dims=None):
    """Head dim instantiated, and memory layout the kernels' 16-byte cp.async row loads need."""
    head_dims = tuple(_ops.SUPPORTED_HEAD_DIMS if head_dims is None else head_dims)
    D = q.shape[-1]
    if D not in head_dims:
        raise ValueError(f"head dim {D} (last dim of q, k, v) is not supported by the CUDA kernels; "
                         f"supported: {list(head_dims)}")
    if q.numel() == 0 or k.numel() == 0:  # nothing is read: no kernel launch
        return
    int_max = 2**31 - 1  # the kernels index rows and (batch, head) pairs with 32-bit ints
    if q.shape[2] >= int_max or k.shape[2] >= int_max or q.shape[0] * q.shape[1] >= int_max:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)}: seqlens and batch * heads must be < 2**31 - 1")
    for name, t in zip(_NAMES, (q, k, v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have stride(-1) == 1, got strides {tuple(t.stride())}; "
                             f"call {name}.contiguous()")
        # Size-1 dims are never stepped over, so their stride is irrelevant (the C++ check agrees).
        if any(n > 1 and s % 8 != 0 for n, s in zip(t.shape[:3], t.stride()[:3])):
            raise ValueError(
                f"{name} strides {tuple(t.stride())} must be multiples of 8 elements in dims 0-2: each row "
                f"must start 16-byte aligned for cp.async; call {name}.contiguous()"
            )
        ptr = _data_ptr(t)
        if ptr is not None and ptr % 16 != 0:
            raise ValueError(
                f"{name}.data_ptr() must be 16-byte aligned (rows are loaded with 16-byte cp.async), got "
                f"address % 16 == {ptr % 16} (a view with an odd storage offset?); call {name}.clone() (.contiguous() "
                f"does not copy an already contiguous view)"
            )


def validate_attention_args(q, k, v, causal, scale, window, return_lse):
    """All checks for attention(); returns the resolved float softmax scale."""
    check_tensors(q, k, v)
    cuda = q.device.type == "cuda"
    check_dtypes(q, k, v, cuda=cuda)
    check_bool(causal, "causal")
    check_bool(return_lse, "return_lse")
    check_window(window)
    scale = check_scale(scale, q.shape[-1])
    if cuda:
        check_cuda_runtime(q.device)
        check_cuda_layout(q, k, v)
    return scale
