"""CUDA backward against the float64 reference (autograd through flashattn_ext.reference): accuracy under
flash-attn's backward rule (3x the error of the same math done in the input dtype), masks, GQA, layouts,
non-contiguous dO, rows that see nothing, lse gradients, determinism and torch integration (opcheck, compile).
Skipped without a GPU of compute capability >= 8.0 and a built extension."""

import pytest
import torch

import flashattn_ext
from flashattn_ext.reference import attention_reference, visible_mask
from flashattn_ext.testing import (BF16, D_DEFAULT, DEVICE, FP16, HAS_FA3, FamilyUnderTest, make_qkv, max_abs_err,
                                   need_head_dim, seed_of)

pytestmark = pytest.mark.requires_cuda_ext

# Every test here runs once per kernel family this GPU has (flashattn_ext.testing.GPU_FAMILIES); with "fa3" the
# backward is the Hopper one at D64/D128 and FA2's after a fa3 forward at D256.
FAMILY = FamilyUnderTest()
family = FAMILY.fixture()
attention = FAMILY.attention


def test_auto_backward_family():
    """The Hopper backward serves "auto" where it exists; the C++ op resolves both directions the same way."""
    q = torch.randn(1, 2, 64, 128, device=DEVICE, dtype=BF16, requires_grad=True)
    out = flashattn_ext.attention(q, q, q, causal=True)
    out.sum().backward()  # runs whichever backward auto picks; the gradient checks below judge it
    assert q.grad is not None and not torch.isnan(q.grad).any()
    assert flashattn_ext.resolve_algorithm("auto", DEVICE, 128) == ("fa3" if HAS_FA3 else "fa2")

GRAD_FLOOR = 1e-4


def make_dout(shape, dtype, kind, seed):
    """dO with the layouts autograd hands the backward: contiguous, (B, S, H, D) transposed, sliced from a wider
    buffer (strides multiples of 8: used in place), or sliced with odd padding (copied by the C++ op)."""
    B, H, S, D = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "contiguous":
        t = torch.randn(B, H, S, D, generator=g)
    elif kind == "bshd":
        t = torch.randn(B, S, H, D, generator=g).transpose(1, 2)
    elif kind == "sliced":
        t = torch.randn(B, H, S, D + 16, generator=g)[..., :D]
    elif kind == "sliced_odd":
        t = torch.randn(B, H, S + 1, D + 3, generator=g)[:, :, 1:, :D]
    else:
        raise ValueError(kind)
    return t.to(device=DEVICE, dtype=dtype)


def reference_grads(q, k, v, dout, dlse, upcast, **kw):
    """(dq, dk, dv) of sum(out * dout) (+ sum(lse * dlse)) through the reference; float64 when upcast."""
    dt = torch.float64 if upcast else q.dtype
    leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
    out, lse = attention_reference(*leaves, return_lse=True, upcast=upcast, **kw)
    outputs, grads = [out], [dout.to(dt)]
    if dlse is not None:
        outputs.append(lse)
        grads.append(dlse.to(lse.dtype))
    return torch.autograd.grad(outputs, leaves, grads, allow_unused=True)


def check_grads(q, k, v, causal=False, window=(-1, -1), scale=None, dout_kind="contiguous", with_dlse=False,
                deterministic=False):
    """Gradients of attention(q, k, v) against the float64 reference under the 3x rule; returns them."""
    need_head_dim(q.shape[-1])
    seed = seed_of(tuple(q.shape), tuple(k.shape), causal, window, dout_kind)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = attention(q, k, v, causal=causal, window=window, scale=scale, return_lse=True,
                         deterministic=deterministic)
    dout = make_dout(out.shape, q.dtype, dout_kind, seed)
    dlse = torch.randn(lse.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed)) \
        if with_dlse else None
    outputs, grads_in = ((out, lse), (dout, dlse)) if with_dlse else ((out,), (dout,))
    got = torch.autograd.grad(outputs, (q, k, v), grads_in)
    kw = dict(causal=causal, window=window, scale=scale)
    ref = reference_grads(q, k, v, dout, dlse, upcast=True, **kw)
    lowp = reference_grads(q, k, v, dout, dlse, upcast=False, **kw)
    for name, g, r, lp, t in zip("qkv", got, ref, lowp, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype
        if t.is_cuda:  # the op's contract (the CPU reference path leaves layouts to autograd)
            assert g.stride() == torch.empty_like(t).stride(), f"d{name} must have {name}'s layout"
        assert not torch.isnan(g).any(), f"d{name} has NaN"
        err = max_abs_err(g, r)
        quant = max_abs_err(r.to(t.dtype), r)  # rounding the exact gradient to the dtype
        bound = 3 * max_abs_err(lp, r) + 2 * quant + GRAD_FLOOR
        assert err <= bound, f"d{name}: max err {err:.3e} > 3 * (low-precision reference error) + floor = {bound:.3e}"
    return got


def run(B, Hq, Hkv, Sq, Sk, D, dtype, causal=False, window=(-1, -1), layout="bhsd", **kw):
    need_head_dim(D)
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, DEVICE, layout, seed=seed_of(B, Hq, Hkv, Sq, Sk, D, dtype,
                                                                                     causal, window, layout))
    return check_grads(q, k, v, causal, window, **kw)


SEQS = [(1, 1), (17, 17), (97, 97), (128, 128), (1025, 1025), (17, 97), (97, 17), (1, 1025), (1025, 128)]
HEADS = {"mha": (4, 4), "gqa4": (8, 2), "mqa": (4, 1)}


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("Sq,Sk", SEQS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_bwd_matrix(dtype, D, causal, Sq, Sk, heads, layout):
    Hq, Hkv = HEADS[heads]
    # bshd inputs get a (B, S, H, D)-transposed dO, as a model's next op would produce.
    run(2, Hq, Hkv, Sq, Sk, D, dtype, causal, layout=layout, dout_kind="bshd" if layout == "bshd" else "contiguous")


@pytest.mark.parametrize("Sq,Sk", [(97, 97), (17, 300), (300, 17)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [32, 96, 256])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_bwd_other_head_dims(dtype, D, causal, Sq, Sk):
    run(2, 4, 2, Sq, Sk, D, dtype, causal)


@pytest.mark.parametrize("dout_kind", ["contiguous", "bshd", "sliced", "sliced_odd"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_bwd_dout_layouts(layout, dout_kind):
    run(2, 8, 2, 200, 333, D_DEFAULT, BF16, True, layout=layout, dout_kind=dout_kind)


def test_bwd_packed_qkv_and_expanded_dout():
    # q/k/v sliced from one packed projection (non-dense views); loss = out.sum() gives an all-stride-0 dO.
    D = D_DEFAULT
    need_head_dim(D)
    qkv = torch.randn(2, 300, 3, 8, D, device=DEVICE, dtype=FP16, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    attention(q, k, v, causal=True).float().sum().backward()
    ref_qkv = qkv.detach().double().requires_grad_()
    rq, rk, rv = (ref_qkv[:, :, i].transpose(1, 2) for i in range(3))
    attention_reference(rq, rk, rv, causal=True).sum().backward()
    lp_qkv = qkv.detach().clone().requires_grad_()
    lq, lk, lv = (lp_qkv[:, :, i].transpose(1, 2) for i in range(3))
    attention_reference(lq, lk, lv, causal=True, upcast=False).float().sum().backward()
    err, bound = max_abs_err(qkv.grad, ref_qkv.grad), 3 * max_abs_err(lp_qkv.grad, ref_qkv.grad) + 1e-3
    assert err <= bound, f"packed qkv grad: {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("Sq,Sk", [(97, 97), (97, 300), (300, 97)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", [(0, 0), (16, 0), (3, 3), (-1, 5), (64, -1), (200, 200)])
def test_bwd_sliding_window(window, causal, Sq, Sk):
    run(2, 8, 2, Sq, Sk, D_DEFAULT, BF16, causal, window)


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_bwd_custom_scale_and_lse_grad(dtype):
    # A loss that also uses lse (e.g. merging partial attention states): d lse / d scores = P.
    run(2, 8, 2, 200, 333, D_DEFAULT, dtype, causal=True, scale=0.3, with_dlse=True)
    run(2, 4, 4, 97, 97, D_DEFAULT, dtype, causal=False, with_dlse=True)


@pytest.mark.parametrize("causal,window,Sq,Sk", [(True, (-1, -1), 300, 100), (False, (0, 0), 300, 100),
                                                 (True, (5, -1), 129, 1)])
def test_bwd_rows_that_see_no_key(causal, window, Sq, Sk):
    dq, dk, dv = run(2, 4, 2, Sq, Sk, D_DEFAULT, FP16, causal, window, with_dlse=True)
    seen = visible_mask(Sq, Sk, causal, window, device=DEVICE).any(-1)
    assert (~seen).any() and seen.any()
    assert torch.all(dq[:, :, ~seen] == 0), "rows that see no key must get dq = 0"
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()


def test_bwd_keys_no_query_sees_get_zero_grads():
    # Window (2, 0) with Sk >> Sq: only keys near the last 17 positions are seen; whole K/V tiles are seen by no
    # query, and those keys must get dk = dv = 0 exactly.
    dq, dk, dv = run(1, 2, 1, 17, 300, D_DEFAULT, BF16, False, (2, 0))
    seen_keys = visible_mask(17, 300, False, (2, 0), device=DEVICE).any(0)
    assert torch.all(dk[:, :, ~seen_keys] == 0) and torch.all(dv[:, :, ~seen_keys] == 0)
    assert dk[:, :, seen_keys].abs().sum() > 0


@pytest.mark.parametrize("shape_q,shape_kv", [((2, 4, 0), (2, 2, 9)), ((2, 4, 9), (2, 2, 0)), ((0, 4, 9), (0, 2, 9))])
def test_bwd_empty_inputs(shape_q, shape_kv):
    need_head_dim(D_DEFAULT)
    q = torch.randn(*shape_q, D_DEFAULT, device=DEVICE, dtype=BF16, requires_grad=True)
    k, v = (torch.randn(*shape_kv, D_DEFAULT, device=DEVICE, dtype=BF16, requires_grad=True) for _ in range(2))
    attention(q, k, v, causal=True).float().sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.all(t.grad == 0)


@pytest.mark.parametrize("Hkv", [1, 8])
def test_bwd_deterministic_20_runs(Hkv):
    need_head_dim(D_DEFAULT)
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 8, Hkv, 1025, 1025, D_DEFAULT, BF16, DEVICE, "bshd", seed=3))
    dout = torch.randn_like(q)

    def grads():
        out = attention(q, k, v, causal=True, deterministic=True)
        return torch.autograd.grad(out, (q, k, v), dout)

    first = grads()
    for _ in range(19):
        assert all(torch.equal(a, b) for a, b in zip(grads(), first))


@pytest.mark.parametrize("Sq,Sk,causal", [(1025, 1025, True), (97, 300, False), (300, 97, True)])
def test_bwd_deterministic_accuracy(Sq, Sk, causal):
    run(2, 8, 2, Sq, Sk, D_DEFAULT, FP16, causal, deterministic=True, with_dlse=True)


def test_bwd_side_stream():
    need_head_dim(D_DEFAULT)
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 8, 2, 513, 513, D_DEFAULT, FP16, DEVICE, seed=11))
    dout = torch.randn_like(q)
    want = torch.autograd.grad(attention(q, k, v, causal=True, deterministic=True), (q, k, v), dout)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = torch.autograd.grad(attention(q, k, v, causal=True, deterministic=True), (q, k, v), dout)
    stream.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(got, want))


class TrainBlock(torch.nn.Module):
    """Projections -> attention -> output projection, the shape of a transformer layer's attention."""

    def __init__(self, dim, heads, kv_heads, head_dim):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.wq = torch.nn.Linear(dim, heads * head_dim, bias=False)
        self.wkv = torch.nn.Linear(dim, 2 * kv_heads * head_dim, bias=False)
        self.wo = torch.nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).view(B, S, 2, self.kv_heads, self.head_dim).unbind(2)
        out = attention(q, k.transpose(1, 2), v.transpose(1, 2), causal=True, deterministic=True)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


def test_torch_compile_fullgraph_training_step_matches_eager():
    need_head_dim(D_DEFAULT)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TrainBlock(256, 8, 2, D_DEFAULT).to(DEVICE, BF16)
    compiled = torch.compile(model, fullgraph=True)
    for S in (128, 200):
        x = torch.randn(2, S, 256, device=DEVICE, dtype=BF16)
        grads = []
        for m in (model, compiled):
            model.zero_grad(set_to_none=True)
            loss = m(x).float().square().mean()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for g_eager, g_compiled in zip(*grads):
            torch.testing.assert_close(g_compiled, g_eager, atol=2e-3, rtol=2e-2)


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_opcheck_fwd_with_autograd(layout):
    need_head_dim(D_DEFAULT)
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 97, 130, D_DEFAULT, FP16, DEVICE, layout))
    for window, det in [((-1, -1), True), ((-1, 0), True), ((16, 4), False)]:
        result = torch.library.opcheck(torch.ops.flashattn_ext.fwd.default, (q, k, v, 0.125, *window, det),
                                       test_utils=OPCHECK_UTILS)
        assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_bwd():
    need_head_dim(D_DEFAULT)
    q, k, v = make_qkv(2, 4, 2, 97, 130, D_DEFAULT, FP16, DEVICE, "bshd")
    with torch.no_grad():
        out, lse = attention(q, k, v, causal=True, return_lse=True)
    dout = torch.randn_like(out)
    for dlse in (None, torch.randn_like(lse)):
        args = (dout, q, k, v, out, lse, q.shape[-1] ** -0.5, -1, 0, True, dlse)
        result = torch.library.opcheck(torch.ops.flashattn_ext.bwd.default, args,
                                       test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        assert set(result.values()) == {"SUCCESS"}, result
