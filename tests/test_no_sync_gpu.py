"""No CUDA path synchronises with the host: attention() forward and backward (every family), attention_with_kvcache
(paged and contiguous, with append, automatic and explicit splits, a DecodeWorkspace), merge_states and sdpa, each
run under ``torch.cuda.set_sync_debug_mode("error")``, which turns any synchronising call (a device-to-host read
such as ``.item()``, ``.cpu()``, ``nonzero``) into a RuntimeError. A positive control shows the mode is armed."""
import contextlib

import pytest
import torch

import flashattn_ext
from flashattn_ext import DecodeWorkspace, attention, attention_with_kvcache, merge_states, sdpa
from flashattn_ext.kvcache import decode_head_dims
from flashattn_ext.testing import make_qkv

pytestmark = pytest.mark.requires_cuda_ext

DEVICE = "cuda"
BF16 = torch.bfloat16
BUILT_HEAD_DIMS = flashattn_ext.build_info()["head_dims"]


def head_dim(allowed):
    dims = [d for d in (128, 64) if d in allowed]
    if not dims:
        pytest.skip(f"no head dim of {allowed} compiled (build_info()['head_dims'] = {BUILT_HEAD_DIMS})")
    return dims[0]


@contextlib.contextmanager
def syncs_are_errors():
    """Every call inside raises if it synchronises. Warm up (lazy CUDA / allocator init) before entering."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def run_twice(fn):
    """Once to warm up (first-call initialisation may legitimately sync), once under the error mode."""
    fn()
    with syncs_are_errors():
        fn()
    torch.cuda.synchronize()


def test_the_mode_catches_a_sync():
    x = torch.ones(4, device=DEVICE)
    with syncs_are_errors(), pytest.raises(RuntimeError, match="synchroniz"):
        x.sum().item()


@pytest.mark.parametrize("algorithm", ["auto", "fa2", "fa1"])
def test_attention_forward_does_not_sync(algorithm):
    D = head_dim(BUILT_HEAD_DIMS)
    q, k, v = make_qkv(2, 8, 2, 97, 130, D, BF16, DEVICE, "bshd")
    empty_k = k[:, :, :0]

    def step():
        attention(q, k, v, causal=True, algorithm=algorithm)
        attention(q, k, v, window=(16, 4), return_lse=True, algorithm=algorithm)
        attention(q, empty_k, empty_k, algorithm=algorithm)  # no keys: answered without a launch

    run_twice(step)


@pytest.mark.parametrize("algorithm,deterministic", [("auto", False), ("fa2", True), ("fa1", False)])
def test_attention_backward_does_not_sync(algorithm, deterministic):
    D = head_dim(BUILT_HEAD_DIMS)
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 8, 2, 97, 130, D, BF16, DEVICE, "bshd"))

    def step():
        out, lse = attention(q, k, v, causal=True, return_lse=True, algorithm=algorithm, deterministic=deterministic)
        (out.float().sum() + lse.sum()).backward()

    run_twice(step)
    assert all(t.grad is not None for t in (q, k, v))


def kv_case(D, B=3, Hq=8, Hkv=2, Sq=2, page=16, pages_per_seq=4):
    g = torch.Generator().manual_seed(7)
    num_pages = B * pages_per_seq
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, BF16)  # noqa: E731
    return dict(
        q=rnd(B, Hq, Sq, D), k_new=rnd(B, Hkv, Sq, D), v_new=rnd(B, Hkv, Sq, D),
        k_pages=rnd(num_pages, page, Hkv, D), v_pages=rnd(num_pages, page, Hkv, D),
        k_cont=rnd(B, Hkv, page * pages_per_seq, D), v_cont=rnd(B, Hkv, page * pages_per_seq, D),
        table=torch.randperm(num_pages, generator=g).to(torch.int32).view(B, pages_per_seq).to(DEVICE),
        lens=torch.tensor([5, 17, 40], dtype=torch.int32, device=DEVICE)[:B],
    )


def test_attention_with_kvcache_does_not_sync():
    c = kv_case(head_dim(decode_head_dims()))
    rows = c["q"].shape[0] * c["q"].shape[1] * c["q"].shape[2]
    ws = DecodeWorkspace(*c["q"].shape, max_splits=8)

    def step():
        with torch.no_grad():
            for splits in (0, 1, 3):
                attention_with_kvcache(c["q"], c["k_pages"], c["v_pages"], c["lens"], c["table"], c["k_new"],
                                       c["v_new"], num_splits=splits, return_lse=True)
            attention_with_kvcache(c["q"], c["k_cont"], c["v_cont"], c["lens"], None, c["k_new"], c["v_new"])
            attention_with_kvcache(c["q"], c["k_pages"], c["v_pages"], c["lens"], c["table"], num_splits=2,
                                   workspace=ws)

    assert rows > 0
    run_twice(step)


def test_check_values_is_the_one_reading_values():
    # The opt-in value check reads lengths and tables back (a sync); the default never does.
    c = kv_case(head_dim(decode_head_dims()))
    args = (c["q"], c["k_pages"], c["v_pages"], c["lens"], c["table"])
    with torch.no_grad():
        attention_with_kvcache(*args, check_values=True)
        with syncs_are_errors(), pytest.raises(RuntimeError, match="synchroniz"):
            attention_with_kvcache(*args, check_values=True)
        with syncs_are_errors():
            attention_with_kvcache(*args)
    torch.cuda.synchronize()


def test_merge_states_does_not_sync():
    o = torch.randn(2, 4, 33, 128, device=DEVICE, dtype=BF16)
    lse = torch.randn(2, 4, 33, device=DEVICE)
    run_twice(lambda: merge_states(o, lse, o.flip(2), lse.flip(2)))


def test_sdpa_does_not_sync():
    D = head_dim(BUILT_HEAD_DIMS)
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 8, 8, 97, 97, D, BF16, DEVICE, "bshd"))

    def step():
        sdpa(q, k, v, is_causal=True).float().sum().backward()

    flashattn_ext.reset_sdpa_stats()
    run_twice(step)
    assert flashattn_ext.sdpa_stats()["fallback"] == 0, flashattn_ext.sdpa_stats()
