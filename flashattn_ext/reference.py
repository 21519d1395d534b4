"""Pure-PyTorch attention with exactly the semantics of the CUDA kernels: the test oracle and the CPU path.

Masking is bottom-right aligned (as in flash-attn >= 2.1): query row i sits at key position
p = i + Sk - Sq and sees key j iff (left < 0 or j >= p - left) and (right < 0 or j <= p + right).
A row that sees no key gets output 0 and lse -inf (never NaN).
"""
import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def effective_window(causal, window=(-1, -1)):
    """Fold ``causal`` into the window: causal means no key to the right of the query's position."""
    left, right = int(window[0]), int(window[1])
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def visible_mask(Sq, Sk, causal=False, window=(-1, -1), device=None):
    """Bool (Sq, Sk): True where query i may attend to key j."""
    left, right = effective_window(causal, window)
    i = torch.arange(Sq, device=device).unsqueeze(1)
    j = torch.arange(Sk, device=device).unsqueeze(0)
    p = i + (Sk - Sq)
    mask = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= p - left
    if right >= 0:
        mask &= j <= p + right
    return mask


def attention_reference(q, k, v, causal=False, scale=None, window=(-1, -1), return_lse=False, upcast=True):
    """Reference attention. q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), Hq % Hkv == 0.

    upcast=True computes in float32 (float64 stays float64) and returns the input dtype; upcast=False
    computes in the input dtype, the "low precision reference" of flash-attn's 2x error rule.
    lse is float32 (B, Hq, Sq), natural log of the scaled row sum. Differentiable.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    scale = D**-0.5 if scale is None else float(scale)
    if upcast:
        compute = torch.promote_types(q.dtype, torch.float32)
    else:
        compute = q.dtype
    if Hkv != Hq:  # GQA: query head h reads kv head h // (Hq // Hkv)
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)

    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    mask = visible_mask(Sq, Sk, causal, window, device=q.device)
    row_sees_any = mask.any(dim=-1, keepdim=True)
    s = s.masked_fill(~mask, float("-inf"))
    # Fully masked rows: softmax of all -inf is NaN (and NaN grads); give them finite scores, zero them after.
    s = s.masked_fill(~row_sees_any, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(~row_sees_any, 0.0)
    out = torch.matmul(p.to(vc.dtype), vc).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.logsumexp(s.float() if s.dtype in _LOW_PRECISION else s, dim=-1)
    lse = lse.masked_fill(~row_sees_any.squeeze(-1), float("-inf")).to(torch.float32)
    return out, lse
