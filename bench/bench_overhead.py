"""Per-call cost at tiny shapes, where the host side (Python, dispatch, checks, launches) rather than the kernel
decides the time: attention() forward, forward + backward, attention_with_kvcache decode and merge_states, with
SDPA flash and cuDNN (and torch ops for merge_states) measured in the same run.

    python bench/bench_overhead.py [--calls 2000] [--out DIR] [--no-decode-throughput]
    python bench/bench_overhead.py --python-layer     (no GPU needed)

Three numbers per (case, implementation), microseconds per call:
  host_us   host time alone: `calls` back-to-back calls timed with perf_counter, the clock stopped BEFORE the
            closing torch.cuda.synchronize(), so nothing waits on the GPU inside the loop (median of 5 loops).
  wall_us   the same loop including the closing synchronize: the steady-state cost of a stream of calls,
            about max(host, device).
  event_us  do_bench median of one call between CUDA events (L2 flushed): device time plus any launch gaps
            inside the call; the "end to end" number of /work/shared/PEERS.md.
"ours raw op" rows call torch.ops.flashattn_ext.* directly: host_us(ours) - host_us(raw op) is what the Python
layer of the public API costs.

The decode-throughput section (issue #12's target) compares the public attention_with_kvcache with the raw op
at B1 L32k and B64 L4k (paged, page 16, GQA 32/8, D128): event_us of each and their ratio.

--python-layer times, on any machine, only the Python that attention() runs on a CUDA tensor before the op
(validate.scalar_args and the call), with the op replaced by a stub: the part of host_us that is Python.

Writes overhead_results.json into --out (default $OUT, else bench/results) and prints the tables.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)
import report  # noqa: E402
from bench_decode import paged_copy  # noqa: E402
from timing import median_ms  # noqa: E402

import flashattn_ext  # noqa: E402
from flashattn_ext import _ops  # noqa: E402
from flashattn_ext.kvcache import merge_states_reference  # noqa: E402

BF16 = torch.bfloat16
PEERS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}


def host_and_wall_us(fn, calls, loops=5):
    """(host_us, wall_us) per call, medians over `loops` loops of `calls` calls (see the module docstring)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) / calls * 1e6)
        wall.append((t2 - t0) / calls * 1e6)
    return statistics.median(host), statistics.median(wall)


def measure(fn, calls):
    """{host_us, wall_us, event_us}, or {error} when the implementation cannot run the case."""
    try:
        fn()
        torch.cuda.synchronize()
        host, wall = host_and_wall_us(fn, calls)
        return {"host_us": host, "wall_us": wall, "event_us": median_ms(fn) * 1e3}
    except Exception as e:  # e.g. a cuDNN backend that refuses the shape
        torch.cuda.synchronize()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def sdpa_call(backend, q, k, v, causal):
    gqa = q.shape[1] != k.shape[1]

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return run


def with_backward(fwd, q, k, v):
    """fwd() then the gradients of (q, k, v) for a fixed dout: torch.autograd.grad, so nothing accumulates."""
    dout = torch.randn_like(q)

    def run():
        return torch.autograd.grad(fwd(), (q, k, v), dout)
    return run


def attention_cases(calls):
    rows = []
    for B, Hq, Hkv, S, D, causal in [(1, 32, 32, 128, 128, True), (1, 32, 8, 128, 128, True),
                                     (1, 16, 16, 512, 64, False)]:
        if D not in _ops.SUPPORTED_HEAD_DIMS:
            continue
        g = torch.Generator().manual_seed(S)
        q, k, v = (torch.randn(B, H, S, D, generator=g).to("cuda", BF16) for H in (Hq, Hkv, Hkv))
        label = f"B{B} Hq{Hq} Hkv{Hkv} S{S} D{D}{' causal' if causal else ''}"
        right = 0 if causal else -1
        fwd_impls = {
            "ours": lambda: flashattn_ext.attention(q, k, v, causal=causal),
            "ours raw op": lambda: torch.ops.flashattn_ext.fwd.default(q, k, v, D ** -0.5, -1, right, False, "auto"),
        }
        fwd_impls.update({name: sdpa_call(backend, q, k, v, causal) for name, backend in PEERS.items()})
        with torch.no_grad():
            for name, fn in fwd_impls.items():
                rows.append({"case": f"fwd {label}", "impl": name, **measure(fn, calls)})
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        bwd_impls = {"ours": with_backward(lambda: flashattn_ext.attention(qg, kg, vg, causal=causal), qg, kg, vg)}
        bwd_impls.update({name: with_backward(sdpa_call(backend, qg, kg, vg, causal), qg, kg, vg)
                          for name, backend in PEERS.items()})
        for name, fn in bwd_impls.items():
            rows.append({"case": f"fwd+bwd {label}", "impl": name, **measure(fn, calls)})
    return rows


def decode_inputs(B, L, Hq=32, Hkv=8, D=128, page=16):
    g = torch.Generator().manual_seed(B * 7919 + L)
    q = torch.randn(B, Hq, 1, D, generator=g).to("cuda", BF16)
    k = torch.randn(B, Hkv, L, D, generator=g).to("cuda", BF16)
    v = torch.randn(B, Hkv, L, D, generator=g).to("cuda", BF16)
    kp, vp, table = paged_copy(k, v, page, torch.Generator(device="cuda").manual_seed(B * 7919 + L))
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    ws = flashattn_ext.DecodeWorkspace(B, Hq, 1, D)
    return q, k, v, kp, vp, table, lens, ws


def decode_impls(q, k, v, kp, vp, table, lens, ws):
    D = q.shape[-1]
    impls = {
        "ours": lambda: flashattn_ext.attention_with_kvcache(q, kp, vp, lens, table, workspace=ws),
        "ours raw op": lambda: _ops.kvcache_fwd(q, kp, vp, lens, table, None, None, D ** -0.5, -1, 0, 0, ws.buffer),
    }
    impls.update({name: sdpa_call(backend, q, k, v, False) for name, backend in PEERS.items()})
    return impls


def decode_and_merge_cases(calls):
    rows = []
    if 128 in flashattn_ext.kvcache.decode_head_dims():
        with torch.no_grad():
            for name, fn in decode_impls(*decode_inputs(1, 1024)).items():
                rows.append({"case": "decode B1 Hq32 Hkv8 L1024 D128 page16", "impl": name, **measure(fn, calls)})
    o_a, o_b = (torch.randn(1, 32, 1, 128, device="cuda", dtype=BF16) for _ in range(2))
    lse_a, lse_b = (torch.randn(1, 32, 1, device="cuda") for _ in range(2))
    merge = {"ours": lambda: flashattn_ext.merge_states(o_a, lse_a, o_b, lse_b),
             "torch ops (merge_states_reference)": lambda: merge_states_reference(o_a, lse_a, o_b, lse_b)}
    if _ops.HAS_MERGE_OP:
        merge["ours raw op"] = lambda: _ops.merge_states(o_a, lse_a, o_b, lse_b)
    for name, fn in merge.items():
        rows.append({"case": "merge_states B1 H32 S1 D128", "impl": name, **measure(fn, calls)})
    return rows


def decode_throughput():
    """Public attention_with_kvcache vs the raw op where the kernel dominates (issue #12: within 5%)."""
    out = []
    if 128 not in flashattn_ext.kvcache.decode_head_dims():
        return out
    for B, L in [(1, 32768), (64, 4096)]:
        impls = decode_impls(*decode_inputs(B, L))
        with torch.no_grad():
            public, raw = (median_ms(impls[name]) * 1e3 for name in ("ours", "ours raw op"))
        out.append({"case": f"decode B{B} L{L} paged16", "public_us": public, "raw_op_us": raw,
                    "public_over_raw": public / raw})
    return out


def python_layer_us(calls=20000, loops=7):
    """Best-of-loops us per call of attention()'s CUDA-branch Python with a stub op (see the docstring)."""
    from flashattn_ext import validate
    q = torch.randn(1, 32, 128, 128, dtype=BF16)
    out, lse = torch.empty_like(q), torch.empty(1, 32, 128)

    def stub(*args):
        return out, lse

    def python_layer(q, k, v, causal=False, scale=None, return_lse=False, window=(-1, -1), algorithm="auto",
                     deterministic=False, global_mask=None):  # the statements of attention()'s CUDA branch, stub op
        if global_mask is not None:
            raise AssertionError("the hot path has no global tokens")
        if isinstance(q, torch.Tensor) and (q.is_cuda or True):
            scale, left, right = validate.scalar_args(q, causal, scale, window, return_lse, deterministic, algorithm)
            o, l = stub(q, k, v, scale, left, right, deterministic, algorithm)
            return (o, l) if return_lse else o

    cases = {"causal=True": lambda: python_layer(q, q, q, causal=True),
             "causal, scale, window, return_lse": lambda: python_layer(q, q, q, causal=True, scale=0.1,
                                                                        window=(64, -1), return_lse=True),
             "stub op alone": lambda: stub(q, q, q, 0.1, -1, 0, False, "auto")}
    res = {}
    for name, fn in cases.items():
        for _ in range(1000):
            fn()
        best = float("inf")
        for _ in range(loops):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        res[name] = best
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000, help="calls per host-timed loop (>= 2000 for the issue)")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--no-decode-throughput", action="store_true", help="skip the B1 L32k / B64 L4k section")
    p.add_argument("--python-layer", action="store_true", help="only time attention()'s Python (no GPU needed)")
    args = p.parse_args()
    if args.python_layer:
        report.print_table(["attention() Python layer", "us/call"], [[k, v] for k, v in python_layer_us().items()])
        return
    if not (torch.cuda.is_available() and _ops.HAS_CUDA_EXT):
        raise SystemExit(f"needs a GPU and a built extension (build_info: {flashattn_ext.build_info()})")
    os.makedirs(args.out, exist_ok=True)

    rows = attention_cases(args.calls) + decode_and_merge_cases(args.calls)
    report.print_table(["case", "impl", "host_us", "wall_us", "event_us", "error"],
                       [[r["case"], r["impl"], r.get("host_us"), r.get("wall_us"), r.get("event_us"),
                         r.get("error", "")] for r in rows])
    throughput = [] if args.no_decode_throughput else decode_throughput()
    if throughput:
        print()
        report.print_table(["case", "public_us", "raw_op_us", "public/raw"],
                           [[t["case"], t["public_us"], t["raw_op_us"], f"{t['public_over_raw']:.3f}"]
                            for t in throughput])
    report.write_json(os.path.join(args.out, "overhead_results.json"),
                      {"environment": report.environment(), "calls": args.calls, "rows": rows,
                       "decode_public_vs_raw": throughput})


if __name__ == "__main__":
    main()
