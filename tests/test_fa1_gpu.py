"""FlashAttention-1 forward (torch.ops.flashattn_ext.fwd with algorithm="fa1") against the float64 reference
(flash-attn's 2x rule) and against the FA2 forward: same semantics (bottom-right masks, GQA, strides, odd sizes, empty rows).
Skipped without a GPU of compute capability >= 8.0 and a built extension."""
import pytest
import torch

import flashattn_ext  # noqa: F401  (loads the ops and their fake impls)
from flashattn_ext.api import kernel_window
from flashattn_ext.reference import visible_mask
from flashattn_ext.testing import (BF16, D_DEFAULT, DEVICE, FP16, lse_check, make_qkv, max_abs_err,
                                   need_head_dim, seed_of, two_x_rule)

pytestmark = pytest.mark.requires_cuda_ext


def check_fa1(q, k, v, causal=False, window=(-1, -1)):
    """fwd(algorithm="fa1") on (q, k, v): contract checks, 2x rule vs float64, lse, empty rows, and agreement with FA2."""
    need_head_dim(q.shape[-1])
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    scale = D**-0.5
    left, right = kernel_window(causal, window, Sq, Sk)
    with torch.no_grad():
        out, lse = torch.ops.flashattn_ext.fwd(q, k, v, scale, left, right, False, "fa1")
        out2, lse2 = torch.ops.flashattn_ext.fwd(q, k, v, scale, left, right)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride() == torch.empty_like(q).stride()
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    err, bound, ref_lse, ok = two_x_rule(out, q, k, v, causal=causal, window=window)
    assert ok, f"FA1: max |out - ref| = {err:.3e} > 2 * (low-precision reference error) + floor = {bound:.3e}"
    lse_err, lse_ok = lse_check(lse, ref_lse)
    assert lse_ok, f"FA1 lse: max err {lse_err:.3e}, or -inf rows differ from the reference"
    seen = visible_mask(Sq, Sk, causal, window, device=q.device).any(-1)
    assert torch.all(out[:, :, ~seen] == 0), "rows that see no key must be exactly 0"
    assert torch.all(torch.isneginf(lse[:, :, ~seen]))
    # FA1 and FA2 compute the same function: they may differ by rounding only, within the same 2x bound.
    diff = max_abs_err(out, out2)
    assert diff <= bound, f"max |FA1 - FA2| = {diff:.3e} > bound {bound:.3e}"
    lse_diff, lse_same = lse_check(lse, lse2)
    assert lse_same, f"max |lse FA1 - lse FA2| = {lse_diff:.3e}, or their -inf rows differ"
    return out, lse, seen


def run(B, Hq, Hkv, Sq, Sk, D, dtype, causal=False, window=(-1, -1), layout="bhsd"):
    need_head_dim(D)
    seed = seed_of(B, Hq, Hkv, Sq, Sk, D, dtype, causal, window, layout)
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, DEVICE, layout, seed=seed)
    return check_fa1(q, k, v, causal, window)


SEQS = [(1, 1), (17, 17), (97, 97), (128, 128), (1025, 1025), (17, 97), (97, 17), (1025, 128)]


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("group", [1, 4], ids=["mha", "gqa4"])
@pytest.mark.parametrize("Sq,Sk", SEQS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_fa1_matrix(dtype, D, causal, Sq, Sk, group, layout):
    run(2, 8, 8 // group, Sq, Sk, D, dtype, causal, layout=layout)


@pytest.mark.parametrize("Sq,Sk", [(97, 97), (17, 300), (300, 17)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [32, 96, 256])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_fa1_other_head_dims(dtype, D, causal, Sq, Sk):
    run(2, 4, 2, Sq, Sk, D, dtype, causal)


@pytest.mark.parametrize("Sq,Sk", [(97, 300), (300, 97), (1025, 1025)])
@pytest.mark.parametrize("window", [(0, 0), (16, 0), (3, 3), (-1, 5), (5, -1), (200, 200)])
def test_fa1_sliding_window(window, Sq, Sk):
    run(2, 4, 2, Sq, Sk, D_DEFAULT, BF16, causal=False, window=window)


@pytest.mark.parametrize("causal,window,Sq,Sk", [(True, (-1, -1), 300, 100), (False, (0, 0), 300, 100),
                                                 (True, (5, -1), 129, 1), (True, (-1, -1), 2, 1)])
def test_fa1_rows_that_see_no_key(causal, window, Sq, Sk):
    out, lse, seen = run(2, 4, 2, Sq, Sk, D_DEFAULT, FP16, causal, window)
    assert (~seen).any() and seen.any()  # the case really has both kinds of rows
    assert torch.all(torch.isfinite(lse[:, :, seen]))


def test_fa1_packed_qkv_views():
    # q/k/v sliced from one (B, S, 3, H, D) projection output: non-dense views with stride(-1) == 1.
    need_head_dim(D_DEFAULT)
    qkv = torch.randn(2, 300, 3, 8, D_DEFAULT, device=DEVICE, dtype=BF16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    check_fa1(q, k, v, causal=True)


def test_fa1_no_keys():
    need_head_dim(D_DEFAULT)
    q = torch.randn(2, 4, 9, D_DEFAULT, device=DEVICE, dtype=BF16)
    k = torch.randn(2, 2, 0, D_DEFAULT, device=DEVICE, dtype=BF16)
    out, lse = torch.ops.flashattn_ext.fwd(q, k, k, 0.1, -1, -1, False, "fa1")
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_fa1_opcheck():
    need_head_dim(D_DEFAULT)
    q, k, v = make_qkv(2, 4, 2, 97, 130, D_DEFAULT, FP16, DEVICE, "bshd")
    for window in [(-1, -1), (-1, 0), (16, 4)]:
        result = torch.library.opcheck(torch.ops.flashattn_ext.fwd.default,
                                       (q, k, v, 0.125, *window, False, "fa1"),
                                       test_utils=("test_schema", "test_faketensor"))
        assert set(result.values()) == {"SUCCESS"}, result
