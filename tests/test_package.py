"""Package surface, op schema, fake (meta) impl and torch.compile traceability; all on CPU."""
import re
from pathlib import Path

import pytest
import torch

import flashattn_ext
from flashattn_ext import _ops
from flashattn_ext.reference import attention_reference
from flashattn_ext.testing import make_qkv

CONTRACT_SCHEMA = ("flashattn_ext::fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, "
                   "int window_right, bool deterministic=False, str algorithm=\"auto\", Tensor? cu_seqlens_q=None, "
                   "Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0) -> (Tensor, Tensor)")
BWD_SCHEMA = ("flashattn_ext::bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
              "int window_left, int window_right, bool deterministic, Tensor? dlse=None, str algorithm=\"auto\", "
              "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0) "
              "-> (Tensor, Tensor, Tensor)")


def test_public_names():
    assert set(flashattn_ext.__all__) == {"attention", "attention_varlen", "build_info", "reference", "resolve_algorithm", "reset_sdpa_stats",
                                         "sdpa", "sdpa_stats", "sdpa_strict", "__version__",
                                         "PagedKVCache", "DecodeWorkspace", "attention_with_kvcache", "merge_states",
                                         "GlobalTokens", "global_tokens"}
    assert callable(flashattn_ext.attention)
    assert flashattn_ext.reference.attention_reference is attention_reference


def test_version_single_source():
    text = (Path(flashattn_ext.__file__).parent / "_version.py").read_text()
    assert re.search(r'^__version__ = "(.+)"$', text, re.M).group(1) == flashattn_ext.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", flashattn_ext.__version__)


def test_build_info_shape():
    info = flashattn_ext.build_info()
    assert info["built"] is _ops.HAS_CUDA_EXT
    assert isinstance(info["head_dims"], list) and isinstance(info["cuda_archs"], str)
    if info["built"]:
        assert info["head_dims"] and set(info["head_dims"]) <= {32, 64, 96, 128, 256}
        assert set(info["dtypes"]) == {"float16", "bfloat16"}
        assert _ops.SUPPORTED_HEAD_DIMS == tuple(info["head_dims"])
    else:
        assert info["error"] and "install" in info["hint"]


@pytest.mark.requires_ext
def test_op_schema_is_the_contract():
    assert str(torch.ops.flashattn_ext.fwd.default._schema) == CONTRACT_SCHEMA
    assert str(torch.ops.flashattn_ext.bwd.default._schema) == BWD_SCHEMA


@pytest.mark.requires_ext
def test_meta_backward_uses_fake_impls():
    # Autograd is registered on the fwd op: a meta forward + backward runs both fake impls.
    q, k, v = (t.to("meta").requires_grad_() for t in make_qkv(2, 8, 2, 33, 50, 64, torch.bfloat16, layout="bshd"))
    out, lse = torch.ops.flashattn_ext.fwd(q, k, v, 0.125, -1, 0, True)
    dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (torch.empty_like(out), torch.empty_like(lse)))
    for g, t in zip((dq, dk, dv), (q, k, v)):
        assert g.device.type == "meta" and g.shape == t.shape and g.dtype == t.dtype


@pytest.mark.requires_ext
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "packed"])
def test_meta_call_uses_fake_impl(layout):
    # Meta tensors dispatch to the registered fake impl: shapes/strides the compiler will assume.
    if layout == "packed":
        qkv = torch.empty(2, 33, 3, 8, 64, device="meta", dtype=torch.bfloat16)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, k, v = (t.to("meta") for t in make_qkv(2, 8, 2, 33, 50, 64, torch.bfloat16, layout=layout))
    out, lse = torch.ops.flashattn_ext.fwd(q, k, v, 0.125, -1, 0)
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == q.dtype
    assert out.stride() == torch.empty_like(q).stride()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32 and lse.is_contiguous()


@pytest.fixture(scope="module")
def cpu_twin_op():
    """A CPU op with the contract's schema and semantics, carrying our fake impl: opcheck then verifies the
    fake impl against real outputs (strides included) without a GPU."""
    lib = torch.library.Library("flashattn_ext_cputwin", "DEF")
    lib.define(CONTRACT_SCHEMA.split("::", 1)[1])

    def cpu_impl(q, k, v, scale, window_left, window_right, deterministic=False, algorithm="auto"):
        ref, lse = attention_reference(q, k, v, scale=scale, window=(window_left, window_right), return_lse=True)
        return torch.empty_like(q).copy_(ref), lse

    lib.impl("fwd", cpu_impl, "CPU")
    torch.library.register_fake("flashattn_ext_cputwin::fwd", _ops._fwd_fake, lib=lib)
    yield torch.ops.flashattn_ext_cputwin.fwd.default
    lib._destroy()


@pytest.mark.parametrize("layout", ["bhsd", "bshd", "packed"])
def test_fake_impl_passes_opcheck_against_cpu_twin(cpu_twin_op, layout):
    if layout == "packed":
        qkv = torch.randn(2, 17, 3, 4, 16)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, k, v = make_qkv(2, 4, 2, 17, 23, 16, torch.float32, layout=layout)
    result = torch.library.opcheck(cpu_twin_op, (q, k, v, 0.25, 3, 0),
                                   test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                               "test_aot_dispatch_dynamic"))
    assert set(result.values()) == {"SUCCESS"}, result


class CausalAttn(torch.nn.Module):
    def forward(self, q, k, v):
        out, lse = flashattn_ext.attention(q, k, v, causal=True, window=(6, -1), return_lse=True)
        return out * 2, lse


@pytest.mark.parametrize("dynamic", [False, True])
def test_cpu_path_compiles_fullgraph(dynamic):
    # Traces validate.py end to end: a graph break anywhere in the checks fails fullgraph=True.
    torch._dynamo.reset()
    model = CausalAttn()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=dynamic)
    for Sq, Sk in [(9, 13), (11, 17)]:
        q, k, v = make_qkv(2, 4, 2, Sq, Sk, 16, torch.float32, layout="bshd", seed=Sq)
        got, want = compiled(q, k, v), model(q, k, v)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
    with pytest.raises(Exception, match="window"):
        torch.compile(lambda q, k, v: flashattn_ext.attention(q, k, v, window=(-5, 0)), fullgraph=True,
                      backend="eager")(q, k, v)
