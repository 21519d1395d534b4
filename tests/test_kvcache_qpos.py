"""The decode op's per-row query positions (``kvcache_fwd(..., q_pos=...)``, KvCacheParams::q_pos): row i of batch
b sits at key position q_pos[b, i] instead of bottom-right aligned. Longformer's global rows run through it
(flashattn_ext/global_tokens.py), so this checks the op alone against a dense reference with the same rule:
positions unordered, repeated, -1 and past the keys; GQA with several row blocks per kv head; causal, windows,
split counts; a paged cache; and the argument checks.
"""
import pytest
import torch

from flashattn_ext import _ops
from flashattn_ext.kvcache import decode_head_dims
from flashattn_ext.testing import lse_check, max_abs_err

BF16, FP16 = torch.bfloat16, torch.float16
cuda = pytest.mark.requires_cuda_ext


def positioned_reference(q, k, v, lens, pos, scale, left, right, compute):
    """(out, lse) with row i of batch b at position pos[b, i]: key j visible iff j < lens[b] and inside the window
    around pos (left / right < 0: unbounded). compute: float64 (the oracle) or q's dtype (the low-precision
    reference of flash-attn's 2x rule). Rows that see no key: out 0, lse -inf."""
    B, Hq, Sq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    j = torch.arange(S, device=q.device).view(1, 1, 1, S)
    p = pos.to(torch.int64).view(B, 1, Sq, 1)
    vis = j < lens.to(torch.int64).view(B, 1, 1, 1)
    if left >= 0:
        vis = vis & (j >= p - left)
    if right >= 0:
        vis = vis & (j <= p + right)
    kk = k.repeat_interleave(Hq // Hkv, dim=1).to(compute)
    vv = v.repeat_interleave(Hq // Hkv, dim=1).to(compute)
    s = (q.to(compute) @ kk.transpose(-1, -2)).double() * scale
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    prob = torch.exp(s - lse.nan_to_num(neginf=0.0).unsqueeze(-1))
    out = (prob.to(compute) @ vv).double()
    return out, lse.float()


def run_case(B, Hq, Hkv, Sq, D, S, lens, dtype, left, right, splits, seed, paged_page=0):
    g = torch.Generator().manual_seed(seed)
    dev = "cuda"
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dev, dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dev, dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dev, dtype)
    # unordered, repeated, -1 (sees no key when causal), past the last key
    pos = torch.randint(-1, S + 4, (B, Sq), generator=g, dtype=torch.int32)
    pos[0, 0] = -1
    if Sq > 2:
        pos[0, 2] = pos[0, 1]
    lens_t = torch.tensor(lens, dtype=torch.int32)
    scale = D ** -0.5
    if paged_page:  # the same keys in a paged cache, pages in reverse order
        n = -(-S // paged_page)
        kp = torch.zeros(B * n, paged_page, Hkv, D, dtype=dtype, device=dev)
        vp = torch.zeros_like(kp)
        table = torch.arange(B * n, dtype=torch.int32).flip(0).view(B, n).contiguous()
        for b in range(B):
            for t in range(S):
                page, row = table[b, t // paged_page].item(), t % paged_page
                kp[page, row] = k[b, :, t]
                vp[page, row] = v[b, :, t]
        k_cache, v_cache, bt = kp, vp, table.to(dev)
    else:
        k_cache, v_cache, bt = k, v, None
    out, lse = _ops.kvcache_fwd(q, k_cache, v_cache, lens_t.to(dev), bt, None, None, scale, left, right, splits,
                                None, pos.to(dev))
    ref, ref_lse = positioned_reference(q, k, v, lens_t.to(dev), pos.to(dev), scale, left, right, torch.float64)
    lowp, _ = positioned_reference(q, k, v, lens_t.to(dev), pos.to(dev), scale, left, right, dtype)
    err, bound = max_abs_err(out, ref), 2 * max_abs_err(lowp, ref) + 1e-3
    assert err <= bound, f"out error {err:.3e} > bound {bound:.3e}"
    lerr, ok = lse_check(lse, ref_lse)
    assert ok, f"lse error {lerr:.3e} or empty rows differ"


@cuda
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("left,right", [(-1, 0), (-1, -1), (37, 0), (-1, 5), (100, 20)])
@pytest.mark.parametrize("splits", [0, 1, 3])
def test_q_pos_matches_reference(D, dtype, left, right, splits):
    if D not in decode_head_dims():
        pytest.skip(f"head dim {D} not compiled for decode")
    # GQA 8/2 with 7 rows: 28 packed rows, two row blocks per kv head; one sequence of 0 keys
    run_case(3, 8, 2, 7, D, 333, [333, 100, 0], dtype, left, right, splits, seed=hash((D, left, right, splits)) % 997)


@cuda
@pytest.mark.parametrize("page", [1, 16])
def test_q_pos_paged_cache(page):
    D = decode_head_dims()[-1]
    run_case(2, 4, 4, 5, D, 70, [70, 33], BF16, -1, 0, 0, seed=page, paged_page=page)


@cuda
def test_q_pos_checks():
    D = decode_head_dims()[-1]
    q = torch.randn(2, 4, 3, D, device="cuda", dtype=BF16)
    k = torch.randn(2, 4, 50, D, device="cuda", dtype=BF16)
    lens = torch.full((2,), 50, dtype=torch.int32, device="cuda")
    good = torch.zeros(2, 3, dtype=torch.int32, device="cuda")
    for bad in (good[:, :2], good.to(torch.int64), good.t().contiguous().t(), good.cpu()):
        with pytest.raises(ValueError, match="q_pos"):
            _ops.kvcache_fwd(q, k, k.clone(), lens, None, None, None, 0.1, -1, 0, 0, None, bad)
    kn = torch.randn(2, 4, 3, D, device="cuda", dtype=BF16)
    with pytest.raises(ValueError, match="q_pos cannot be combined with k_new"):
        _ops.kvcache_fwd(q, k, k.clone(), lens, None, kn, kn.clone(), 0.1, -1, 0, 0, None, good)


@pytest.mark.requires_ext
def test_q_pos_fake_impl():
    if not _ops.HAS_KVCACHE_OP:
        pytest.skip("built without the kvcache ops")
    q = torch.empty(2, 8, 3, 128, device="meta", dtype=BF16)
    kc = torch.empty(2, 2, 40, 128, device="meta", dtype=BF16)
    lens = torch.empty(2, device="meta", dtype=torch.int32)
    pos = torch.empty(2, 3, device="meta", dtype=torch.int32)
    out, lse = torch.ops.flashattn_ext.kvcache_fwd(q, kc, kc.clone(), lens, None, None, None, 0.1, -1, 0, 0, None, pos)
    assert out.shape == q.shape and lse.shape == (2, 8, 3)
