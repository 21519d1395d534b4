"""Padding masks -> packed variable-length calls: how the transformers integration runs a padded batch.

A padded batch q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) with a padding mask runs as one ``attention_varlen`` over the
valid tokens only, as transformers' own flash-attention path does: gather the valid rows into packed
(total, H, D), run varlen, scatter the output back to (B, Sq, Hq, D).

Which rows are which. Queries sit at the LAST Sq key slots (query i at key slot Sk - Sq + i: prefill, cached
decoding and chunked prefill with a dynamic cache), the bottom-right alignment of every call of this integration.
  * keys: those the mask lets some query see (2-D mask: those marked 1/True);
  * causal: a query is valid when its own key slot is. In the packed order each sequence's bottom-right causal
    rule is then exactly "valid keys at or before the query's slot", for left, right and middle padding alike (the
    k-th valid query and the slot with k valid keys before it coincide). A padded query row (own slot unseen)
    that sees no key outputs 0; one that sees every valid key of its sequence (right padding: the rows after the
    last token, which transformers' generate reads for the first new token) gets them in a second, non-causal
    varlen pass over the same packed keys, so it too equals sdpa's row.
  * not causal: every query row is computed (a padded row sees the valid keys, as under sdpa). A bidirectional
    4-D mask says nothing about which queries are padding, and cross-attention queries are not key slots at all.
  * a 2-D mask (B, Sk), transformers' flash-attention convention: the same, except that every padded query row
    of a causal call outputs 0, as in transformers' flash-attention path.

Which 4-D masks qualify: boolean (True = visible) or additive (0 = visible, <= finfo.min / 2 or -inf = masked),
shaped (B or 1, 1, Sq, Sk), equal to the mask the rule above implies, element for element (a padded query row
seeing some but not all valid keys disqualifies it). So every row's output equals sdpa's, except rows that see
nothing (0 here). A static cache with future slots (queries not at the last slots) fails the comparison and
falls back, as do sliding windows, packed documents and custom masks: ``plan_from_mask`` returns a reason string.

Host syncs. ``max_seqlen_q/k`` size the varlen grid and the packed sizes the gathers, so one host read per mask
is unavoidable (transformers' flash-attention path does one per layer too). It is a single ``.tolist()`` of
[mask qualifies, the packed sizes, the max sequence lengths]; the plan is cached for the last mask object seen
(weakref + version counter), so the layers of one forward, which share the mask tensor, pay it once; the gathers,
the varlen calls and the scatter then run without a sync. Index tensors come from ``torch.nonzero_static`` with
the sizes read in that same sync. The qualification check costs a few elementwise passes over the (B, Sq, Sk)
mask that transformers already built at that size.
"""
import weakref
from typing import NamedTuple, Optional

import torch

from ..varlen import attention_varlen


class VarlenPlan(NamedTuple):
    q_rows: Optional[torch.Tensor]  # (total_q, 2) (batch, slot) of the valid queries; None: every row is valid
    k_rows: torch.Tensor  # (total_k, 2) (batch, slot) of the valid keys
    cu_seqlens_q: torch.Tensor  # (B + 1,) int32
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    total_q: int
    total_k: int
    tail_rows: Optional[torch.Tensor] = None  # (total_t, 2) padded query rows that see every valid key (causal)
    cu_seqlens_t: Optional[torch.Tensor] = None
    max_seqlen_t: int = 0


def _visible(mask, batch, Sq, Sk):
    """(B, Sq, Sk) bool visibility and a 0-d bool "values are plain visible/masked", or a reason string. Metadata
    decides the reason; no host read."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != (Sq, Sk):
        return f"4-D attention_mask of shape {tuple(mask.shape)} is not (B or 1, 1, Sq={Sq}, Sk={Sk})"
    m = mask[:, 0].expand(batch, Sq, Sk)
    if m.dtype == torch.bool:
        return m, torch.ones((), dtype=torch.bool, device=m.device)
    if not m.is_floating_point():
        return f"4-D attention_mask of dtype {m.dtype} (bool or additive float masks qualify)"
    vis = m == 0
    plain = (vis | (m <= torch.finfo(m.dtype).min / 2)).all()  # -inf included; a bias in between disqualifies
    return vis, plain


def _slots_before(Sq, Sk, device):
    """(Sq, Sk) bool: key slot j is at or before query i's slot Sk - Sq + i (bottom-right causal)."""
    return torch.ones(Sq, Sk, dtype=torch.bool, device=device).tril(Sk - Sq)


def _rows_and_check(mask, batch, Sq, Sk, causal):
    """(key_valid (B, Sk), query_valid (B, Sq) or None for all rows, tail (B, Sq) or None, qualifies 0-d bool), or a
    reason string. ``tail``: padded query rows that see every valid key of their sequence."""
    if mask.dim() == 2:
        if mask.shape[0] not in (1, batch) or mask.shape[1] != Sk:
            return f"2-D attention_mask of shape {tuple(mask.shape)} is not (B or 1, Sk={Sk})"
        if mask.is_floating_point() or mask.is_complex():
            return f"2-D attention_mask of dtype {mask.dtype} (bool or integer 1 = keep qualify)"
        keys = (mask != 0).expand(batch, Sk)
        queries = keys[:, Sk - Sq:] if causal else None
        return keys, queries, None, torch.ones((), dtype=torch.bool, device=mask.device)
    got = _visible(mask, batch, Sq, Sk)
    if isinstance(got, str):
        return got
    vis, ok = got
    keys = vis.any(1)  # (B, Sk): seen by some query
    if not causal:
        return keys, None, None, ok & (vis == keys[:, None, :]).all()
    queries = keys[:, Sk - Sq:]
    ok = ok & (vis == (keys[:, None, :] & _slots_before(Sq, Sk, vis.device))).all()
    seen = vis.sum(2)  # (B, Sq) keys each row sees
    padded_seeing = ~queries & (seen > 0)
    tail = padded_seeing & (seen == keys.sum(1, keepdim=True))
    ok = ok & ~(padded_seeing & ~tail).any()  # a padded row sees nothing or every valid key
    return keys, queries, tail, ok


def _cu_seqlens(valid):
    counts = valid.sum(1, dtype=torch.int32)
    return counts, torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))


_last = {}  # one-entry plan cache: the layers of one forward share the mask tensor


def plan_from_mask(mask, batch, Sq, Sk, causal):
    """A ``VarlenPlan`` for a padding(+causal) ``mask`` (2-D (B, Sk) keep-mask or 4-D, see the module docstring),
    or a string saying why the mask does not qualify. Requires Sq <= Sk when causal. One host read per new mask."""
    key = (batch, Sq, Sk, bool(causal), mask._version)
    ref = _last.get("mask")
    if ref is not None and ref() is mask and _last["key"] == key:
        return _last["plan"]
    plan = _build_plan(mask, batch, Sq, Sk, causal)
    _last.update(mask=weakref.ref(mask), key=key, plan=plan)
    return plan


def _build_plan(mask, batch, Sq, Sk, causal):
    if causal and Sq > Sk:
        return f"causal with Sq={Sq} > Sk={Sk} and a mask (queries are placed at the last Sq key slots)"
    got = _rows_and_check(mask, batch, Sq, Sk, causal)
    if isinstance(got, str):
        return got
    keys, queries, tail, ok = got
    counts_k, cu_k = _cu_seqlens(keys)
    if queries is None:
        counts_q = torch.full((batch,), Sq, dtype=torch.int32, device=keys.device)
        cu_q = torch.arange(0, (batch + 1) * Sq, Sq, dtype=torch.int32, device=keys.device)
    else:
        counts_q, cu_q = _cu_seqlens(queries)
    counts_t, cu_t = _cu_seqlens(tail) if tail is not None else (torch.zeros_like(counts_q), None)
    stats = torch.stack([ok.long()] + [c.sum(dtype=torch.int64) for c in (counts_q, counts_k, counts_t)] +
                        [c.max().long() for c in (counts_q, counts_k, counts_t)])
    ok, total_q, total_k, total_t, max_q, max_k, max_t = stats.tolist()  # the one host read (module docstring)
    if not ok:
        return ("attention_mask is not a padding(+causal) mask (e.g. a sliding window, packed documents, a custom "
                "or additive bias mask, padding inside a sequence, or queries not at the last key slots)")
    q_rows = None if queries is None else torch.nonzero_static(queries, size=total_q)
    k_rows = torch.nonzero_static(keys, size=total_k)
    if total_t == 0:
        return VarlenPlan(q_rows, k_rows, cu_q, cu_k, max_q, max_k, total_q, total_k)
    return VarlenPlan(q_rows, k_rows, cu_q, cu_k, max_q, max_k, total_q, total_k,
                      torch.nonzero_static(tail, size=total_t), cu_t, max_t)


def _pack(x, rows):
    """(B, H, S, D) -> (total, H, D): the rows listed in ``rows`` (None: all), one gather."""
    xt = x.transpose(1, 2)
    if rows is None:
        return xt.reshape(-1, x.shape[1], x.shape[3])
    return xt[rows[:, 0], rows[:, 1]]


def attention_unpadded(query, key, value, plan, causal, scale):
    """attention_varlen over the rows of ``plan``; returns (B, Sq, Hq, D) contiguous, padded query rows 0 (or, for
    the plan's tail rows, attention over every valid key of their sequence)."""
    B, Hq, Sq, D = query.shape
    if plan.total_k == 0:  # no query sees a key: every row is 0
        return query.new_zeros(B, Sq, Hq, D)
    k, v = _pack(key, plan.k_rows), _pack(value, plan.k_rows)
    if plan.q_rows is None:
        out = attention_varlen(_pack(query, None), k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q,
                               plan.max_seqlen_k, causal=causal, scale=scale)
        return out.view(B, Sq, Hq, D)
    full = query.new_zeros(B, Sq, Hq, D)
    passes = [(plan.q_rows, plan.cu_seqlens_q, plan.max_seqlen_q, causal)]
    if plan.tail_rows is not None:
        passes.append((plan.tail_rows, plan.cu_seqlens_t, plan.max_seqlen_t, False))
    for rows, cu_q, max_q, pass_causal in passes:
        if rows.shape[0] == 0:
            continue
        out = attention_varlen(_pack(query, rows), k, v, cu_q, plan.cu_seqlens_k, max_q, plan.max_seqlen_k,
                               causal=pass_causal, scale=scale)
        full[rows[:, 0], rows[:, 1]] = out
    return full
