"""Every validation error: raised before any kernel, with the right type and a message naming the argument.

All run on CPU: CUDA-only checks are exercised by calling validate's functions directly on CPU tensors.
"""
import math

import numpy as np
import pytest
import torch

import flashattn_ext
from flashattn_ext import _ops, validate


def qkv(B=2, Hq=4, Hkv=2, Sq=8, Sk=8, D=64, dtype=torch.float16):
    return (torch.randn(B, Hq, Sq, D).to(dtype), torch.randn(B, Hkv, Sk, D).to(dtype),
            torch.randn(B, Hkv, Sk, D).to(dtype))


def call(q=None, k=None, v=None, **kw):
    """attention() with good defaults for whatever is not given."""
    dq, dk, dv = qkv()
    return flashattn_ext.attention(dq if q is None else q, dk if k is None else k, dv if v is None else v, **kw)


Q, K, V = qkv()
Q32, K32, V32 = qkv(dtype=torch.float32)

# (id, thunk, exception, regex that must name the argument)
API_CASES = [
    ("q_list", lambda: call(q=Q.tolist()), TypeError, r"^q must be a torch\.Tensor"),
    ("k_numpy", lambda: call(k=K.float().numpy()), TypeError, r"^k must be a torch\.Tensor"),
    ("v_none", lambda: flashattn_ext.attention(Q, K, None), TypeError, r"^v must be a torch\.Tensor"),
    ("q_sparse", lambda: call(q=Q.float().to_sparse(), k=K32, v=V32), ValueError, r"^q must be a dense"),
    ("mixed_devices", lambda: call(k=K.to("meta")), ValueError, r"same device: q is on cpu, k is on meta"),
    ("v_other_device", lambda: call(v=V.to("meta")), ValueError, r"v is on meta"),
    ("unsupported_device", lambda: call(q=Q.to("meta"), k=K.to("meta"), v=V.to("meta")), ValueError,
     r"q, k, v are on meta"),
    ("q_rank3", lambda: call(q=Q[0]), ValueError, r"^q must be 4-D"),
    ("k_rank5", lambda: call(k=K[None]), ValueError, r"^k must be 4-D"),
    ("v_rank3", lambda: call(v=V[0]), ValueError, r"^v must be 4-D"),
    ("kv_shape_mismatch", lambda: call(v=V[:, :, :4]), ValueError, r"^k and v must have the same shape"),
    ("batch_mismatch", lambda: call(k=K[:1], v=V[:1]), ValueError, r"^q and k must have the same batch"),
    ("head_dim_mismatch", lambda: call(k=K[..., :32], v=V[..., :32]), ValueError, r"^q and k/v .* head dim"),
    ("head_dim_zero", lambda: call(q=Q[..., :0], k=K[..., :0], v=V[..., :0]), ValueError, r"^head dim"),
    ("hkv_zero", lambda: call(k=K[:, :0], v=V[:, :0]), ValueError, r"^k and v must have at least one head"),
    ("hq_not_multiple", lambda: call(q=Q[:, :3]), ValueError, r"q heads Hq=3 .* k/v heads Hkv=2"),
    ("q_last_dim_strided", lambda: call(q=Q.transpose(-1, -2).contiguous().transpose(-1, -2)), ValueError,
     r"^q must have a contiguous last dim"),
    ("v_last_dim_strided", lambda: call(v=torch.randn(2, 2, 64, 8).half().transpose(-1, -2)), ValueError,
     r"^v must have a contiguous last dim"),
    ("q_int_dtype", lambda: call(q=Q.to(torch.int32)), TypeError, r"^q\.dtype must be one of"),
    ("q_complex", lambda: call(q=torch.randn(2, 4, 8, 64, dtype=torch.complex64)), TypeError, r"^q\.dtype"),
    ("k_dtype_mismatch", lambda: call(k=K.float()), TypeError, r"^k\.dtype \(float32\) must equal q\.dtype"),
    ("v_dtype_mismatch", lambda: call(v=V.bfloat16()), TypeError, r"^v\.dtype \(bfloat16\) must equal"),
    ("causal_int", lambda: call(causal=1), TypeError, r"^causal must be a bool"),
    ("causal_none", lambda: call(causal=None), TypeError, r"^causal must be a bool"),
    ("return_lse_str", lambda: call(return_lse="yes"), TypeError, r"^return_lse must be a bool"),
    ("deterministic_int", lambda: call(deterministic=1), TypeError, r"^deterministic must be a bool"),
    ("scale_nan", lambda: call(scale=math.nan), ValueError, r"^scale must be a finite positive"),
    ("scale_inf", lambda: call(scale=math.inf), ValueError, r"^scale must be a finite positive"),
    ("scale_zero", lambda: call(scale=0.0), ValueError, r"^scale must be a finite positive"),
    ("scale_negative", lambda: call(scale=-0.125), ValueError, r"^scale must be a finite positive"),
    ("scale_bool", lambda: call(scale=True), TypeError, r"^scale must be None or a positive float"),
    ("scale_str", lambda: call(scale="0.1"), TypeError, r"^scale must be None or a positive float"),
    ("scale_tensor", lambda: call(scale=torch.tensor(0.1)), TypeError, r"^scale must be None"),
    ("window_int", lambda: call(window=4), TypeError, r"^window must be a tuple"),
    ("window_none", lambda: call(window=None), TypeError, r"^window must be a tuple"),
    ("window_len3", lambda: call(window=(1, 2, 3)), ValueError, r"^window must have exactly 2 entries"),
    ("window_float", lambda: call(window=(2.0, -1)), TypeError, r"^window left must be an int"),
    ("window_bool", lambda: call(window=(-1, True)), TypeError, r"^window right must be an int"),
    ("window_below_minus_one", lambda: call(window=(-2, 0)), ValueError, r"^window left must be >= -1"),
    ("window_right_below", lambda: call(window=(3, -5)), ValueError, r"^window right must be >= -1"),
    ("cuda_dtype_float32", lambda: validate.check_dtypes(Q32, K32, V32, cuda=True), TypeError,
     r"^q\.dtype must be one of \['float16', 'bfloat16'\] on CUDA, got float32"),
]


@pytest.mark.parametrize("thunk,exc,match", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_bad_argument_raises(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


def test_at_least_25_distinct_cases():
    assert len({c[0] for c in API_CASES}) == len(API_CASES) >= 25


def test_good_arguments_pass_every_check():
    # Positive control: the same helpers accept valid input, so the failures above are the intended ones.
    out = call(causal=True, scale=np.float32(0.1), window=(np.int64(3), -1), return_lse=False)
    assert out.shape == Q.shape and torch.isfinite(out).all()
    assert validate.validate_attention_args(Q, K, V, True, None, [2, 0], True) == 64**-0.5
    validate.check_cuda_layout(Q, K, V, head_dims=(64,))


def strided_rows(pad, D=64):
    """(2, 4, 8, D) fp16 view whose rows are D + pad elements apart."""
    return torch.randn(2, 4, 8, D + pad).half()[..., :D]


def misaligned(D=64):
    """(2, 4, 8, D) fp16 view starting 2 bytes after a 16-byte boundary."""
    buf = torch.empty(2 * 4 * 8 * D + 8, dtype=torch.float16)
    off = (-buf.data_ptr() // 2) % 8 + 1  # one element past an aligned address
    return buf[off:off + 2 * 4 * 8 * D].view(2, 4, 8, D)


CUDA_LAYOUT_CASES = [
    ("head_dim_not_built", dict(q=torch.randn(2, 4, 8, 80).half(), k=torch.randn(2, 2, 8, 80).half(),
                                v=torch.randn(2, 2, 8, 80).half()), r"^head dim 80 .* not supported"),
    ("q_row_stride_not_mult_8", dict(q=strided_rows(4)), r"^q strides \(.*\) must be multiples of 8"),
    ("k_row_stride_not_mult_8", dict(k=strided_rows(2)[:, :2]), r"^k strides .* must be multiples of 8"),
    ("v_batch_stride_not_mult_8", dict(v=torch.randn(2, 2 * 8 * 64 + 4).half()[:, :2 * 8 * 64].view(2, 2, 8, 64)),
     r"^v strides \(1028, 512, 64, 1\) must be multiples of 8"),
    ("q_misaligned", dict(q=misaligned()), r"^q\.data_ptr\(\) must be 16-byte aligned"),
    ("v_misaligned", dict(v=misaligned()[:, :2]), r"^v\.data_ptr\(\) must be 16-byte aligned"),
]


@pytest.mark.parametrize("tensors,match", [c[1:] for c in CUDA_LAYOUT_CASES], ids=[c[0] for c in CUDA_LAYOUT_CASES])
def test_cuda_layout_checks_on_cpu_tensors(tensors, match):
    args = dict(zip("qkv", qkv()))
    args.update(tensors)
    with pytest.raises(ValueError, match=match):
        validate.check_cuda_layout(args["q"], args["k"], args["v"], head_dims=(32, 64, 128))


def test_cuda_layout_ignores_strides_of_size_one_dims_and_empty_tensors():
    q = torch.randn(1, 4, 8, 64).half().as_strided((1, 4, 8, 64), (3, 512, 64, 1))  # batch stride 3, size 1
    validate.check_cuda_layout(q, *qkv(B=1)[1:], head_dims=(64,))
    validate.check_cuda_layout(misaligned()[:, :, :0], *qkv()[1:], head_dims=(64,))  # nothing to load


def test_cuda_without_extension_raises_runtime_error_with_build_hint(monkeypatch):
    monkeypatch.setattr(_ops, "HAS_CUDA_EXT", False)
    monkeypatch.setattr(_ops, "_C", None)
    with pytest.raises(RuntimeError, match=r"CUDA extension \(flashattn_ext\._C\) is not built.*install"):
        validate.check_cuda_runtime(torch.device("cuda", 0))


def test_old_gpu_raises_value_error(monkeypatch):
    monkeypatch.setattr(_ops, "HAS_CUDA_EXT", True)
    monkeypatch.setattr(validate, "_device_capability", lambda device: (7, 5))
    with pytest.raises(ValueError, match=r"compute capability 7\.5.*>= 8\.0"):
        validate.check_cuda_runtime(torch.device("cuda", 0))
    monkeypatch.setattr(validate, "_device_capability", lambda device: (8, 0))
    validate.check_cuda_runtime(torch.device("cuda", 0))  # Ampere passes


def test_grads_are_computed():
    # Nothing refuses requires_grad any more (the CUDA backward is tested in tests/test_bwd_gpu.py); on CPU the
    # reference path is differentiable.
    assert not hasattr(validate, "check_grad_supported")
    q, k, v = (t.float().requires_grad_() for t in qkv())
    out, lse = flashattn_ext.attention(q, k, v, causal=True, return_lse=True, deterministic=True)
    (out.sum() + lse.sum()).backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()
    assert v.grad.abs().sum() > 0 and q.grad.abs().sum() > 0


def test_errors_come_before_any_compute(monkeypatch):
    # A bad argument must never reach the reference / kernel.
    import flashattn_ext.api as api

    def boom(*a, **k):
        raise AssertionError("compute ran before validation")

    monkeypatch.setattr(api, "attention_reference", boom)
    with pytest.raises(ValueError, match="^window"):
        call(window=(-3, 0))


@pytest.mark.parametrize("algorithm", ["fa4", "FA2", "", None, 2])
def test_algorithm_rejected_names_the_argument(algorithm):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"^algorithm must be one of \('auto', 'fa2', 'fa1', 'fa3'\)"):
        flashattn_ext.attention(q, q, q, algorithm=algorithm)
    with pytest.raises(ValueError, match=r"^algorithm must be one of"):
        flashattn_ext.resolve_algorithm(algorithm)


def test_auto_algorithm_rule_is_fa2():
    assert flashattn_ext.resolve_algorithm("auto") == "fa2"
    assert flashattn_ext.resolve_algorithm("fa1") == "fa1"
    assert flashattn_ext.resolve_algorithm("fa3") == "fa3"  # a known name; on a GPU the op decides if it runs


# The CUDA hot path runs only validate.scalar_args in Python (the op checks tensors in C++): it must raise the same
# error as the CPU path for every bad non-tensor argument it sees. (Finite-positive scale is the op's check.)
SCALAR_CASES = [
    ("causal_int", dict(causal=1), TypeError, r"^causal must be a bool"),
    ("causal_none", dict(causal=None), TypeError, r"^causal must be a bool"),
    ("return_lse_str", dict(return_lse="yes"), TypeError, r"^return_lse must be a bool"),
    ("deterministic_int", dict(deterministic=1), TypeError, r"^deterministic must be a bool"),
    ("scale_bool", dict(scale=True), TypeError, r"^scale must be None or a positive float"),
    ("scale_str", dict(scale="0.1"), TypeError, r"^scale must be None or a positive float"),
    ("scale_tensor", dict(scale=torch.tensor(0.1)), TypeError, r"^scale must be None"),
    ("scale_negative_int", dict(scale=-1), ValueError, r"^scale must be a finite positive"),
    ("window_int", dict(window=4), TypeError, r"^window must be a tuple"),
    ("window_none", dict(window=None), TypeError, r"^window must be a tuple"),
    ("window_len3", dict(window=(1, 2, 3)), ValueError, r"^window must have exactly 2 entries"),
    ("window_float", dict(window=(2.0, -1)), TypeError, r"^window left must be an int"),
    ("window_bool", dict(window=(-1, True)), TypeError, r"^window right must be an int"),
    ("window_below_minus_one", dict(window=(-2, 0)), ValueError, r"^window left must be >= -1"),
    ("window_right_below_causal", dict(window=(3, -5), causal=True), ValueError, r"^window right must be >= -1"),
    ("algorithm_none", dict(algorithm=None), ValueError, r"^algorithm must be one of"),
]


def scalar_args(causal=False, scale=None, window=(-1, -1), return_lse=False, deterministic=False, algorithm="auto"):
    return validate.scalar_args(Q, causal, scale, window, return_lse, deterministic, algorithm)


@pytest.mark.parametrize("kwargs,exc,match", [c[1:] for c in SCALAR_CASES], ids=[c[0] for c in SCALAR_CASES])
def test_hot_path_scalar_checks_match_the_cpu_path(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        scalar_args(**kwargs)
    with pytest.raises(exc, match=match):
        call(**kwargs)


def test_hot_path_scalar_args_values():
    D = Q.shape[-1]
    assert scalar_args() == (D**-0.5, -1, -1)
    assert scalar_args(causal=True) == (D**-0.5, -1, 0)
    assert scalar_args(causal=True, window=(5, 3)) == (D**-0.5, 5, 0)  # causal: min(right, 0)
    assert scalar_args(window=[np.int64(4), 2], scale=np.float32(0.5)) == (0.5, 4, 2)
    left, right = scalar_args(window=(np.int64(4), np.int32(2)))[1:]
    assert type(left) is int and type(right) is int  # plain ints for the op's schema
    assert scalar_args(scale=2) == (2.0, -1, -1)
