"""flashattn_ext.sdpa: SDPA's signature and semantics (top-left is_causal), path counters, sdpa_strict.

CPU: the flashattn_ext path is attention()'s pure-PyTorch reference, so every mapping (top-left causal for any
Sq/Sk, GQA, scale) is checked against torch SDPA here. GPU tests check the kernel path is taken and accurate.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import flashattn_ext
from flashattn_ext import sdpa, sdpa_stats, reset_sdpa_stats, sdpa_strict
from flashattn_ext.reference import visible_mask
from flashattn_ext.testing import OUT_FLOOR, make_qkv, max_abs_err

# flashattn_ext.sdpa is the function (the package re-exports it); the module holds the internals.
sdpa_mod = importlib.import_module("flashattn_ext.sdpa")


@pytest.fixture(autouse=True)
def _fresh_stats():
    reset_sdpa_stats()
    yield
    reset_sdpa_stats()


def took(path, reason=None):
    """Exactly one call since the reset, on `path` (with `reason` for a fallback)."""
    s = sdpa_stats()
    if path == "flashattn_ext":
        return s == {"flashattn_ext": 1, "fallback": 0, "fallback_reasons": {}}
    return s == {"flashattn_ext": 0, "fallback": 1, "fallback_reasons": {reason: 1}}


# ---------------------------------------------------------------------------------------------------- signature

def test_signature_matches_torch_sdpa_schema():
    # F.scaled_dot_product_attention is a builtin without an inspect signature; its aten schema is the source.
    import inspect

    schema = torch.ops.aten.scaled_dot_product_attention.default._schema
    params = list(inspect.signature(sdpa).parameters.values())
    assert [p.name for p in params] == [a.name for a in schema.arguments]
    for p, a in zip(params, schema.arguments):
        want_kind = inspect.Parameter.KEYWORD_ONLY if a.kwarg_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert p.kind == want_kind, p.name
        if a.default_value is None and not a.has_default_value():
            assert p.default is inspect.Parameter.empty, p.name
        else:
            assert p.default == a.default_value, p.name
    # and the positional limit is the same as torch's (scale is keyword-only)
    q = torch.randn(1, 1, 2, 8)
    for fn in (F.scaled_dot_product_attention, sdpa):
        with pytest.raises(TypeError):
            fn(q, q, q, None, 0.0, False, 0.5)


def test_exported():
    assert flashattn_ext.sdpa is sdpa_mod.sdpa
    assert flashattn_ext.sdpa_strict is sdpa_mod.sdpa_strict


# ---------------------------------------------------------------------------------------- CPU: same results

CPU_PATH_CASES = [
    # id, (B, Hq, Hkv, Sq, Sk, D), kwargs
    ("plain", (2, 4, 4, 9, 9, 16), {}),
    ("plain_sq_lt_sk", (2, 4, 4, 5, 13, 16), {}),
    ("causal_square", (2, 4, 4, 11, 11, 16), {"is_causal": True}),
    ("causal_sq_lt_sk", (2, 4, 4, 5, 13, 16), {"is_causal": True}),
    ("causal_sq_gt_sk", (2, 4, 4, 13, 5, 16), {"is_causal": True}),
    ("causal_sq1", (1, 2, 2, 1, 7, 8), {"is_causal": True}),
    ("gqa", (2, 8, 2, 7, 12, 16), {"enable_gqa": True}),
    ("gqa_causal_sq_lt_sk", (2, 8, 2, 6, 17, 16), {"enable_gqa": True, "is_causal": True}),
    ("mqa_causal_sq_gt_sk", (1, 6, 1, 9, 4, 8), {"enable_gqa": True, "is_causal": True}),
    ("gqa_flag_equal_heads", (1, 4, 4, 5, 5, 8), {"enable_gqa": True}),
    ("scale", (2, 4, 4, 8, 10, 16), {"scale": 0.3, "is_causal": True}),
    ("dropout_zero_int", (1, 2, 2, 4, 4, 8), {"dropout_p": 0}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CPU_PATH_CASES, ids=[c[0] for c in CPU_PATH_CASES])
def test_cpu_flashattn_path_equals_torch_sdpa(case, dtype):
    _, (B, Hq, Hkv, Sq, Sk, D), kw = case
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, layout="bshd", seed=Sq * 31 + Sk)
    out = sdpa(q, k, v, **kw)
    assert took("flashattn_ext"), sdpa_stats()
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    assert out.shape == want.shape and out.dtype == want.dtype
    torch.testing.assert_close(out, want)


def test_cpu_positional_args():
    q, k, v = make_qkv(1, 2, 2, 6, 9, 8, torch.float32)
    torch.testing.assert_close(sdpa(q, k, v, None, 0.0, True), F.scaled_dot_product_attention(q, k, v, None, 0.0, True))
    assert took("flashattn_ext")


def test_cpu_gradients_match_torch_sdpa():
    # The reference path is differentiable; keys after Sq in top-left causal get exactly zero grad, as in SDPA.
    q, k, v = make_qkv(2, 4, 2, 5, 11, 16, torch.float64, seed=3)
    grads = []
    for fn in (sdpa, F.scaled_dot_product_attention):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv, is_causal=True, enable_gqa=True)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w)
    assert grads[0][1][:, :, 5:].abs().max() == 0


@pytest.mark.parametrize("Sq", range(1, 8))
@pytest.mark.parametrize("Sk", range(1, 8))
def test_top_left_causal_mapping_is_exact(Sq, Sk):
    # The plan's (key slice, causal, window) through our bottom-right visibility rule is SDPA's tril, exactly.
    q, k, v = make_qkv(1, 1, 1, Sq, Sk, 8, torch.float32)
    plan = sdpa_mod._plan(q, k, v, None, 0.0, True, None, False)
    assert len(plan) == 5, plan
    _, k2, _, causal, window = plan
    got = torch.zeros(Sq, Sk, dtype=torch.bool)
    got[:, :k2.shape[2]] = visible_mask(Sq, k2.shape[2], causal=causal, window=window)
    assert torch.equal(got, torch.ones(Sq, Sk, dtype=torch.bool).tril())
    assert k2.data_ptr() == k.data_ptr() and k2.stride() == k.stride()  # a view: kernel layout checks still hold


# ------------------------------------------------------------------------------------ CPU: falls back, counted

def _bool_mask(Sq, Sk):
    m = torch.rand(Sq, Sk, generator=torch.Generator().manual_seed(1)) > 0.3
    m[:, 0] = True  # no fully masked row (torch gives NaN there)
    return m


FALLBACK_CASES = [
    # id, (B, Hq, Hkv, Sq, Sk, D), kwargs, expected reason
    ("bool_mask", (2, 4, 4, 6, 9, 16), {"attn_mask": _bool_mask(6, 9)}, "attn_mask"),
    ("additive_mask", (2, 4, 4, 6, 9, 16), {"attn_mask": torch.randn(6, 9)}, "attn_mask"),
    ("mask_4d_gqa", (2, 4, 2, 6, 9, 16), {"attn_mask": _bool_mask(6, 9)[None, None].expand(2, 4, 6, 9),
                                          "enable_gqa": True}, "attn_mask"),
    ("mqa_broadcast_without_enable_gqa", (1, 4, 1, 5, 7, 8), {}, "gqa"),
    ("negative_scale", (1, 2, 2, 5, 7, 8), {"scale": -0.5}, "scale"),
    ("zero_scale", (1, 2, 2, 5, 7, 8), {"scale": 0.0}, "scale"),
    ("empty_batch", (0, 2, 2, 5, 7, 8), {}, "empty"),
    ("empty_keys", (1, 2, 2, 5, 0, 8), {}, "empty"),
]


@pytest.mark.parametrize("case", FALLBACK_CASES, ids=[c[0] for c in FALLBACK_CASES])
def test_cpu_fallback_equals_torch_sdpa(case):
    _, (B, Hq, Hkv, Sq, Sk, D), kw, reason = case
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, torch.float32, seed=Sq + Sk)
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    out = sdpa(q, k, v, **kw)
    assert took("fallback", reason), sdpa_stats()
    torch.testing.assert_close(out, want, equal_nan=True)


def test_cpu_fallback_dropout_is_torch_dropout():
    q, k, v = make_qkv(2, 2, 2, 8, 8, 16, torch.float32)
    torch.manual_seed(5)
    want = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    out = sdpa(q, k, v, dropout_p=0.5)
    assert took("fallback", "dropout")
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("shape_case", ["3d", "5d", "value_head_dim", "last_dim_strided"])
def test_cpu_fallback_shapes_and_layouts(shape_case):
    g = torch.Generator().manual_seed(0)
    if shape_case == "3d":
        q, k, v = (torch.randn(4, 6, 8, generator=g) for _ in range(3))
        reason = "shape"
    elif shape_case == "5d":
        q, k, v = (torch.randn(2, 3, 2, 6, 8, generator=g) for _ in range(3))
        reason = "shape"
    elif shape_case == "value_head_dim":
        q, k = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(2))
        v = torch.randn(1, 2, 6, 12, generator=g)
        reason = "shape"
    else:
        q, k, v = (torch.randn(1, 2, 6, 16, generator=g)[..., ::2] for _ in range(3))
        reason = "layout"
    out = sdpa(q, k, v, is_causal=True)
    assert took("fallback", reason), sdpa_stats()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_gqa_without_enable_gqa_raises_like_torch():
    q, k, v = make_qkv(1, 4, 2, 5, 5, 8, torch.float32)
    with pytest.raises(RuntimeError) as torch_err:
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError) as our_err:
        sdpa(q, k, v)
    assert str(our_err.value) == str(torch_err.value)  # it is torch's own error: the fallback ran torch
    assert sdpa_stats()["fallback_reasons"] == {"gqa": 1}


def test_mask_with_is_causal_behaves_like_torch():
    # torch 2.14 rejects attn_mask together with is_causal; torch 2.11 (the GPU image) accepts it. The drop-in
    # must do whatever the installed torch does: raise the same error, or give the same result.
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8, torch.float32)
    m = torch.ones(5, 5, dtype=torch.bool)
    try:
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)
    except RuntimeError as torch_err:
        with pytest.raises(RuntimeError) as our_err:
            sdpa(q, k, v, attn_mask=m, is_causal=True)
        assert str(our_err.value) == str(torch_err)
    else:
        torch.testing.assert_close(sdpa(q, k, v, attn_mask=m, is_causal=True), expected)


def test_stats_accumulate_and_reset():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, torch.float32)
    sdpa(q, k, v)
    sdpa(q, k, v, is_causal=True)
    sdpa(q, k, v, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    sdpa(q, k, v, dropout_p=0.1)
    sdpa(q, k, v, attn_mask=torch.zeros(4, 4))
    s = sdpa_stats()
    assert s == {"flashattn_ext": 2, "fallback": 3, "fallback_reasons": {"attn_mask": 2, "dropout": 1}}
    s["fallback_reasons"]["x"] = 1  # a copy: callers cannot corrupt the counters
    assert "x" not in sdpa_stats()["fallback_reasons"]
    reset_sdpa_stats()
    assert sdpa_stats() == {"flashattn_ext": 0, "fallback": 0, "fallback_reasons": {}}


# ------------------------------------------------------------------------------------------------ sdpa_strict

def test_strict_raises_on_fallback_naming_reason():
    q, k, v = make_qkv(1, 2, 2, 4, 6, 8, torch.float32)
    with sdpa_strict():
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(sdpa(q, k, v, is_causal=True), want)
        with pytest.raises(RuntimeError, match=r"reason 'attn_mask'.*attn_mask"):
            sdpa(q, k, v, attn_mask=torch.ones(4, 6, dtype=torch.bool))
        with pytest.raises(RuntimeError, match=r"reason 'dropout'.*dropout_p=0.2"):
            sdpa(q, k, v, dropout_p=0.2)
        with pytest.raises(sdpa_mod.SdpaFallbackError) as e:
            sdpa(q, k, v, scale=-1.0)
        assert e.value.reason == "scale"
    # only the call that ran is counted; outside the block fallbacks run again
    assert sdpa_stats() == {"flashattn_ext": 1, "fallback": 0, "fallback_reasons": {}}
    sdpa(q, k, v, dropout_p=0.2)
    assert sdpa_stats()["fallback_reasons"] == {"dropout": 1}


def test_strict_nests_and_unwinds_on_error():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, torch.float32)
    with pytest.raises(ValueError):
        with sdpa_strict():
            with sdpa_strict():
                pass
            with pytest.raises(RuntimeError):
                sdpa(q, k, v, dropout_p=0.5)  # still strict after the inner block left
            raise ValueError("boom")
    sdpa(q, k, v, dropout_p=0.5)  # not strict any more
    assert sdpa_stats()["fallback"] == 1


def test_compiles_fullgraph_on_cpu():
    # Path choice is metadata-only and counters are skipped while tracing: no graph break.
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: sdpa(q, k, v, is_causal=True, enable_gqa=True), fullgraph=True,
                       backend="eager")
    q, k, v = make_qkv(2, 4, 2, 9, 13, 16, torch.float32, layout="bshd")
    torch.testing.assert_close(fn(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def test_runtime_reasons_for_cuda_only_conditions_on_cpu_tensors():
    # Reasons that depend only on metadata, checked without a GPU.
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, torch.float32)
    assert sdpa_mod.runtime_fallback(q, k, v.double(), None)[0] == "dtype"
    assert sdpa_mod.runtime_fallback(q, k, v, float("inf"))[0] == "scale"
    assert sdpa_mod.runtime_fallback(q, k.to("meta"), v, None)[0] == "device"
    assert sdpa_mod.runtime_fallback(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32), None)[0] == "dtype"
    assert sdpa_mod.runtime_fallback(q, k, v, None) is None


# --------------------------------------------------------------------------------------------------------- GPU

def top_left_oracle(q, k, v, is_causal, scale, enable_gqa, dtype):
    """SDPA math in `dtype` (float64: the oracle; q's dtype: the naive low-precision reference of the 2x rule)."""
    qq, kk, vv = (t.to(dtype) for t in (q, k, v))
    if enable_gqa and kk.shape[1] != qq.shape[1]:
        kk = kk.repeat_interleave(qq.shape[1] // kk.shape[1], dim=1)
        vv = vv.repeat_interleave(qq.shape[1] // vv.shape[1], dim=1)
    s = (qq @ kk.transpose(-1, -2)) * (scale if scale is not None else qq.shape[-1] ** -0.5)
    if is_causal:
        Sq, Sk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(Sq, Sk, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return torch.softmax(s, dim=-1) @ vv


GPU_CASES = [
    # id, (B, Hq, Hkv, Sq, Sk, D), kwargs
    ("causal_square", (2, 8, 8, 257, 257, 64), {"is_causal": True}),
    ("causal_sq_lt_sk", (2, 8, 8, 100, 333, 128), {"is_causal": True}),
    ("causal_sq_gt_sk", (2, 4, 4, 300, 130, 64), {"is_causal": True}),
    ("gqa_causal_square", (2, 8, 2, 200, 200, 128), {"is_causal": True, "enable_gqa": True}),
    ("gqa_causal_sq_lt_sk", (1, 8, 2, 64, 500, 64), {"is_causal": True, "enable_gqa": True}),
    ("mqa_noncausal", (2, 8, 1, 129, 77, 64), {"enable_gqa": True}),
    ("decode_sq1", (4, 8, 2, 1, 513, 128), {"is_causal": True, "enable_gqa": True}),
    ("scale", (1, 4, 4, 128, 128, 32), {"scale": 0.2, "is_causal": True}),
]


@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_kernel_path_matches_torch_sdpa(case, layout, dtype):
    _, (B, Hq, Hkv, Sq, Sk, D), kw = case
    if D not in flashattn_ext.build_info()["head_dims"]:
        pytest.skip(f"head dim {D} not built")
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device="cuda", layout=layout, seed=Sq + Sk)
    with torch.no_grad(), sdpa_strict():  # strict: the kernel path must be taken, not silently skipped
        out = sdpa(q, k, v, **kw)
        torch_out = F.scaled_dot_product_attention(q, k, v, **kw)
    assert took("flashattn_ext"), sdpa_stats()
    assert out.shape == torch_out.shape and out.dtype == dtype
    ref = top_left_oracle(q, k, v, kw.get("is_causal", False), kw.get("scale"), kw.get("enable_gqa", False),
                          torch.float64)
    naive = top_left_oracle(q, k, v, kw.get("is_causal", False), kw.get("scale"), kw.get("enable_gqa", False), dtype)
    err = max_abs_err(out, ref)
    # 2x rule against the worse of torch SDPA and the naive low-precision math (both vs the float64 oracle).
    bound = 2 * max(max_abs_err(torch_out, ref), max_abs_err(naive, ref)) + OUT_FLOOR
    assert err <= bound, f"err {err:.3e} > bound {bound:.3e}"


@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("what", ["mask", "dropout", "float32", "head_dim_80", "misaligned"])
def test_gpu_fallbacks_are_torch_sdpa(what):
    dtype, D, kw = torch.float16, 64, {}
    if what == "mask":
        kw = {"attn_mask": _bool_mask(64, 96).cuda()}
    elif what == "dropout":
        kw = {"dropout_p": 0.3}
    elif what == "float32":
        dtype = torch.float32
    elif what == "head_dim_80":
        D = 80
    q, k, v = make_qkv(2, 4, 4, 64, 96, D, dtype, device="cuda")
    if what == "misaligned":  # odd storage offset: not 16-byte aligned
        k = torch.empty(k.numel() + 1, dtype=dtype, device="cuda")[1:].view_as(k).copy_(k)
    reason = {"mask": "attn_mask", "dropout": "dropout", "float32": "dtype", "head_dim_80": "head_dim",
              "misaligned": "layout"}[what]
    if what == "head_dim_80" and 80 in flashattn_ext.build_info()["head_dims"]:
        pytest.skip("head dim 80 is built")
    with torch.no_grad():
        torch.manual_seed(0)
        want = F.scaled_dot_product_attention(q, k, v, **kw)
        torch.manual_seed(0)
        out = sdpa(q, k, v, **kw)
    assert took("fallback", reason), sdpa_stats()
    torch.testing.assert_close(out, want)
    with sdpa_strict(), pytest.raises(RuntimeError, match=reason):
        sdpa(q, k, v, **kw)


@pytest.mark.requires_cuda_ext
def test_gpu_grad_path():
    """With a CUDA backward op: kernel path, grads within 2x of torch SDPA's error. Without: fallback 'grad'."""
    q, k, v = make_qkv(2, 8, 2, 150, 300, 64, torch.bfloat16, device="cuda", layout="bshd", seed=7)
    kw = {"is_causal": True, "enable_gqa": True}
    dout = torch.randn(2, 8, 150, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).bfloat16()

    def grads(fn, dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        fn(qq, kk, vv, **kw).backward(dout.to(dtype))
        return qq.grad, kk.grad, vv.grad

    ours = grads(sdpa, torch.bfloat16)
    if not hasattr(torch.ops.flashattn_ext, "bwd"):
        assert took("fallback", "grad"), sdpa_stats()
        return
    assert took("flashattn_ext"), sdpa_stats()
    ref = grads(lambda *a, **k_: top_left_oracle(*a, k_["is_causal"], None, True, torch.float64), torch.float64)
    theirs = grads(F.scaled_dot_product_attention, torch.bfloat16)
    for name, o, t, r in zip(("dq", "dk", "dv"), ours, theirs, ref):
        err, bound = max_abs_err(o, r), 2 * max_abs_err(t, r) + 1e-3
        assert err <= bound, f"{name}: err {err:.3e} > bound {bound:.3e}"
