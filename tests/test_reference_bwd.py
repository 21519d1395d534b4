"""attention_backward_reference (the FlashAttention backward formulas in PyTorch) against autograd of the
reference forward, and the block property ring attention relies on: with the global lse, the gradients of key
blocks add up to the gradients over all keys."""
import pytest
import torch

from flashattn_ext.reference import attention_reference, effective_window, visible_mask
from flashattn_ext.reference_bwd import attention_backward_reference
from flashattn_ext.testing import make_qkv

TOL = dict(atol=1e-11, rtol=1e-9)  # float64: the two computations differ only by summation order

CASES = [  # (B, Hq, Hkv, Sq, Sk, D, causal, window)
    (1, 1, 1, 1, 1, 8, False, (-1, -1)),
    (2, 3, 3, 17, 17, 16, True, (-1, -1)),
    (1, 4, 2, 33, 17, 8, True, (-1, -1)),     # Sq > Sk causal: the first 16 rows see nothing
    (2, 6, 3, 17, 65, 16, False, (-1, -1)),
    (1, 3, 1, 40, 40, 8, True, (5, -1)),      # causal local window
    (1, 2, 2, 23, 31, 8, False, (3, 4)),
    (1, 2, 1, 29, 13, 8, False, (0, 0)),      # some rows see no key
]


def lse64(q, k, scale, window):
    # attention_reference returns lse in float32 (the kernels' contract); these float64 checks need it exact.
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = visible_mask(q.shape[2], k.shape[2], False, window)
    return torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1)


def autograd_grads(q, k, v, dout, dlse, scale, window):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = attention_reference(q, k, v, scale=scale, window=window, return_lse=True)
    finite_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # -inf * 0 would be NaN
    loss = (out * dout).sum() + (finite_lse * dlse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return (out.detach(), lse64(q.detach(), k.detach(), scale, window)) + grads


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("with_dlse", [False, True])
def test_matches_autograd_of_reference(case, with_dlse):
    B, Hq, Hkv, Sq, Sk, D, causal, window = case
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, torch.float64, seed=Sq * 7 + Sk)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64)
    # float32 values: autograd rounds the lse gradient to lse's float32 on its way back
    dlse = torch.randn(B, Hq, Sq, generator=g) if with_dlse else torch.zeros(B, Hq, Sq)
    win = effective_window(causal, window)
    scale = 0.37
    out, lse, dq_ref, dk_ref, dv_ref = autograd_grads(q, k, v, dout, dlse.double(), scale, win)
    dq, dk, dv = attention_backward_reference(dout, q, k, v, out, lse, scale, win,
                                              dlse.double() if with_dlse else None)
    for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, **TOL)


def test_low_precision_inputs_return_their_dtype():
    q, k, v = make_qkv(1, 2, 1, 9, 9, 8, torch.bfloat16, seed=3)
    out, lse = attention_reference(q, k, v, return_lse=True)
    grads = attention_backward_reference(torch.ones_like(out), q, k, v, out, lse, 8**-0.5)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    want = autograd_grads(q.double(), k.double(), v.double(), torch.ones(out.shape, dtype=torch.float64),
                          torch.zeros(lse.shape, dtype=torch.float64), 8**-0.5, (-1, -1))[2:]
    for got, ref in zip(grads, want):
        assert (got.double() - ref).abs().max() < 0.05


@pytest.mark.parametrize("causal", [False, True])
def test_key_blocks_with_global_lse_add_up(causal):
    # Ring attention's backward: each key block's gradients from the global out and lse; dq sums over blocks.
    B, Hq, Hkv, S, D = 1, 4, 2, 24, 8
    q, k, v = make_qkv(B, Hq, Hkv, S, S, D, torch.float64, seed=11)
    dout = torch.randn(B, Hq, S, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    win = effective_window(causal, (-1, -1))
    out, lse, dq_ref, dk_ref, dv_ref = autograd_grads(q, k, v, dout, torch.zeros(B, Hq, S, dtype=torch.float64),
                                                      D**-0.5, win)
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for j0, j1 in ((0, 10), (10, 24)):
        # Keys [j0, j1) against all rows. Bottom-right alignment puts local row i at p' = i + (j1 - j0) - S in
        # block keys, i.e. global key p' + j0 = i - (S - j1): the global window shifted by S - j1.
        left, right = win
        shift = S - j1
        w = (left if left < 0 else left - shift, right if right < 0 else right + shift)
        bdq, bdk, bdv = attention_backward_reference(dout, q, k[:, :, j0:j1], v[:, :, j0:j1], out, lse, D**-0.5,
                                                     w)
        dq += bdq
        dks.append(bdk)
        dvs.append(bdv)
    torch.testing.assert_close(dq, dq_ref, **TOL)
    torch.testing.assert_close(torch.cat(dks, 2), dk_ref, **TOL)
    torch.testing.assert_close(torch.cat(dvs, 2), dv_ref, **TOL)
