"""One decode shape for a profiler: the raw kvcache op on a B x L cache (GQA 32/8, D128, bf16), paged with a
random table (or contiguous: page 0), called --calls times. Usage under ncu:
    ncu -k regex:decode_split --launch-skip 3 --launch-count 1 ... python bench/ncu_decode.py B L PAGE"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from bench_decode import HKV, HQ, D, paged_copy  # noqa: E402

import flashattn_ext  # noqa: E402
from flashattn_ext import _ops  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("B", type=int)
    p.add_argument("L", type=int)
    p.add_argument("page", type=int, help="page size; 0: the contiguous (B, Hkv, L, D) cache")
    p.add_argument("--calls", type=int, default=5)
    a = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(a.B, HQ, 1, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(a.B, HKV, a.L, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(a.B, HKV, a.L, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((a.B,), a.L, dtype=torch.int32, device="cuda")
    kc, vc, table = (k, v, None) if a.page == 0 else paged_copy(k, v, a.page, gen)
    ws = flashattn_ext.DecodeWorkspace(a.B, HQ, 1, D, max_splits=64)
    for _ in range(a.calls):
        _ops.kvcache_fwd(q, kc, vc, lens, table, None, None, D ** -0.5, -1, 0, 0, ws.buffer)
    torch.cuda.synchronize()
    print(f"decode B{a.B} L{a.L} page {a.page}: {a.calls} calls done")


if __name__ == "__main__":
    main()
