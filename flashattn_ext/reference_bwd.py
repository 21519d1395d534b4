"""The attention backward from saved (q, k, v, out, lse), written with the FlashAttention formulas in float32.

This is what the CUDA backward computes, in PyTorch: the CPU path of ring attention (flashattn_ext.distributed)
and an oracle for "a block of keys with the lse of a larger key set". Autograd through ``attention_reference``
cannot do the latter: it differentiates the block's own softmax, not the block's share of the global one.
"""
import torch

from .reference import visible_mask


def attention_backward_reference(dout, q, k, v, out, lse, scale, window=(-1, -1), dlse=None):
    """(dq, dk, dv) of attention over the keys k, v given the forward's ``out`` and ``lse``.

    q, dout, out: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D); lse, dlse: (B, Hq, Sq). ``window`` is (left, right)
    with causal already folded in (bottom-right aligned, as ``visible_mask``). With P = exp(scale * q k^T - lse)
    over visible keys:

        dV = P^T dO,  dP = dO V^T,  Delta = rowsum(dO * O) - dlse,  dS = P * (dP - Delta),
        dQ = scale * dS K,  dK = scale * dS^T Q

    When lse and out are those of attention over a larger key set that contains these keys (a ring block), the
    results are this block's exact share of the full gradients: dQ summed over blocks, dK/dV per block.
    Rows with lse = -inf (they see no key) get zero gradients. Computed in float32 (float64 stays float64) and
    returned in the dtypes of q, k, v. GQA: query head h uses kv head h // (Hq // Hkv); dK/dV sum over the group.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    compute = torch.promote_types(q.dtype, torch.float32)
    qc, kc, vc, doc, oc = (t.to(compute) for t in (q, k, v, dout, out))
    if group > 1:
        kc = kc.repeat_interleave(group, dim=1)
        vc = vc.repeat_interleave(group, dim=1)
    lse_c = lse.to(compute)
    sees_keys = ~torch.isneginf(lse_c)
    visible = visible_mask(Sq, Sk, False, window, device=q.device) & sees_keys.unsqueeze(-1)

    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    # exp(s - lse) is at most 1 on visible entries; masked entries may overflow and are replaced, never multiplied.
    p = torch.exp(scores - torch.where(sees_keys, lse_c, 0.0).unsqueeze(-1)).masked_fill(~visible, 0.0)
    dv = torch.matmul(p.transpose(-1, -2), doc)
    dp = torch.matmul(doc, vc.transpose(-1, -2))
    delta = (doc * oc).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(compute)  # d lse / d s = P: the lse gradient folds into Delta
    ds = p * (dp - delta.unsqueeze(-1))
    dq = torch.matmul(ds, kc) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qc) * scale
    if group > 1:
        dk = dk.view(B, Hkv, group, Sk, D).sum(2)
        dv = dv.view(B, Hkv, group, Sk, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
