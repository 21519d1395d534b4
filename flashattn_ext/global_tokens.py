"""Longformer global tokens on top of the windowed kernels (``attention(..., global_mask=...)``).

Query i sees key j iff j is inside i's window, or j is global, or i is global (both global directions limited to
j <= i when causal). The result is assembled from three disjoint key sets per row, merged by log-sum-exp:

    L  every row against the keys inside its window: the existing kernels (any family), with lse.
    G  every non-global row against the global keys outside its window: the few global K/V rows gathered into an
       "extra key tile" (B, Hkv, G, D); (S, G) float32 scores per head from one GEMM.
    D  every global row against the keys outside its window: the few global query rows gathered; (G, S) float32
       scores per head from one GEMM against all keys.

    non-global row: merge(L, G)        global row: merge(L, D)

On CUDA with a decode head dim (64, 128) the forward's global rows are instead computed whole, over every key they
see, by one call of the split-KV decode kernel with the gathered rows as queries at their own positions
(``kvcache_fwd(..., q_pos=)``): K/V read once, no (G, S) score matrix, no merge; the backward keeps L / G / D.

The sets never overlap (a global key inside the window is L's, not G's), so every visible key is counted once.
On the Hopper family the forward's L and G are one kernel pass (op fwd_global: the gathered global K/V are extra
key tiles of every query tile, csrc/kernels/fa3/fwd_kernel.cuh); it computes L + G for every row, global rows
too, so their D then takes only the non-global keys outside the window (``fuses_global_keys``).
One autograd.Function: the forward computes each row's final lse first and scales o_L into the output, and a GEMM
accumulates P_G @ V_G into it; the backward gives every part its share from the final out and lse, as ring
attention's blocks (flashattn_ext/distributed.py): the kernels' backward (with dlse) for L, GEMMs and scatter-adds
for G and D, whose work is O(S * G) per head. docs/semantics.md has the mask picture and the reasons.

Finding the global positions in a bool mask needs their count on the host: ``global_tokens(mask)`` reads it once
(one device sync) and returns a ``GlobalTokens`` that every layer can reuse without another sync.
"""
from collections import namedtuple
from dataclasses import dataclass, field

import torch

from . import _ops
from .kvcache import decode_head_dims, merge_states_unchecked
from .reference import attention_reference, blocked_backward, in_window

NEG_INF = float("-inf")
_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")  # torch.bmm(..., out_dtype=) (recent torch); else upcast


@dataclass(frozen=True, eq=False)  # eq would compare tensors
class GlobalTokens:
    """The global positions of a (B, S) global_attention_mask, gathered once for every layer of a forward.

    mask: (B, S) bool, the caller's mask (on its device).
    index: (B, max_count) int64, row b's global positions in ascending order, padded with 0 past count[b].
    valid: (B, max_count) bool, False on the padding.
    flat_batch, flat_pos: (total,) int64, batch and position of every global token (the rows that D writes).
    flat_slot: (total,) int64, its column in ``index``.
    pos32: (B, max_count) int32, ``index`` with -1 on the padding (the kernels' form).
    max_count, total: host ints, the most global tokens of one sequence and their number over the batch.
    cache: what the calls derive from the tokens and static sizes alone (expanded indexes, masks), made by the
        first call that needs it and reused by every later layer and by the backward (``_cached``).
    """
    mask: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    flat_batch: torch.Tensor
    flat_slot: torch.Tensor
    flat_pos: torch.Tensor
    pos32: torch.Tensor
    max_count: int
    total: int
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self):
        return tuple(self.mask.shape)

    @property
    def device(self):
        return self.mask.device


def check_global_mask(global_mask, name="global_mask"):
    """A (B, S) bool tensor; raises TypeError / ValueError naming the argument."""
    if not isinstance(global_mask, torch.Tensor):
        raise TypeError(f"{name} must be a (batch, seqlen) bool tensor or a GlobalTokens from "
                        f"flashattn_ext.global_tokens, got {type(global_mask).__name__}")
    if global_mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = global token), got dtype "
                        f"{str(global_mask.dtype).replace('torch.', '')}; use mask.bool() (Longformer's "
                        f"global_attention_mask is 1 for global tokens)")
    if global_mask.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, seqlen), got shape {tuple(global_mask.shape)}")


def global_tokens(global_mask):
    """GlobalTokens of a (B, S) bool mask (True = global). Reads the per-sequence counts on the host: one device
    synchronisation, here and nowhere else; pass the result as ``attention(..., global_mask=tokens)`` in every
    layer."""
    check_global_mask(global_mask)
    B, S = global_mask.shape
    device = global_mask.device
    counts = global_mask.sum(dim=1)
    host = counts.cpu()  # the one sync: the gathered shapes depend on the counts
    max_count = int(host.max()) if B else 0
    total = int(host.sum())
    positions = torch.arange(S, device=device)
    # Ascending global positions first: non-global ones sort last as the sentinel S.
    index = torch.where(global_mask, positions, S).sort(dim=1).values[:, :max_count]
    valid = index < S
    index = torch.where(valid, index, 0)
    # Every valid (b, slot) in order, without nonzero() (a sync): sort their linear ids before the padding's.
    linear = torch.arange(B * max_count, device=device)
    flat = torch.where(valid.flatten(), linear, B * max_count).sort().values[:total]
    flat_batch = torch.div(flat, max(max_count, 1), rounding_mode="floor")
    flat_slot = flat - flat_batch * max_count
    pos32 = torch.where(valid, index, -1).to(torch.int32)
    return GlobalTokens(global_mask, index, valid, flat_batch, flat_slot, index.flatten()[flat], pos32, max_count,
                        total)


def resolve_global_tokens(global_mask, q, k):
    """GlobalTokens for attention(q, k, v, global_mask=...), after the checks that need q and k (before any kernel):
    self-attention, the mask's shape and device."""
    B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
    if Sq != Sk:
        raise ValueError(f"global_mask needs self-attention (Sq == Sk): Longformer's global tokens are positions of "
                         f"one sequence; got Sq={Sq}, Sk={Sk}")
    if isinstance(global_mask, GlobalTokens):
        mask = global_mask.mask
    else:
        check_global_mask(global_mask)
        mask = global_mask
    if tuple(mask.shape) != (B, Sk):
        raise ValueError(f"global_mask must have shape (batch, seqlen) = {(B, Sk)}, got {tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"global_mask is on {mask.device} but q is on {q.device}")
    return global_mask if isinstance(global_mask, GlobalTokens) else global_tokens(global_mask)


def adds_nothing(tokens, causal, left, right):
    """True when global tokens cannot change any row: none, or a window that already holds every key a global
    token could add (no left bound, and no right bound or causal). Then attention() runs the plain call."""
    return tokens.max_count == 0 or (left < 0 and (right < 0 or causal))


# ---- the pieces: masks, scores, probabilities ----------------------------------------------------------------

Spec = namedtuple("Spec", "scale causal left right algorithm deterministic")  # left/right: causal folded in


def _cached(tokens, key, make):
    """make() once per GlobalTokens and key: a call's host time is mostly its count of PyTorch ops (about 100 per
    forward before, measured host-bound), and indexes and masks depend only on the tokens and static sizes."""
    hit = tokens.cache.get(key)
    if hit is None:
        hit = tokens.cache[key] = make()
    return hit


def _key_mask(tokens, S, spec):
    """(B, S, G) bool: non-global row i counts global key index[b, g] here (outside its window; j <= i if causal)."""
    i = torch.arange(S, device=tokens.device).view(1, S, 1)
    j = tokens.index.unsqueeze(1)
    keep = tokens.valid.unsqueeze(1) & ~in_window(i, j, spec.left, spec.right) & ~tokens.mask.unsqueeze(2)
    return keep & (j <= i) if spec.causal else keep


def _row_mask(tokens, S, spec, exclude_global=False):
    """(B, G, S) bool: global row index[b, g] counts key j here (outside its window; j <= i if causal; not a global
    key with exclude_global, when a kernel already counted those)."""
    i = tokens.index.unsqueeze(2)
    j = torch.arange(S, device=tokens.device).view(1, 1, S)
    keep = tokens.valid.unsqueeze(2) & ~in_window(i, j, spec.left, spec.right)
    if exclude_global:
        keep &= ~tokens.mask.unsqueeze(1)
    return keep & (j <= i) if spec.causal else keep


def _bmm32(a, b):
    """Batched a @ b with float32 (float64) results. fp16/bf16 on CUDA: cuBLAS writes float32 directly, so no
    float32 copy of the (large) inputs is made."""
    if _BMM_OUT_DTYPE and a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    compute = torch.promote_types(a.dtype, torch.float32)
    return torch.bmm(a.to(compute), b.to(compute))


def _add_bmm_(t, a, b):
    """t (4-D) += a @ b, with a (N, R, n), b (N, n, D) and N * R rows of t: one GEMM accumulating into t when t is
    contiguous, else through a temporary."""
    a, b = a.to(t.dtype), b.to(t.dtype)
    if t.is_contiguous():
        t.view(a.shape[0], a.shape[1], t.shape[-1]).baddbmm_(a, b)
    else:
        t.add_(torch.bmm(a, b).view(t.shape))


def _rows_index(tokens, H, D):
    B, G = tokens.index.shape
    return _cached(tokens, ("rows", H, D), lambda: tokens.index[:, None, :, None].expand(B, H, G, D))


def _gather_rows(t, tokens):
    """t (B, H, S, D) rows at the global positions: (B, H, G, D)."""
    return torch.gather(t, 2, _rows_index(tokens, t.shape[1], t.shape[3]))


def _gather_stat(t, tokens):
    """t (B, H, S) at the global positions: (B, H, G)."""
    B, G = tokens.index.shape
    H = t.shape[1]
    return torch.gather(t, 2, _cached(tokens, ("stat", H), lambda: tokens.index[:, None, :].expand(B, H, G)))


def _scatter_add_rows_(t, tokens, rows):
    """t (B, H, S, D) rows at the global positions += rows (B, H, G, D). Padded slots carry exact zeros."""
    t.scatter_add_(2, _rows_index(tokens, rows.shape[1], rows.shape[3]), rows.to(t.dtype))


def _key_scores(q, kg, tokens, spec):
    """G's scores (B, Hkv, group, S, G), float32, -inf where not counted. GQA without repeating K: the query heads
    of a kv head are one matrix of group * S rows."""
    B, Hq, S, D = q.shape
    Hkv, G = kg.shape[1], kg.shape[2]
    s = _bmm32(q.reshape(B * Hkv, Hq // Hkv * S, D), kg.reshape(B * Hkv, G, D).transpose(1, 2))
    s = s.mul_(spec.scale).view(B, Hkv, Hq // Hkv, S, G)
    hidden = _cached(tokens, ("key_mask", S, spec.left, spec.right, spec.causal),
                     lambda: ~_key_mask(tokens, S, spec)[:, None, None])
    return s.masked_fill_(hidden, NEG_INF)


def _row_scores(qg, k, tokens, spec, exclude_global=False):
    """D's scores (B, Hkv, group, G, S), float32, -inf where not counted."""
    B, Hq, G, D = qg.shape
    Hkv, S = k.shape[1], k.shape[2]
    s = _bmm32(qg.reshape(B * Hkv, Hq // Hkv * G, D), k.reshape(B * Hkv, S, D).transpose(1, 2))
    s = s.mul_(spec.scale).view(B, Hkv, Hq // Hkv, G, S)
    hidden = _cached(tokens, ("row_mask", S, spec.left, spec.right, spec.causal, exclude_global),
                     lambda: ~_row_mask(tokens, S, spec, exclude_global)[:, None, None])
    return s.masked_fill_(hidden, NEG_INF)


def _finite(lse):
    """-inf (a row or part that saw no key) as 0, so subtracting it gives exp(-inf) = 0, never NaN."""
    return lse.nan_to_num(neginf=0.0)


def _probs_(s, lse):
    """exp(s - lse) in place: the share of each counted key in the row's whole softmax (lse of every part)."""
    return s.sub_(_finite(lse).unsqueeze(-1)).exp_()


def _weight(lse_part, lse):
    """exp(lse_part - lse): a part's share of the row; 0 for a part that saw no key."""
    return torch.where(torch.isneginf(lse_part), torch.zeros_like(lse), torch.exp(lse_part - _finite(lse)))


# ---- forward and backward ----------------------------------------------------------------------------------

def _window_forward(q, k, v, spec):
    """L: the kernels on CUDA (any family), the float32 reference elsewhere."""
    if q.is_cuda:
        return _ops.FWD(q, k, v, spec.scale, spec.left, spec.right, spec.deterministic, spec.algorithm)
    return attention_reference(q, k, v, scale=spec.scale, window=(spec.left, spec.right), return_lse=True)


def _window_backward(dout, q, k, v, out, lse, dlse, spec):
    """L's share of the gradients given the final out and lse (as ring attention's blocks)."""
    if q.is_cuda:
        return _ops.bwd(dout, q, k, v, out, lse, spec.scale, spec.left, spec.right, spec.deterministic, dlse,
                        spec.algorithm)
    return blocked_backward(dout, q, k, v, out, lse, spec.scale, spec.left, spec.right, dlse)


_FUSED_FAMILY = {}  # (algorithm, device index, head dim) -> the family fwd runs; read under torch.compile too


def fuses_global_keys(q, algorithm="auto"):
    """True when the forward counts the global keys inside the kernel (op fwd_global): CUDA inputs whose
    ``algorithm`` runs the Hopper family (fa3) on their device and head dim."""
    if not (q.is_cuda and _ops.HAS_FWD_GLOBAL):
        return False
    key = (algorithm, q.device.index, q.shape[-1])
    if key not in _FUSED_FAMILY:
        _FUSED_FAMILY[key] = _ops._C.resolve_algorithm(algorithm, q.device.index, int(q.shape[-1]))
    return _FUSED_FAMILY[key] == "fa3"


def _global_rows(q, k, v, o_l, lse_l, tokens, spec, exclude_global):
    """(out, lse) of the global rows, (B, Hq, G, D) float32 and (B, Hq, G): their L part (rows of o_l, lse_l) merged
    with D, every key outside their window (less the global keys when the kernel's L already counted those)."""
    B, Hq, S, D = q.shape
    Hkv, G = k.shape[1], tokens.max_count
    s = _row_scores(_gather_rows(q, tokens), k, tokens, spec, exclude_global)  # (B, Hkv, group, G, S)
    lse_d = torch.logsumexp(s, dim=-1)  # -inf for a row that counts no key here
    p = s.sub_(_finite(lse_d).unsqueeze(-1)).exp_()
    o_d = _bmm32(p.view(B * Hkv, Hq // Hkv * G, S).to(v.dtype), v.reshape(B * Hkv, S, D)).view(B, Hq, G, D)
    o_l_rows = _gather_rows(o_l, tokens).to(o_d.dtype)
    return merge_states_unchecked(o_l_rows, _gather_stat(lse_l, tokens), o_d, lse_d.view(B, Hq, G))


def _rows_by_decode(q):
    """True when the global rows run as one decode-kernel call (CUDA, a decode head dim)."""
    return q.is_cuda and _ops.HAS_KVCACHE_OP and q.shape[-1] in decode_head_dims()


def _global_rows_decode(q, k, v, tokens, spec):
    """(out, lse) of the global rows, (B, Hq, G, D) in q's dtype and (B, Hq, G), each over ALL the keys it sees (every
    key, or j <= its position when causal): the split-KV decode kernel with the gathered rows as its queries, k / v
    as a contiguous cache of S keys and each row's position given (q_pos; -1 on the padding, which sees no key when
    causal and is never written back). K/V are read once per kv head and block of 16 (row, head) pairs, spread
    over the SMs by the split count, where the GEMM path (``_global_rows``) materialised (B, Hq, G, S) float32
    scores in ~10 launches."""
    B, S = q.shape[0], k.shape[2]
    seqlens = _cached(tokens, ("seqlens", S), lambda: torch.full((B,), S, dtype=torch.int32, device=q.device))
    return _ops.kvcache_fwd(_gather_rows(q, tokens), k, v, seqlens, None, None, None, spec.scale, -1,
                            0 if spec.causal else -1, 0, None, tokens.pos32)


def _global_forward(q, k, v, tokens, spec):
    B, Hq, S, D = q.shape
    Hkv, G = k.shape[1], tokens.max_count
    group = Hq // Hkv
    fused = fuses_global_keys(q, spec.algorithm)
    if fused:
        # L and G of every row in one kernel pass: out and lse are final for the non-global rows.
        o_l, lse_l = _ops.fwd_global(q, k, v, _gather_rows(k, tokens), _gather_rows(v, tokens), tokens.pos32,
                                     spec.scale, spec.left, spec.right, spec.causal, spec.algorithm)
    else:
        o_l, lse_l = _window_forward(q, k, v, spec)
    # Global rows (written over those rows of the output at the end): whole rows from the decode kernel, or L
    # merged with D (fused, their "L" already holds the global keys outside the window, so D leaves those out).
    if _rows_by_decode(q):
        o_r, lse_r = _global_rows_decode(q, k, v, tokens, spec)
    else:
        o_r, lse_r = _global_rows(q, k, v, o_l, lse_l, tokens, spec, exclude_global=fused)
    if fused:
        out, lse = o_l, lse_l
    else:
        # Non-global rows: L merged with G. The row's lse first, then out = w_L * o_L + P_G @ V_G: o_L scaled in
        # place (float32 math, stored in its dtype) and one GEMM accumulating into it; no float32 copy of the output.
        vg = _gather_rows(v, tokens)
        p_g = _key_scores(q, _gather_rows(k, tokens), tokens, spec)
        lse = torch.logaddexp(lse_l, torch.logsumexp(p_g, dim=-1).view(B, Hq, S))  # -inf rows stay -inf
        _probs_(p_g, lse.view(B, Hkv, group, S))
        out = o_l.mul_(_weight(lse_l, lse).unsqueeze(-1))
        _add_bmm_(out, p_g.view(B * Hkv, group * S, G), vg.reshape(B * Hkv, G, D))
        lse = lse.to(torch.float32)
    picked, rows = (tokens.flat_batch, tokens.flat_slot), (tokens.flat_batch, tokens.flat_pos)
    out.transpose(1, 2).index_put_(rows, o_r.transpose(1, 2)[picked].to(out.dtype))
    lse.transpose(1, 2).index_put_(rows, lse_r.transpose(1, 2)[picked].to(torch.float32))
    return out, lse


def _global_backward(dout, dlse, q, k, v, out, lse, tokens, spec):
    """(dq, dk, dv): every part's share given the final out and lse. With P = exp(s - lse) over a part's keys and
    Delta = rowsum(dO * O) - dlse: dV = P^T dO, dS = P * (dO V^T - Delta), dQ = scale dS K, dK = scale dS^T Q."""
    B, Hq, S, D = q.shape
    Hkv, G = k.shape[1], tokens.max_count
    group = Hq // Hkv
    dq, dk, dv = _window_backward(dout, q, k, v, out, lse, dlse, spec)
    delta = (dout * out).sum(dim=-1, dtype=torch.promote_types(out.dtype, torch.float32))
    if dlse is not None:
        delta = delta - dlse
    # G: non-global rows against the global keys.
    kg, vg = _gather_rows(k, tokens), _gather_rows(v, tokens)
    p_g = _probs_(_key_scores(q, kg, tokens, spec), lse.view(B, Hkv, group, S))
    do3, q3 = dout.reshape(B * Hkv, group * S, D), q.reshape(B * Hkv, group * S, D)
    dvg = _bmm32(p_g.view(B * Hkv, group * S, G).transpose(1, 2).to(dout.dtype), do3)
    dp_g = _bmm32(do3, vg.reshape(B * Hkv, G, D).transpose(1, 2)).view(p_g.shape)
    ds_g = p_g.mul_(dp_g.sub_(delta.view(B, Hkv, group, S, 1))).mul_(spec.scale).view(B * Hkv, group * S, G)
    _add_bmm_(dq, ds_g, kg.reshape(B * Hkv, G, D))
    dkg = _bmm32(ds_g.transpose(1, 2).to(q.dtype), q3)
    _scatter_add_rows_(dk, tokens, dkg.view(B, Hkv, G, D))
    _scatter_add_rows_(dv, tokens, dvg.view(B, Hkv, G, D))
    # D: global rows against the keys outside their window.
    qg, dog = _gather_rows(q, tokens), _gather_rows(dout, tokens)
    p_d = _probs_(_row_scores(qg, k, tokens, spec), _gather_stat(lse, tokens).view(B, Hkv, group, G))
    qg3, dog3 = qg.reshape(B * Hkv, group * G, D), dog.reshape(B * Hkv, group * G, D)
    k3, v3 = k.reshape(B * Hkv, S, D), v.reshape(B * Hkv, S, D)
    _add_bmm_(dv, p_d.view(B * Hkv, group * G, S).transpose(1, 2), dog3)
    dp_d = _bmm32(dog3, v3.transpose(1, 2)).view(p_d.shape)
    ds_d = p_d.mul_(dp_d.sub_(_gather_stat(delta, tokens).view(B, Hkv, group, G, 1))).mul_(spec.scale)
    ds_d = ds_d.view(B * Hkv, group * G, S)
    _scatter_add_rows_(dq, tokens, _bmm32(ds_d.to(k.dtype), k3).view(B, Hq, G, D))
    _add_bmm_(dk, ds_d.transpose(1, 2), qg3)
    return dq, dk, dv


class _GlobalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tokens, spec):
        ctx.set_materialize_grads(False)  # no lse gradient unless the loss uses lse
        out, lse = _global_forward(q, k, v, tokens, spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tokens, ctx.spec = tokens, spec
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        return (*_global_backward(dout, dlse, q, k, v, out, lse, ctx.tokens, ctx.spec), None, None)


def global_attention(q, k, v, tokens, spec):
    """(out in q's dtype, lse float32) of attention with global tokens; differentiable. CUDA inputs run in their
    dtype (scores and softmax in float32); CPU inputs in float32 (float64 stays), as the CPU reference."""
    if q.is_cuda:
        return _GlobalAttention.apply(q, k, v, tokens, spec)
    compute = torch.promote_types(q.dtype, torch.float32)
    out, lse = _GlobalAttention.apply(q.to(compute), k.to(compute), v.to(compute), tokens, spec)
    return out.to(q.dtype), lse


__all__ = ["GlobalTokens", "global_tokens", "global_attention", "fuses_global_keys"]
