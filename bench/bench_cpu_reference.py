"""CPU path (flashattn_ext.reference.attention_reference, what attention() runs on CPU tensors) against
F.scaled_dot_product_attention on the same CPU: forward time and peak memory growth, float32.

    python bench/bench_cpu_reference.py                # the cases below, 3 timed calls each after one warm-up
    python bench/bench_cpu_reference.py --dense        # also the dense formulation (upcast=False): ~7 GB at S8192

Each (case, implementation) runs in a fresh process so its peak RSS growth (ru_maxrss after - before the calls)
is its own. Time is the median of --reps calls (time.perf_counter); torch uses its default thread count.
SDPA gets the same mask: is_causal for square causal, an explicit bool mask otherwise (which it materialises).
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: (B, H, Sq, Sk, D, causal, window)
CASES = {
    "causal S8192": (1, 8, 8192, 8192, 64, True, (-1, -1)),
    "no mask S8192": (1, 8, 8192, 8192, 64, False, (-1, -1)),
    "sliding window 1024 S8192": (1, 8, 8192, 8192, 64, True, (1024, -1)),
    "causal Sq 8191 Sk 8192": (1, 8, 8191, 8192, 64, True, (-1, -1)),
}


def run_one(case, impl, reps):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from flashattn_ext.reference import attention_reference, visible_mask

    B, H, Sq, Sk, D, causal, window = CASES[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Sq, D, generator=g)
    k = torch.randn(B, H, Sk, D, generator=g)
    v = torch.randn(B, H, Sk, D, generator=g)
    if impl == "ours":
        fn = lambda: attention_reference(q, k, v, causal=causal, window=window, return_lse=True)  # noqa: E731
    elif impl == "dense":
        fn = lambda: attention_reference(q, k, v, causal=causal, window=window, return_lse=True,  # noqa: E731
                                         upcast=False)
    elif causal and window == (-1, -1) and Sq == Sk:
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    elif not causal and window == (-1, -1):
        fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    else:
        mask = visible_mask(Sq, Sk, causal, window)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(json.dumps({"s": statistics.median(times), "all_s": times, "rss_mib": grew,
                      "threads": torch.get_num_threads()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", action="store_true", help="also time the dense formulation (needs ~7 GB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated names from CASES")
    ap.add_argument("--one", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return run_one(*args.one, args.reps)
    impls = ["sdpa", "ours"] + (["dense"] if args.dense else [])
    print(f"{'case':<28}{'impl':>7}{'median s':>10}{'peak RSS +MiB':>15}{'vs sdpa':>9}   all runs (s)")
    for case in args.cases.split(","):
        sdpa_s = None
        for impl in impls:
            res = subprocess.run([sys.executable, __file__, "--one", case, impl, "--reps", str(args.reps)],
                                 capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                print(f"{case:<28}{impl:>7}  FAILED: {res.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            sdpa_s = r["s"] if impl == "sdpa" else sdpa_s
            ratio = f"{r['s'] / sdpa_s:.2f}x" if sdpa_s else "-"
            runs = " ".join(f"{t:.3f}" for t in r["all_s"])
            print(f"{case:<28}{impl:>7}{r['s']:>10.3f}{r['rss_mib']:>15.0f}{ratio:>9}   {runs}  "
                  f"(threads {r['threads']})", flush=True)


if __name__ == "__main__":
    main()
