"""integrations/unpad.py: padding masks -> packed attention_varlen, against torch SDPA with the same mask.

Needs no transformers: masks are built here the way transformers' sdpa_mask builds them (keep[j], and j at or
before the query's slot Sk - Sq + i when causal). Oracle: torch SDPA with that mask, per row; rows that see no key
must be 0. CPU runs float32 (the reference path of attention_varlen); GPU runs bf16 under the 2x rule and checks
that a cached plan runs without a host sync.
"""
import pytest
import torch
import torch.nn.functional as F

from flashattn_ext.integrations import unpad
from flashattn_ext.integrations.unpad import VarlenPlan, attention_unpadded, plan_from_mask


def keep_mask(B, Sk, pads, seed=0):
    """(B, Sk) bool; pads[b] is "none", "left", "right", "middle" or "all" for row b."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(B, Sk, dtype=torch.bool)
    for b, kind in enumerate(pads):
        n = int(torch.randint(1, max(2, Sk // 2), (1,), generator=g))
        if kind == "left":
            keep[b, :n] = False
        elif kind == "right":
            keep[b, Sk - n:] = False
        elif kind == "middle":
            keep[b, Sk // 3: Sk // 3 + n] = False
        elif kind == "all":
            keep[b] = False
    return keep


def mask_4d(keep, Sq, causal):
    """(B, 1, Sq, Sk) bool, True = visible, as transformers' sdpa_mask builds it."""
    B, Sk = keep.shape
    m = keep[:, None, None, :].expand(B, 1, Sq, Sk)
    if causal:
        m = m & torch.ones(Sq, Sk, dtype=torch.bool, device=keep.device).tril(Sk - Sq)
    return m


def qkv(B, Hq, Hkv, Sq, Sk, D, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g, device=device, dtype=dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g, device=device, dtype=dtype)
    return q, k, v


def sdpa_rows(q, k, v, mask):
    """torch SDPA with ``mask`` as (B, Sq, Hq, D) float32, rows that see no key set to 0."""
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                         enable_gqa=q.shape[1] != k.shape[1])
    sees = mask.any(-1, keepdim=True)  # (B, 1, Sq, 1)
    return torch.where(sees, out, 0.0).transpose(1, 2)


def run(q, k, v, mask, causal):
    plan = plan_from_mask(mask, q.shape[0], q.shape[2], k.shape[2], causal)
    assert isinstance(plan, VarlenPlan), plan
    out = attention_unpadded(q, k, v, plan, causal and q.shape[2] > 1, None)
    assert out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3]) and out.is_contiguous()
    return out, plan


# (Sq, Sk, causal, pads): prefill, decode (Sq 1) and cached chunks (Sq < Sk); bidirectional self and cross
CASES = [
    (17, 17, True, ("left", "right", "none")),
    (40, 40, True, ("right", "left")),
    (6, 23, True, ("middle", "right")),  # a chunk after a padded prefix: the holes are keys only
    (1, 23, True, ("left", "middle", "right")),  # right/middle padded generate: holes before the new token
    (5, 23, True, ("left", "none")),
    (1, 1, True, ("none",)),
    (17, 17, False, ("right", "none", "left")),
    (7, 13, False, ("right", "middle")),  # cross-attention shape: queries are not key slots
    (97, 97, True, ("left", "right")),
]


@pytest.mark.parametrize("Sq,Sk,causal,pads", CASES)
@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
def test_matches_sdpa_with_the_same_mask(Sq, Sk, causal, pads, additive):
    B = len(pads)
    keep = keep_mask(B, Sk, pads, seed=Sq * 100 + Sk)
    mask = mask_4d(keep, Sq, causal)
    q, k, v = qkv(B, 4, 2, Sq, Sk, 16, seed=Sq + Sk)
    given = torch.where(mask, 0.0, torch.finfo(torch.float32).min) if additive else mask
    out, plan = run(q, k, v, given, causal)
    torch.testing.assert_close(out, sdpa_rows(q, k, v, mask), atol=2e-5, rtol=2e-5)
    assert plan.total_k == int(keep.sum())


def test_right_padded_rows_see_every_key_in_a_second_pass():
    # The rows after a right-padded sequence's last token are what generate reads for the first new token.
    keep = keep_mask(2, 19, ("right", "none"), seed=3)
    mask = mask_4d(keep, 19, True)
    q, k, v = qkv(2, 2, 2, 19, 19, 8, seed=4)
    out, plan = run(q, k, v, mask, True)
    n_pad = int((~keep[0]).sum())
    assert plan.tail_rows is not None and plan.tail_rows.shape[0] == n_pad
    assert plan.total_q == int(keep.sum())
    ref = sdpa_rows(q, k, v, mask)
    torch.testing.assert_close(out[0, 19 - n_pad:], ref[0, 19 - n_pad:], atol=2e-5, rtol=2e-5)
    assert out[0, 19 - n_pad:].abs().amax() > 0


def test_rows_that_see_nothing_are_zero_and_empty_sequences_work():
    keep = keep_mask(3, 12, ("all", "left", "none"), seed=5)
    mask = mask_4d(keep, 12, True)
    q, k, v = qkv(3, 2, 1, 12, 12, 8, seed=6)
    out, _ = run(q, k, v, mask, True)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, sdpa_rows(q, k, v, mask), atol=2e-5, rtol=2e-5)
    out, plan = run(q[:1], k[:1], v[:1], mask[:1], True)  # nothing valid at all
    assert plan.total_k == 0 and torch.equal(out, torch.zeros_like(out))


def test_static_cache_decode_row_is_exact():
    # Sq 1 at slot 10 of a 16-slot static cache: the query's own (last) slot is a future slot; it sees every
    # valid key, so it runs in the non-causal pass and equals sdpa's row.
    keep = keep_mask(2, 16, ("left", "none"), seed=7)
    keep[:, 11:] = False
    mask = keep[:, None, None, :].clone()
    q, k, v = qkv(2, 2, 2, 1, 16, 8, seed=8)
    out, plan = run(q, k, v, mask, True)
    assert plan.total_q == 0 and plan.tail_rows.shape[0] == 2
    torch.testing.assert_close(out, sdpa_rows(q, k, v, mask), atol=2e-5, rtol=2e-5)


def test_two_d_mask_follows_the_flash_attention_convention():
    keep = keep_mask(3, 17, ("left", "right", "none"), seed=9)
    q, k, v = qkv(3, 4, 2, 17, 17, 16, seed=10)
    out, plan = run(q, k, v, keep.long(), True)
    ref = sdpa_rows(q, k, v, mask_4d(keep, 17, True))
    valid = keep[:, :, None, None]
    torch.testing.assert_close(out * valid, ref * valid, atol=2e-5, rtol=2e-5)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))  # every padded query row is 0, as in FA2
    out, _ = run(q, k, v, keep, False)  # bidirectional: every row computed
    torch.testing.assert_close(out, sdpa_rows(q, k, v, mask_4d(keep, 17, False)), atol=2e-5, rtol=2e-5)


def _sliding(B, S, w):
    i = torch.arange(S)
    return ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < w)).expand(B, 1, S, S)


@pytest.mark.parametrize("name", ["sliding", "static_prefill", "bias", "heads", "shape", "int4d", "partial_row",
                                  "causal_sq_gt_sk", "bidirectional_as_causal", "causal_as_bidirectional"])
def test_masks_that_are_not_padding_are_refused(name):
    B, S = 2, 12
    keep = keep_mask(B, S, ("left", "none"), seed=11)
    causal = True
    Sq, Sk = S, S
    if name == "sliding":
        mask = _sliding(B, S, 4) & keep[:, None, None, :]
    elif name == "static_prefill":  # queries at slots 0..7 of a 12-slot cache: not at the last slots
        Sq = 8
        mask = torch.ones(Sq, Sk, dtype=torch.bool).tril()[None, None].expand(B, 1, Sq, Sk) & keep[:, None, None, :]
    elif name == "bias":
        mask = torch.where(mask_4d(keep, S, True), 0.5, float("-inf"))
    elif name == "heads":
        mask = mask_4d(keep, S, True).expand(B, 2, S, S)
    elif name == "shape":
        mask = mask_4d(keep, S, True)[..., :-1]
    elif name == "int4d":
        mask = mask_4d(keep, S, True).int()
    elif name == "partial_row":  # a padded slot inside a prefill whose row sees only the keys before it
        keep = torch.ones(B, S, dtype=torch.bool)
        keep[0, 5] = False
        mask = mask_4d(keep, S, True)
    elif name == "causal_sq_gt_sk":
        Sq, Sk = S, S - 3
        mask = torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
    elif name == "bidirectional_as_causal":
        mask = mask_4d(keep, S, False)
    else:
        mask, causal = mask_4d(keep, S, True), False
    got = plan_from_mask(mask, B, Sq, Sk, causal)
    assert isinstance(got, str) and got, got


def test_plan_is_cached_per_mask_object_and_version():
    keep = keep_mask(2, 10, ("left", "right"), seed=12)
    mask = mask_4d(keep, 10, True).clone()
    first = plan_from_mask(mask, 2, 10, 10, True)
    assert plan_from_mask(mask, 2, 10, 10, True) is first  # the next layer: no second host read
    assert plan_from_mask(mask.clone(), 2, 10, 10, True) is not first
    assert plan_from_mask(mask, 2, 10, 10, False) is not first  # not reused for another causal flag
    first = plan_from_mask(mask, 2, 10, 10, True)
    mask[1, 0, :, :] = False  # in-place edit bumps the version counter
    again = plan_from_mask(mask, 2, 10, 10, True)
    assert again is not first and again.total_k == int(keep[0].sum())


def test_gradients_match_sdpa_on_rows_that_see_keys():
    keep = keep_mask(3, 15, ("left", "right", "none"), seed=13)
    mask = mask_4d(keep, 15, True)
    q, k, v = (t.double().requires_grad_() for t in qkv(3, 4, 2, 15, 15, 8, seed=14))
    out, _ = run(q, k, v, mask, True)
    sees = mask[:, 0].any(-1)[:, :, None, None]  # (B, Sq, 1, 1)
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(15)) * sees
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = sdpa_rows(qr, kr, vr, mask).double()
    want = torch.autograd.grad((ref * w).sum(), (qr, kr, vr))
    for g, r in zip(grads, want):
        torch.testing.assert_close(g, r.to(g.dtype), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------- GPU

@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("Sq,Sk,causal,pads", [(97, 97, True, ("left", "right", "none")),
                                               (1, 1025, True, ("left", "middle")),
                                               (33, 1025, True, ("left", "none")),
                                               (97, 97, False, ("right", "left")),
                                               (17, 17, False, ("all", "none"))])  # a sequence with no key
def test_gpu_bf16_within_2x_of_sdpa(Sq, Sk, causal, pads):
    import flashattn_ext

    D = 128 if 128 in flashattn_ext.build_info()["head_dims"] else flashattn_ext.build_info()["head_dims"][0]
    B = len(pads)
    keep = keep_mask(B, Sk, pads, seed=Sq + Sk).cuda()
    mask = mask_4d(keep, Sq, causal)
    q, k, v = qkv(B, 8, 2, Sq, Sk, D, device="cuda", dtype=torch.bfloat16, seed=Sq)
    out, _ = run(q, k, v, mask, causal)
    want = sdpa_rows(q.double(), k.double(), v.double(), mask)
    low = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    low = torch.where(mask.any(-1, keepdim=True), low, 0).transpose(1, 2)
    err, low_err = (out.double() - want).abs().max().item(), (low.double() - want).abs().max().item()
    assert err <= 2 * low_err + 1e-4, (err, low_err)


@pytest.mark.requires_cuda_ext
def test_gpu_cached_plan_runs_without_a_host_sync():
    keep = keep_mask(3, 200, ("left", "right", "none"), seed=16).cuda()
    mask = mask_4d(keep, 200, True)
    import flashattn_ext

    D = flashattn_ext.build_info()["head_dims"][0]
    q, k, v = qkv(3, 4, 2, 200, 200, D, device="cuda", dtype=torch.bfloat16, seed=17)
    plan = plan_from_mask(mask, 3, 200, 200, True)  # the one host read
    attention_unpadded(q, k, v, plan, True, None)  # warm-up
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = plan_from_mask(mask, 3, 200, 200, True)  # every later layer of the same forward
        attention_unpadded(q, k, v, again, True, None)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert again is plan and unpad._last["plan"] is plan
