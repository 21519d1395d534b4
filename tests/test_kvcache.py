"""KV-cache attention (attention_with_kvcache), PagedKVCache bookkeeping and merge_states.

CPU tests: page-pool bookkeeping, validation errors (a rejected call leaves the cache bitwise unchanged), the
reference path against attention over gathered keys. GPU tests (requires_cuda_ext): paged == contiguous ==
reference under flash-attn's 2x rule, decode == last rows of a causal prefill, page sizes 1..256, GQA/MQA,
append in the op, split counts, merge_states, CUDA graph capture and replay; the kernel-shape tests run once per
split-kernel variant (FAE_DECODE_VARIANT, flashattn_ext.kvcache.DECODE_VARIANTS), and a window test shows keys
before the window are never read.
"""
import os
import re
import zlib

import pytest
import torch

import flashattn_ext
from flashattn_ext import DecodeWorkspace, PagedKVCache, attention_with_kvcache, merge_states
from flashattn_ext.kvcache import (DECODE_VARIANT_ENV, DECODE_VARIANTS, append_reference, gather_kv,
                                   merge_states_reference)
from flashattn_ext.reference import attention_reference
from flashattn_ext.testing import lse_check, max_abs_err, two_x_rule

BF16, FP16 = torch.bfloat16, torch.float16


def seed_of(*params):
    return zlib.crc32(repr(params).encode())


def make_case(B, Hq, Hkv, Sq, D, lens, page_size, dtype, device, seed, append=True, shuffle=True, spare_pages=3):
    """Random q, k_new, v_new and a paged cache holding `lens[b]` tokens of sequence b (plus room for Sq more
    when append), pages assigned in a random order; the same data as a contiguous (B, Hkv, S_max, D) cache.
    Every slot that holds no token is NaN, so a kernel reading past a sequence's end shows up as NaN."""
    g = torch.Generator().manual_seed(seed)
    extra = Sq if append else 0
    totals = [n + extra for n in lens]
    n_pages = [max(1, -(-t // page_size)) for t in totals]
    num_pages = sum(n_pages) + spare_pages
    order = torch.randperm(num_pages, generator=g) if shuffle else torch.arange(num_pages)
    max_pages = max(n_pages)
    table = torch.zeros(B, max_pages, dtype=torch.int32)
    k_pages = torch.full((num_pages, page_size, Hkv, D), float("nan"))
    v_pages = torch.full((num_pages, page_size, Hkv, D), float("nan"))
    S_max = max_pages * page_size
    k_cont = torch.full((B, Hkv, S_max, D), float("nan"))
    v_cont = torch.full((B, Hkv, S_max, D), float("nan"))
    nxt = 0
    for b in range(B):
        pages = order[nxt:nxt + n_pages[b]]
        nxt += n_pages[b]
        table[b, :len(pages)] = pages.to(torch.int32)
        kb = torch.randn(lens[b], Hkv, D, generator=g)
        vb = torch.randn(lens[b], Hkv, D, generator=g)
        pos = torch.arange(lens[b])
        k_pages[pages[pos // page_size], pos % page_size] = kb
        v_pages[pages[pos // page_size], pos % page_size] = vb
        k_cont[b, :, :lens[b]] = kb.transpose(0, 1)
        v_cont[b, :, :lens[b]] = vb.transpose(0, 1)
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k_new = torch.randn(B, Hkv, Sq, D, generator=g)
    v_new = torch.randn(B, Hkv, Sq, D, generator=g)
    to = lambda t: t.to(device=device, dtype=dtype)
    return dict(q=to(q), k_new=to(k_new), v_new=to(v_new), k_pages=to(k_pages), v_pages=to(v_pages),
                k_cont=to(k_cont), v_cont=to(v_cont), table=table.to(device),
                lens=torch.tensor(lens, dtype=torch.int32, device=device))


def check_rows(out, lse, q, k_cache, v_cache, block_table, totals, causal=True, window=(-1, -1), scale=None):
    """Each sequence's output against the float64 reference over its gathered keys (2x rule), lse too."""
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    worst = 0.0
    for b, L in enumerate(totals):
        k = gather_kv(k_cache, block_table, b, L).unsqueeze(0)
        v = gather_kv(v_cache, block_table, b, L).unsqueeze(0)
        err, bound, ref_lse, ok = two_x_rule(out[b:b + 1], q[b:b + 1], k, v, causal=causal, window=window,
                                             scale=scale)
        assert ok, f"batch {b} (L={L}): max |out - ref| = {err:.3e} > bound {bound:.3e}"
        lse_err, lse_ok = lse_check(lse[b:b + 1], ref_lse)
        assert lse_ok, f"batch {b}: lse err {lse_err:.3e} or -inf rows differ"
        worst = max(worst, bound)
    return worst


# ---- PagedKVCache (CPU) --------------------------------------------------------------------------------------

def test_paged_cache_bookkeeping():
    cache = PagedKVCache(num_pages=10, page_size=4, num_kv_heads=2, head_dim=8, num_layers=3,
                         dtype=torch.float32, device="cpu")
    assert cache.k_pages.shape == (3, 10, 4, 2, 8) and cache.v_pages.shape == (3, 10, 4, 2, 8)
    a = cache.add_sequence()
    b = cache.add_sequence(5)
    assert cache.pages(a) == [] and len(cache.pages(b)) == 2
    assert cache.extend(a, 9) == 9 and len(cache.pages(a)) == 3
    assert cache.extend(a, 3) == 12 and len(cache.pages(a)) == 3  # fits the last page
    assert cache.extend(a, 1) == 13 and len(cache.pages(a)) == 4
    all_pages = cache.pages(a) + cache.pages(b)
    assert len(set(all_pages)) == len(all_pages), "a page was given to two sequences"
    assert cache.num_free_pages == 10 - len(all_pages)
    assert cache.seqlens([a, b]).tolist() == [13, 5] and cache.seqlens([a]).dtype == torch.int32
    table = cache.block_table([b, a])
    assert table.dtype == torch.int32 and table.shape == (2, 4)
    assert table[0, :2].tolist() == cache.pages(b) and table[1].tolist() == cache.pages(a)
    assert cache.block_table([b], max_pages=6).shape == (1, 6)
    with pytest.raises(ValueError, match="max_pages"):
        cache.block_table([a], max_pages=2)
    kp, vp = cache.layer(1)
    assert kp.shape == (10, 4, 2, 8) and kp.data_ptr() == cache.k_pages[1].data_ptr()


def test_paged_cache_free_reuses_pages():
    cache = PagedKVCache(6, 2, 1, 8, dtype=torch.float32, device="cpu")
    a, b = cache.add_sequence(6), cache.add_sequence(6)
    assert cache.num_free_pages == 0
    freed = cache.pages(a)
    cache.free(a)
    assert cache.num_free_pages == 3 and a not in cache.sequences
    c = cache.add_sequence(5)
    assert sorted(cache.pages(c)) == sorted(freed)
    assert not set(cache.pages(c)) & set(cache.pages(b))
    with pytest.raises(KeyError, match="unknown sequence"):
        cache.extend(a, 1)
    with pytest.raises(KeyError):
        cache.free(a)


def test_paged_cache_over_capacity_changes_nothing():
    cache = PagedKVCache(5, 4, 2, 8, dtype=torch.float32, device="cpu")
    a = cache.add_sequence(7)
    b = cache.add_sequence(4)
    cache.k_pages.normal_()
    cache.v_pages.normal_()
    before = (cache.pages(a), cache.pages(b), cache.seqlen(a), cache.seqlen(b), cache.num_free_pages,
              cache.k_pages.clone(), cache.v_pages.clone())
    with pytest.raises(RuntimeError, match=r"extend\(seq=0, n=100\).*needs"):
        cache.extend(a, 100)
    with pytest.raises(RuntimeError, match=r"add_sequence\(num_tokens=9\)"):
        cache.add_sequence(9)
    after = (cache.pages(a), cache.pages(b), cache.seqlen(a), cache.seqlen(b), cache.num_free_pages)
    assert after == before[:5]
    assert torch.equal(cache.k_pages, before[5]) and torch.equal(cache.v_pages, before[6])
    assert cache.sequences == [a, b]
    cache.extend(a, 9)  # 16 tokens: exactly the free pages, still works afterwards
    assert cache.num_free_pages == 0


def test_paged_cache_argument_errors():
    with pytest.raises(ValueError, match="page_size"):
        PagedKVCache(4, 0, 1, 8, device="cpu")
    with pytest.raises(TypeError, match="num_pages"):
        PagedKVCache(4.0, 2, 1, 8, device="cpu")
    cache = PagedKVCache(4, 2, 1, 8, device="cpu")
    s = cache.add_sequence()
    with pytest.raises(ValueError, match="n must be >= 0"):
        cache.extend(s, -1)


# ---- reference path and validation (CPU) ---------------------------------------------------------------------

@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("Sq", [1, 5])
def test_cpu_paged_equals_contiguous_equals_reference(page_size, Hq, Hkv, Sq):
    lens = [0, 9, 31]
    c = make_case(3, Hq, Hkv, Sq, 16, lens, page_size, torch.float32, "cpu", seed_of(page_size, Hq, Hkv, Sq))
    out_p, lse_p = attention_with_kvcache(c["q"], c["k_pages"], c["v_pages"], c["lens"], c["table"], c["k_new"],
                                          c["v_new"], return_lse=True)
    out_c, lse_c = attention_with_kvcache(c["q"], c["k_cont"], c["v_cont"], c["lens"], None, c["k_new"],
                                          c["v_new"], return_lse=True)
    torch.testing.assert_close(out_p, out_c, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse_p, lse_c, atol=1e-6, rtol=1e-6)
    totals = [n + Sq for n in lens]
    for b, L in enumerate(totals):
        k = torch.cat([c["k_cont"][b:b + 1, :, :lens[b]], c["k_new"][b:b + 1]], dim=2)
        v = torch.cat([c["v_cont"][b:b + 1, :, :lens[b]], c["v_new"][b:b + 1]], dim=2)
        ref, ref_lse = attention_reference(c["q"][b:b + 1], k, v, causal=True, return_lse=True)
        torch.testing.assert_close(out_p[b:b + 1], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse_p[b:b + 1], ref_lse, atol=1e-5, rtol=1e-5)


def test_cpu_append_writes_slots_and_does_not_advance_seqlens():
    Sq, ps = 3, 4
    c = make_case(2, 4, 2, Sq, 8, [5, 0], ps, torch.float32, "cpu", 1)
    lens_before = c["lens"].clone()
    attention_with_kvcache(c["q"], c["k_pages"], c["v_pages"], c["lens"], c["table"], c["k_new"], c["v_new"])
    assert torch.equal(c["lens"], lens_before), "cache_seqlens must not be advanced by the call"
    for b, start in enumerate(lens_before.tolist()):
        for i in range(Sq):
            pos = start + i
            page = int(c["table"][b, pos // ps])
            assert torch.equal(c["k_pages"][page, pos % ps], c["k_new"][b, :, i])
            assert torch.equal(c["v_pages"][page, pos % ps], c["v_new"][b, :, i])


def test_cpu_window_and_no_append():
    # Without k_new the call attends to the first cache_seqlens[b] keys, bottom-right aligned.
    c = make_case(2, 4, 2, 4, 8, [20, 11], 4, torch.float32, "cpu", 2, append=False)
    for causal, window in [(True, (-1, -1)), (True, (5, -1)), (False, (3, 2)), (False, (-1, -1))]:
        out, lse = attention_with_kvcache(c["q"], c["k_pages"], c["v_pages"], c["lens"], c["table"], causal=causal,
                                          window=window, return_lse=True)
        for b, L in enumerate(c["lens"].tolist()):
            k = c["k_cont"][b:b + 1, :, :L]
            v = c["v_cont"][b:b + 1, :, :L]
            ref, ref_lse = attention_reference(c["q"][b:b + 1], k, v, causal=causal, window=window, return_lse=True)
            torch.testing.assert_close(out[b:b + 1], ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse[b:b + 1], ref_lse, atol=1e-5, rtol=1e-5)


def _rejected_unchanged(c, match, exc=ValueError, **overrides):
    args = dict(q=c["q"], k_cache=c["k_pages"], v_cache=c["v_pages"], cache_seqlens=c["lens"],
                block_table=c["table"], k_new=c["k_new"], v_new=c["v_new"])
    args.update(overrides)
    k_before, v_before = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(exc, match=match):
        attention_with_kvcache(**args)
    # bitwise, NaN slots included
    assert torch.equal(args["k_cache"].view(torch.int32), k_before.view(torch.int32))
    assert torch.equal(args["v_cache"].view(torch.int32), v_before.view(torch.int32))


def test_cpu_validation_errors_leave_cache_unchanged():
    c = make_case(2, 4, 2, 2, 8, [5, 9], 4, torch.float32, "cpu", 3)
    num_pages = c["k_pages"].shape[0]
    bad = c["table"].clone()
    bad[1, 0] = num_pages
    _rejected_unchanged(c, r"block_table\[1, 0\] = .* not a page index", block_table=bad)
    bad = c["table"].clone()
    bad[0, 1] = -1
    _rejected_unchanged(c, r"block_table\[0, 1\] = -1", block_table=bad)
    capacity = c["table"].shape[1] * 4
    _rejected_unchanged(c, "exceeds the cache capacity",
                        cache_seqlens=torch.tensor([capacity - 1, 0], dtype=torch.int32))
    _rejected_unchanged(c, "negative", cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32))
    _rejected_unchanged(c, "cache_seqlens must be int32", cache_seqlens=c["lens"].long())
    _rejected_unchanged(c, "together", v_new=None)
    _rejected_unchanged(c, "k_new must be", k_new=c["k_new"][:, :, :1], v_new=c["v_new"][:, :, :1])
    _rejected_unchanged(c, "block_table must be int32", block_table=c["table"].long())
    _rejected_unchanged(c, "multiple", q=torch.randn(2, 3, 2, 8))
    _rejected_unchanged(c, "num_splits", num_splits=-1)
    _rejected_unchanged(c, "scale", scale=-1.0)
    _rejected_unchanged(c, "window", window=(-3, 0))
    _rejected_unchanged(c, "q.dtype", exc=TypeError, q=c["q"].double())
    _rejected_unchanged(c, "batch", block_table=None)  # contiguous interpretation: batch mismatch
    # entries past a sequence's used pages are never read: any value is accepted
    ok = c["table"].clone()
    assert ok.shape[1] == 3  # sequence 0 holds 5 + 2 tokens: pages 0 and 1 of its row
    ok[0, 2] = -7
    attention_with_kvcache(c["q"], c["k_pages"], c["v_pages"], c["lens"], ok, c["k_new"], c["v_new"])


# ---- merge_states (CPU) --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, BF16])
def test_cpu_merge_states_equals_concatenated_keys(dtype):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 5, 16, generator=g).to(dtype)
    k = torch.randn(2, 4, 40, 16, generator=g).to(dtype)
    v = torch.randn(2, 4, 40, 16, generator=g).to(dtype)
    oa, la = attention_reference(q, k[:, :, :13], v[:, :, :13], return_lse=True)
    ob, lb = attention_reference(q, k[:, :, 13:], v[:, :, 13:], return_lse=True)
    o, lse = merge_states(oa, la, ob, lb)
    ref, ref_lse = attention_reference(q, k, v, return_lse=True)
    tol = 1e-5 if dtype != BF16 else 2e-2
    assert o.dtype == dtype and o.is_contiguous() and lse.dtype == torch.float32
    torch.testing.assert_close(o, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_cpu_merge_states_neg_inf():
    o_a = torch.full((1, 1, 3, 4), float("nan"))  # garbage where lse is -inf: must not leak
    o_b = torch.randn(1, 1, 3, 4)
    lse_a = torch.tensor([[[float("-inf"), float("-inf"), 0.5]]])
    lse_b = torch.tensor([[[1.0, float("-inf"), float("-inf")]]])
    o_a[0, 0, 2] = 2.0
    o_b[0, 0, 2] = float("nan")
    o, lse = merge_states(o_a, lse_a, o_b, lse_b)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(o[0, 0, 0], o_b[0, 0, 0])
    assert torch.all(o[0, 0, 1] == 0) and lse[0, 0, 1] == float("-inf")
    torch.testing.assert_close(o[0, 0, 2], torch.full((4,), 2.0))
    torch.testing.assert_close(lse[0, 0], torch.tensor([1.0, float("-inf"), 0.5]))


def test_cpu_merge_states_errors():
    o = torch.randn(1, 2, 3, 4)
    lse = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="lse_a must be float32"):
        merge_states(o, lse.double(), o, lse)
    with pytest.raises(ValueError, match="one shape"):
        merge_states(o, lse, o[:, :1], lse)
    with pytest.raises(TypeError, match="floating"):
        merge_states(o.to(torch.int32), lse, o.to(torch.int32), lse)


def test_decode_variant_names_match_the_kernel_list():
    # DECODE_VARIANTS (what tests and benchmarks iterate) is the X-macro list the C++ launcher switches over.
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "kernels", "decode",
                       "decode_launch.cuh")
    with open(src) as f:
        names = tuple(re.findall(r'^\s*X\(\d+, "([a-z0-9_]+)"', f.read(), flags=re.M))
    assert names == DECODE_VARIANTS


@pytest.mark.requires_ext
def test_kvcache_ops_fake_impls():
    if not flashattn_ext._ops.HAS_KVCACHE_OP:
        pytest.skip("flashattn_ext._C was built without the kvcache ops (rebuild)")
    q = torch.empty(2, 8, 3, 128, device="meta", dtype=BF16)
    kc = torch.empty(10, 16, 2, 128, device="meta", dtype=BF16)
    lens = torch.empty(2, device="meta", dtype=torch.int32)
    table = torch.empty(2, 4, device="meta", dtype=torch.int32)
    out, lse = torch.ops.flashattn_ext.kvcache_fwd(q, kc, kc.clone(), lens, table, None, None, 0.1, -1, 0, 0, None)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 8, 3) and lse.dtype == torch.float32
    o, l = torch.ops.flashattn_ext.merge_states(q, lse, q, lse)
    assert o.shape == q.shape and o.is_contiguous() and l.shape == lse.shape


# ---- CUDA ----------------------------------------------------------------------------------------------------

cuda = pytest.mark.requires_cuda_ext
DEV = "cuda"


def decode_dims():
    return flashattn_ext.kvcache.decode_head_dims()


def need_dim(D):
    if D not in decode_dims():
        pytest.skip(f"decode head dim {D} not compiled (have {decode_dims()})")


@pytest.fixture(params=DECODE_VARIANTS)
def variant(request, monkeypatch):
    """Runs the test once per split-kernel variant (the op reads FAE_DECODE_VARIANT on every call)."""
    monkeypatch.setenv(DECODE_VARIANT_ENV, request.param)
    return request.param


def run_case(B, Hq, Hkv, Sq, D, lens, page_size, dtype, num_splits=0, causal=True, window=(-1, -1), shuffle=True):
    need_dim(D)
    seed = seed_of(B, Hq, Hkv, Sq, D, lens, page_size, dtype, num_splits, causal, window)
    c = make_case(B, Hq, Hkv, Sq, D, lens, page_size, dtype, DEV, seed, shuffle=shuffle)
    with torch.no_grad():
        out_p, lse_p = attention_with_kvcache(c["q"], c["k_pages"], c["v_pages"], c["lens"], c["table"], c["k_new"],
                                              c["v_new"], causal=causal, window=window, num_splits=num_splits,
                                              return_lse=True)
        out_c, lse_c = attention_with_kvcache(c["q"], c["k_cont"], c["v_cont"], c["lens"], None, c["k_new"],
                                              c["v_new"], causal=causal, window=window, num_splits=num_splits,
                                              return_lse=True)
    totals = [n + Sq for n in lens]
    assert out_p.shape == c["q"].shape and out_p.dtype == dtype and lse_p.shape == (B, Hq, Sq)
    check_rows(out_p, lse_p, c["q"], c["k_pages"], c["v_pages"], c["table"], totals, causal, window)
    check_rows(out_c, lse_c, c["q"], c["k_cont"], c["v_cont"], None, totals, causal, window)
    if num_splits > 0:  # same split of the same keys: the paged and contiguous paths are bitwise equal
        assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)
    return c, out_p, lse_p


@cuda
@pytest.mark.parametrize("page_size", [1, 3, 16, 64, 256])
@pytest.mark.parametrize("L", [1, 17, 1000, 4097])
def test_gpu_page_sizes_and_lengths(page_size, L, variant):
    run_case(2, 16, 4, 1, 128, [L - 1, max(0, L // 3 - 1)], page_size, BF16)


@cuda
@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (8, 2), (16, 2), (8, 1)], ids=["mha", "gqa4", "gqa8", "mqa"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_gpu_gqa_dims_dtypes(Hq, Hkv, D, dtype, variant):
    run_case(3, Hq, Hkv, 1, D, [999, 0, 300], 16, dtype)


@cuda
@pytest.mark.parametrize("Sq", [2, 7, 37])
@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (8, 1)])
def test_gpu_chunked_prefill(Sq, Hq, Hkv, variant):
    # Sq * group > 16 packed rows: several query blocks per (batch, kv head)
    run_case(2, Hq, Hkv, Sq, 128 if 128 in decode_dims() else 64, [500, 63], 16, BF16)


@cuda
@pytest.mark.parametrize("causal,window", [(True, (100, -1)), (False, (-1, -1)), (False, (50, 3)), (True, (0, -1))])
def test_gpu_windows(causal, window, variant):
    run_case(2, 8, 2, 5, 128 if 128 in decode_dims() else 64, [700, 40], 16, BF16, causal=causal, window=window)


@cuda
@pytest.mark.parametrize("num_splits", [0, 5])
def test_gpu_window_reads_only_keys_inside(num_splits, variant):
    # Keys before a sliding window are never loaded: with every cached key more than a tile (<= 128 keys) before
    # the window's first key turned to NaN, the output is bitwise the same as with the clean cache. (A kernel that
    # read them would turn the output NaN: a masked key's probability is 0, and 0 * NaN is NaN.)
    D = 128 if 128 in decode_dims() else decode_dims()[-1]
    lens, left, ps = [5000, 3000], 300, 16
    c = make_case(2, 8, 2, 1, D, lens, ps, BF16, DEV, seed_of("window-reads", num_splits))
    call = lambda kp, vp, kc, vc: [attention_with_kvcache(c["q"], k, v, c["lens"], t, c["k_new"], c["v_new"],
                                                          window=(left, 0), num_splits=num_splits, return_lse=True)
                                   for k, v, t in ((kp, vp, c["table"]), (kc, vc, None))]
    clean_bufs = [c[n].clone() for n in ("k_pages", "v_pages", "k_cont", "v_cont")]
    with torch.no_grad():
        clean = call(*clean_bufs)  # appends the new token into these copies
    totals = [n + 1 for n in lens]
    check_rows(*clean[0], c["q"], clean_bufs[0], clean_bufs[1], c["table"], totals, window=(left, 0))
    kp, vp, kc, vc = (c[n].clone() for n in ("k_pages", "v_pages", "k_cont", "v_cont"))
    for b, total in enumerate(totals):
        first = (total - 1 - left) // 128 * 128  # the window's first key, rounded down to a whole tile
        pos = torch.arange(first, device=DEV)
        pages = c["table"][b].long()[pos // ps]
        for t in (kp, vp):
            t[pages, pos % ps] = float("nan")
        for t in (kc, vc):
            t[b, :, :first] = float("nan")
    with torch.no_grad():
        poisoned = call(kp, vp, kc, vc)
    for (o, l), (o_ref, l_ref) in zip(poisoned, clean):
        assert torch.equal(o, o_ref) and torch.equal(l, l_ref)


@cuda
@pytest.mark.parametrize("page_size", [1, 256])
def test_gpu_one_long_sequence_split_counts(page_size, variant):
    # The shape the split heuristic spreads over the whole GPU (one sequence, GQA 32/8): automatic, one full wave
    # on 2 or 3 blocks per SM, and the 64-split limit all agree with one split under the 2x rule.
    D = 128 if 128 in decode_dims() else decode_dims()[-1]
    c = make_case(1, 32, 8, 1, D, [9000], page_size, BF16, DEV, seed_of("long", page_size))
    outs = {}
    for splits in (1, 0, 32, 48, 64):
        with torch.no_grad():
            outs[splits] = attention_with_kvcache(c["q"], c["k_pages"], c["v_pages"], c["lens"], c["table"],
                                                  num_splits=splits, return_lse=True)
        bound = check_rows(*outs[splits], c["q"], c["k_pages"], c["v_pages"], c["table"], [9000])
        assert max_abs_err(outs[splits][0], outs[1][0]) <= 2 * bound
        assert max_abs_err(outs[splits][1], outs[1][1]) <= 1e-3


@cuda
def test_gpu_combine_launch_modes_agree(variant, monkeypatch):
    # The combine kernel launched as a programmatic dependent of the split kernel (default on sm_90) and in plain
    # stream order (FAE_DECODE_PDL=0): bitwise the same output, eager and replayed from a CUDA graph.
    D = decode_dims()[-1]
    c = make_case(2, 32, 8, 1, D, [6000, 77], 16, BF16, DEV, seed_of("pdl", variant))
    ws = DecodeWorkspace(2, 32, 1, D)
    outs = []
    for pdl in ("1", "0"):
        monkeypatch.setenv("FAE_DECODE_PDL", pdl)
        step = lambda: attention_with_kvcache(c["q"], c["k_pages"], c["v_pages"], c["lens"], c["table"],
                                              num_splits=13, workspace=ws, return_lse=True)
        with torch.no_grad():
            eager = step()
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                replayed = step()
            graph.replay()
            torch.cuda.synchronize()
        assert torch.equal(eager[0], replayed[0]) and torch.equal(eager[1], replayed[1])
        outs.append(eager)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    check_rows(*outs[0], c["q"], c["k_pages"], c["v_pages"], c["table"], [6000, 77])


@cuda
def test_gpu_unknown_variant_raises(monkeypatch):
    D = decode_dims()[-1]
    c = make_case(1, 8, 2, 1, D, [40], 16, BF16, DEV, 12)
    monkeypatch.setenv(DECODE_VARIANT_ENV, "no_such_variant")
    with pytest.raises((RuntimeError, ValueError), match="FAE_DECODE_VARIANT"):
        attention_with_kvcache(c["q"], c["k_pages"], c["v_pages"], c["lens"], c["table"])


@cuda
def test_gpu_sequential_pages():
    run_case(2, 8, 2, 1, 128 if 128 in decode_dims() else 64, [333, 1000], 16, BF16, shuffle=False)


@cuda
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_num_splits_agree(D, variant):
    need_dim(D)
    c = make_case(2, 16, 2, 1, D, [4096, 2000], 64, BF16, DEV, seed_of("splits", D))
    outs = {}
    for splits in (1, 0, 7, 64):
        k, v = c["k_pages"].clone(), c["v_pages"].clone()
        with torch.no_grad():
            outs[splits] = attention_with_kvcache(c["q"], k, v, c["lens"], c["table"], c["k_new"], c["v_new"],
                                                  num_splits=splits, return_lse=True)
        bound = check_rows(*outs[splits], c["q"], k, v, c["table"], [4097, 2001])
    for splits in (0, 7, 64):
        assert max_abs_err(outs[splits][0], outs[1][0]) <= 2 * bound
        assert max_abs_err(outs[splits][1], outs[1][1]) <= 1e-3
    # deterministic: the same call twice is bitwise equal
    with torch.no_grad():
        again = attention_with_kvcache(c["q"], c["k_pages"].clone(), c["v_pages"].clone(), c["lens"], c["table"],
                                       c["k_new"], c["v_new"], num_splits=7, return_lse=True)
    assert torch.equal(again[0], outs[7][0]) and torch.equal(again[1], outs[7][1])


@cuda
def test_gpu_workspace_matches_no_workspace():
    D = decode_dims()[-1]
    c = make_case(1, 32, 8, 1, D, [8000], 16, BF16, DEV, 11)
    ws = DecodeWorkspace(1, 32, 1, D)
    with torch.no_grad():
        a = attention_with_kvcache(c["q"], c["k_pages"].clone(), c["v_pages"].clone(), c["lens"], c["table"],
                                   c["k_new"], c["v_new"], num_splits=9, return_lse=True)
        b = attention_with_kvcache(c["q"], c["k_pages"].clone(), c["v_pages"].clone(), c["lens"], c["table"],
                                   c["k_new"], c["v_new"], num_splits=9, return_lse=True, workspace=ws)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    small = DecodeWorkspace(1, 32, 1, D, max_splits=2)
    with pytest.raises(RuntimeError, match="workspace"):
        attention_with_kvcache(c["q"], c["k_pages"].clone(), c["v_pages"].clone(), c["lens"], c["table"],
                               num_splits=9, workspace=small)


@cuda
@pytest.mark.parametrize("Sq", [1, 4])
def test_gpu_decode_equals_last_rows_of_causal_prefill(Sq):
    D = decode_dims()[-1]
    B, Hq, Hkv, L = 2, 16, 4, 777
    g = torch.Generator().manual_seed(Sq)
    q = torch.randn(B, Hq, L, D, generator=g).to(DEV, BF16)
    k = torch.randn(B, Hkv, L, D, generator=g).to(DEV, BF16)
    v = torch.randn(B, Hkv, L, D, generator=g).to(DEV, BF16)
    with torch.no_grad():
        full = flashattn_ext.attention(q, k, v, causal=True)[:, :, L - Sq:]
    cache = PagedKVCache(200, 16, Hkv, D, dtype=BF16, device=DEV)
    kp, vp = cache.layer(0)
    seqs = [cache.add_sequence() for _ in range(B)]
    for b, s in enumerate(seqs):  # prefill L - Sq tokens through the cache API (append without attention use)
        prefill = cache.step([s], L - Sq)
        append_reference(kp, vp, prefill.cache_seqlens, k[b:b + 1, :, :L - Sq], v[b:b + 1, :, :L - Sq],
                         prefill.block_table)
    step = cache.step(seqs, Sq)
    lens = step.cache_seqlens
    assert lens.device == kp.device and step.block_table.device == kp.device
    with torch.no_grad():
        out = cache.attention(step, 0, q[:, :, L - Sq:], k[:, :, L - Sq:], v[:, :, L - Sq:])
    err, bound, _, ok = two_x_rule(out, q[:, :, L - Sq:], k, v, causal=True)
    assert ok, f"{err:.3e} > {bound:.3e}"
    assert max_abs_err(out, full) <= 2 * bound
    assert torch.equal(cache.seqlens(seqs) - Sq, lens.cpu())


@cuda
def test_gpu_append_in_op_equals_write_then_attend():
    D = decode_dims()[-1]
    Sq, ps = 3, 16
    c = make_case(3, 8, 2, Sq, D, [15, 0, 250], ps, FP16, DEV, 5)
    k1, v1 = c["k_pages"].clone(), c["v_pages"].clone()
    k2, v2 = c["k_pages"].clone(), c["v_pages"].clone()
    lens_before = c["lens"].clone()
    with torch.no_grad():
        a = attention_with_kvcache(c["q"], k1, v1, c["lens"], c["table"], c["k_new"], c["v_new"], num_splits=3,
                                   return_lse=True)
        append_reference(k2, v2, c["lens"], c["k_new"], c["v_new"], c["table"])
        b = attention_with_kvcache(c["q"], k2, v2, c["lens"] + Sq, c["table"], num_splits=3, return_lse=True)
    assert torch.equal(c["lens"], lens_before), "cache_seqlens must not be advanced"
    assert torch.equal(k1.view(torch.int16), k2.view(torch.int16)) and torch.equal(v1.view(torch.int16),
                                                                                    v2.view(torch.int16))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for bi, start in enumerate(lens_before.tolist()):
        pos = torch.arange(start, start + Sq, device=DEV)
        pages = c["table"][bi].long()[pos // ps]
        assert torch.equal(k1[pages, pos % ps], c["k_new"][bi].transpose(0, 1))
        assert torch.equal(v1[pages, pos % ps], c["v_new"][bi].transpose(0, 1))


@cuda
def test_gpu_rejected_call_leaves_cache_unchanged():
    D = decode_dims()[-1]
    c = make_case(2, 8, 2, 2, D, [40, 9], 16, BF16, DEV, 6)
    bad = c["table"].clone()
    bad[0, 1] = c["k_pages"].shape[0] + 5
    # Value checks read lengths and tables back (a sync): on CUDA only when asked for.
    _rejected_unchanged(c, r"block_table\[0, 1\]", block_table=bad, check_values=True)
    cap = c["table"].shape[1] * 16
    _rejected_unchanged(c, "exceeds the cache capacity", check_values=True,
                        cache_seqlens=torch.tensor([cap - 1, 0], dtype=torch.int32, device=DEV))
    _rejected_unchanged(c, "head_dim", q=torch.randn(2, 8, 2, 96, device=DEV, dtype=BF16))


@cuda
def test_gpu_garbage_values_are_clamped(variant):
    # Without check_values nothing reads lengths or tables on the host: the kernels clamp them. Negative and
    # over-capacity lengths, page indices out of range: no fault, finite output, and no write outside the pages
    # the table names (the spare pages of make_case are named by no entry).
    D = decode_dims()[-1]
    c = make_case(3, 8, 2, 2, D, [40, 9, 20], 16, BF16, DEV, 9, spare_pages=3)
    for t in (c["k_pages"], c["v_pages"]):
        t.nan_to_num_(0.0)  # empty slots are NaN in make_case: zeros here, so any output NaN is the kernel's
    used = c["table"].flatten()
    spare = torch.ones(c["k_pages"].shape[0], dtype=torch.bool, device=DEV)
    spare[used.long()] = False
    k_spare, v_spare = c["k_pages"][spare].clone(), c["v_pages"][spare].clone()
    cap = c["table"].shape[1] * 16
    bad = c["table"].clone()
    bad[0, 0], bad[1, 1], bad[2, 0] = -1, c["k_pages"].shape[0], 2**31 - 1
    for lens in ([-5, cap + 3, 2**31 - 1], [-(2**31), 0, cap - 1]):
        lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
        for table in (c["table"], bad):
            with torch.no_grad():
                out = attention_with_kvcache(c["q"], c["k_pages"], c["v_pages"], lens, table, c["k_new"], c["v_new"])
            torch.cuda.synchronize()
            assert torch.isfinite(out).all()
    assert torch.equal(c["k_pages"][spare], k_spare) and torch.equal(c["v_pages"][spare], v_spare)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, FP16, BF16])
def test_gpu_merge_states(dtype):
    D = decode_dims()[-1]
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 8, 3, D, generator=g).to(DEV, BF16)
    k = torch.randn(2, 2, 900, D, generator=g).to(DEV, BF16)
    v = torch.randn(2, 2, 900, D, generator=g).to(DEV, BF16)
    with torch.no_grad():
        oa, la = flashattn_ext.attention(q, k[:, :, :300], v[:, :, :300], return_lse=True)
        ob, lb = flashattn_ext.attention(q, k[:, :, 300:], v[:, :, 300:], return_lse=True)
    o, lse = merge_states(oa.to(dtype), la, ob.to(dtype), lb)
    assert o.dtype == dtype and o.is_contiguous()
    err, bound, ref_lse, ok = two_x_rule(o.to(BF16), q, k, v)
    assert err <= bound + 8e-3, f"{err:.3e} > {bound:.3e}"  # o_a, o_b were rounded to bf16 before the merge
    assert lse_check(lse, ref_lse)[1]
    ro, rl = merge_states_reference(oa.to(dtype), la, ob.to(dtype), lb)
    torch.testing.assert_close(o.float(), ro.float(), atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)
    torch.testing.assert_close(lse, rl, atol=1e-5, rtol=1e-5)
    # -inf sides with NaN garbage
    oa2 = oa.to(dtype).clone()
    la2 = la.clone()
    la2[:, :, 0] = float("-inf")
    oa2[:, :, 0] = float("nan")
    lb2 = lb.clone()
    lb2[:, 0, 0] = float("-inf")
    o2, l2 = merge_states(oa2, la2, ob.to(dtype), lb2)
    assert not torch.isnan(o2).any() and not torch.isnan(l2).any()
    assert torch.all(o2[:, 0, 0] == 0) and torch.all(torch.isneginf(l2[:, 0, 0]))
    torch.testing.assert_close(o2[:, 1:, 0].float(), ob.to(dtype)[:, 1:, 0].float(), atol=1e-2, rtol=1e-2)


@cuda
def test_gpu_cuda_graph_capture_and_replay(variant):
    D = decode_dims()[-1]
    B, Hq, Hkv, ps, max_pages = 4, 16, 4, 16, 40
    cache = PagedKVCache(B * max_pages, ps, Hkv, D, dtype=BF16, device=DEV)
    kp, vp = cache.layer(0)
    seqs = [cache.add_sequence(n) for n in (100, 5, 300, 0)]
    kp.normal_()
    vp.normal_()
    q = torch.randn(B, Hq, 1, D, device=DEV, dtype=BF16)
    k_new = torch.randn(B, Hkv, 1, D, device=DEV, dtype=BF16)
    v_new = torch.randn_like(k_new)
    first = cache.step(seqs, 1, max_pages=max_pages)
    lens, table = first.cache_seqlens.clone(), first.block_table.clone()  # the buffers the graph captures
    ws = DecodeWorkspace(B, Hq, 1, D)

    def step():
        return attention_with_kvcache(q, kp, vp, lens, table, k_new, v_new, workspace=ws, return_lse=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out, lse = step()

    g = torch.Generator().manual_seed(8)
    for it in range(3):
        # new query, new cache contents, new token and one more step of every sequence
        q.copy_(torch.randn(q.shape, generator=g))
        k_new.copy_(torch.randn(k_new.shape, generator=g))
        v_new.copy_(torch.randn(v_new.shape, generator=g))
        kp.copy_(torch.randn(kp.shape, generator=g))
        vp.copy_(torch.randn(vp.shape, generator=g))
        nxt = cache.step(seqs, 1 + it, max_pages=max_pages)  # room for more than the one token appended
        lens.copy_(nxt.cache_seqlens)
        table.copy_(nxt.block_table)
        k_eager, v_eager = kp.clone(), vp.clone()
        with torch.no_grad():
            want, want_lse = attention_with_kvcache(q, k_eager, v_eager, lens, table, k_new, v_new, workspace=ws,
                                                    return_lse=True)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want) and torch.equal(lse, want_lse), f"replay {it} differs from eager"
        assert torch.equal(kp, k_eager) and torch.equal(vp, v_eager), f"replay {it}: cache differs from eager"
        totals = (lens + 1).tolist()
        check_rows(out, lse, q, kp, vp, table, totals)
