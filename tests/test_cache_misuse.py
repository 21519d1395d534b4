"""PagedKVCache / DecodeWorkspace cannot be misused silently: each pitfall of the old API either cannot be
expressed through ``step`` + ``attention`` or raises a clear error before anything is written. CPU, except the
last test (a CUDA cache's host copies cannot be passed to the CUDA op)."""
import pytest
import torch

from flashattn_ext import DecodeWorkspace, PagedKVCache, attention_with_kvcache
from flashattn_ext.cache import DecodeStep
from flashattn_ext.kvcache import decode_head_dims, gather_kv
from flashattn_ext.reference import attention_reference

HKV, HQ, D, PS = 2, 4, 8, 4


def new_cache(num_pages=12, num_layers=2):
    cache = PagedKVCache(num_pages, PS, HKV, D, num_layers=num_layers, dtype=torch.float32, device="cpu")
    cache.k_pages.normal_()
    cache.v_pages.normal_()
    return cache


def tokens(B, n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, HQ, n, D, generator=g), torch.randn(B, HKV, n, D, generator=g),
            torch.randn(B, HKV, n, D, generator=g))


def snapshot(cache):
    return cache.k_pages.clone(), cache.v_pages.clone()


def assert_unchanged(cache, snap):
    assert torch.equal(cache.k_pages, snap[0]) and torch.equal(cache.v_pages, snap[1]), "a refused call wrote"


# ---- the managed path is right by construction -----------------------------------------------------------

def test_step_gives_lengths_before_and_pages_after():
    cache = new_cache()
    a, b = cache.add_sequence(3), cache.add_sequence(0)
    step = cache.step([a, b], 2)
    assert isinstance(step, DecodeStep) and step.seqs == (a, b) and step.n_new == 2
    assert step.cache_seqlens.dtype == torch.int32 and step.cache_seqlens.device == cache.device
    assert step.cache_seqlens.tolist() == [3, 0] == list(step.lengths_before)
    assert cache.seqlens([a, b]).tolist() == [5, 2]
    assert step.block_table.dtype == torch.int32 and step.block_table.shape == (2, 2)
    assert step.block_table[0].tolist() == cache.pages(a)
    assert step.block_table[1].tolist() == cache.pages(b) + [-1]  # padding is no page, never page 0
    assert cache.step([a], 0, max_pages=5).block_table.shape == (1, 5)


def test_step_attention_prefill_then_decode_matches_reference():
    cache = new_cache()
    seqs = [cache.add_sequence() for _ in range(3)]
    keys = [torch.empty(1, HKV, 0, D) for _ in seqs]
    vals = [torch.empty(1, HKV, 0, D) for _ in seqs]
    for it, n in enumerate((5, 1, 1, 3)):  # a prefill of 5 tokens, two decode steps, a chunk of 3
        q, k_new, v_new = tokens(len(seqs), n, seed=it)
        step = cache.step(seqs, n)
        for layer in range(cache.num_layers):
            out, lse = cache.attention(step, layer, q, k_new, v_new, return_lse=True)
            for b in range(len(seqs)):
                if layer == 0:
                    keys[b] = torch.cat([keys[b], k_new[b:b + 1]], dim=2)
                    vals[b] = torch.cat([vals[b], v_new[b:b + 1]], dim=2)
                ref, ref_lse = attention_reference(q[b:b + 1], keys[b], vals[b], causal=True, return_lse=True)
                torch.testing.assert_close(out[b:b + 1], ref, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(lse[b:b + 1], ref_lse, atol=1e-5, rtol=1e-5)
                L = int(step.cache_seqlens[b]) + n
                kp, vp = cache.layer(layer)
                assert torch.equal(gather_kv(kp, step.block_table, b, L).unsqueeze(0), keys[b])
                assert torch.equal(gather_kv(vp, step.block_table, b, L).unsqueeze(0), vals[b])


def test_step_zero_new_tokens_attends_to_cached_keys():
    cache = new_cache(num_layers=1)
    s = cache.add_sequence()
    q, k_new, v_new = tokens(1, 6, seed=1)
    cache.attention(cache.step([s], 6), 0, q, k_new, v_new)
    out = cache.attention(cache.step([s], 0), 0, q[:, :, -2:])  # the last two queries again, nothing appended
    ref = attention_reference(q[:, :, -2:], k_new, v_new, causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---- the pitfalls raise -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", ["step", "extend", "free_other", "free_own"])
def test_stale_step_is_refused(change):
    cache = new_cache()
    a, b = cache.add_sequence(2), cache.add_sequence(2)
    step = cache.step([a], 1)
    if change == "step":
        cache.step([a], 1)       # step's lengths are now stale (off by one)
    elif change == "extend":
        cache.extend(a, 1)
    elif change == "free_other":
        cache.free(b)
    else:
        cache.free(a)
    q, k_new, v_new = tokens(1, 1, seed=2)
    snap = snapshot(cache)
    with pytest.raises(ValueError, match="step is stale"):
        cache.attention(step, 0, q, k_new, v_new)
    assert_unchanged(cache, snap)


def test_table_from_before_free_cannot_write_into_new_owner():
    # The case: a's step kept past free(a); c takes a's pages; the old step must not write into them.
    cache = new_cache(num_pages=2)
    a = cache.add_sequence(3)
    step_a = cache.step([a], 1)
    cache.free(a)
    c = cache.add_sequence(4)
    assert set(cache.pages(c)) & set(step_a.block_table[0].tolist())  # the page did change owner
    snap = snapshot(cache)
    q, k_new, v_new = tokens(1, 1, seed=3)
    with pytest.raises(ValueError, match="stale"):
        cache.attention(step_a, 0, q, k_new, v_new)
    assert_unchanged(cache, snap)


@pytest.mark.parametrize("n_new,given", [(1, 2), (2, 1), (1, None), (0, 1)])
def test_append_other_than_extended_is_refused(n_new, given):
    cache = new_cache()
    s = cache.add_sequence(3)  # 3 tokens in a 4-token page: one more fits, two would spill
    step = cache.step([s], n_new)
    q, k_new, v_new = tokens(1, given or 1, seed=4)
    if given is None:
        k_new = v_new = None
    snap = snapshot(cache)
    with pytest.raises(ValueError, match="k_new"):
        cache.attention(step, 0, q, k_new, v_new)
    assert_unchanged(cache, snap)


def test_raw_append_without_extend_cannot_write_page_zero():
    # Old pitfall: a table padded with 0 let an append without extend() write into page 0, which no sequence
    # owns. The host table is padded with -1, which attention_with_kvcache refuses for any slot it would use.
    cache = new_cache()
    s = cache.add_sequence(0)
    kp, vp = cache.layer(0)
    table = cache.block_table([s])
    assert table.tolist() == [[-1]]
    q, k_new, v_new = tokens(1, 1, seed=5)
    snap = snapshot(cache)
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = -1"):
        attention_with_kvcache(q, kp, vp, cache.seqlens([s]), table, k_new, v_new)
    assert_unchanged(cache, snap)


def test_host_copies_and_foreign_steps():
    cache, other = new_cache(), new_cache()
    s = cache.add_sequence(5)
    assert cache.seqlens([s]).device.type == "cpu" and cache.block_table([s]).device.type == "cpu"
    with pytest.raises(ValueError, match="another PagedKVCache"):
        other.attention(cache.step([s], 0), 0, tokens(1, 1, 0)[0])
    with pytest.raises(TypeError, match="DecodeStep"):
        cache.attention((cache.seqlens([s]), cache.block_table([s])), 0, tokens(1, 1, 0)[0])


def test_step_errors_change_nothing():
    cache = new_cache(num_pages=4)
    a, b = cache.add_sequence(4), cache.add_sequence(4)
    good = cache.step([a, b], 0)
    state = (cache.pages(a), cache.pages(b), cache.seqlens([a, b]).tolist(), cache.num_free_pages)
    with pytest.raises(RuntimeError, match=r"step\(seqs=\[0, 1\], n_new=8\) needs 4 more pages"):
        cache.step([a, b], 8)  # a alone would fit: all or nothing
    with pytest.raises(ValueError, match="max_pages"):
        cache.step([a], 4, max_pages=1)
    with pytest.raises(ValueError, match="twice"):
        cache.step([a, a], 1)
    with pytest.raises(ValueError, match="n_new must be >= 0"):
        cache.step([a], -1)
    with pytest.raises(TypeError, match="seqs must be a list"):
        cache.step(a, 1)
    with pytest.raises(KeyError, match="unknown sequence"):
        cache.step([a, 7], 1)
    assert (cache.pages(a), cache.pages(b), cache.seqlens([a, b]).tolist(), cache.num_free_pages) == state
    cache.check_step(good)  # refused calls did not invalidate the current step


# ---- constructors -------------------------------------------------------------------------------------------

CACHE_ARGS = dict(num_pages=4, page_size=2, num_kv_heads=1, head_dim=8, num_layers=1)


@pytest.mark.parametrize("name", list(CACHE_ARGS))
@pytest.mark.parametrize("bad,error", [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError),
                                       ("4", TypeError)])
def test_cache_constructor_names_bad_count(name, bad, error):
    with pytest.raises(error, match=f"PagedKVCache: {name} must be"):
        PagedKVCache(**{**CACHE_ARGS, name: bad}, device="cpu")


@pytest.mark.parametrize("dtype,match", [("float32", "dtype must be a torch.dtype"),
                                         (torch.int32, "dtype must be one of"), (None, "dtype must be a torch.dtype")])
def test_cache_constructor_dtype(dtype, match):
    with pytest.raises(TypeError, match=match):
        PagedKVCache(**CACHE_ARGS, dtype=dtype, device="cpu")


@pytest.mark.parametrize("device,error,match", [("nodevice", ValueError, "not a device name"),
                                                ("meta", ValueError, "cpu or cuda"), (1.5, TypeError, "device must")])
def test_constructors_device(device, error, match):
    with pytest.raises(error, match=f"PagedKVCache: .*{match}"):
        PagedKVCache(**CACHE_ARGS, device=device)
    with pytest.raises(error, match=f"DecodeWorkspace: .*{match}"):
        DecodeWorkspace(1, 4, 1, 8, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's defaults")
def test_constructors_default_to_cpu_without_cuda():
    assert PagedKVCache(**CACHE_ARGS).device.type == "cpu"
    assert DecodeWorkspace(1, 4, 1, 8).buffer.device.type == "cpu"
    for make in (lambda: PagedKVCache(**CACHE_ARGS, device="cuda"), lambda: DecodeWorkspace(1, 4, 1, 8, device="cuda")):
        with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
            make()


def test_layer_index_checked():
    cache = PagedKVCache(**{**CACHE_ARGS, "num_layers": 3}, device="cpu")
    assert cache.layer(2)[0].shape == (4, 2, 1, 8)
    for bad in (3, 5, -1):
        with pytest.raises(ValueError, match="layer must be"):
            cache.layer(bad)
    with pytest.raises(TypeError, match="layer must be an int"):
        cache.layer("0")


WS_ARGS = dict(batch=2, num_heads_q=4, seqlen_q=1, head_dim=8, max_splits=3)


@pytest.mark.parametrize("name", list(WS_ARGS))
@pytest.mark.parametrize("bad,error", [(0, ValueError), (-1, ValueError), (1.0, TypeError), (None, TypeError)])
def test_workspace_constructor_names_bad_count(name, bad, error):
    with pytest.raises(error, match=f"DecodeWorkspace: {name} must be"):
        DecodeWorkspace(**{**WS_ARGS, name: bad}, device="cpu")


def test_workspace_size_and_split_limit():
    ws = DecodeWorkspace(**WS_ARGS, device="cpu")
    assert ws.buffer.dtype == torch.float32 and ws.buffer.numel() == 3 * 2 * 4 * 1 * (8 + 1)
    with pytest.raises(ValueError, match="max_splits must be <= 256"):
        DecodeWorkspace(**{**WS_ARGS, "max_splits": 257}, device="cpu")


@pytest.mark.requires_cuda_ext
def test_gpu_host_copies_cannot_reach_the_kernel():
    # seqlens() read after extend() was the stale-length pitfall: on CUDA those host copies are refused outright.
    dims = decode_head_dims()
    if not dims:
        pytest.skip("this build has no decode head dim (64 or 128)")
    D = dims[-1]
    cache = PagedKVCache(8, 16, 2, D, dtype=torch.bfloat16)  # device=None on a CUDA machine: the current GPU
    assert cache.device.type == "cuda"
    s = cache.add_sequence(3)
    cache.extend(s, 1)
    kp, vp = cache.layer(0)
    q = torch.randn(1, 4, 1, D, device="cuda", dtype=torch.bfloat16)
    k_new = torch.randn(1, 2, 1, D, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"cache_seqlens .*on cpu"), torch.no_grad():
        attention_with_kvcache(q, kp, vp, cache.seqlens([s]), cache.block_table([s]).cuda(), k_new, k_new)
    step = cache.step([s], 1)
    with torch.no_grad():
        out = cache.attention(step, 0, q, k_new, k_new)
    assert out.shape == q.shape and not torch.isnan(out).any()
