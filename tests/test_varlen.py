"""attention_varlen: packed variable-length sequences. Oracles: a loop over sequences of attention() (metamorphic,
bitwise on the same family's kernels) and the float64 reference per sequence (flash-attn's 2x / 3x rules); masks,
GQA, Sq != Sk per sequence, empty sequences, poisoned outputs, errors, opcheck and torch.compile. Every GPU test of
the kernels runs once per family with varlen kernels (testing.GPU_FAMILIES: fa2, and fa3 on sm_90; `-k fa3` picks
the Hopper family's). CPU tests run everywhere; GPU tests skip without a GPU and a built extension."""
import functools
import math

import pytest
import torch

import flashattn_ext
from flashattn_ext.testing import (BF16, DEVICE, FA3_HEAD_DIMS, FP16, GPU_FAMILIES, HAS_FA3, LSE_ATOL, OUT_FLOOR,
                                   lse_check, max_abs_err, need_family, need_head_dim, seed_of)
from flashattn_ext.varlen import attention_varlen_reference

GRAD_FLOOR = 1e-4
# (Sq, Sk) per sequence: lengths {0, 1, 17, 1000, 4097} mixed, Sq != Sk in most, empty q or k sides.
SEQS_BIG = [(17, 17), (0, 5), (1000, 1000), (1, 1), (4097, 4097), (17, 1000), (5, 0), (1000, 17), (1, 4097)]
SEQS_GRAD = [(17, 17), (0, 5), (1000, 1000), (1, 17), (300, 1000), (5, 0), (1000, 17), (4097, 4097)]
SEQS_SMALL = [(17, 17), (0, 3), (1, 1), (200, 130), (4, 0), (33, 257)]
MASKS = {  # name: (causal, window)
    "full": (False, (-1, -1)),
    "causal": (True, (-1, -1)),
    "window": (False, (17, 5)),
    "causal_local": (True, (255, -1)),
}


def packed(seqs, Hq, Hkv, D, dtype, device, seed):
    """Random packed q (total_q, Hq, D), k/v (total_k, Hkv, D) and int32 cu_seqlens on `device`."""
    g = torch.Generator().manual_seed(seed)
    lq, lk = [s[0] for s in seqs], [s[1] for s in seqs]
    q, k, v = (torch.randn(sum(l), H, D, generator=g).to(device, dtype) for l, H in ((lq, Hq), (lk, Hkv), (lk, Hkv)))
    cu_q = torch.tensor([0] + lq, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    cu_k = torch.tensor([0] + lk, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    return q, k, v, cu_q, cu_k, max(lq, default=0), max(lk, default=0)


# ---- CPU: the reference path ---------------------------------------------------------------------------------

def test_cpu_equals_loop_of_attention():
    q, k, v, cu_q, cu_k, mq, mk = packed(SEQS_SMALL, 4, 2, 16, torch.float32, "cpu", 1)
    for causal, window in MASKS.values():
        out, lse = flashattn_ext.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal, window=window,
                                                  return_lse=True)
        assert out.shape == q.shape and lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
        for b in range(len(SEQS_SMALL)):
            rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            o_b, lse_b = flashattn_ext.attention(*(t[r].transpose(0, 1).unsqueeze(0) for t, r in
                                                   ((q, rq), (k, rk), (v, rk))),
                                                 causal=causal, window=window, return_lse=True)
            assert torch.equal(out[rq], o_b[0].transpose(0, 1)) and torch.equal(lse[:, rq], lse_b[0])
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        empty_rows = torch.isneginf(lse)
        assert (out.transpose(0, 1)[empty_rows] == 0).all()


def test_cpu_gradcheck():
    q, k, v, cu_q, cu_k, mq, mk = packed([(3, 5), (0, 2), (4, 4), (2, 0)], 2, 1, 8, torch.float64, "cpu", 2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):  # out only: lse is float32 by contract, too coarse for finite differences
        return flashattn_ext.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True)

    assert torch.autograd.gradcheck(f, (q, k, v))


def _cpu_args():
    q, k, v, cu_q, cu_k, mq, mk = packed([(5, 7), (3, 2)], 4, 2, 16, torch.float32, "cpu", 3)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk)


def test_cpu_takes_every_family_with_varlen():
    # The CPU path validates `algorithm` like CUDA: fa2 and fa3 have varlen kernels (same reference result on CPU).
    args = _cpu_args()
    base = flashattn_ext.attention_varlen(**args, causal=True)
    for algorithm in ("fa2", "fa3"):
        assert torch.equal(flashattn_ext.attention_varlen(**args, causal=True, algorithm=algorithm), base)


def _error_cases(device):
    """(name, changes to the arguments, exception, message fragment): checked by the C++ op on CUDA and by Python
    on CPU with the same messages."""
    i32 = dict(dtype=torch.int32, device=device)
    return [
        ("cu int64", dict(cu_seqlens_q=torch.tensor([0, 5, 8], device=device)), TypeError,
         "cu_seqlens_q.dtype must be int32"),
        ("cu 2-D", dict(cu_seqlens_k=torch.tensor([[0, 7, 9]], **i32)), ValueError, "cu_seqlens_k must be 1-D"),
        ("cu empty", dict(cu_seqlens_q=torch.tensor([], **i32)), ValueError, "cu_seqlens_q must be 1-D"),
        ("cu other device", dict(cu_seqlens_q=torch.tensor([0, 5, 8], dtype=torch.int32,
                                                           device="cpu" if device != "cpu" else "meta")),
         ValueError, "cu_seqlens_q must be on q's device"),
        ("batch mismatch", dict(cu_seqlens_k=torch.tensor([0, 9], **i32)), ValueError,
         "cu_seqlens_q and cu_seqlens_k must have the same length"),
        ("max_seqlen too small", dict(max_seqlen_q=3), ValueError, "max_seqlen_q=3 is too small"),
        ("max_seqlen negative", dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be >= 0"),
        ("max_seqlen float", dict(max_seqlen_k=7.0), TypeError, "max_seqlen_k must be an int"),
        ("q 4-D", dict(q="unsqueeze"), ValueError, "q must be 3-D"),
        ("fa1", dict(algorithm="fa1"), ValueError, r"algorithm='fa1' does not support varlen"),
        ("bad algorithm", dict(algorithm="fa9"), ValueError, "algorithm must be one of"),
    ]


def _apply(args, changes):
    args = dict(args)
    for key, value in changes.items():
        args[key] = args[key].unsqueeze(0) if value == "unsqueeze" else value
    return args


ERROR_CASES = [c[0] for c in _error_cases("cpu")]


def _error_case(name, device):
    return next(c for c in _error_cases(device) if c[0] == name)  # built lazily: CUDA tensors only where run


@pytest.mark.parametrize("name", ERROR_CASES)
def test_cpu_errors(name):
    _, changes, exc, match = _error_case(name, "cpu")
    with pytest.raises(exc, match=match):
        flashattn_ext.attention_varlen(**_apply(_cpu_args(), changes))


@pytest.mark.parametrize("cu_q, match", [([1, 5, 8], r"cu_seqlens_q\[0\] must be 0"),
                                         ([0, 6, 5], "must be non-decreasing"),
                                         ([0, 5, 7], r"cu_seqlens_q\[-1\] \(7\) must equal the packed rows \(8\)"),
                                         ([0, 1, 8], "max_seqlen_q=5 is too small")])
def test_cpu_checks_cu_seqlens_values(cu_q, match):
    # What the CUDA op leaves to the caller (it would need a host read) the CPU path checks.
    args = _cpu_args()
    args["cu_seqlens_q"] = torch.tensor(cu_q, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        flashattn_ext.attention_varlen(**args)


@pytest.mark.requires_ext
def test_meta_varlen_uses_fake_impls():
    # The fake impl gives lse (Hq, total_q); autograd through the fwd op's C++ function reaches the bwd fake.
    q, k, v = (torch.empty(s, h, 64, device="meta", dtype=BF16, requires_grad=True)
               for s, h in ((40, 8), (50, 2), (50, 2)))
    cu = torch.empty(4, dtype=torch.int32, device="meta")
    out, lse = torch.ops.flashattn_ext.fwd(q, k, v, 0.125, -1, 0, False, "auto", cu, cu, 20, 30)
    assert out.shape == q.shape and lse.shape == (8, 40) and lse.dtype == torch.float32
    dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (torch.empty_like(out), torch.empty_like(lse)))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


# ---- GPU: every family's kernels over packed sequences ----------------------------------------------------------

gpu = pytest.mark.requires_cuda_ext


@pytest.fixture(params=GPU_FAMILIES)
def family(request):
    """The kernel family under test (algorithm=): fa2 everywhere, fa3 on sm_90 with an sm_90a build."""
    return request.param


def _loop_of_attention(q, k, v, cu_q, cu_k, algorithm, **kwargs):
    """attention() once per sequence on views of the packed tensors: (out, lse) packed like varlen's."""
    out, lse = torch.empty_like(q), torch.empty(q.shape[1], q.shape[0], device=q.device)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o_b, lse_b = flashattn_ext.attention(*(t[r].transpose(0, 1).unsqueeze(0) for t, r in
                                               ((q, rq), (k, rk), (v, rk))),
                                             return_lse=True, algorithm=algorithm, **kwargs)
        out[rq] = o_b[0].transpose(0, 1)
        lse[:, rq] = lse_b[0]
    return out, lse


@gpu
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_forward_equals_loop_and_reference(family, dtype, D, mask):
    need_head_dim(D)
    need_family(family, D)
    causal, window = MASKS[mask]
    Hq, Hkv = (4, 2) if dtype == FP16 else (3, 3)
    q, k, v, cu_q, cu_k, mq, mk = packed(SEQS_BIG, Hq, Hkv, D, dtype, DEVICE, seed_of(dtype, D, mask))
    with torch.no_grad():
        out, lse = flashattn_ext.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal, window=window,
                                                  return_lse=True, algorithm=family)
        # The same kernels on one padded sequence at a time: a tile past a sequence's end must neither read into
        # its result (keys of the next sequence masked) nor write into the next sequence's rows.
        loop_out, loop_lse = _loop_of_attention(q, k, v, cu_q, cu_k, family, causal=causal, window=window)
        ref, ref_lse = attention_varlen_reference(q.double(), k.double(), v.double(), cu_q, cu_k, causal,
                                                  window=window)
        lowp, _ = attention_varlen_reference(q, k, v, cu_q, cu_k, causal, window=window, upcast=False)
    err, bound = max_abs_err(out, ref), 2 * max_abs_err(lowp, ref) + OUT_FLOOR
    assert err <= bound, (err, bound)
    # Bitwise equal where both calls run the same tiles. The Hopper forward at D64 picks its tile shape by the
    # grid's longest sequence (fwd_launch.cuh: 192-row / 96-key tiles from 2048 rows), so the packed call and a
    # short sequence's own call sum in different orders there: both are held to the reference instead.
    if family == "fa3" and D == 64:
        assert max_abs_err(loop_out, ref) <= bound, "a loop over sequences vs the reference"
        assert lse_check(loop_lse, ref_lse.float(), LSE_ATOL)[1], "a loop over sequences: lse"
    else:
        assert torch.equal(out, loop_out) and torch.equal(lse, loop_lse), "varlen != a loop over sequences"
    lse_err, ok = lse_check(lse, ref_lse.float(), LSE_ATOL)
    assert ok, lse_err
    assert (out.transpose(0, 1)[torch.isneginf(lse)] == 0).all()


def _grads(q, k, v, cu_q, cu_k, mq, mk, dout, dlse, fn, **kwargs):
    """(out, dq, dk, dv) of loss = <out, dout> + <lse over rows that see keys, dlse>."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, cu_q, cu_k, mq, mk, **kwargs)
    loss = (out.double() * dout.double()).sum() + (torch.where(torch.isfinite(lse), lse, 0.0).double() * dlse).sum()
    return (out, *torch.autograd.grad(loss, (q, k, v)))


def _kernel(q, k, v, cu_q, cu_k, mq, mk, **kwargs):
    return flashattn_ext.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, **kwargs)


def _reference(q, k, v, cu_q, cu_k, mq, mk, causal=False, window=(-1, -1), upcast=True):
    return attention_varlen_reference(q, k, v, cu_q, cu_k, causal, window=window, upcast=upcast)


def _check_backward(seqs, Hq, Hkv, D, dtype, causal, window, algorithm, deterministic=False):
    q, k, v, cu_q, cu_k, mq, mk = packed(seqs, Hq, Hkv, D, dtype, DEVICE, seed_of(seqs, D, dtype, causal, window))
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(q.shape, generator=g).to(DEVICE, dtype)
    dlse = torch.randn(Hq, q.shape[0], generator=g).to(DEVICE, torch.float64)
    kernel = functools.partial(_kernel, deterministic=deterministic, algorithm=algorithm)
    got = _grads(q, k, v, cu_q, cu_k, mq, mk, dout, dlse, kernel, causal=causal, window=window)
    ref = _grads(q.double(), k.double(), v.double(), cu_q, cu_k, mq, mk, dout, dlse, _reference, causal=causal,
                 window=window)
    lowp = _grads(q, k, v, cu_q, cu_k, mq, mk, dout, dlse, _reference, causal=causal, window=window, upcast=False)
    for name, a, r, lo, floor in zip(("out", "dq", "dk", "dv"), got, ref, lowp, (OUT_FLOOR,) + (GRAD_FLOOR,) * 3):
        err, bound = max_abs_err(a, r), (2 if name == "out" else 3) * max_abs_err(lo, r) + floor
        assert err <= bound, (name, err, bound)
    return got


@gpu
@pytest.mark.parametrize("mask", ["full", "causal", "window"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_backward_against_float64(family, dtype, D, mask):
    need_head_dim(D)
    need_family(family, D)
    causal, window = MASKS[mask]
    _check_backward(SEQS_GRAD, 4, 2, D, dtype, causal, window, family)


@gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_causal_local_window(family, deterministic):
    # A window and causal together, per sequence, through both dQ paths (atomics / the dQ kernel).
    need_head_dim(128)
    need_family(family, 128)
    _check_backward(SEQS_GRAD, 4, 1, 128, BF16, True, (255, -1), family, deterministic=deterministic)


@gpu
@pytest.mark.parametrize("D", [32, 96, 256])
def test_other_head_dims_forward_and_backward(family, D):
    # fa3 at D256: the Hopper forward with the FA2 backward (as attention() pairs them).
    need_head_dim(D)
    need_family(family, D)
    _check_backward(SEQS_SMALL, 4, 1, D, BF16, True, (-1, -1), family)
    _check_backward(SEQS_SMALL, 2, 2, D, FP16, False, (40, 3), family)


@gpu
def test_deterministic_backward_is_bitwise_and_accurate(family):
    need_head_dim(128)
    need_family(family, 128)
    first = _check_backward(SEQS_SMALL, 4, 2, 128, BF16, True, (-1, -1), family, deterministic=True)
    again = _check_backward(SEQS_SMALL, 4, 2, 128, BF16, True, (-1, -1), family, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@gpu
def test_outputs_fully_written_over_nan_poisoned_memory(family):
    need_head_dim(128)
    need_family(family, 128)
    q, k, v, cu_q, cu_k, mq, mk = packed(SEQS_SMALL, 4, 2, 128, BF16, DEVICE, 9)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    poison_out = torch.full_like(q, math.nan)
    poison_lse = torch.full((4, q.shape[0]), math.nan, device=DEVICE)
    poisoned = {poison_out.data_ptr(), poison_lse.data_ptr()}
    del poison_out, poison_lse
    with torch.no_grad():
        out, lse = flashattn_ext.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, return_lse=True,
                                                  algorithm=family)
    assert {out.data_ptr(), lse.data_ptr()} == poisoned, "test setup: allocator did not reuse the NaN blocks"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    # Gradients over poisoned memory too: every row of dq / dk / dv is written (zeros where nothing is seen).
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for deterministic in (False, True):
        out = flashattn_ext.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, deterministic=deterministic,
                                             algorithm=family)
        dout = torch.randn_like(out)
        torch.cuda.synchronize()
        junk = [torch.full_like(t, math.nan) for t in (q, k, v, q, k, v)]
        del junk
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        assert not any(torch.isnan(t).any() for t in (dq, dk, dv)), deterministic


@gpu
def test_empty_batches_and_empty_sides(family):
    need_head_dim(64)
    need_family(family, 64)
    for seqs in ([], [(0, 0)], [(0, 4), (0, 9)], [(3, 0), (5, 0)], [(0, 7), (5, 0), (130, 200), (0, 0)]):
        q, k, v, cu_q, cu_k, mq, mk = packed(seqs, 2, 2, 64, FP16, DEVICE, 4)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out, lse = flashattn_ext.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, algorithm=family)
        assert out.shape == q.shape and lse.shape == (2, q.shape[0])
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert all(g.shape == t.shape for g, t in zip((dq, dk, dv), (q, k, v)))
        if any(lq and lk for lq, lk in seqs):
            continue  # the mixed batch: checked against the reference below
        assert (out == 0).all() and torch.isneginf(lse).all()
        assert all((g == 0).all() for g in (dq, dk, dv))
    # The mixed batch: a sequence with both sides between empty ones, gradients against the reference.
    _check_backward([(0, 7), (5, 0), (130, 200), (0, 0)], 2, 2, 64, FP16, False, (-1, -1), family)


def _expected_auto_family(D):
    """The family "auto" runs the forward of head dim D with on this GPU: the padded call's rule."""
    return "fa3" if HAS_FA3 and D in FA3_HEAD_DIMS else "fa2"


@gpu
def test_auto_picks_the_family_of_the_padded_call():
    # "auto" for varlen is what it is for attention(): fa3 on sm_90 (its head dims), FA2 elsewhere; bitwise the
    # same as naming that family, forward and (deterministic) backward.
    need_head_dim(128)
    expected = _expected_auto_family(128)
    assert flashattn_ext.resolve_algorithm("auto", DEVICE, 128) == expected
    q, k, v, cu_q, cu_k, mq, mk = packed(SEQS_SMALL, 4, 2, 128, BF16, DEVICE, 6)
    results = []
    for algorithm in ("auto", expected):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, lse = flashattn_ext.attention_varlen(*leaves, cu_q, cu_k, mq, mk, causal=True, return_lse=True,
                                                  deterministic=True, algorithm=algorithm)
        results.append([out, lse, *torch.autograd.grad(out, leaves, torch.ones_like(out))])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _gpu_args():
    q, k, v, cu_q, cu_k, mq, mk = packed([(5, 7), (3, 2)], 4, 2, 64, FP16, DEVICE, 3)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk)


@gpu
@pytest.mark.parametrize("name", ERROR_CASES)
def test_gpu_errors_before_any_kernel(name):
    need_head_dim(64)
    _, changes, exc, match = _error_case(name, DEVICE)
    with pytest.raises(exc, match=match):
        flashattn_ext.attention_varlen(**_apply(_gpu_args(), changes))


@gpu
def test_raw_op_needs_both_cu_seqlens():
    need_head_dim(64)
    a = _gpu_args()
    with pytest.raises(ValueError, match="must be given together"):
        torch.ops.flashattn_ext.fwd(a["q"], a["k"], a["v"], 0.125, -1, -1, False, "auto", a["cu_seqlens_q"], None,
                                    5, 7)


@gpu
def test_no_host_sync_forward_and_backward(family):
    # cu_seqlens are never read on the host: the whole training step runs under sync debug mode "error".
    need_head_dim(64)
    need_family(family, 64)
    q, k, v, cu_q, cu_k, mq, mk = packed(SEQS_SMALL, 4, 2, 64, BF16, DEVICE, 12)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    # warm-up outside the mode
    out = flashattn_ext.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, algorithm=family)
    dout = torch.randn_like(out)
    torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = flashattn_ext.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, return_lse=True,
                                                  algorithm=family)
        grads = torch.autograd.grad((out, lse), (q, k, v), (dout, torch.zeros_like(lse)))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert len(grads) == 3


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@gpu
def test_opcheck_fwd_and_bwd(family):
    need_head_dim(64)
    need_family(family, 64)
    q, k, v, cu_q, cu_k, mq, mk = packed(SEQS_SMALL, 4, 2, 64, FP16, DEVICE, 8)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for window, det in [((-1, -1), True), ((-1, 0), False), ((16, 4), False)]:
        result = torch.library.opcheck(torch.ops.flashattn_ext.fwd.default,
                                       (q, k, v, 0.125, *window, det, family, cu_q, cu_k, mq, mk),
                                       test_utils=OPCHECK_UTILS)
        assert set(result.values()) == {"SUCCESS"}, result
    with torch.no_grad():
        out, lse = torch.ops.flashattn_ext.fwd(q, k, v, 0.125, -1, 0, False, family, cu_q, cu_k, mq, mk)
    for dlse in (None, torch.randn_like(lse)):
        args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.125, -1, 0, False, dlse,
                family, cu_q, cu_k, mq, mk)
        result = torch.library.opcheck(torch.ops.flashattn_ext.bwd.default, args,
                                       test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        assert set(result.values()) == {"SUCCESS"}, result


@gpu
def test_torch_compile_fullgraph_matches_eager(family):
    need_head_dim(64)
    need_family(family, 64)
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k, mq, mk = packed(SEQS_SMALL, 4, 2, 64, BF16, DEVICE, 10)

    def step(q, k, v, cu_q, cu_k):
        out, lse = flashattn_ext.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, return_lse=True,
                                                  algorithm=family)
        return out.float().square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        loss = fn(*leaves, cu_q, cu_k)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=2e-3, rtol=2e-2)
