"""CUDA forward kernels against the float64 reference: accuracy (flash-attn's 2x rule), masks, GQA, layouts,
robustness (poisoned memory, NaN padding, races, huge grids) and torch integration (opcheck, compile).
Skipped without a GPU of compute capability >= 8.0 and a built extension."""
import math

import pytest
import torch

import flashattn_ext
from flashattn_ext.reference import visible_mask
from flashattn_ext.testing import (BF16, BUILT_HEAD_DIMS, D_DEFAULT, DEVICE, FA3_HEAD_DIMS, FP16, FamilyUnderTest,
                                   HAS_FA3, lse_check, make_qkv, need_head_dim, seed_of, two_x_rule)

pytestmark = pytest.mark.requires_cuda_ext

OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")


# Every test here runs once per kernel family this GPU has (flashattn_ext.testing.GPU_FAMILIES).
FAMILY = FamilyUnderTest()
family = FAMILY.fixture()
attention = FAMILY.attention


def test_auto_picks_fa3_on_hopper():
    want = "fa3" if HAS_FA3 else "fa2"
    for D in FA3_HEAD_DIMS:
        if D in BUILT_HEAD_DIMS:
            assert flashattn_ext.resolve_algorithm("auto", DEVICE, D) == want
    if 96 in BUILT_HEAD_DIMS:
        assert flashattn_ext.resolve_algorithm("auto", DEVICE, 96) == "fa2"  # not a multiple of 64


def check(q, k, v, causal=False, window=(-1, -1), scale=None):
    """Run attention on (q, k, v) and assert everything the contract promises about the result."""
    need_head_dim(q.shape[-1])
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    with torch.no_grad():
        out, lse = attention(q, k, v, causal=causal, window=window, scale=scale, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert out.stride() == torch.empty_like(q).stride()  # q's layout (q's strides when q is dense)
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    err, bound, ref_lse, ok = two_x_rule(out, q, k, v, causal=causal, window=window, scale=scale)
    assert ok, f"max |out - ref| = {err:.3e} > 2 * (low-precision reference error) + floor = {bound:.3e}"
    lse_err, lse_ok = lse_check(lse, ref_lse)
    assert lse_ok, f"lse: max err {lse_err:.3e}, or -inf rows differ from the reference"
    seen = visible_mask(Sq, Sk, causal, window, device=q.device).any(-1)
    assert torch.all(out[:, :, ~seen] == 0), "rows that see no key must be exactly 0"
    return out, lse, seen


def run(B, Hq, Hkv, Sq, Sk, D, dtype, causal=False, window=(-1, -1), layout="bhsd", scale=None):
    need_head_dim(D)
    seed = seed_of(B, Hq, Hkv, Sq, Sk, D, dtype, causal, window, layout, scale)
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, DEVICE, layout, seed=seed)
    return check(q, k, v, causal, window, scale)


SEQS = [(1, 1), (17, 17), (97, 97), (128, 128), (1025, 1025), (17, 97), (97, 17), (1, 1025), (1025, 128),
        (128, 4096)]
HEADS = {"mha": (8, 8), "gqa4": (8, 2), "mqa": (8, 1)}


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("Sq,Sk", SEQS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_fwd_matrix(dtype, D, causal, Sq, Sk, heads, layout):
    Hq, Hkv = HEADS[heads]
    run(2, Hq, Hkv, Sq, Sk, D, dtype, causal, layout=layout)


@pytest.mark.parametrize("dtype,D,causal,Hkv", [(FP16, 128, True, 1), (BF16, 64, False, 4), (BF16, 128, True, 2)])
def test_fwd_long_4096(dtype, D, causal, Hkv):
    run(1, 4, Hkv, 4096, 4096, D, dtype, causal)


@pytest.mark.parametrize("Sq,Sk", [(97, 97), (17, 300), (300, 17)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [32, 96, 256])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_fwd_other_head_dims(dtype, D, causal, Sq, Sk):
    run(2, 4, 2, Sq, Sk, D, dtype, causal)


@pytest.mark.parametrize("Sq,Sk", [(97, 97), (97, 300), (300, 97), (1025, 1025)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", [(0, 0), (16, 0), (3, 3), (-1, 5), (5, -1), (64, -1), (200, 200)])
def test_fwd_sliding_window(window, causal, Sq, Sk):
    run(2, 8, 2, Sq, Sk, D_DEFAULT, BF16, causal, window)


@pytest.mark.parametrize("scale", [0.05, 1.0])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_fwd_custom_scale(dtype, scale):
    run(2, 8, 2, 200, 333, D_DEFAULT, dtype, causal=True, scale=scale)


@pytest.mark.parametrize("causal,window,Sq,Sk", [(True, (-1, -1), 300, 100), (False, (0, 0), 300, 100),
                                                 (True, (5, -1), 129, 1), (True, (-1, -1), 2, 1)])
def test_rows_that_see_no_key(causal, window, Sq, Sk):
    out, lse, seen = run(2, 4, 2, Sq, Sk, D_DEFAULT, FP16, causal, window)
    assert (~seen).any() and seen.any()  # the case really has both kinds of rows
    assert torch.all(out[:, :, ~seen] == 0) and torch.all(torch.isneginf(lse[:, :, ~seen]))
    assert torch.all(torch.isfinite(lse[:, :, seen]))


@pytest.mark.parametrize("shape_q,shape_kv", [((0, 4, 9), (0, 2, 9)), ((2, 0, 9), (2, 2, 9)), ((2, 4, 0), (2, 2, 9)),
                                              ((2, 4, 9), (2, 2, 0))])
def test_empty_inputs(shape_q, shape_kv):
    need_head_dim(D_DEFAULT)
    q = torch.randn(*shape_q, D_DEFAULT, device=DEVICE, dtype=BF16)
    k, v = (torch.randn(*shape_kv, D_DEFAULT, device=DEVICE, dtype=BF16) for _ in range(2))
    with torch.no_grad():
        out, lse = attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    if k.shape[2] == 0:
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_qkv_views(causal):
    # q/k/v sliced from one (B, S, 3, H, D) projection output: non-dense views with stride(-1) == 1.
    D = D_DEFAULT
    qkv = torch.randn(2, 300, 3, 8, D, device=DEVICE, dtype=BF16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out, _, _ = check(q, k, v, causal)
    assert out.stride() == (300 * 8 * D, D, 8 * D, 1)  # dense, (B, S, H, D) memory order


def test_packed_gqa_views():
    D, Hq, Hkv = D_DEFAULT, 8, 2
    x = torch.randn(2, 257, Hq + 2 * Hkv, D, device=DEVICE, dtype=FP16)  # fused GQA projection
    q, k, v = (x[:, :, :Hq], x[:, :, Hq:Hq + Hkv], x[:, :, Hq + Hkv:])
    check(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)


def test_no_reads_past_sequence_or_head_ends():
    # q/k/v are views into NaN-filled buffers: any load past Sq/Sk or past the last head would leak NaN.
    D, B, Hq, Hkv = D_DEFAULT, 2, 4, 2
    for Sq, Sk in [(97, 77), (17, 1025), (200, 130)]:
        views = []
        for H, S in [(Hq, Sq), (Hkv, Sk), (Hkv, Sk)]:
            buf = torch.full((B, H + 1, S + 64, D), math.nan, device=DEVICE, dtype=BF16)
            buf[:, :H, :S] = torch.randn(B, H, S, D, device=DEVICE, dtype=BF16)
            views.append(buf[:, :H, :S])
        check(*views, causal=True)
        check(*views, causal=False)


def test_outputs_fully_written_over_nan_poisoned_memory():
    # The op allocates out/lse with empty(): hand it blocks the caching allocator just saw filled with NaN.
    D = D_DEFAULT
    for Sq, Sk, causal in [(97, 300, True), (300, 100, True), (1025, 1025, False), (1, 17, False)]:
        q, k, v = make_qkv(2, 8, 2, Sq, Sk, D, BF16, DEVICE, seed=Sq)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        poison_out = torch.full_like(q, math.nan)
        poison_lse = torch.full((2, 8, Sq), math.nan, device=DEVICE)
        poisoned = {poison_out.data_ptr(), poison_lse.data_ptr()}
        del poison_out, poison_lse
        with torch.no_grad():
            out, lse = attention(q, k, v, causal=causal, return_lse=True)
        assert {out.data_ptr(), lse.data_ptr()} == poisoned, "test setup: allocator did not reuse the NaN blocks"
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        check(q, k, v, causal)


def test_same_inputs_same_bits_100_times():
    q, k, v = make_qkv(2, 8, 2, 1025, 1025, D_DEFAULT, BF16, DEVICE, seed=7)
    need_head_dim(D_DEFAULT)
    with torch.no_grad():
        out0, lse0 = attention(q, k, v, causal=True, return_lse=True)
        assert out0.abs().sum() > 0
        for _ in range(100):
            out, lse = attention(q, k, v, causal=True, return_lse=True)
            assert torch.equal(out, out0) and torch.equal(lse, lse0)


def test_side_stream():
    need_head_dim(D_DEFAULT)
    q, k, v = make_qkv(2, 8, 2, 513, 513, D_DEFAULT, FP16, DEVICE, seed=11)
    with torch.no_grad():
        want = attention(q, k, v, causal=True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            q2, k2, v2 = (t * 1 for t in (q, k, v))  # produced on the side stream
            got = attention(q2, k2, v2, causal=True)
        stream.synchronize()
    assert torch.equal(got, want)


def _sample_rows(t, idx, along_batch):
    return t[idx] if along_batch else t[:, idx]


@pytest.mark.parametrize("B,Hq,Hkv", [(65537, 1, 1), (1, 65537, 1), (257, 256, 256)])
def test_large_grid(B, Hq, Hkv):
    # B * Hq >= 65536 overflows gridDim.y/z if (batch, head) is mapped there naively.
    D = D_DEFAULT
    need_head_dim(D)
    g = torch.Generator(device=DEVICE).manual_seed(B + Hq)
    q = torch.randn(B, Hq, 17, D, device=DEVICE, dtype=BF16, generator=g)
    k, v = (torch.randn(B, Hkv, 17, D, device=DEVICE, dtype=BF16, generator=g) for _ in range(2))
    with torch.no_grad():
        out = attention(q, k, v, causal=True)
    assert not torch.isnan(out).any()
    along_batch = B > 1
    n = B if along_batch else Hq
    idx = torch.tensor(sorted({0, 1, n // 2, 65535 % n, 65536 % n, n - 1} |
                              set(torch.randint(0, n, (32,), generator=torch.Generator().manual_seed(0)).tolist())))
    qs, os_ = _sample_rows(q, idx, along_batch), _sample_rows(out, idx, along_batch)
    ks, vs = (t if (not along_batch and Hkv == 1) else _sample_rows(t, idx, along_batch) for t in (k, v))
    err, bound, _, ok = two_x_rule(os_, qs, ks, vs, causal=True)
    assert ok, f"sampled (batch, head) rows: max err {err:.3e} > bound {bound:.3e}"


class Block(torch.nn.Module):
    def forward(self, q, k, v):
        out, lse = attention(q, k, v, causal=True, return_lse=True)
        return out * 2, lse


def test_torch_compile_fullgraph_matches_eager():
    need_head_dim(D_DEFAULT)
    torch._dynamo.reset()
    model = Block()
    compiled = torch.compile(model, fullgraph=True)
    for Sq, Sk in [(128, 128), (97, 300), (200, 333)]:  # the later shapes recompile with dynamic sizes
        q, k, v = make_qkv(2, 8, 2, Sq, Sk, D_DEFAULT, BF16, DEVICE, layout="bshd", seed=Sq)
        with torch.no_grad():
            got, want = compiled(q, k, v), model(q, k, v)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["bhsd", "bshd", "packed"])
def test_opcheck(layout):
    need_head_dim(D_DEFAULT)
    if layout == "packed":
        qkv = torch.randn(2, 97, 3, 4, D_DEFAULT, device=DEVICE, dtype=FP16)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, k, v = make_qkv(2, 4, 2, 97, 130, D_DEFAULT, FP16, DEVICE, layout)
    for window in [(-1, -1), (-1, 0), (16, 4)]:
        result = torch.library.opcheck(torch.ops.flashattn_ext.fwd.default, (q, k, v, 0.125, *window),
                                       test_utils=OPCHECK_UTILS)
        assert set(result.values()) == {"SUCCESS"}, result


def aligned_fp16(n):
    """A 16-byte aligned fp16 buffer of n elements plus slack, for building bad views."""
    buf = torch.randn(n + 64, device=DEVICE, dtype=FP16)
    off = (-buf.data_ptr() // 2) % 8
    return buf[off:]


def test_cuda_argument_errors():
    D = D_DEFAULT
    need_head_dim(D)
    q, k, v = make_qkv(2, 4, 2, 64, 64, D, FP16, DEVICE)
    n = q.numel()
    misaligned = aligned_fp16(n)[1:n + 1].view_as(q)
    with pytest.raises(ValueError, match=r"^q\.data_ptr\(\) must be 16-byte aligned"):
        attention(misaligned, k, v)
    with pytest.raises(ValueError, match=r"^q\.data_ptr\(\) must be 16-byte aligned"):  # raw op: same C++ check
        torch.ops.flashattn_ext.fwd(misaligned, k, v, 0.1, -1, -1)
    padded_rows = torch.randn(2, 2, 64, D + 4, device=DEVICE, dtype=FP16)[..., :D]
    with pytest.raises(ValueError, match=r"^k strides .* multiples of 8"):
        attention(q, padded_rows, v)
    with pytest.raises(TypeError, match=r"^q\.dtype .* on CUDA, got float32"):
        attention(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match=r"same device: q is on cuda:\d, k is on cpu"):
        attention(q, k.cpu(), v)
    q.requires_grad_()
    assert attention(q, k, v).grad_fn is not None  # the backward exists (tests/test_bwd_gpu.py)
    with torch.no_grad():
        assert attention(q, k, v).shape == q.shape  # inference with requires_grad inputs is fine
    unsupported = next(d for d in (80, 72, 40, 160) if d not in BUILT_HEAD_DIMS)
    bad = torch.randn(1, 1, 8, unsupported, device=DEVICE, dtype=FP16)
    with pytest.raises(ValueError, match=rf"^head dim {unsupported} .* not supported"):
        attention(bad, bad, bad)
