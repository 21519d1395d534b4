"""Ring attention on CPU with gloo: 1, 2, 3 and 4 ranks in spawned processes.

Each world size is spawned once and runs every case (tests/dist_harness.py); each case compares the shards'
forward, lse and gradients with flashattn_ext.attention on the whole sequence, computed on every rank. float64
cases must agree to the float32 rounding of lse (the contract's lse dtype); the bfloat16 case uses the accuracy
rules of the GPU tests against a float64 oracle. Error cases check that every rank raises, none hangs.
"""
import functools
import zlib

import pytest
import torch

import flashattn_ext
from flashattn_ext.distributed import ring_attention, shard_sequence, unshard_sequence
from flashattn_ext.reference import attention_reference
from flashattn_ext.testing import max_abs_err

from dist_harness import run_ranks

WORLDS = (1, 2, 3, 4)
TIMEOUT_S = 150
F64_TOL = dict(atol=2e-6, rtol=1e-5)  # lse is float32 by contract: merge weights and P carry its rounding


def accuracy_cases():
    """name -> keyword arguments of one comparison. Local shard lengths are small and even (zigzag)."""
    cases = {}
    for layout in ("zigzag", "contiguous"):
        for causal in (False, True):
            tag = f"{layout}-{'causal' if causal else 'full'}"
            cases[f"{tag}-mha"] = dict(layout=layout, causal=causal, B=2, Hq=2, Hkv=2, Sq_l=6, Sk_l=6, D=8)
            cases[f"{tag}-gqa3to1"] = dict(layout=layout, causal=causal, B=1, Hq=3, Hkv=1, Sq_l=4, Sk_l=4, D=16)
    cases["zigzag-causal-window"] = dict(layout="zigzag", causal=True, B=1, Hq=2, Hkv=1, Sq_l=8, Sk_l=8, D=8,
                                         window=(5, -1))
    cases["contiguous-window-both-sides"] = dict(layout="contiguous", causal=False, B=1, Hq=1, Hkv=1, Sq_l=6,
                                                 Sk_l=6, D=8, window=(3, 2))
    cases["zigzag-causal-sq-gt-sk"] = dict(layout="zigzag", causal=True, B=1, Hq=5, Hkv=5, Sq_l=6, Sk_l=4, D=8)
    cases["contiguous-causal-sq-lt-sk"] = dict(layout="contiguous", causal=True, B=1, Hq=2, Hkv=2, Sq_l=2,
                                               Sk_l=6, D=8)
    cases["zigzag-causal-lse-grad-scale"] = dict(layout="zigzag", causal=True, B=1, Hq=4, Hkv=2, Sq_l=4, Sk_l=4,
                                                 D=8, lse_grad=True, scale=0.3)
    cases["zigzag-causal-bf16-rule"] = dict(layout="zigzag", causal=True, B=1, Hq=2, Hkv=1, Sq_l=16, Sk_l=16, D=16,
                                            dtype=torch.bfloat16)
    return cases


def error_cases():
    return ["zigzag-odd-shard", "shapes-differ", "one-rank-bad-window", "causal-differs", "shard-indivisible",
            "unshard-shapes-differ", "group-of-one", "group-usable-after-errors"]


def full_inputs(c, seed):
    """Whole-sequence q, k, v, dout, dlse in float64 (identical on every rank: same seed)."""
    g = torch.Generator().manual_seed(seed)
    W = c["world"]
    Sq, Sk = W * c["Sq_l"], W * c["Sk_l"]
    q = torch.randn(c["B"], c["Hq"], Sq, c["D"], generator=g, dtype=torch.float64)
    k = torch.randn(c["B"], c["Hkv"], Sk, c["D"], generator=g, dtype=torch.float64)
    v = torch.randn(c["B"], c["Hkv"], Sk, c["D"], generator=g, dtype=torch.float64)
    dout = torch.randn(c["B"], c["Hq"], Sq, c["D"], generator=g, dtype=torch.float64)
    # float32 values: the lse is float32, and autograd rounds its gradient to that dtype
    dlse = torch.randn(c["B"], c["Hq"], Sq, generator=g).double()
    return q, k, v, dout, dlse


def finite(lse):
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # -inf * 0 would be NaN in a loss


def forward_and_grads(fn, q, k, v, dout, dlse, lse_grad):
    """(out, lse, dq, dk, dv) of fn(q, k, v) -> (out, lse) for the loss <out, dout> (+ <lse, dlse>)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.double() * dout).sum()
    if lse_grad:
        loss = loss + (finite(lse).double() * dlse).sum()
    return (out.detach(), lse.detach()) + torch.autograd.grad(loss, (q, k, v))


def compare_f64(rank, world, c):
    q, k, v, dout, dlse = full_inputs(c, seed=zlib.crc32(repr(sorted(c.items())).encode()))
    kw = dict(causal=c["causal"], scale=c.get("scale"), window=c.get("window", (-1, -1)))
    want = forward_and_grads(lambda *t: flashattn_ext.attention(*t, return_lse=True, **kw), q, k, v, dout, dlse,
                             c.get("lse_grad", False))
    shard = functools.partial(shard_sequence, layout=c["layout"])
    got = forward_and_grads(lambda *t: ring_attention(*t, layout=c["layout"], return_lse=True, **kw),
                            shard(q), shard(k), shard(v), shard(dout), shard(dlse), c.get("lse_grad", False))
    msgs = []
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        w = shard(w)
        if name == "lse" and not torch.equal(torch.isneginf(g), torch.isneginf(w)):
            msgs.append("lse: -inf rows differ")
            g, w = finite(g), finite(w)
        if g.isnan().any() or not torch.allclose(g.double(), w.double(), **F64_TOL):
            msgs.append(f"{name}: max err {max_abs_err(g, w):.3g}")
    whole = unshard_sequence(got[0], layout=c["layout"])
    if not torch.allclose(whole, want[0], **F64_TOL):
        msgs.append(f"unshard_sequence(out): max err {max_abs_err(whole, want[0]):.3g}")
    return "; ".join(msgs)


def compare_bf16_rule(rank, world, c):
    """flash-attn's rules: out within 2x, grads within 3x, of the low-precision reference's error (+1e-4)."""
    q, k, v, dout, dlse = full_inputs(c, seed=7)
    q, k, v, dout = (t.to(c["dtype"]) for t in (q, k, v, dout))
    oracle = forward_and_grads(lambda *t: attention_reference(*t, causal=True, return_lse=True),
                               q.double(), k.double(), v.double(), dout.double(), dlse, False)
    lowp = forward_and_grads(lambda *t: attention_reference(*t, causal=True, return_lse=True, upcast=False),
                             q, k, v, dout, dlse, False)
    shard = functools.partial(shard_sequence, layout=c["layout"])
    got = forward_and_grads(lambda *t: ring_attention(*t, layout=c["layout"], causal=True, return_lse=True),
                            shard(q), shard(k), shard(v), shard(dout), shard(dlse), False)
    msgs = []
    for name, i, factor in (("out", 0, 2), ("dq", 2, 3), ("dk", 3, 3), ("dv", 4, 3)):
        err = max_abs_err(got[i], shard(oracle[i]))
        bound = factor * max_abs_err(shard(lowp[i]), shard(oracle[i])) + 1e-4
        if not err <= bound:
            msgs.append(f"{name}: err {err:.3g} > bound {bound:.3g}")
    return "; ".join(msgs)


def expect_error(fn, exc_type, *fragments):
    """'' if fn() raises exc_type with every fragment in its message, else what happened instead."""
    try:
        fn()
    except exc_type as e:
        missing = [f for f in fragments if f not in str(e)]
        return f"message {str(e)!r} lacks {missing}" if missing else ""
    except Exception as e:  # noqa: BLE001 - reported as the failure
        return f"raised {type(e).__name__}: {e}"
    return "did not raise"


def check_errors(rank, world):
    t = lambda S, H=2, seed=0: torch.randn(1, H, S, 8, generator=torch.Generator().manual_seed(seed),
                                          dtype=torch.float64)
    res = {}
    if world == 1:
        res["group-of-one"] = expect_error(lambda: ring_attention(t(4), t(4), t(4)), ValueError, "at least 2 ranks")
        # shard/unshard are well defined on one rank: the identity
        x = t(6)
        same = torch.equal(unshard_sequence(shard_sequence(x)), x)
        res["group-usable-after-errors"] = "" if same else "shard/unshard on one rank changed the tensor"
        return res
    res["zigzag-odd-shard"] = expect_error(lambda: ring_attention(t(3), t(3), t(3)), ValueError, "must be even")
    S = 4 if rank == 0 else 6
    res["shapes-differ"] = expect_error(lambda: ring_attention(t(S), t(S), t(S)), ValueError,
                                        "local q length differs")
    window = (-2, 0) if rank == world - 1 else (-1, -1)
    fragment = "window left" if rank == world - 1 else f"rank(s) [{world - 1}]"
    res["one-rank-bad-window"] = expect_error(lambda: ring_attention(t(4), t(4), t(4), window=window), ValueError,
                                              fragment)
    res["causal-differs"] = expect_error(lambda: ring_attention(t(4), t(4), t(4), causal=rank == 0), ValueError,
                                         "causal differs")
    res["shard-indivisible"] = expect_error(lambda: shard_sequence(t(2 * world + 1)), ValueError,
                                            f"divisible by {2 * world}")
    res["unshard-shapes-differ"] = expect_error(lambda: unshard_sequence(t(2 if rank else 4)), ValueError,
                                                "size of dim 2 differs")
    # After all that, no message is left in flight: a real call still matches the whole-sequence attention.
    q, k, v = t(8 * world, 4, seed=1), t(8 * world, 2, seed=2), t(8 * world, 2, seed=3)
    out = ring_attention(*(shard_sequence(x) for x in (q, k, v)))
    ok = torch.allclose(out, shard_sequence(flashattn_ext.attention(q, k, v, causal=True)), **F64_TOL)
    res["group-usable-after-errors"] = "" if ok else "ring_attention wrong after the error cases"
    return res


def check_groups(rank, world):
    """Subgroups (ranks are group ranks, e.g. one context-parallel group per data-parallel replica) and the
    gradient of unshard_sequence."""
    import torch.distributed as dist

    res = {}
    pairs = [dist.new_group([2 * i, 2 * i + 1]) for i in range(world // 2)]  # every rank creates every group
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 4 * world, 8, generator=g, dtype=torch.float64)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    x_l = shard_sequence(x).requires_grad_()
    (unshard_sequence(x_l) * w).sum().backward()
    res["unshard-grad"] = "" if torch.equal(x_l.grad, shard_sequence(w)) else "unshard_sequence gradient wrong"
    if world == 4:
        group = pairs[rank // 2]
        q, k, v = (torch.randn(1, H, 16, 8, generator=g, dtype=torch.float64) for H in (3, 1, 1))
        out = ring_attention(*(shard_sequence(t, group) for t in (q, k, v)), group=group)
        want = shard_sequence(flashattn_ext.attention(q, k, v, causal=True), group)
        ok = torch.allclose(out, want, **F64_TOL)
        res["subgroups"] = "" if ok else f"max err {max_abs_err(out, want):.3g}"
    return res


def run_all(rank, world):
    results = check_errors(rank, world)
    if world == 1:
        return results
    results.update(check_groups(rank, world))
    for name, c in accuracy_cases().items():
        c = dict(c, world=world)
        try:
            results[name] = (compare_bf16_rule if "dtype" in c else compare_f64)(rank, world, c)
        except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
            results[name] = f"raised {type(e).__name__}: {e}"
    return results


@functools.lru_cache(maxsize=None)
def results_for(world):
    return run_ranks(run_all, world, backend="gloo", timeout_s=TIMEOUT_S)


def case_ids(world):
    names = [n for n in error_cases() if world > 1 or n in ("group-of-one", "group-usable-after-errors")]
    if world == 1:
        return names
    groups = ["unshard-grad"] + (["subgroups"] if world == 4 else [])
    return [n for n in names if n != "group-of-one"] + groups + list(accuracy_cases())


@pytest.mark.parametrize("world,case", [(w, n) for w in WORLDS for n in case_ids(w)])
def test_ring_attention_gloo(world, case):
    per_rank = results_for(world)
    failures = {rank: res.get(case, "case did not run") for rank, res in enumerate(per_rank)}
    failures = {rank: msg for rank, msg in failures.items() if msg}
    assert not failures, failures
