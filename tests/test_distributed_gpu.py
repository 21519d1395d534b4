"""Ring attention on 2 GPUs with NCCL against single-GPU attention() and a float64 oracle.

Each rank builds the whole sequence (same seed), runs ring_attention on its shards and, on its own GPU,
attention() on the whole sequence and the oracle, then checks its rows. Rules (docs/testing.md): the ring's error
against the float64 oracle is at most 2x (out) / 3x (grads) the error of the same math in bf16, plus the rounding
of the exact result and a floor; and at most 2x single-GPU attention()'s own error plus the same slack.
The oracle runs a block of query rows at a time so that S = 128k fits (the 128k case is marked slow).
"""
import functools

import pytest
import torch

import flashattn_ext
from flashattn_ext.distributed import ring_attention, shard_sequence
from flashattn_ext.reference import attention_reference
from flashattn_ext.testing import lse_check, max_abs_err

from dist_harness import run_ranks

WORLD = 2
FLOOR = 1e-4

pytestmark = [
    pytest.mark.requires_cuda_ext,
    pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA devices"),
]


def head_dim():
    dims = flashattn_ext.build_info().get("head_dims") or [128]
    return 128 if 128 in dims else dims[0]


# name -> (layout, causal, B, Hq, Hkv, S, window)
CASES = {
    "zigzag-causal-gqa-8k": ("zigzag", True, 1, 8, 2, 8192, (-1, -1)),
    "zigzag-full-mha-4100": ("zigzag", False, 2, 4, 4, 4100, (-1, -1)),
    "contiguous-causal-mha-4100": ("contiguous", True, 1, 4, 4, 4100, (-1, -1)),
    "contiguous-full-gqa-8k": ("contiguous", False, 1, 8, 2, 8192, (-1, -1)),
    "zigzag-causal-window-8k": ("zigzag", True, 1, 4, 1, 8192, (1000, -1)),
    "zigzag-causal-gqa-32k": ("zigzag", True, 1, 8, 2, 32768, (-1, -1)),
}
MIXED_CASE = "zigzag-causal-gqa-8k-cpu-gloo-cuda-nccl-group"
SLOW_CASES = {
    "zigzag-causal-gqa-128k": ("zigzag", True, 1, 4, 2, 131072, (-1, -1)),
}


def chunked_reference(q, k, v, dout, causal, left, upcast):
    """(out, lse, dq, dk, dv) of attention_reference on the whole sequence (Sq == Sk), a block of query rows at a
    time: with a causal mask, rows [a, b) see only keys [a - left, b), and slicing the keys to end at b keeps the
    bottom-right alignment exact. upcast=True: float64; False: the same math in the inputs' dtype."""
    assert causal or left < 0, "a window without causal would shift the alignment of the sliced keys"
    dtype = torch.float64 if upcast else q.dtype
    B, Hq, S, D = q.shape
    qd, kd, vd, dod = (t.to(dtype) for t in (q, k, v, dout))
    out, dq = torch.empty_like(qd), torch.empty_like(qd)
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    acc = torch.promote_types(dtype, torch.float32)
    dk, dv = torch.zeros_like(kd, dtype=acc), torch.zeros_like(vd, dtype=acc)
    rows = max(64, 2**27 // (B * Hq * S))
    for a in range(0, S, rows):
        b = min(S, a + rows)
        j0 = max(0, a - left) if causal and left >= 0 else 0
        j1 = b if causal else S
        qc = qd[:, :, a:b].detach().requires_grad_()
        kc = kd[:, :, j0:j1].detach().requires_grad_()
        vc = vd[:, :, j0:j1].detach().requires_grad_()
        o, l = attention_reference(qc, kc, vc, causal=causal, window=(left, -1), return_lse=True, upcast=upcast)
        gq, gk, gv = torch.autograd.grad(o, (qc, kc, vc), dod[:, :, a:b])
        # Detached: assigning a tensor that requires grad into out/lse would chain every block's autograd graph
        # (and its saved S-wide float64 scores) onto them, which at S = 128k runs the GPU out of memory.
        out[:, :, a:b], lse[:, :, a:b], dq[:, :, a:b] = o.detach(), l.detach(), gq
        dk[:, :, j0:j1] += gk
        dv[:, :, j0:j1] += gv
    return out, lse, dq, dk.to(dtype), dv.to(dtype)


def with_grads(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    return (out.detach(), lse.detach()) + torch.autograd.grad(out, (q, k, v), dout)


def check_case(rank, case, group=None):
    layout, causal, B, Hq, Hkv, S, window = case
    D = head_dim()
    g = torch.Generator().manual_seed(S + Hq)
    mk = lambda H: torch.randn(B, H, S, D, generator=g).to("cuda", torch.bfloat16)
    q, k, v, dout = mk(Hq), mk(Hkv), mk(Hkv), mk(Hq)
    kw = dict(causal=causal, window=window, return_lse=True)
    shard = functools.partial(shard_sequence, group=group, layout=layout)

    ring = with_grads(lambda *t: ring_attention(*t, group=group, layout=layout, **kw), shard(q), shard(k), shard(v),
                      shard(dout))
    single = [shard(t) for t in with_grads(lambda *t: flashattn_ext.attention(*t, **kw), q, k, v, dout)]
    oracle = [shard(t) for t in chunked_reference(q, k, v, dout, causal, window[0], upcast=True)]
    lowp = [shard(t) for t in chunked_reference(q, k, v, dout, causal, window[0], upcast=False)]

    msgs = []
    lse_err, lse_ok = lse_check(ring[1], oracle[1])
    if not lse_ok:
        msgs.append(f"lse: err {lse_err:.3g} or -inf rows differ")
    for name, i, factor in (("out", 0, 2), ("dq", 2, 3), ("dk", 3, 3), ("dv", 4, 3)):
        rounding = max_abs_err(oracle[i].to(torch.bfloat16), oracle[i])
        err = max_abs_err(ring[i], oracle[i])
        bound = factor * max_abs_err(lowp[i], oracle[i]) + (0 if i == 0 else 2 * rounding) + FLOOR
        single_bound = 2 * max_abs_err(single[i], oracle[i]) + 2 * rounding + FLOOR
        if not err <= bound:
            msgs.append(f"{name}: err {err:.3g} > {factor}x low-precision bound {bound:.3g}")
        if not err <= single_bound:
            msgs.append(f"{name}: err {err:.3g} > 2x single-GPU bound {single_bound:.3g}")
    return "; ".join(msgs)


def run_cases(rank, world, names):
    import torch.distributed as dist

    results = {}
    for name in names:
        try:
            if name == MIXED_CASE:  # every rank gets here at the same time: new_group is collective
                # A group that also has gloo: ring_attention's argument check then runs on the CPU (no GPU sync).
                mixed = dist.new_group(backend="cpu:gloo,cuda:nccl")
                results[name] = check_case(rank, CASES["zigzag-causal-gqa-8k"], group=mixed)
                continue
            results[name] = check_case(rank, {**CASES, **SLOW_CASES}[name])
        except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
            results[name] = f"raised {type(e).__name__}: {e}"
        torch.cuda.empty_cache()
    return results


def run_fast(rank, world):
    return run_cases(rank, world, list(CASES) + [MIXED_CASE])


def run_slow(rank, world):
    return run_cases(rank, world, list(SLOW_CASES))


@functools.lru_cache(maxsize=None)
def results_for(fn):
    # Bounded below the device tool's 10-minute limit per command: a hang fails instead of eating the budget.
    return run_ranks(fn, WORLD, backend="nccl", timeout_s=300 if fn is run_fast else 480)


def assert_case(fn, case):
    failures = {rank: res.get(case, "case did not run") for rank, res in enumerate(results_for(fn))}
    failures = {rank: msg for rank, msg in failures.items() if msg}
    assert not failures, failures


@pytest.mark.parametrize("case", list(CASES) + [MIXED_CASE])
def test_ring_attention_nccl(case):
    assert_case(run_fast, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SLOW_CASES))
def test_ring_attention_nccl_128k(case):
    assert_case(run_slow, case)
