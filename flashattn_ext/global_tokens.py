"""Longformer global tokens on top of the windowed kernels (``attention(..., global_mask=...)``).

Query i sees key j iff j is inside i's window, or j is global, or i is global (both global directions limited to
j <= i when causal). The result is assembled from three disjoint key sets per row, merged by log-sum-exp:

    L  every row against the keys inside its window: the existing kernels (any family), return_lse=True.
    G  every non-global row against the global keys outside its window: the few global K/V rows gathered into an
       "extra key tile" (B, Hkv, G, D) and attended with torch ops in float32, (S, G) scores per head.
    D  every global row against the keys outside its window: the few global query rows gathered and attended
       densely against all keys with torch ops in float32, (G, S) scores per head.

    non-global row: merge(L, G)        global row: merge(L, D)

The sets never overlap (a global key inside the window is L's, not G's), so every visible key is counted once.
Gradients come from autograd: L's through the kernels' backward (which takes dout and dlse of the merged result),
G and D through torch ops, whose work is O(S * G) per head. docs/semantics.md has the mask picture.

Finding the global positions in a bool mask needs their count on the host: ``global_tokens(mask)`` reads it once
(one device sync) and returns a ``GlobalTokens`` that every layer can reuse without another sync.
"""
from dataclasses import dataclass

import torch

from .kvcache import merge_states_reference
from .reference import in_window

NEG_INF = float("-inf")


@dataclass(frozen=True, eq=False)  # eq would compare tensors
class GlobalTokens:
    """The global positions of a (B, S) global_attention_mask, gathered once for every layer of a forward.

    mask: (B, S) bool, the caller's mask (on its device).
    index: (B, max_count) int64, row b's global positions in ascending order, padded with 0 past count[b].
    valid: (B, max_count) bool, False on the padding.
    flat_batch, flat_pos: (total,) int64, batch and position of every global token (the rows that D writes).
    flat_slot: (total,) int64, its column in ``index``.
    max_count, total: host ints, the most global tokens of one sequence and their number over the batch.
    """
    mask: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    flat_batch: torch.Tensor
    flat_slot: torch.Tensor
    flat_pos: torch.Tensor
    max_count: int
    total: int

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
    return GlobalTokens(global_mask, index, valid, flat_batch, flat_slot, index.flatten()[flat], max_count, total)


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


def _softmax_rows(s, v):
    """(out, lse) of softmax(s) @ v over the last dim of s, where masked scores are -inf. Rows with no visible key
    give out 0 and lse -inf; no exp(-inf - (-inf)) anywhere, so no NaN in the forward or the gradients."""
    m = s.amax(dim=-1, keepdim=True).detach()  # out and lse do not depend on the shift: no gradient through it
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    total = e.sum(dim=-1, keepdim=True)
    seen = total > 0
    safe = torch.where(seen, total, torch.ones_like(total))
    out = torch.matmul(e, v) / safe
    lse = torch.where(seen, m + torch.log(safe), torch.full_like(total, NEG_INF)).squeeze(-1)
    return out, lse


def _gather_rows(t, index):
    """t (B, H, S, D) rows at index (B, G): (B, H, G, D)."""
    B, H, _, D = t.shape
    return torch.gather(t, 2, index[:, None, :, None].expand(B, H, index.shape[1], D))


def _extra_keys(q, k, v, tokens, scale, causal, left, right, compute):
    """G: every non-global row against the global keys outside its window. (out (B, Hq, S, D), lse (B, Hq, S))."""
    B, Hq, S, D = q.shape
    Hkv, G = k.shape[1], tokens.max_count
    group = Hq // Hkv
    kg = _gather_rows(k, tokens.index).to(compute)
    vg = _gather_rows(v, tokens.index).to(compute)
    # GQA without repeating K: the `group` query heads of a kv head are one matrix of group * S rows.
    qf = q.to(compute).reshape(B, Hkv, group * S, D)
    s = torch.matmul(qf, kg.transpose(-1, -2)).mul_(scale).view(B, Hkv, group, S, G)
    i = torch.arange(S, device=q.device).view(1, S, 1)
    j = tokens.index.unsqueeze(1)  # (B, 1, G)
    keep = tokens.valid.unsqueeze(1) & ~in_window(i, j, left, right) & ~tokens.mask.unsqueeze(2)
    if causal:
        keep &= j <= i
    s = s.masked_fill(~keep[:, None, None], NEG_INF)
    out, lse = _softmax_rows(s.view(B, Hkv, group * S, G), vg)
    return out.view(B, Hq, S, D), lse.view(B, Hq, S)


def _global_rows(q, k, v, tokens, scale, causal, left, right, compute):
    """D: every global row against the keys outside its window. (out (B, Hq, G, D), lse (B, Hq, G))."""
    B, Hq, S, D = q.shape
    Hkv, G = k.shape[1], tokens.max_count
    group = Hq // Hkv
    qg = _gather_rows(q, tokens.index).to(compute).reshape(B, Hkv, group * G, D)
    s = torch.matmul(qg, k.to(compute).transpose(-1, -2)).mul_(scale).view(B, Hkv, group, G, S)
    i = tokens.index.unsqueeze(2)  # (B, G, 1)
    j = torch.arange(S, device=q.device).view(1, 1, S)
    keep = tokens.valid.unsqueeze(2) & ~in_window(i, j, left, right)
    if causal:
        keep &= j <= i
    s = s.masked_fill(~keep[:, None, None], NEG_INF)
    out, lse = _softmax_rows(s.view(B, Hkv, group * G, S), v.to(compute))
    return out.view(B, Hq, G, D), lse.view(B, Hq, G)


def global_attention(window_attention, q, k, v, tokens, scale, causal, left, right):
    """(out in q's dtype, lse float32) of attention with global tokens. window_attention(q, k, v) -> (out, lse) is
    L, the caller's windowed attention (the kernels or the CPU reference); left/right have causal folded in."""
    compute = torch.promote_types(q.dtype, torch.float32)
    o_l, lse_l = window_attention(q, k, v)
    o_g, lse_g = _extra_keys(q, k, v, tokens, scale, causal, left, right, compute)
    o_d, lse_d = _global_rows(q, k, v, tokens, scale, causal, left, right, compute)
    # Non-global rows: merge(L, G), in float32 (G's side first: the merge returns its dtype).
    o, lse = merge_states_reference(o_g, lse_g, o_l, lse_l)
    out = o.to(q.dtype)
    # Global rows: merge(L, D) on the gathered rows, written over those rows (G saw nothing there).
    o_rows, lse_rows = merge_states_reference(o_d, lse_d, _gather_rows(o_l, tokens.index),
                                              torch.gather(lse_l, 2, tokens.index[:, None].expand(lse_d.shape)))
    picked = (tokens.flat_batch, tokens.flat_slot)
    rows = o_rows.transpose(1, 2)[picked]  # (total, Hq, D)
    out.transpose(1, 2).index_put_((tokens.flat_batch, tokens.flat_pos), rows.to(q.dtype))
    lse.transpose(1, 2).index_put_((tokens.flat_batch, tokens.flat_pos), lse_rows.transpose(1, 2)[picked])
    return out, lse


__all__ = ["GlobalTokens", "global_tokens"]
