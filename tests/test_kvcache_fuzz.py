"""Seeded fuzz of attention_with_kvcache against flashattn_ext.kvcache.kvcache_reference (float64 oracle, 2x rule).

Each case draws, from its own seed: paged or contiguous cache (contiguous sometimes a strided slice of a longer
buffer), page size, capacity, per-sequence lengths (0, exactly the capacity and in between), GQA ratio, dtype,
head dim, Sq_new, k_new or not, causal / window and num_splits. Slots that hold no token, spare pages and the unused
block-table entries (pointed at an all-NaN page) are NaN, so any read past a sequence's end shows up. Checked:
out under the 2x rule, lse (-inf exactly for rows that see no key), no NaN, and the caches after the call bitwise
equal to the reference's append (nothing outside the new tokens' slots written).

Default: 50 cases on the GPU; ``-m slow`` runs 1,000 (``FLASHATTN_EXT_KVCACHE_FUZZ=N`` for another count). A few
cases also run on CPU (the reference path, float32 math, against the float64 oracle) so CI tests the harness itself.
"""
import os
import random

import pytest
import torch

from flashattn_ext import attention_with_kvcache
from flashattn_ext.kvcache import DECODE_VARIANT_ENV, DECODE_VARIANTS, decode_head_dims, kvcache_reference
from flashattn_ext.testing import OUT_FLOOR, lse_check, max_abs_err

FAST_CASES = 50
SLOW_CASES = int(os.environ.get("FLASHATTN_EXT_KVCACHE_FUZZ", "1000"))
CPU_CASES = 6


def draw(seed, device):
    rnd = random.Random(seed)
    dims = (decode_head_dims() if device == "cuda" else ()) or (64,)
    paged = rnd.random() < 0.7
    Sq = rnd.choice([1, 1, 1, 2, 5, 16, 17, 33])
    append = rnd.random() < 0.6
    extra = Sq if append else 0
    want = max(rnd.choice([1, 16, 17, 97, 256, 1025, 4097]), extra, 1)
    page_size = rnd.choice([1, 2, 16, 17, 64, 256]) if paged else None  # 17: the non-power-of-two page split
    if paged:
        while want // page_size > 4200:  # page size 1 at 4k: ~4k pages per sequence is plenty
            want //= 2
        want = max(want, extra, 1)
    max_pages = -(-want // page_size) if paged else None
    capacity = max_pages * page_size if paged else want
    B = rnd.choice([1, 2, 3, 4])
    lens = [rnd.choice([0, capacity - extra, rnd.randint(0, capacity - extra)]) for _ in range(B)]
    Hkv = rnd.choice([1, 2, 4])
    return dict(
        paged=paged, page_size=page_size, max_pages=max_pages, capacity=capacity, lens=lens, B=B,
        Hkv=Hkv, Hq=Hkv * rnd.choice([1, 2, 4, 8]), Sq=Sq, append=append,
        D=rnd.choice(dims), dtype=rnd.choice([torch.float16, torch.bfloat16]),
        causal=rnd.random() < 0.7,
        window=(rnd.choice([-1, -1, -1, 0, 5, 100]), rnd.choice([-1, -1, 0, 3])),
        num_splits=rnd.choice([0, 0, 1, 2, 7, 64]),
        strided=(not paged) and rnd.random() < 0.3,
    )


def build(c, seed):
    """q, k_new, v_new, k/v cache buffers and the block table, float32 on the CPU with values already rounded to
    c["dtype"]. A contiguous cache buffer may be longer than the capacity (see ``cache_view``)."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Sq, D = c["B"], c["Hq"], c["Hkv"], c["Sq"], c["D"]
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(c["dtype"]).float()
    nan = float("nan")
    q, k_new, v_new = rnd(B, Hq, Sq, D), rnd(B, Hkv, Sq, D), rnd(B, Hkv, Sq, D)
    keys = [(rnd(n, Hkv, D), rnd(n, Hkv, D)) for n in c["lens"]]
    if not c["paged"]:
        pad = 24 if c["strided"] else 0  # a (B, Hkv, capacity, D) view of a longer buffer: row stride != capacity
        k_cache = torch.full((B, Hkv, c["capacity"] + pad, D), nan)
        v_cache = torch.full_like(k_cache, nan)
        for b, (kb, vb) in enumerate(keys):
            k_cache[b, :, :len(kb)] = kb.transpose(0, 1)
            v_cache[b, :, :len(vb)] = vb.transpose(0, 1)
        return q, k_new, v_new, k_cache, v_cache, None
    ps, extra = c["page_size"], Sq if c["append"] else 0
    used = [-(-(n + extra) // ps) for n in c["lens"]]
    num_pages = sum(used) + 1 + torch.randint(0, 3, (), generator=g).item()  # >= 1 spare page, all NaN
    order = torch.randperm(num_pages, generator=g)
    spare = int(order[sum(used)])
    table = torch.full((B, c["max_pages"]), spare, dtype=torch.int32)  # unused entries: a NaN page
    k_cache = torch.full((num_pages, ps, Hkv, D), nan)
    v_cache = torch.full_like(k_cache, nan)
    start = 0
    for b, (kb, vb) in enumerate(keys):
        pages = order[start:start + used[b]]
        start += used[b]
        table[b, :used[b]] = pages.to(torch.int32)
        pos = torch.arange(len(kb))
        k_cache[pages[pos // ps], pos % ps] = kb
        v_cache[pages[pos // ps], pos % ps] = vb
    return q, k_new, v_new, k_cache, v_cache, table


def cache_view(buf, c):
    """The cache the op sees: the buffer itself (paged), or its first ``capacity`` rows (contiguous)."""
    return buf if c["paged"] else buf[:, :, :c["capacity"]]


def bits(t):
    """Bitwise view (NaN == NaN) of a float16/bfloat16/float32 tensor."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def run_case(seed, device):
    c = draw(seed, device)
    q, k_new, v_new, k_buf, v_buf, table = build(c, seed)
    lens = torch.tensor(c["lens"], dtype=torch.int32)
    dt = c["dtype"]
    on = lambda t: None if t is None else t.to(device, dt, copy=True)  # copy: never alias the CPU originals
    k_dev, v_dev = on(k_buf), on(v_buf)
    kc, vc = cache_view(k_dev, c), cache_view(v_dev, c)
    k_cache, v_cache = cache_view(k_buf, c), cache_view(v_buf, c)
    kn, vn = (on(k_new), on(v_new)) if c["append"] else (None, None)
    with torch.no_grad():
        out, lse = attention_with_kvcache(on(q), kc, vc, lens.to(device), None if table is None else table.to(device),
                                          kn, vn, causal=c["causal"], window=c["window"], num_splits=c["num_splits"],
                                          return_lse=True)
    kw = dict(block_table=table, causal=c["causal"], window=c["window"])
    new = lambda t: t if c["append"] else None
    ref_k, ref_v = k_cache.double(), v_cache.double()  # copies: the reference appends in place
    ref, ref_lse = kvcache_reference(q.double(), ref_k, ref_v, lens, k_new=new(k_new.double()),
                                     v_new=new(v_new.double()), **kw)
    lp_kbuf, lp_vbuf = k_buf.to(dt, copy=True), v_buf.to(dt, copy=True)
    lp_k, lp_v = cache_view(lp_kbuf, c), cache_view(lp_vbuf, c)  # views: the reference's append lands in the buffers
    lowp, _ = kvcache_reference(q.to(dt), lp_k, lp_v, lens, k_new=new(k_new.to(dt)), v_new=new(v_new.to(dt)),
                                upcast=False, **kw)
    out, lse = out.cpu(), lse.cpu()
    where = f"seed {seed} {c} {DECODE_VARIANT_ENV}={os.environ.get(DECODE_VARIANT_ENV)}"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{where}: NaN in out or lse"
    for b in range(c["B"]):  # the 2x rule per sequence: a short sequence is not judged by a long one's bound
        err, bound = max_abs_err(out[b], ref[b]), 2 * max_abs_err(lowp[b], ref[b]) + OUT_FLOOR
        assert err <= bound, f"{where}: sequence {b}: max |out - ref| = {err:.3e} > bound {bound:.3e}"
    lse_err, lse_ok = lse_check(lse, ref_lse.float())
    assert lse_ok, f"{where}: lse err {lse_err:.2e} or -inf rows differ"
    # The append wrote exactly the new tokens' slots: whole buffers (a strided cache's padding included) bitwise
    # equal to the reference's, NaN slots included.
    assert torch.equal(bits(k_dev.cpu()), bits(lp_kbuf)) and torch.equal(bits(v_dev.cpu()), bits(lp_vbuf)), \
        f"{where}: cache after the call differs from the reference append"


@pytest.mark.parametrize("seed", range(CPU_CASES))
def test_kvcache_fuzz_cpu_reference_path(seed):
    run_case(seed, "cpu")


@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("seed", range(FAST_CASES))
def test_kvcache_fuzz_fast(seed, monkeypatch):
    monkeypatch.setenv(DECODE_VARIANT_ENV, DECODE_VARIANTS[seed % len(DECODE_VARIANTS)])  # each variant in turn
    run_case(seed, "cuda")


@pytest.mark.slow
@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("seed", range(20_000, 20_000 + SLOW_CASES))
def test_kvcache_fuzz_slow(seed, monkeypatch):
    monkeypatch.setenv(DECODE_VARIANT_ENV, DECODE_VARIANTS[seed % len(DECODE_VARIANTS)])
    run_case(seed, "cuda")
