"""The public attention() entry point: CUDA tensors go straight to the fwd op (checked in C++), everything else
is validated here and runs the pure-PyTorch reference."""
import torch

from . import _ops, validate
from .global_tokens import Spec, adds_nothing, global_attention, resolve_global_tokens
from .reference import attention_reference, effective_window


def kernel_window(causal, window, seqlen_q, seqlen_k):
    """(left, right) passed to the kernel: causal folded in, bounds that mask nothing replaced by -1.

    left >= Sk or right >= Sq can never exclude a key (p - left < 0 <= j, p + right >= Sk > j), so they
    become -1; this keeps the values in int32 range for the kernel and lets it skip the mask work.
    """
    left, right = effective_window(causal, window)
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_q:
        right = -1
    return left, right


def resolve_algorithm(algorithm="auto", device=None, head_dim=128):
    """The kernel family ``attention(..., algorithm=algorithm)`` runs on CUDA ``device`` for ``head_dim``.

    The choice is made in C++ (csrc/host/dispatch.cpp) from the device's compute capability; this asks it.
    "auto" is the Hopper family "fa3" (wgmma + TMA, warp-specialised) for the forward on compute capability 9.0
    when the build has sm_90a and the head dim is 64, 128 or 256; FlashAttention-2 otherwise (measured faster
    than FA1 on every benchmarked shape, README "FA1 vs FA2"). The backward of "auto" and "fa3" runs the FA2
    backward. Without a CUDA device or a built extension the answer is "fa2".
    """
    validate.check_algorithm(algorithm)
    if device is not None and _ops.HAS_CUDA_EXT and torch.device(device).type == "cuda":
        index = torch.device(device).index
        return _ops._C.resolve_algorithm(algorithm, torch.cuda.current_device() if index is None else index,
                                         int(head_dim))
    return "fa2" if algorithm == "auto" else algorithm


def attention(q, k, v, causal=False, scale=None, return_lse=False, window=(-1, -1), algorithm="auto",
              deterministic=False, global_mask=None):
    """FlashAttention forward: ``softmax(q @ k^T * scale + mask) @ v``.

    Args:
        q: (B, Hq, Sq, D) query, same layout convention as ``torch.nn.functional.scaled_dot_product_attention``.
        k, v: (B, Hkv, Sk, D) keys and values, ``Hq % Hkv == 0``. Grouped-query / multi-query attention:
            query head ``h`` uses kv head ``h // (Hq // Hkv)`` (like SDPA's ``enable_gqa=True``).
        causal: mask keys after the query's position. Bottom-right aligned, as in flash-attn >= 2.1: query
            ``i`` sits at position ``p = i + Sk - Sq`` and sees keys ``j <= p``. This equals SDPA's
            ``is_causal`` (top-left aligned) only when ``Sq == Sk``. With ``Sq > Sk`` the first ``Sq - Sk``
            query rows see no key at all: their output is 0 and their lse is -inf.
        scale: softmax scale, default ``1 / sqrt(D)``; any finite positive float.
        return_lse: also return the log-sum-exp of each row.
        algorithm: "auto" (the family C++ picks for the GPU, see ``resolve_algorithm``: "fa3" on Hopper, else FA2),
            "fa3" (Hopper only: TMA loads, wgmma, a producer warp and two consumer warpgroups; forward only, its
            backward is FA2's),
            "fa2" (FlashAttention-2: query tiles across blocks, K/V loop inside, split-Q warps), "fa1"
            (FlashAttention-1 as published: one block per (batch, head), K/V-outer / Q-inner loops, O, m, l
            round-tripped through global memory, split-K warps reduced through shared memory; its own backward,
            Algorithm 4). "fa3" raises ValueError where it is not built or the GPU is not Hopper. Same results
            either way; CPU ignores it.
        window: ``(left, right)`` sliding window in key positions around ``p``; query ``i`` sees key ``j``
            iff ``(left < 0 or j >= p - left) and (right < 0 or j <= p + right)``; ``-1`` = unbounded.
            ``causal=True`` sets ``right = 0`` (or ``min(right, 0)`` when given), so ``causal=True,
            window=(w, -1)`` is causal local attention over the last ``w + 1`` keys.

    Inputs: CUDA tensors in float16/bfloat16 run the hand-written kernels (compute capability >= 8.0,
    head dim in ``build_info()["head_dims"]``, last dim contiguous, other strides multiples of 8 elements,
    16-byte aligned data). Any such strides work, e.g. (B, S, H, D) memory viewed with ``.transpose(1, 2)``
    or q/k/v sliced out of a packed qkv tensor. CPU tensors (float16/bfloat16/float32/float64) use the
    pure-PyTorch reference (``flashattn_ext.reference``), computed in float32 and returned in the input
    dtype; it is differentiable.

    Gradients: on CUDA, autograd runs the hand-written FlashAttention-2 backward (out and lse are both
    differentiable, so a loss may use the returned lse too). dQ is accumulated with fp32 atomics,
    whose order varies from run to run (last-bit differences in dq). ``deterministic=True`` makes dq, dk, dv
    bitwise reproducible: dQ then comes from a separate kernel that recomputes the attention scores (about
    1.4x the backward FLOPs). dk and dv are always reproducible. The forward is unaffected.

    Returns:
        ``out`` (B, Hq, Sq, D) in q's dtype and memory layout, as ``torch.empty_like(q)``: same strides as
        q when q is dense (e.g. a transposed (B, S, H, D) buffer), otherwise dense in q's dimension order
        (q sliced from packed qkv gives (B, S, H, D) memory), or ``(out, lse)`` with ``lse`` (B, Hq, Sq)
        float32 contiguous, natural log: ``lse[b, h, i] = log(sum_j exp(scale * q_i . k_j))`` over visible
        keys, -inf for a row that sees no key.

    global_mask: Longformer global tokens (self-attention only, ``Sq == Sk``): a (B, Sk) bool tensor on q's device
        (Longformer's ``global_attention_mask``, True = global) or the ``GlobalTokens`` that
        ``flashattn_ext.global_tokens(mask)`` made from one. Query ``i`` then also sees every global key, and a
        global query sees every key; with ``causal=True`` both only for ``j <= i``. A bool mask costs one device
        synchronisation per call (the count of global tokens sizes the gathered tensors); a ``GlobalTokens`` built
        once costs none, so build it once and pass it to every layer. The windowed part runs on the kernels
        (every family), the global parts as GEMMs over the gathered global rows (work O(S * G) per head, float32
        scores). Differentiable (out and lse). With no global token, or a window that already holds every key a
        global token could add, it is exactly the call without ``global_mask``. docs/semantics.md has the mask
        picture and the design.

    Empty inputs (B, Hq, Sq or Sk == 0) return empty / all-zero outputs without launching a kernel.
    Bad arguments raise TypeError / ValueError naming the argument, before any kernel runs (on CUDA the op's C++
    checks raise them, so raw-op and torch.compile callers see the same errors). No call synchronises with the
    GPU.
    """
    if global_mask is not None:
        return _attention_with_globals(q, k, v, causal, scale, return_lse, window, algorithm, deterministic,
                                       global_mask)
    if _ops.HAS_CUDA_EXT and isinstance(q, torch.Tensor) and q.is_cuda:
        # The hot path: the op checks tensors (shapes, dtypes, layout, device, head dim) in C++ with the same
        # errors as validate.py, picks the kernel family, and handles empty inputs. Python checks only the
        # arguments the op cannot see as given (None scale, the window tuple, causal, bools).
        scale, left, right = validate.scalar_args(q, causal, scale, window, return_lse, deterministic, algorithm)
        out, lse = _ops.FWD(q, k, v, scale, left, right, deterministic, algorithm)
        return (out, lse) if return_lse else out

    scale = validate.validate_attention_args(q, k, v, causal, scale, window, return_lse)
    validate.check_bool(deterministic, "deterministic")
    validate.check_algorithm(algorithm)
    # Only CPU tensors get here: CUDA ones without the extension were refused by validate_attention_args.
    left, right = kernel_window(causal, window, q.shape[2], k.shape[2])
    ref, lse = attention_reference(q, k, v, scale=scale, window=(left, right), return_lse=True)
    out = torch.empty_like(q).copy_(ref)  # same layout contract as the CUDA op; copy_ is differentiable
    return (out, lse) if return_lse else out


def _attention_with_globals(q, k, v, causal, scale, return_lse, window, algorithm, deterministic, global_mask):
    """attention() with Longformer global tokens (flashattn_ext/global_tokens.py). Every argument is checked here,
    the mask last, before any kernel runs."""
    scale = validate.validate_attention_args(q, k, v, causal, scale, window, return_lse)
    validate.check_bool(deterministic, "deterministic")
    validate.check_algorithm(algorithm)
    tokens = resolve_global_tokens(global_mask, q, k)
    left, right = kernel_window(causal, window, q.shape[2], k.shape[2])
    if q.numel() == 0 or adds_nothing(tokens, causal, left, right):
        return attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse, window=window,
                         algorithm=algorithm, deterministic=deterministic)
    out, lse = global_attention(q, k, v, tokens, Spec(scale, causal, left, right, algorithm, deterministic))
    return (out, lse) if return_lse else out
