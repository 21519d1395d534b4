"""Which attention() calls ring attention makes: the layouts' segments and, per ring step, the blocks to compute.

q has Sq rows and k/v have Sk keys in the whole sequence, split over W ranks the same way:
- "contiguous": rank r holds rows [r * Sq / W, (r + 1) * Sq / W).
- "zigzag": the sequence is cut into 2W equal chunks; rank r holds chunks r and 2W-1-r, stored one after the
  other. Under a causal mask every rank then has the same amount of work.

At ring step s, rank r holds the K/V shard of rank (r - s) mod W. Its queries must see exactly the keys that
attention() on the whole sequence lets them see: with p = i + Sk - Sq (bottom-right alignment), query i sees key j
iff lo <= j - i <= hi, the band of ``band()``. A ``Call`` is one attention() on a range of local rows and a range of
the held keys, with a local window whose mask equals that global mask on those rows and keys; blocks nobody sees
are skipped. Everything here depends only on shapes, so every rank computes the same plan without talking.
"""
import functools
from collections import namedtuple

from .reference import effective_window

LAYOUTS = ("zigzag", "contiguous")
INF = float("inf")

# start: global position of the segment's first row/key; length; offset: where it starts in the local tensor
Segment = namedtuple("Segment", "start length offset")
# local rows [q0, q1) against held keys [k0, k1) with attention(window=window, causal=False)
Call = namedtuple("Call", "q0 q1 k0 k1 window")


def chunks_per_rank(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return 2 if layout == "zigzag" else 1


def chunk_ids(layout, rank, world):
    """The chunks rank holds, in storage order, out of world * chunks_per_rank(layout) equal chunks."""
    if chunks_per_rank(layout) == 1:
        return (rank,)
    return (rank, 2 * world - 1 - rank)


def segments(layout, rank, world, local_len):
    """The Segments of the sequence that rank holds, local_len rows in all."""
    ids = chunk_ids(layout, rank, world)
    n = local_len // len(ids)
    return tuple(Segment(c * n, n, i * n) for i, c in enumerate(ids))


def band(causal, window, Sq, Sk):
    """(lo, hi): query i sees key j iff lo <= j - i <= hi in whole-sequence positions (+-inf when unbounded)."""
    left, right = effective_window(causal, window)
    lo = Sk - Sq - left if left >= 0 else -INF
    hi = Sk - Sq + right if right >= 0 else INF
    return lo, hi


def _visible_ranges(qs, ks, lo, hi):
    """((i0, i1), (j0, j1)) inclusive global rows of qs that see a key of ks and keys of ks seen by a row, or None."""
    i0, i1 = max(qs.start, ks.start - hi), min(qs.start + qs.length - 1, ks.start + ks.length - 1 - lo)
    j0, j1 = max(ks.start, qs.start + lo), min(ks.start + ks.length - 1, qs.start + qs.length - 1 + hi)
    if i0 > i1 or j0 > j1:
        return None
    return (int(i0), int(i1)), (int(j0), int(j1))


def _local_window(L, R, n, m):
    """attention()'s window for an (n rows, m keys) call whose kernel band is [m - n - L, m - n + R]; a bound
    that masks nothing becomes -1 (row 0's right bound reaches key m - 1 iff R >= n - 1, the last row's left
    bound reaches key 0 iff L >= m - 1)."""
    left = -1 if L == INF or L >= m - 1 else int(L)
    right = -1 if R == INF or R >= n - 1 else int(R)
    return left, right


def _pair_call(qs, ks, rows, keys, lo, hi):
    """The one call for the visible part of one (q segment, k segment) block: trimmed to rows that see a key and
    keys that a row sees, which makes both window bounds >= 0."""
    (i0, i1), (j0, j1) = rows, keys
    n, m = i1 - i0 + 1, j1 - j0 + 1
    L = INF if lo == -INF else j1 - i1 - lo
    R = INF if hi == INF else hi - j1 + i1
    assert L >= 0 and R >= 0, (L, R)  # guaranteed by the trimming (docs/distributed.md, "Planning")
    q0, k0 = qs.offset + i0 - qs.start, ks.offset + j0 - ks.start
    return Call(q0, q0 + n, k0, k0 + m, _local_window(L, R, n, m))


def _restricted(a, b, dlo, dhi):
    """The diagonals [a, b] that exist in a block whose j - i runs over [dlo, dhi]; None if none does."""
    a, b = max(a, dlo), min(b, dhi)
    return None if a > b else (a, b)


def _fused_call(q_group, k_group, lo, hi):
    """One call for every block of q_group x k_group (segments adjacent in storage) if one window gives each block
    its exact mask, else None. In the call, row I and key J are visible iff FL <= J - I <= FH with FL = m - n - L,
    FH = m - n + R; block (qs, ks) sees its own diagonals j' - i' in [lo, hi] + qs.start - ks.start."""
    n = sum(s.length for s in q_group)
    m = sum(s.length for s in k_group)
    q_base, k_base = q_group[0].offset, k_group[0].offset
    blocks = []
    for qs in q_group:
        for ks in k_group:
            shift = (ks.offset - k_base) - (qs.offset - q_base)  # J - I = j' - i' + shift
            dom = (-(qs.length - 1), ks.length - 1)
            want = _restricted(lo + qs.start - ks.start, hi + qs.start - ks.start, *dom)
            blocks.append((shift, dom, want, qs.start - ks.start))
    # Each bounded block edge proposes a call bound; unbounded first so the kernel can skip the mask.
    lows = [-INF] + ([lo + d + s for s, _, _, d in blocks] if lo != -INF else [])
    highs = [INF] + ([hi + d + s for s, _, _, d in blocks] if hi != INF else [])
    for FL in lows:
        for FH in highs:
            L, R = m - n - FL, FH - (m - n)
            if L < 0 or R < 0:
                continue
            if all(_restricted(FL - s, FH - s, *dom) == want for s, dom, want, _ in blocks):
                return Call(q_base, q_base + n, k_base, k_base + m, _local_window(L, R, n, m))
    return None


def _adjacent(group):
    return all(a.offset + a.length == b.offset for a, b in zip(group, group[1:]))


def plan_block(q_segs, k_segs, lo, hi):
    """The calls that compute q_segs against k_segs under the band (lo, hi): one call if one window fits every
    block, else one per q segment, else one per visible block. Blocks nobody sees are left out."""
    visible = {(a, b): _visible_ranges(qs, ks, lo, hi) for a, qs in enumerate(q_segs) for b, ks in enumerate(k_segs)}
    rows = [a for a in range(len(q_segs)) if any(visible[a, b] for b in range(len(k_segs)))]
    if not rows:
        return ()
    cols = [b for b in range(len(k_segs)) if any(visible[a, b] for a in rows)]
    q_group, k_group = [q_segs[a] for a in rows], [k_segs[b] for b in cols]
    if _adjacent(q_group) and _adjacent(k_group):
        call = _fused_call(q_group, k_group, lo, hi)
        if call is not None:
            return (call,)
    calls = []
    for a in rows:
        k_group = [k_segs[b] for b in range(len(k_segs)) if visible[a, b]]
        call = _fused_call([q_segs[a]], k_group, lo, hi) if _adjacent(k_group) else None
        if call is not None:
            calls.append(call)
            continue
        for b, ks in enumerate(k_segs):
            if visible[a, b]:
                calls.append(_pair_call(q_segs[a], ks, *visible[a, b], lo, hi))
    return tuple(calls)


@functools.lru_cache(maxsize=256)
def ring_plan(layout, world, Sq_local, Sk_local, causal, window):
    """plan[rank][step]: the Calls rank makes at ring step `step` (holding the K/V of rank (rank - step) mod W).

    Steps after the last one in which any rank has work are dropped (a sliding window may need few), so
    len(plan[r]) is the number of ring steps for everyone (at least 1)."""
    Sq, Sk = world * Sq_local, world * Sk_local
    lo, hi = band(causal, window, Sq, Sk)
    plans = [[plan_block(segments(layout, r, world, Sq_local), segments(layout, (r - s) % world, world, Sk_local),
                         lo, hi) for s in range(world)] for r in range(world)]
    steps = 1 + max((s for p in plans for s in range(world) if p[s]), default=0)
    return tuple(tuple(p[:steps]) for p in plans)
