"""FlashAttention-1 backward (torch.ops.flashattn_ext.bwd with algorithm="fa1", reached through autograd of
fwd(algorithm="fa1")) against the
float64 reference with autograd. Rule: max|dX - dX_ref64| <= 3 * max|dX_lowp - dX_ref64| + 1e-4, where lowp is
the reference computed in the input dtype (upcast=False). Skipped without a CUDA GPU (cc >= 8.0) and a built
extension."""
import pytest
import torch

import flashattn_ext  # noqa: F401  (loads the ops, their fake impls and fwd's autograd)
from flashattn_ext.api import kernel_window
from flashattn_ext.reference import attention_reference, visible_mask
from flashattn_ext.testing import (BF16, D_DEFAULT, DEVICE, FP16, make_qkv, max_abs_err,
                                   need_head_dim, seed_of)

pytestmark = pytest.mark.requires_cuda_ext

GRAD_FLOOR = 1e-4


def leaves(*ts):
    return [t.detach().requires_grad_() for t in ts]


def fa1_grads(q, k, v, dout, left, right, dlse=None):
    """(dq, dk, dv) of fwd(algorithm="fa1") through autograd; also returns (out, lse)."""
    ql, kl, vl = leaves(q, k, v)
    out, lse = torch.ops.flashattn_ext.fwd(ql, kl, vl, q.shape[-1] ** -0.5, left, right, False, "fa1")
    outs, grads = [out], [dout]
    if dlse is not None:
        outs.append(lse)
        grads.append(dlse)
    torch.autograd.backward(outs, grads)
    return (ql.grad, kl.grad, vl.grad), (out.detach(), lse.detach())


def ref_grads(q, k, v, dout, causal, window, upcast, dlse=None):
    """Reference gradients: float64 when upcast, else computed in the input dtype (the low-precision reference)."""
    if upcast:
        q, k, v = (t.double() for t in (q, k, v))
    ql, kl, vl = leaves(q, k, v)
    out, lse = attention_reference(ql, kl, vl, causal=causal, window=window, return_lse=True, upcast=upcast)
    outs, grads = [out], [dout.to(out.dtype)]
    if dlse is not None:
        outs.append(lse)
        grads.append(dlse.to(lse.dtype))
    torch.autograd.backward(outs, grads)
    return ql.grad, kl.grad, vl.grad


def grad_bounds(q, k, v, dout, causal, window, dlse=None):
    """(float64 reference grads, per-tensor bounds 3 * low-precision error + floor)."""
    ref = ref_grads(q, k, v, dout, causal, window, upcast=True, dlse=dlse)
    lowp = ref_grads(q, k, v, dout, causal, window, upcast=False, dlse=dlse)
    return ref, [3 * max_abs_err(lo, r) + GRAD_FLOOR for lo, r in zip(lowp, ref)]


def check_grads(grads, ref, bounds, what="FA1"):
    for name, g, r, bound in zip(("dq", "dk", "dv"), grads, ref, bounds):
        assert g.shape == r.shape
        assert not torch.isnan(g).any(), f"{what} {name} has NaN"
        err = max_abs_err(g, r)
        assert err <= bound, f"{what} {name}: max |d - ref64| = {err:.3e} > 3 * (low-precision error) + floor = {bound:.3e}"


def run(B, Hq, Hkv, Sq, Sk, D, dtype, causal=False, window=(-1, -1), layout="bhsd", with_dlse=False):
    need_head_dim(D)
    seed = seed_of(B, Hq, Hkv, Sq, Sk, D, dtype, causal, window, layout, with_dlse)
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, DEVICE, layout, seed=seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g).to(DEVICE, dtype)
    dlse = torch.randn(B, Hq, Sq, generator=g).to(DEVICE) if with_dlse else None
    left, right = kernel_window(causal, window, Sq, Sk)
    grads, (out, lse) = fa1_grads(q, k, v, dout, left, right, dlse)
    ref, bounds = grad_bounds(q, k, v, dout, causal, window, dlse)
    check_grads(grads, ref, bounds)
    # Rows that see no key get exactly zero dq.
    seen = visible_mask(Sq, Sk, causal, window, device=DEVICE).any(-1)
    assert torch.all(grads[0][:, :, ~seen] == 0), "dq rows that see no key must be exactly 0"
    return q, k, v, dout, grads, ref, bounds


SEQS = [(1, 1), (17, 17), (97, 97), (128, 128), (257, 257), (17, 97), (97, 17)]


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("group", [1, 4], ids=["mha", "gqa4"])
@pytest.mark.parametrize("Sq,Sk", SEQS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_fa1_bwd_matrix(dtype, D, causal, Sq, Sk, group, layout):
    run(2, 8, 8 // group, Sq, Sk, D, dtype, causal, layout=layout)


@pytest.mark.parametrize("Sq,Sk", [(97, 97), (17, 300), (300, 17)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [32, 96, 256])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_fa1_bwd_other_head_dims(dtype, D, causal, Sq, Sk):
    run(2, 4, 2, Sq, Sk, D, dtype, causal)


@pytest.mark.parametrize("Sq,Sk", [(97, 300), (300, 97), (1025, 1025)])
@pytest.mark.parametrize("window", [(0, 0), (16, 0), (3, 3), (-1, 5), (5, -1), (200, 200)])
def test_fa1_bwd_sliding_window(window, Sq, Sk):
    run(2, 4, 2, Sq, Sk, D_DEFAULT, BF16, causal=False, window=window)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fa1_bwd_long(causal):
    # Many query tiles per K/V tile and many K/V tiles per query tile: the dQ round trip over several visits.
    run(1, 4, 1, 1025, 1100, D_DEFAULT, FP16, causal)


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_fa1_bwd_lse_gradient(dtype):
    # A loss that uses lse too: d lse / d scores = P folds into D_i.
    run(2, 4, 2, 97, 130, D_DEFAULT, dtype, causal=True, with_dlse=True)


@pytest.mark.parametrize("causal,window,Sq,Sk", [(True, (-1, -1), 300, 100), (False, (0, 0), 300, 100),
                                                 (False, (0, 0), 100, 300), (True, (5, -1), 129, 1),
                                                 (True, (-1, -1), 2, 1)])
@pytest.mark.parametrize("group", [1, 2], ids=["mha", "gqa2"])  # direct dk/dv writes, fp32 atomics
def test_fa1_bwd_rows_and_keys_that_see_nothing(causal, window, Sq, Sk, group):
    _, _, _, _, grads, ref, _ = run(2, 4, 4 // group, Sq, Sk, D_DEFAULT, FP16, causal, window)
    for g in grads:
        assert torch.isfinite(g).all()
    # Keys that no query sees: exactly zero dk / dv.
    key_seen = visible_mask(Sq, Sk, causal, window, device=DEVICE).any(0)
    assert torch.all(grads[1][:, :, ~key_seen] == 0) and torch.all(grads[2][:, :, ~key_seen] == 0)


@pytest.mark.parametrize("kind", ["strided_last_dim", "odd_row_stride", "transposed", "expanded"])
def test_fa1_bwd_noncontiguous_dout(kind):
    need_head_dim(D_DEFAULT)
    B, H, Sq, Sk, D = 2, 4, 97, 130, D_DEFAULT
    q, k, v = make_qkv(B, H, H, Sq, Sk, D, FP16, DEVICE, "bhsd", seed=7)
    base = torch.randn(B, H, Sq, D, device=DEVICE, dtype=FP16)
    if kind == "strided_last_dim":
        dout = torch.stack([base, base], dim=-1).flatten(-2)[..., ::2]
    elif kind == "odd_row_stride":
        dout = torch.nn.functional.pad(base, (0, 1))[..., :D]
    elif kind == "transposed":
        dout = base.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        dout = base[:, :, :1].expand(B, H, Sq, D)
    assert torch.equal(dout, dout.contiguous()) and not dout.is_contiguous()
    scale = D**-0.5
    out, lse = torch.ops.flashattn_ext.fwd(q, k, v, scale, -1, 0, False, "fa1")
    got = torch.ops.flashattn_ext.bwd(dout, q, k, v, out, lse, scale, -1, 0, False, None, "fa1")
    want = torch.ops.flashattn_ext.bwd(dout.contiguous(), q, k, v, out, lse, scale, -1, 0, False, None, "fa1")
    for g, w in zip(got, want):  # MHA: no atomics anywhere, so bitwise equal
        assert torch.equal(g, w)
    grads, _ = fa1_grads(q, k, v, dout, -1, 0)  # and through autograd, against the reference
    ref, bounds = grad_bounds(q, k, v, dout, True, (-1, -1))
    check_grads(grads, ref, bounds)


def test_fa1_bwd_output_layout():
    need_head_dim(D_DEFAULT)
    q, k, v = make_qkv(2, 8, 2, 97, 130, D_DEFAULT, BF16, DEVICE, "bshd")
    out, lse = torch.ops.flashattn_ext.fwd(q, k, v, 0.1, -1, -1, False, "fa1")
    dq, dk, dv = torch.ops.flashattn_ext.bwd(torch.randn_like(out), q, k, v, out, lse, 0.1, -1, -1, False, None,
                                             "fa1")
    for g, t in zip((dq, dk, dv), (q, k, v)):
        assert g.dtype == t.dtype and g.shape == t.shape and g.stride() == torch.empty_like(t).stride()


@pytest.mark.parametrize("group", [1, 4], ids=["mha", "gqa4"])
def test_fa1_bwd_reproducible(group):
    # dq is never accumulated with atomics (one block owns each (batch, head)): bitwise reproducible. dk/dv are
    # too without GQA; with GQA the group's fp32 atomics may differ in the last bit.
    need_head_dim(D_DEFAULT)
    q, k, v = make_qkv(2, 8, 8 // group, 257, 257, D_DEFAULT, BF16, DEVICE, "bhsd", seed=3)
    dout = torch.randn_like(q)
    out, lse = torch.ops.flashattn_ext.fwd(q, k, v, 0.1, -1, 0, False, "fa1")
    a = torch.ops.flashattn_ext.bwd(dout, q, k, v, out, lse, 0.1, -1, 0, False, None, "fa1")
    b = torch.ops.flashattn_ext.bwd(dout, q, k, v, out, lse, 0.1, -1, 0, False, None, "fa1")
    assert torch.equal(a[0], b[0])
    if group == 1:
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


@pytest.mark.parametrize("Sq,Sk", [(0, 5), (5, 0)])
def test_fa1_bwd_empty(Sq, Sk):
    need_head_dim(D_DEFAULT)
    q, k, v = make_qkv(2, 4, 2, Sq, Sk, D_DEFAULT, FP16, DEVICE, "bhsd")
    (dq, dk, dv), _ = fa1_grads(q, k, v, torch.ones_like(q), -1, -1)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert all(torch.all(g == 0) for g in (dq, dk, dv))


@pytest.mark.skipif(not hasattr(torch.ops.flashattn_ext, "bwd"), reason="FA2 backward (flashattn_ext::bwd) not built")
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (16, 4))])
@pytest.mark.parametrize("group", [1, 4], ids=["mha", "gqa4"])
def test_fa1_bwd_matches_fa2(group, causal, window):
    # Same function, different algorithm: FA1 and FA2 gradients differ by rounding only, within the same bound.
    need_head_dim(D_DEFAULT)
    Sq, Sk = 257, 300
    q, k, v = make_qkv(2, 8, 8 // group, Sq, Sk, D_DEFAULT, BF16, DEVICE, "bshd", seed=11)
    dout = torch.randn_like(q)
    left, right = kernel_window(causal, window, Sq, Sk)
    fa1, _ = fa1_grads(q, k, v, dout, left, right)
    ql, kl, vl = leaves(q, k, v)
    out, _ = torch.ops.flashattn_ext.fwd(ql, kl, vl, D_DEFAULT**-0.5, left, right)
    out.backward(dout)
    fa2 = (ql.grad, kl.grad, vl.grad)
    ref, bounds = grad_bounds(q, k, v, dout, causal, window)
    check_grads(fa1, ref, bounds, "FA1")
    check_grads(fa2, ref, bounds, "FA2")
    for name, a, b, bound in zip(("dq", "dk", "dv"), fa1, fa2, bounds):
        diff = max_abs_err(a, b)
        assert diff <= bound, f"max |FA1 {name} - FA2 {name}| = {diff:.3e} > bound {bound:.3e}"


def test_fa1_bwd_opcheck():
    need_head_dim(D_DEFAULT)
    q, k, v = make_qkv(2, 4, 2, 97, 130, D_DEFAULT, FP16, DEVICE, "bshd")
    q, k, v = leaves(q, k, v)
    for window in [(-1, -1), (-1, 0), (16, 4)]:
        result = torch.library.opcheck(torch.ops.flashattn_ext.fwd.default, (q, k, v, 0.125, *window, False, "fa1"),
                                       test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        assert set(result.values()) == {"SUCCESS"}, result
    with torch.no_grad():
        out, lse = torch.ops.flashattn_ext.fwd(q, k, v, 0.125, -1, 0, False, "fa1")
    dout = torch.randn_like(out)
    for dlse in (None, torch.randn_like(lse)):
        result = torch.library.opcheck(torch.ops.flashattn_ext.bwd.default,
                                       (dout, q.detach(), k.detach(), v.detach(), out, lse, 0.125, -1, 0, False, dlse,
                                        "fa1"),
                                       test_utils=("test_schema", "test_faketensor"))
        assert set(result.values()) == {"SUCCESS"}, result
