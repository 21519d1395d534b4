"""The reference (and the CPU path of attention()) against torch SDPA and against masks built by hand."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import flashattn_ext
from flashattn_ext.api import kernel_window
from flashattn_ext.reference import attention_reference, effective_window, visible_mask
from flashattn_ext.testing import make_qkv

FLOATS = [torch.float32, torch.float64]
TOL = {torch.float32: dict(atol=2e-6, rtol=2e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}


def loop_mask(Sq, Sk, causal, window):
    """The CONTRACT's visibility rule written out element by element (independent of visible_mask)."""
    left, right = window
    if causal:
        right = 0 if right == -1 else min(right, 0)
    m = torch.zeros(Sq, Sk, dtype=torch.bool)
    for i in range(Sq):
        p = i + Sk - Sq
        for j in range(Sk):
            m[i, j] = (left < 0 or j >= p - left) and (right < 0 or j <= p + right)
    return m


def sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kw)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (5, 5), (33, 17), (17, 65)])
def test_no_mask_matches_sdpa(dtype, Sq, Sk):
    q, k, v = make_qkv(2, 3, 3, Sq, Sk, 16, dtype, seed=Sq * 100 + Sk)
    torch.testing.assert_close(attention_reference(q, k, v), sdpa(q, k, v), **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("S", [1, 7, 64])
def test_causal_square_matches_sdpa_is_causal(dtype, S):
    # With Sq == Sk bottom-right and top-left alignment coincide.
    q, k, v = make_qkv(2, 4, 4, S, S, 32, dtype, seed=S)
    torch.testing.assert_close(attention_reference(q, k, v, causal=True), sdpa(q, k, v, is_causal=True),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_matches_sdpa_enable_gqa(dtype, Hq, Hkv, causal):
    q, k, v = make_qkv(2, Hq, Hkv, 19, 19, 16, dtype, seed=Hq + Hkv)
    torch.testing.assert_close(attention_reference(q, k, v, causal=causal), sdpa(q, k, v, is_causal=causal),
                               **TOL[dtype])


@pytest.mark.parametrize("Sq,Sk", [(1, 9), (5, 40), (31, 32)])
def test_bottom_right_causal_matches_torch_causal_lower_right(Sq, Sk):
    q, k, v = make_qkv(1, 2, 2, Sq, Sk, 8, torch.float64, seed=Sk)
    expected = sdpa(q, k, v, attn_mask=causal_lower_right(Sq, Sk))
    torch.testing.assert_close(attention_reference(q, k, v, causal=True), expected, **TOL[torch.float64])


WINDOW_CASES = [(Sq, Sk, causal, w) for Sq, Sk in [(9, 9), (6, 13), (13, 6), (1, 5)]
                for causal in (False, True) for w in [(-1, -1), (0, 0), (2, -1), (-1, 3), (3, 1), (1, 4)]]


@pytest.mark.parametrize("Sq,Sk,causal,window", WINDOW_CASES)
def test_visible_mask_matches_contract_rule(Sq, Sk, causal, window):
    assert torch.equal(visible_mask(Sq, Sk, causal, window), loop_mask(Sq, Sk, causal, window))


@pytest.mark.parametrize("Sq,Sk,causal,window", WINDOW_CASES)
def test_masked_attention_matches_sdpa_with_explicit_mask(Sq, Sk, causal, window):
    mask = loop_mask(Sq, Sk, causal, window)
    seen = mask.any(-1)
    q, k, v = make_qkv(2, 4, 2, Sq, Sk, 8, torch.float64, seed=Sq + 7 * Sk)
    out, lse = attention_reference(q, k, v, causal=causal, window=window, return_lse=True)
    expected = sdpa(q, k, v, attn_mask=mask | ~seen[:, None])  # SDPA NaNs rows that see nothing
    torch.testing.assert_close(out[:, :, seen], expected[:, :, seen], **TOL[torch.float64])
    assert torch.all(out[:, :, ~seen] == 0)
    # lse from its definition, over the visible keys only
    kk = k.repeat_interleave(2, dim=1)
    s = (q @ kk.transpose(-1, -2)) / math.sqrt(8)
    ref_lse = torch.logsumexp(s.masked_fill(~mask, -math.inf), dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, Sq)
    torch.testing.assert_close(lse[:, :, seen], ref_lse[:, :, seen].float())
    assert torch.all(torch.isneginf(lse[:, :, ~seen]))


def test_fully_masked_rows_are_zero_with_neg_inf_lse():
    # Sq > Sk with causal: the first Sq - Sk rows see no key.
    q, k, v = make_qkv(2, 2, 2, 10, 4, 8, torch.float32, seed=1)
    out, lse = attention_reference(q, k, v, causal=True, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out[:, :, :6] == 0) and torch.all(torch.isneginf(lse[:, :, :6]))
    assert torch.all(out[:, :, 6:].abs().sum(-1) > 0) and torch.all(torch.isfinite(lse[:, :, 6:]))


def test_no_keys_gives_zeros_and_neg_inf():
    q, k, v = make_qkv(2, 4, 2, 5, 0, 8, torch.float32)
    for fn in (attention_reference, flashattn_ext.attention):
        out, lse = fn(q, k, v, return_lse=True)
        assert out.shape == q.shape and torch.all(out == 0)
        assert lse.shape == (2, 4, 5) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("shape_q,shape_kv", [((0, 2, 5, 8), (0, 1, 5, 8)), ((2, 0, 5, 8), (2, 1, 5, 8)),
                                              ((2, 2, 0, 8), (2, 1, 5, 8))])
def test_empty_query_gives_empty_outputs(shape_q, shape_kv):
    q, k, v = torch.randn(shape_q), torch.randn(shape_kv), torch.randn(shape_kv)
    out, lse = flashattn_ext.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == shape_q and lse.shape == shape_q[:3] and lse.dtype == torch.float32


@pytest.mark.parametrize("dtype", FLOATS)
def test_custom_scale_matches_sdpa(dtype):
    q, k, v = make_qkv(1, 2, 2, 12, 12, 16, dtype, seed=3)
    torch.testing.assert_close(attention_reference(q, k, v, scale=0.37, causal=True),
                               sdpa(q, k, v, scale=0.37, is_causal=True), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upcast_flag(dtype):
    q, k, v = make_qkv(2, 4, 4, 64, 64, 32, dtype, seed=5)
    exact = attention_reference(q.double(), k.double(), v.double(), causal=True)
    hi = attention_reference(q, k, v, causal=True)
    lo = attention_reference(q, k, v, causal=True, upcast=False)
    assert hi.dtype == lo.dtype == dtype
    err_hi, err_lo = (hi.double() - exact).abs().max(), (lo.double() - exact).abs().max()
    # fp32 math rounded once to the output dtype is never worse than doing the math in low precision
    assert 0 < err_lo and err_hi <= err_lo
    assert err_lo < (0.05 if dtype == torch.bfloat16 else 0.01)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", FLOATS + [torch.float16, torch.bfloat16])
def test_api_cpu_equals_reference(layout, dtype):
    q, k, v = make_qkv(2, 4, 2, 11, 23, 16, dtype, layout=layout, seed=9)
    out, lse = flashattn_ext.attention(q, k, v, causal=True, window=(5, -1), scale=0.2, return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, causal=True, window=(5, -1), scale=0.2, return_lse=True)
    assert out.dtype == dtype and out.stride() == q.stride()  # q's layout, like the CUDA op
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    assert torch.equal(flashattn_ext.attention(q, k, v, causal=True, window=[5, -1], scale=0.2), ref)


def test_api_cpu_non_dense_q_gives_dense_out_in_q_order():
    # empty_like (used by the CUDA op too) keeps q's dimension order: packed qkv -> (B, S, H, D) memory
    qkv = torch.randn(2, 7, 3, 4, 16)  # packed (B, S, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = flashattn_ext.attention(q, k, v)
    assert out.stride() == (7 * 4 * 16, 16, 4 * 16, 1)
    torch.testing.assert_close(out, sdpa(q, k, v))


def test_cpu_autograd_matches_sdpa():
    q, k, v = make_qkv(2, 4, 2, 9, 9, 8, torch.float64, seed=2)
    grads = []
    for fn in (lambda a, b, c: flashattn_ext.attention(a, b, c, causal=True),
               lambda a, b, c: sdpa(a, b, c, is_causal=True)):
        a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
        fn(a, b, c).square().sum().backward()
        grads.append((a.grad, b.grad, c.grad))
    for g_ours, g_sdpa in zip(*grads):
        torch.testing.assert_close(g_ours, g_sdpa)


def test_cpu_gradcheck_with_window_gqa_and_empty_rows():
    q, k, v = make_qkv(1, 4, 2, 7, 4, 3, torch.float64, seed=4)  # Sq > Sk causal: 3 rows see nothing
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fn = lambda a, b, c: flashattn_ext.attention(a, b, c, causal=True, window=(1, -1))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    out = fn(q, k, v)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(q.grad[:, :, :3] == 0)  # rows that see nothing have no influence


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (0, 0), (3, 2), (100, 100), (2**40, -1), (-1, 2**40)])
@pytest.mark.parametrize("Sq,Sk", [(7, 7), (3, 11), (11, 3)])
def test_kernel_window_keeps_the_mask(causal, window, Sq, Sk):
    left, right = kernel_window(causal, window, Sq, Sk)
    assert left < 2**31 and right < 2**31  # fits the kernel's int
    assert (left, right) == effective_window(causal, window) or -1 in (left, right)
    assert torch.equal(visible_mask(Sq, Sk, False, (left, right)), loop_mask(Sq, Sk, causal, window))


def test_causal_folds_into_window():
    assert effective_window(True, (-1, -1)) == (-1, 0)
    assert effective_window(True, (8, -1)) == (8, 0)
    assert effective_window(True, (8, 4)) == (8, 0)
    assert effective_window(False, (8, 4)) == (8, 4)


def test_cpu_lse_gradient_matches_logsumexp():
    # The CUDA backward differentiates lse too (d lse / d scores = P); check the oracle's lse gradient against an
    # independent float64 logsumexp (gradcheck cannot: lse is returned as float32).
    q, k, v = make_qkv(1, 4, 2, 6, 4, 3, torch.float64, seed=5)  # Sq > Sk causal: 2 rows see nothing
    w = torch.randn(1, 4, 6, dtype=torch.float64)
    grads = []
    for ours in (True, False):
        a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
        if ours:
            _, lse = flashattn_ext.attention(a, b, v, causal=True, return_lse=True, scale=0.7)
        else:
            s = (a @ b.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.7
            s = s.masked_fill(~visible_mask(6, 4, causal=True), float("-inf"))
            lse = torch.logsumexp(s, dim=-1)
        seen = torch.isfinite(lse)
        (lse[seen].double() * w[seen]).sum().backward()
        grads.append((a.grad, b.grad))
    for g_ours, g_ref in zip(*grads):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-5)


# ---- the O(S) paths against the dense formulation (upcast=False in float64 is the old dense reference) -------

def dense(q, k, v, **kw):
    return attention_reference(q, k, v, upcast=False, return_lse=True, **kw)


GRAD_CASES = [  # (Hq, Hkv, Sq, Sk, causal, window): fused (no mask, square causal) and blocked (everything else)
    (2, 2, 17, 17, False, (-1, -1)), (4, 2, 17, 17, True, (-1, -1)), (2, 1, 5, 23, False, (-1, -1)),
    (2, 2, 13, 29, True, (-1, -1)), (2, 2, 29, 13, True, (-1, -1)), (4, 2, 31, 31, True, (4, -1)),
    (2, 2, 19, 19, False, (3, 2)), (2, 2, 9, 20, False, (-1, 1)), (2, 2, 20, 9, False, (2, -1)),
    (2, 2, 11, 11, False, (0, 0)), (2, 2, 7, 4, True, (1, -1)),
]


@pytest.mark.parametrize("Hq,Hkv,Sq,Sk,causal,window", GRAD_CASES)
@pytest.mark.parametrize("block_elements", [None, 64])  # 64: many small blocks, every block boundary exercised
@pytest.mark.parametrize("fused", [True, False])  # False: the blocked path for every mask, as on CUDA tensors
def test_blocked_and_fused_match_dense_values_and_gradients(monkeypatch, Hq, Hkv, Sq, Sk, causal, window,
                                                            block_elements, fused):
    if block_elements:
        monkeypatch.setattr(flashattn_ext.reference, "BLOCK_ELEMENTS", block_elements)
    if not fused:
        monkeypatch.setattr(flashattn_ext.reference, "_use_fused", lambda *args: False)
    q, k, v = make_qkv(2, Hq, Hkv, Sq, Sk, 8, torch.float64, seed=Sq * 31 + Sk)
    g = torch.Generator().manual_seed(Sq + Sk)
    w_out = torch.randn(q.shape, generator=g, dtype=torch.float64)
    w_lse = torch.randn(q.shape[:3], generator=g, dtype=torch.float64)
    results = []
    for fn in (attention_reference, dense):
        a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = fn(a, b, c, causal=causal, window=window, scale=0.3, **({"return_lse": True}
                                                                          if fn is attention_reference else {}))
        seen = torch.isfinite(lse)
        loss = (out * w_out).sum() + (lse[seen].double() * w_lse[seen]).sum()
        results.append((out, lse, *torch.autograd.grad(loss, (a, b, c))))
    ours, ref = results
    torch.testing.assert_close(ours[0], ref[0], atol=1e-12, rtol=1e-12)
    assert torch.equal(torch.isneginf(ours[1]), torch.isneginf(ref[1]))
    torch.testing.assert_close(ours[1], ref[1], atol=1e-6, rtol=1e-6)  # lse is returned as float32
    for name, g_ours, g_ref in zip("qkv", ours[2:], ref[2:]):
        assert torch.isfinite(g_ours).all(), f"d{name} not finite"
        torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (5, -1))])
def test_output_only_gradients_match_dense(causal, window):
    # dlse is None here: the fused path takes aten's own backward
    q, k, v = make_qkv(1, 4, 4, 40, 40, 16, torch.float64, seed=6)
    grads = []
    for up in (True, False):
        a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
        attention_reference(a, b, c, causal=causal, window=window, upcast=up).square().sum().backward()
        grads.append((a.grad, b.grad, c.grad))
    for g_ours, g_ref in zip(*grads):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=1e-10)


MEMORY_SCRIPT = """
import resource, sys, torch
from flashattn_ext.reference import attention_reference
S, causal, window, Sq = 16384, {causal}, {window}, {sq}
q = torch.randn(1, 2, Sq, 16); k = torch.randn(1, 2, S, 16); v = torch.randn(1, 2, S, 16)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out, lse = attention_reference(q, k, v, causal=causal, window=window, return_lse=True)
assert torch.isfinite(out).all()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


@pytest.mark.parametrize("causal,window,sq", [(True, (-1, -1), 16384), (False, (256, 0), 16384),
                                              (True, (-1, -1), 16000)])
def test_memory_is_linear_in_sequence_length(causal, window, sq):
    # One (Sq, Sk) float32 score matrix of 2 heads at S = 16k is 2 GiB; the O(S) paths stay far below it.
    import subprocess
    import sys
    from pathlib import Path
    script = MEMORY_SCRIPT.format(causal=causal, window=window, sq=sq)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    grew_mib = int(res.stdout.split()[-1])
    assert grew_mib < 400, f"peak RSS grew by {grew_mib} MiB (a dense score matrix is 2048 MiB)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the oracle's blocked path there)")
@pytest.mark.parametrize("Hq,Hkv,Sq,Sk,causal,window", GRAD_CASES[:6] + [(2, 2, 300, 700, True, (64, 0))])
def test_oracle_on_cuda_equals_cpu(Hq, Hkv, Sq, Sk, causal, window):
    # CUDA tensors take the blocked path (the fused kernel is CPU-only): same values and gradients in float64.
    q, k, v = make_qkv(2, Hq, Hkv, Sq, Sk, 16, torch.float64, seed=Sq + 7 * Sk)
    w = torch.randn(q.shape, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        a, b, c = (t.to(device).requires_grad_() for t in (q, k, v))
        out, lse = attention_reference(a, b, c, causal=causal, window=window, return_lse=True)
        seen = torch.isfinite(lse)
        loss = (out * w.to(device)).sum() + lse[seen].double().sum()
        results.append([t.cpu() for t in (out, lse, *torch.autograd.grad(loss, (a, b, c)))])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
