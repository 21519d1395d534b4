"""Where the time of one public call goes: torch.profiler over a few calls of attention() (forward, and
forward+backward), the CUDA kernels and ops sorted by their GPU time. A diagnosis tool for bench/NOTES.md, not a
benchmark (bench_*.py time the calls).

    python bench/profile_call.py --seqlen 16384 --heads 16 --window 1024 --causal --globals 16
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_overhead import host_and_wall_us  # noqa: E402

import flashattn_ext  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=-1, help="left window (and right when not causal); -1: none")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--globals", type=int, default=0, help="global prefix tokens (Longformer global_mask)")
    ap.add_argument("--algorithm", default="auto")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25, help="rows of each table")
    args = ap.parse_args()

    B, H, S, D = args.batch, args.heads, args.seqlen, args.head_dim
    Hkv = args.kv_heads or H
    mk = lambda h: torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(H), mk(Hkv), mk(Hkv)
    window = (args.window, -1 if args.causal else args.window)
    extra = {}
    if args.globals:
        mask = torch.zeros(B, S, dtype=torch.bool, device="cuda")
        mask[:, :args.globals] = True
        extra["global_mask"] = flashattn_ext.global_tokens(mask)  # built once, outside the profile (per layer)

    def call():
        return flashattn_ext.attention(q, k, v, causal=args.causal, window=window, algorithm=args.algorithm, **extra)

    dout = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    def forward():
        with torch.no_grad():  # as bench_*.py time the forward
            return call()

    for name, step in (("forward", forward),
                       ("forward+backward", lambda: torch.autograd.grad(call(), (q, k, v), dout))):
        for _ in range(2):  # warm-up: compile caches, cuBLAS handles
            step()
        torch.cuda.synchronize()
        # Host-bound or GPU-bound: the time to issue a call against the time per call with the GPU's part.
        host_us, wall_us = host_and_wall_us(step, calls=20)
        print(f"=== {name}: issuing {host_us / 1e3:.3f} ms per call, {wall_us / 1e3:.3f} ms per call until the GPU is "
              f"done (20 calls back to back, median of 5)")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                step()
            torch.cuda.synchronize()
        print(f"=== {name}: B{B} H{H}/{Hkv} S{S} D{D} window {window} causal {args.causal} globals {args.globals}, "
              f"{args.calls} calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
