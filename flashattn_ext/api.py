"""The public attention() entry point: validate, pick a path, handle empty inputs without a launch."""
import torch

from . import _ops, validate
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


ALGORITHMS = ("auto", "fa2", "fa1")


def resolve_algorithm(algorithm="auto"):
    """The kernel ``attention(..., algorithm=algorithm)`` runs on CUDA. The rule for "auto" is fixed and
    documented: FlashAttention-2, measured faster than FA1 on every benchmarked shape (README, "FA1 vs FA2")."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return "fa2" if algorithm == "auto" else algorithm


def attention(q, k, v, causal=False, scale=None, return_lse=False, window=(-1, -1), algorithm="auto",
              deterministic=False):
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
        algorithm: "auto" (= "fa2", see ``resolve_algorithm``), "fa2" (FlashAttention-2: query tiles across
            blocks, K/V loop inside, split-Q warps) or "fa1" (FlashAttention-1 as published: one block per
            (batch, head), K/V-outer / Q-inner loops, O, m, l round-tripped through global memory, split-K
            warps reduced through shared memory; forward only). Same results either way; CPU ignores it.
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

    Empty inputs (B, Hq, Sq or Sk == 0) return empty / all-zero outputs without launching a kernel.
    Bad arguments raise TypeError / ValueError naming the argument, before any kernel runs.
    """
    scale = validate.validate_attention_args(q, k, v, causal, scale, window, return_lse)
    validate.check_bool(deterministic, "deterministic")
    algorithm = resolve_algorithm(algorithm)
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    left, right = kernel_window(causal, window, Sq, Sk)

    if q.device.type == "cpu":
        ref, lse = attention_reference(q, k, v, scale=scale, window=(left, right), return_lse=True)
        out = torch.empty_like(q).copy_(ref)  # same layout contract as the CUDA op; copy_ is differentiable
    elif (q.numel() == 0 or Sk == 0) and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        out = torch.zeros_like(q)  # a row with no key: output 0, lse -inf (and nothing to launch)
        lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        # Empty inputs that need grads come here too: the ops handle them without a launch, and autograd
        # gets a graph (all-zero gradients).
        if algorithm == "fa1":
            out, lse = _ops.fa1_fwd(q, k, v, scale, left, right)
        else:
            out, lse = _ops.fwd(q, k, v, scale, left, right, deterministic)
    return (out, lse) if return_lse else out
