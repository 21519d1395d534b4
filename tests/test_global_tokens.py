"""attention(..., global_mask=...): Longformer global tokens against the reference with an explicit dense mask.

CPU tests (CI) run the same decomposition as CUDA (window part + gathered global keys + dense global rows, merged
by lse) with the CPU reference as the window part; GPU tests run it on every kernel family. Oracle nobody here
wrote: transformers' LongformerSelfAttention with its global projections set equal to the local ones.
"""
import importlib
import itertools

import pytest
import torch

import flashattn_ext
from flashattn_ext import GlobalTokens, _ops, global_tokens
from flashattn_ext.api import kernel_window
from flashattn_ext.global_tokens import fuses_global_keys
from flashattn_ext.reference import attention_reference, in_window, visible_mask
from flashattn_ext.testing import (BF16, D_DEFAULT, DEVICE, FP16, GPU_FAMILIES, lse_check, make_qkv, max_abs_err,
                                   need_family, need_head_dim, seed_of, two_x_rule)

GRAD_FLOOR = 1e-4
S_ODD = 97
# Windows (left, right) before causal folding: 0, 1, 17, 255, >= S, asymmetric, one side unbounded.
WINDOWS = [(0, 0), (1, 1), (17, 17), (255, 255), (4096, 4096), (3, 17), (17, 0), (-1, 5), (5, -1)]
PATTERNS = ["none", "one", "seven", "prefix"]


def make_global_mask(B, S, pattern, seed, device="cpu"):
    """(B, S) bool. none: no global token; one / seven: that many at random positions per row (fewer in row 1, so
    rows differ in count); prefix: the first 7 positions (Longformer's usual [CLS] / question tokens)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        if pattern == "prefix":
            mask[b, :min(7, S)] = True
        elif pattern in ("one", "seven"):
            n = min(S, 1 if pattern == "one" else 7 - 3 * (b % 2))
            mask[b, torch.randperm(S, generator=g)[:n]] = True
    return mask.to(device)


# ---- the reference's explicit mask -------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(0, 0), (2, 1), (-1, 3), (4, -1), (-1, -1)])
def test_reference_mask_is_the_rule(causal, window):
    B, S = 2, 13
    gm = make_global_mask(B, S, "seven", seed_of("rule", causal, window))
    got = visible_mask(S, S, causal, window, global_mask=gm)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    for b, i, j in itertools.product(range(B), range(S), range(S)):
        in_win = (left < 0 or j >= i - left) and (right < 0 or j <= i + right)
        either = bool(gm[b, i] or gm[b, j]) and (not causal or j <= i)
        assert bool(got[b, i, j]) == (in_win or either), (b, i, j)


# ---- CPU path (runs in CI) -------------------------------------------------------------------------------

def cpu_case(B, Hq, Hkv, S, D, dtype, causal, window, pattern, layout="bhsd"):
    seed = seed_of("cpu", B, Hq, Hkv, S, D, dtype, causal, window, pattern, layout)
    q, k, v = make_qkv(B, Hq, Hkv, S, S, D, dtype, "cpu", layout, seed=seed)
    return q, k, v, make_global_mask(B, S, pattern, seed)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
def test_cpu_forward_matches_reference(window, causal, pattern):
    q, k, v, gm = cpu_case(2, 4, 2, S_ODD, 32, BF16, causal, window, pattern)
    out, lse = flashattn_ext.attention(q, k, v, causal=causal, window=window, global_mask=gm, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    err, bound, ref_lse, ok = two_x_rule(out, q, k, v, causal=causal, window=window, global_mask=gm)
    assert ok, f"max |out - ref| = {err:.3e} > {bound:.3e}"
    lse_err, lse_ok = lse_check(lse, ref_lse)
    assert lse_ok, f"lse err {lse_err:.3e}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(0, 0), (17, 17), (3, 17), (-1, 5)])
def test_cpu_float64_is_exact_up_to_lse_rounding(window, causal):
    """float64 inputs: only the float32 lse of the window part rounds; the decomposition itself is exact."""
    q, k, v, gm = cpu_case(2, 4, 4, 41, 16, torch.float64, causal, window, "seven")
    out, lse = flashattn_ext.attention(q, k, v, causal=causal, window=window, global_mask=gm, return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, causal=causal, window=window, global_mask=gm, return_lse=True)
    assert max_abs_err(out, ref) < 1e-6 and max_abs_err(lse, ref_lse) < 1e-5


def reference_grads(q, k, v, dout, dlse, upcast, **kw):
    dt = torch.float64 if upcast else q.dtype
    leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
    out, lse = attention_reference(*leaves, return_lse=True, upcast=upcast, **kw)
    return torch.autograd.grad((out, lse), leaves, (dout.to(dt), dlse.to(lse.dtype)))


def _kernel_semantics_fwd_global(q, k, v, kg, vg, pos, scale, left, right, causal, algorithm):
    """What op fwd_global computes, densely in float64 on the CPU: every row's window plus the global keys
    (positions ``pos``, -1 padding) that the window leaves out, causal ones only at or before the row."""
    B, Hq, S, D = q.shape
    i = torch.arange(S).view(S, 1)
    j = torch.arange(S).view(1, S)
    is_global = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        p = pos[b][pos[b] >= 0].long()
        is_global[b, p] = True
    extra = is_global[:, None, :] & ((j <= i) if causal else torch.ones(S, S, dtype=torch.bool))
    visible = (in_window(i, j, left, right) | extra).unsqueeze(1)  # (B, 1, S, S)
    group = Hq // k.shape[1]
    kr, vr = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    s = (q.double() @ kr.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p_ = torch.exp(s - lse.nan_to_num(neginf=0.0).unsqueeze(-1))
    return (p_ @ vr).to(q.dtype), lse.float()


@pytest.mark.parametrize("pattern", ["one", "seven", "prefix"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(0, 0), (17, 17), (3, 17), (-1, 5), (5, -1)])
def test_cpu_composition_around_the_global_key_kernel(monkeypatch, window, causal, pattern):
    """The Python side of the fused path (fa3 on a GPU: fwd_global, then the global rows without the global keys
    merged in) on the CPU, with the kernel's semantics computed densely in its place: the result is the global-token
    rule (against the reference), so the kernel's part and the Python part partition every row's keys."""
    import sys
    gt = sys.modules["flashattn_ext.global_tokens"]
    monkeypatch.setattr(gt, "fuses_global_keys", lambda q, algorithm="auto": True)
    monkeypatch.setattr(gt._ops, "fwd_global", _kernel_semantics_fwd_global)
    q, k, v, gm = cpu_case(2, 4, 2, S_ODD, 32, torch.float64, causal, window, pattern)
    out, lse = flashattn_ext.attention(q, k, v, causal=causal, window=window, global_mask=gm, return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, causal=causal, window=window, global_mask=gm, return_lse=True)
    # float64 throughout except the kernel's float32 lse, as in test_cpu_float64_is_exact_up_to_lse_rounding.
    assert max_abs_err(out, ref) < 1e-6 and max_abs_err(lse, ref_lse) < 1e-5


def check_grads(attention, q, k, v, gm, causal, window):
    """Gradients of sum(out * dout) + sum(lse * dlse) against the float64 reference under the 3x rule."""
    seed = seed_of("grads", tuple(q.shape), tuple(k.shape), causal, window)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = attention(q, k, v, causal=causal, window=window, global_mask=gm, return_lse=True)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    dlse = torch.randn(lse.shape, generator=g).to(lse.device)
    got = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    kw = dict(causal=causal, window=window, global_mask=gm)
    ref = reference_grads(q, k, v, dout, dlse, upcast=True, **kw)
    lowp = reference_grads(q, k, v, dout, dlse, upcast=False, **kw)
    for name, gr, r, lp, t in zip("qkv", got, ref, lowp, (q, k, v)):
        assert gr.shape == t.shape and gr.dtype == t.dtype
        assert not torch.isnan(gr).any(), f"d{name} has NaN"
        err = max_abs_err(gr, r)
        bound = 3 * max_abs_err(lp, r) + 2 * max_abs_err(r.to(t.dtype), r) + GRAD_FLOOR
        assert err <= bound, f"d{name}: max err {err:.3e} > 3x rule bound {bound:.3e}"


@pytest.mark.parametrize("pattern", ["one", "seven", "prefix"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(0, 0), (1, 1), (17, 17), (3, 17), (-1, 5)])
def test_cpu_gradients(window, causal, pattern):
    q, k, v, gm = cpu_case(2, 4, 2, S_ODD, 32, BF16, causal, window, pattern)
    check_grads(flashattn_ext.attention, q, k, v, gm, causal, window)


@pytest.fixture
def cuda_like_cpu(monkeypatch):
    """global_attention as CUDA runs it (inputs kept in bf16/fp16: the scaled output, the GEMMs accumulating into
    it, the scatter-adds and Delta in the input dtype), with the window part from the reference (float32 inside,
    the kernels' output and gradient dtypes)."""
    gt = importlib.import_module("flashattn_ext.global_tokens")  # the module (the package attribute is the function)

    def window_backward(dout, q, k, v, out, lse, dlse, spec):
        up = [t.float() for t in (dout, q, k, v, out)]
        grads = gt.blocked_backward(*up[:4], up[4], lse, spec.scale, spec.left, spec.right, dlse)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))

    monkeypatch.setattr(gt, "_window_backward", window_backward)

    def attention(q, k, v, causal=False, window=(-1, -1), global_mask=None, return_lse=False):
        left, right = flashattn_ext.api.kernel_window(causal, window, q.shape[2], k.shape[2])
        spec = gt.Spec(q.shape[-1] ** -0.5, causal, left, right, "auto", False)
        out, lse = gt._GlobalAttention.apply(q, k, v, global_tokens(global_mask), spec)
        assert out.dtype == q.dtype
        return (out, lse) if return_lse else out

    return attention


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("causal, window, heads", [(False, (17, 17), (4, 2)), (True, (3, -1), (4, 1)),
                                                   (False, (-1, 5), (2, 2))])
def test_low_precision_path_on_cpu(cuda_like_cpu, dtype, causal, window, heads, layout):
    """layout "bshd": (B, S, H, D) memory, so the outputs and gradients are not contiguous (the GEMMs then
    accumulate through a temporary)."""
    q, k, v, gm = cpu_case(2, heads[0], heads[1], S_ODD, 32, dtype, causal, window, "seven", layout)
    out = cuda_like_cpu(q, k, v, causal=causal, window=window, global_mask=gm)
    err, bound, _, ok = two_x_rule(out, q, k, v, causal=causal, window=window, global_mask=gm)
    assert ok, f"{err:.3e} > {bound:.3e}"
    check_grads(cuda_like_cpu, q, k, v, gm, causal, window)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)])
def test_cpu_gqa(heads):
    Hq, Hkv = heads
    q, k, v, gm = cpu_case(2, Hq, Hkv, 33, 16, BF16, False, (3, 3), "seven")
    out = flashattn_ext.attention(q, k, v, window=(3, 3), global_mask=gm)
    err, bound, _, ok = two_x_rule(out, q, k, v, window=(3, 3), global_mask=gm)
    assert ok, f"{err:.3e} > {bound:.3e}"
    check_grads(flashattn_ext.attention, q, k, v, gm, False, (3, 3))


@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (True, (-1, 9))])
def test_window_that_holds_every_global_key_is_the_plain_call(causal, window):
    q, k, v, gm = cpu_case(1, 2, 2, 29, 16, torch.float32, causal, window, "seven")
    got = flashattn_ext.attention(q, k, v, causal=causal, window=window, global_mask=gm, return_lse=True)
    want = flashattn_ext.attention(q, k, v, causal=causal, window=window, return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_no_global_token_is_the_plain_call():
    q, k, v, _ = cpu_case(2, 2, 2, 29, 16, torch.float32, False, (2, 2), "none")
    for gm in (torch.zeros(2, 29, dtype=torch.bool), global_tokens(torch.zeros(2, 29, dtype=torch.bool))):
        got = flashattn_ext.attention(q, k, v, window=(2, 2), global_mask=gm, return_lse=True)
        want = flashattn_ext.attention(q, k, v, window=(2, 2), return_lse=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_global_tokens_fields():
    mask = torch.tensor([[0, 1, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    t = global_tokens(mask)
    assert isinstance(t, GlobalTokens) and t.shape == (3, 6) and t.max_count == 3 and t.total == 4
    assert t.index.tolist() == [[1, 4, 5], [0, 0, 0], [0, 0, 0]]
    assert t.valid.tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    assert list(zip(t.flat_batch.tolist(), t.flat_slot.tolist(), t.flat_pos.tolist())) == \
        [(0, 0, 1), (0, 1, 4), (0, 2, 5), (2, 0, 0)]


def test_global_tokens_reused_equals_bool_mask():
    """One GlobalTokens for several layers gives what the bool mask gives (forward and gradients)."""
    q, k, v, gm = cpu_case(3, 2, 2, 40, 16, torch.float32, True, (4, -1), "seven")
    gm[1] = False  # a sequence without global tokens next to ones with
    tokens = global_tokens(gm)
    results = []
    for mask in (gm, tokens, tokens):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flashattn_ext.attention(*leaves, causal=True, window=(4, -1), global_mask=mask)
        results.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("B, S", [(0, 16), (2, 0)])
def test_empty_inputs(B, S):
    q = torch.randn(B, 2, S, 16)
    out, lse = flashattn_ext.attention(q, q, q, window=(2, 2), global_mask=torch.zeros(B, S, dtype=torch.bool),
                                       return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]


# ---- bench/bench_window.py counts and masks what it claims (its GPU part runs on the device) ---------------

def test_bench_window_masks_and_pairs_are_the_rule():
    """Its useful-FLOP count, FlexAttention mask_mod and SDPA dense mask all equal the reference's rule, and its
    argument parsing works without a GPU."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_window as bw

    for S, w, causal, G in itertools.product((1, 37, 100), (1, 3, 50, 200), (False, True), (0, 1, 16)):
        if G > S:
            continue
        gm = torch.zeros(1, S, dtype=torch.bool)
        gm[:, :G] = True
        want = visible_mask(S, S, causal, bw.kernel_window(w, causal), global_mask=gm).reshape(S, S)
        i, j = torch.arange(S).view(S, 1), torch.arange(S).view(1, S)
        assert torch.equal(bw.mask_mod(w, causal, G)(0, 0, i, j).expand(S, S), want), (S, w, causal, G)
        assert torch.equal(bw.dense_mask(S, w, causal, G, "cpu").reshape(S, S), want)
        assert bw.visible_pairs(S, w, causal, G) == int(want.sum())
    args = bw.parse_args(["--issue"])
    assert args.seqlens == [16384, 65536] and args.windows == [1024] and args.modes == [True]
    assert len(bw.cases(bw.parse_args([]))) == 3 * 2 * 2 * 2
    with pytest.raises(SystemExit):
        bw.parse_args(["--windows", "0"])


# ---- bad input: a clear exception before any attention runs ------------------------------------------------

@pytest.fixture
def no_attention_runs(monkeypatch):
    """Any attention work (the global decomposition, the CPU reference, the CUDA op) fails the test."""
    import flashattn_ext.api as api

    def boom(*args, **kwargs):
        raise AssertionError("attention ran before the bad argument was rejected")

    monkeypatch.setattr(api, "global_attention", boom)
    monkeypatch.setattr(api, "attention_reference", boom)
    monkeypatch.setattr(api._ops, "FWD", boom)


def _bad_mask_cases():
    ok = torch.zeros(2, 17, dtype=torch.bool)
    return [
        ("float mask", ok.float(), {}, TypeError, "bool"),
        ("int mask", ok.int(), {}, TypeError, "bool"),
        ("list", [[True] * 17] * 2, {}, TypeError, "global_mask"),
        ("1-D", ok[0], {}, ValueError, "2-D"),
        ("wrong batch", ok[:1], {}, ValueError, "shape"),
        ("wrong seqlen", ok[:, :16], {}, ValueError, "shape"),
        ("other device", ok.to("meta"), {}, ValueError, "device|meta"),
        ("tokens of another shape", global_tokens(torch.ones(2, 16, dtype=torch.bool)), {}, ValueError, "shape"),
        ("Sq != Sk", ok, {"sq": 9}, ValueError, "Sq == Sk"),
    ]


@pytest.mark.parametrize("name, mask, opts, exc, match", _bad_mask_cases(), ids=[c[0] for c in _bad_mask_cases()])
def test_bad_global_mask_raises_before_any_kernel(no_attention_runs, name, mask, opts, exc, match):
    q = torch.randn(2, 2, opts.get("sq", 17), 16)
    k = torch.randn(2, 2, 17, 16)
    with pytest.raises(exc, match=match):
        flashattn_ext.attention(q, k, k, window=(2, 2), global_mask=mask)


def test_bad_global_tokens_argument():
    with pytest.raises(TypeError, match="bool"):
        global_tokens(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2-D"):
        global_tokens(torch.zeros(3, dtype=torch.bool))


# ---- the oracle nobody here wrote: transformers' Longformer ------------------------------------------------

@pytest.mark.parametrize("attention_window, pattern", [(8, "seven"), (8, "prefix"), (16, "one"), (4, "none")])
def test_longformer_self_attention_oracle(attention_window, pattern):
    """LongformerSelfAttention (random config, global projections = local ones) on the same hidden states.

    Longformer's conventions: attention_window is the total window (one side is attention_window // 2, both
    sides, so window=(w/2, w/2)); global tokens come as attention_mask +10000 (0 = local, -10000 = padding), with
    is_index_global_attn / is_index_masked precomputed by the model; the 1/sqrt(head_dim) scale is applied to the
    queries. A global key inside the window is counted once there too."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    torch.manual_seed(seed_of("longformer", attention_window, pattern))
    B, S, H, Dh = 2, 32, 4, 8
    config = transformers.LongformerConfig(hidden_size=H * Dh, num_attention_heads=H,
                                           attention_window=[attention_window], attention_probs_dropout_prob=0.0)
    layer = LongformerSelfAttention(config, layer_id=0).eval()
    with torch.no_grad():
        for name in ("query", "key", "value"):
            getattr(layer, f"{name}_global").load_state_dict(getattr(layer, name).state_dict())
    hidden = torch.randn(B, S, H * Dh)
    gm = make_global_mask(B, S, pattern, seed_of("longformer mask", attention_window, pattern))
    attention_mask = gm.float() * 10000.0
    with torch.no_grad():
        theirs = layer(hidden, attention_mask=attention_mask, is_index_masked=attention_mask < 0,
                       is_index_global_attn=attention_mask > 0, is_global_attn=bool(gm.any()))[0]

        def heads(proj):  # (B, S, H*Dh) -> (B, H, S, Dh)
            return proj(hidden).view(B, S, H, Dh).transpose(1, 2)

        half = attention_window // 2
        out = flashattn_ext.attention(heads(layer.query), heads(layer.key), heads(layer.value), window=(half, half),
                                      global_mask=gm)
    ours = out.transpose(1, 2).reshape(B, S, H * Dh)
    assert theirs.shape == ours.shape
    err = max_abs_err(ours, theirs)
    assert err < 2e-5, f"max |ours - Longformer| = {err:.3e}"


# ---- GPU: every kernel family ------------------------------------------------------------------------------

GPU_ALGORITHMS = tuple(GPU_FAMILIES) + ("fa1",)


def gpu_case(B, Hq, Hkv, S, D, dtype, causal, window, pattern, algorithm):
    need_head_dim(D)
    need_family(algorithm, D)
    seed = seed_of("gpu", B, Hq, Hkv, S, D, dtype, causal, window, pattern, algorithm)
    q, k, v = make_qkv(B, Hq, Hkv, S, S, D, dtype, DEVICE, seed=seed)
    return q, k, v, make_global_mask(B, S, pattern, seed, DEVICE)


@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("algorithm", GPU_ALGORITHMS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("S", [S_ODD, 1025])
def test_gpu_forward(S, window, causal, pattern, algorithm):
    q, k, v, gm = gpu_case(2, 4, 2, S, D_DEFAULT, BF16, causal, window, pattern, algorithm)
    with torch.no_grad():
        out, lse = flashattn_ext.attention(q, k, v, causal=causal, window=window, global_mask=gm, return_lse=True,
                                           algorithm=algorithm)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    err, bound, ref_lse, ok = two_x_rule(out, q, k, v, causal=causal, window=window, global_mask=gm)
    assert ok, f"max |out - ref| = {err:.3e} > {bound:.3e}"
    lse_err, lse_ok = lse_check(lse, ref_lse)
    assert lse_ok, f"lse err {lse_err:.3e}"


@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("algorithm", GPU_ALGORITHMS)
@pytest.mark.parametrize("pattern", ["one", "seven", "prefix"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(0, 0), (17, 17), (255, 255), (3, 17), (-1, 5)])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_gpu_gradients(dtype, window, causal, pattern, algorithm):
    q, k, v, gm = gpu_case(2, 4, 2, S_ODD, D_DEFAULT, dtype, causal, window, pattern, algorithm)

    def attention(*args, **kwargs):
        return flashattn_ext.attention(*args, algorithm=algorithm, **kwargs)

    check_grads(attention, q, k, v, gm, causal, window)


@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("algorithm", GPU_ALGORITHMS)
@pytest.mark.parametrize("heads", [(8, 2), (4, 1)])
def test_gpu_gqa(heads, algorithm):
    Hq, Hkv = heads
    q, k, v, gm = gpu_case(2, Hq, Hkv, 300, D_DEFAULT, BF16, True, (31, -1), "seven", algorithm)
    with torch.no_grad():
        out = flashattn_ext.attention(q, k, v, causal=True, window=(31, -1), global_mask=gm, algorithm=algorithm)
    err, bound, _, ok = two_x_rule(out, q, k, v, causal=True, window=(31, -1), global_mask=gm)
    assert ok, f"{err:.3e} > {bound:.3e}"

    def attention(*args, **kwargs):
        return flashattn_ext.attention(*args, algorithm=algorithm, **kwargs)

    check_grads(attention, q, k, v, gm, True, (31, -1))


@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("algorithm", GPU_ALGORITHMS)
def test_gpu_bshd_layout_and_deterministic(algorithm):
    """(B, S, H, D) memory viewed as (B, H, S, D): out keeps q's layout; gradients under the 3x rule, and
    deterministic=True gives bitwise equal gradients in two runs (not fa1: its GQA dk/dv use atomics)."""
    need_family(algorithm, D_DEFAULT)
    seed = seed_of("bshd", algorithm)
    q, k, v = make_qkv(2, 8, 2, 300, 300, D_DEFAULT, BF16, DEVICE, "bshd", seed=seed)
    gm = make_global_mask(2, 300, "seven", seed, DEVICE)
    with torch.no_grad():
        out = flashattn_ext.attention(q, k, v, window=(17, 5), global_mask=gm, algorithm=algorithm)
    assert out.stride() == torch.empty_like(q).stride()
    err, bound, _, ok = two_x_rule(out, q, k, v, window=(17, 5), global_mask=gm)
    assert ok, f"{err:.3e} > {bound:.3e}"

    def attention(*args, **kwargs):
        return flashattn_ext.attention(*args, algorithm=algorithm, deterministic=True, **kwargs)

    check_grads(attention, q, k, v, gm, False, (17, 5))
    if algorithm == "fa1":
        return
    runs = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, window=(17, 5), global_mask=gm)
        runs.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("algorithm", GPU_ALGORITHMS)
def test_gpu_over_nan_poisoned_memory(algorithm):
    """Every buffer the call allocates (out, lse, gradients, the parts) comes from blocks the caching allocator
    just saw filled with NaN: anything left unwritten shows up as NaN."""
    q, k, v, gm = gpu_case(2, 8, 2, 1025, D_DEFAULT, BF16, True, (17, -1), "seven", algorithm)
    tokens = global_tokens(gm)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    poison = [torch.full_like(t, float("nan")) for t in (q, q, q, k, k, k, v, v)]
    poison += [torch.full(q.shape[:3], float("nan"), device=DEVICE) for _ in range(4)]
    del poison
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = flashattn_ext.attention(*leaves, causal=True, window=(17, -1), global_mask=tokens, return_lse=True,
                                       algorithm=algorithm)
    grads = torch.autograd.grad((out, lse), leaves, (torch.ones_like(out), torch.ones_like(lse)))
    for name, t in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
        assert not torch.isnan(t).any(), f"{name} has NaN"
    err, bound, _, ok = two_x_rule(out.detach(), q, k, v, causal=True, window=(17, -1), global_mask=gm)
    assert ok, f"{err:.3e} > {bound:.3e}"


@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("algorithm", GPU_FAMILIES)
def test_gpu_global_tokens_call_does_not_sync(algorithm):
    """The bool mask syncs once (in global_tokens); a GlobalTokens built beforehand makes forward and backward
    sync-free."""
    q, k, v, gm = gpu_case(1, 4, 4, 256, D_DEFAULT, BF16, True, (31, -1), "prefix", algorithm)
    tokens = global_tokens(gm)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def step():
        out = flashattn_ext.attention(*leaves, causal=True, window=(31, -1), global_mask=tokens, algorithm=algorithm)
        torch.autograd.grad(out.float().square().sum(), leaves)

    step()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.requires_cuda_ext
def test_gpu_bad_mask_device_raises():
    q = torch.randn(1, 2, 17, D_DEFAULT, device=DEVICE, dtype=BF16)
    with pytest.raises(ValueError, match="global_mask is on cpu"):
        flashattn_ext.attention(q, q, q, window=(2, 2), global_mask=torch.zeros(1, 17, dtype=torch.bool))


# ---- the Hopper forward counts the global keys itself (op fwd_global) ----------------------------------------

def _gather_keys(t, tokens):
    B, H, _, D = t.shape
    return torch.gather(t, 2, tokens.index[:, None, :, None].expand(B, H, tokens.max_count, D)).contiguous()


@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("causal, window", [(False, (33, 17)), (True, (100, -1)), (False, (0, 0)), (True, (5, 5))])
@pytest.mark.parametrize("count", [1, 7, 150])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_hopper_kernel_counts_the_global_keys(D, count, causal, window):
    """fa3 counts the gathered global keys inside its forward as extra key tiles (150 of them: more than one tile
    at every head dim; the second sequence has one fewer, so its last slot is padding, and with count 1 none at
    all), GQA. The public call against the reference on every row; the raw op alone is the whole answer for the
    non-global rows (window + the global keys outside it), checked there."""
    need_family("fa3", D)
    B, Hq, Hkv, S = 2, 4, 2, 1000
    seed = seed_of("fused-global", D, count, causal, window)
    q, k, v = make_qkv(B, Hq, Hkv, S, S, D, BF16, DEVICE, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    gm = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        gm[b, torch.randperm(S, generator=gen)[:count - b]] = True
    gm = gm.to(DEVICE)
    assert fuses_global_keys(q, "fa3") and fuses_global_keys(q, "auto")
    with torch.no_grad():
        out, lse = flashattn_ext.attention(q, k, v, causal=causal, window=window, global_mask=gm, return_lse=True,
                                           algorithm="fa3")
    err, bound, ref_lse, ok = two_x_rule(out, q, k, v, causal=causal, window=window, global_mask=gm)
    assert ok, f"public call: {err:.3e} > {bound:.3e}"
    lse_err, lse_ok = lse_check(lse, ref_lse)
    assert lse_ok, f"lse err {lse_err:.3e}"

    tokens = global_tokens(gm)
    left, right = kernel_window(causal, window, S, S)
    raw_out, raw_lse = _ops.fwd_global(q, k, v, _gather_keys(k, tokens), _gather_keys(v, tokens), tokens.pos32,
                                       D**-0.5, left, right, causal, "fa3")
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), causal=causal, window=window,
                                       global_mask=gm, return_lse=True)
    lowp = attention_reference(q, k, v, causal=causal, window=window, global_mask=gm, upcast=False)
    rows = ~gm[:, None, :, None].expand_as(out)
    err = max_abs_err(raw_out[rows], ref[rows])
    bound = 2 * max_abs_err(lowp[rows], ref[rows]) + 1e-3
    assert err <= bound, f"raw op, non-global rows: {err:.3e} > {bound:.3e}"
    lse_rows = ~gm[:, None, :].expand_as(raw_lse)
    assert max_abs_err(raw_lse[lse_rows], ref_lse[lse_rows]) <= 1e-2


@pytest.mark.requires_cuda_ext
def test_gpu_fwd_global_checks():
    """The raw op names its bad argument, and runs only where the Hopper family does."""
    need_family("fa3", D_DEFAULT)
    q, k, v = make_qkv(1, 4, 2, 64, 64, D_DEFAULT, BF16, DEVICE, seed=1)
    kg, vg = k[:, :, :3].contiguous(), v[:, :, :3].contiguous()
    pos = torch.tensor([[0, 5, -1]], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="need the Hopper family"):
        _ops.fwd_global(q, k, v, kg, vg, pos, 0.1, 4, 4, False, "fa2")
    with pytest.raises(ValueError, match="global_pos must be"):
        _ops.fwd_global(q, k, v, kg, vg, pos[:, :2].contiguous(), 0.1, 4, 4, False, "fa3")
    with pytest.raises(TypeError, match="global_pos.dtype must be int32"):
        _ops.fwd_global(q, k, v, kg, vg, pos.long(), 0.1, 4, 4, False, "fa3")
    with pytest.raises(ValueError, match="global_k must have shape"):
        _ops.fwd_global(q, k, v, kg[:, :1].contiguous(), vg, pos, 0.1, 4, 4, False, "fa3")
    with pytest.raises(ValueError, match="self-attention"):
        _ops.fwd_global(q, k[:, :, :32], v[:, :, :32], kg, vg, pos, 0.1, 4, 4, False, "fa3")
