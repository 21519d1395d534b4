"""Decode benchmark: flashattn_ext's paged split-KV decode against SDPA flash and cuDNN, same run, same data.

    python bench/bench_decode.py [--cases peers|quick] [--page-sizes 16 256] [--out DIR]

One new token per sequence (Sq = 1), GQA Hq32/Hkv8, D128, bf16, batch x context as in /work/shared/PEERS.md.
Ours reads a paged cache (pages assigned in a random order) through the block table, for each page size, and
the same keys stored contiguously (B, Hkv, L, D); the SDPA peers read the contiguous copy with enable_gqa.
TB/s counts the K and V bytes a step must read (2 * B * Hkv * L * D * 2). Ours is timed through the raw op
(flashattn_ext._ops.kvcache_fwd, automatic num_splits, a preallocated DecodeWorkspace): the public
attention_with_kvcache adds value validation that reads cache_seqlens on the host (a sync per call) unless the
step runs inside a CUDA graph. Writes decode_results.json / .csv / decode_tbps.png into --out (default $OUT,
else bench/results).
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)
import report  # noqa: E402
from timing import decode_bytes, median_ms, peers_fwd  # noqa: E402

CASES = {
    "peers": [(1, 32768), (16, 8192), (64, 4096), (128, 2048)],
    "quick": [(1, 32768), (64, 4096)],
}
HQ, HKV, D = 32, 8, 128
PEERS = ("sdpa_flash", "sdpa_cudnn")


def paged_copy(k, v, page_size, gen):
    """(B, Hkv, L, D) -> k_pages, v_pages (num_pages, page_size, Hkv, D) with pages in a random order, and the
    (B, L / page_size) int32 block table."""
    B, Hkv, L, Dh = k.shape
    per = -(-L // page_size)
    order = torch.randperm(B * per, generator=gen).to(k.device)
    table = order.view(B, per).to(torch.int32)
    kp = torch.zeros(B * per, page_size, Hkv, Dh, dtype=k.dtype, device=k.device)
    vp = torch.zeros_like(kp)
    pad = per * page_size - L
    kk = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(B, Hkv, per, page_size, Dh).permute(0, 2, 3, 1, 4)
    vv = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(B, Hkv, per, page_size, Dh).permute(0, 2, 3, 1, 4)
    kp[table.long().flatten()] = kk.reshape(B * per, page_size, Hkv, Dh)
    vp[table.long().flatten()] = vv.reshape(B * per, page_size, Hkv, Dh)
    return kp, vp, table


def bench_case(B, L, page_sizes, ops):
    gen = torch.Generator().manual_seed(B * 100003 + L)
    q = torch.randn(B, HQ, 1, D, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(B, HKV, L, D, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(B, HKV, L, D, generator=gen).to("cuda", torch.bfloat16)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    nbytes = decode_bytes(B, HKV, L, D)
    scale = D ** -0.5
    ws = ops.DecodeWorkspace(B, HQ, 1, D)
    res, diffs = {}, {}

    def record(name, fn):
        try:
            out = fn()
            ms = median_ms(fn)
            res[name] = {"us": ms * 1e3, "TBps": nbytes / (ms * 1e-3) / 1e12}
            return out
        except Exception as e:  # a peer that cannot run this case: n/a
            res[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"}
            return None

    with torch.no_grad():
        peer_fns = peers_fwd(q, k, v, causal=False)
        ref = None
        for name in PEERS:
            out = record(name, peer_fns[name])
            ref = out if ref is None else ref
        variants = [(f"ours_ps{ps}", ps) for ps in page_sizes] + [("ours_contig", None)]
        for name, ps in variants:
            if ps is None:
                kc, vc, table = k, v, None
            else:
                kc, vc, table = paged_copy(k, v, ps, gen)
            fn = (lambda kc=kc, vc=vc, table=table:
                  ops.raw(q, kc, vc, lens, table, None, None, scale, -1, -1, 0, ws.buffer)[0])
            out = record(name, fn)
            if out is not None and ref is not None:
                diffs[name] = (out.float() - ref.float()).abs().max().item()
            del kc, vc
        ours = res.get(f"ours_ps{page_sizes[0]}", {})
        ratios = {}
        for peer in PEERS:
            if "us" in ours and "us" in res.get(peer, {}):
                ratios[f"ps{page_sizes[0]}/{peer}"] = ours["TBps"] / res[peer]["TBps"]
    del q, k, v
    torch.cuda.empty_cache()
    return {"B": B, "L": L, "label": f"{B}x{L}", "bytes": nbytes, "results": res, "maxdiff_vs_sdpa": diffs,
            "ratios": ratios}


class Ops:
    """Our op, imported from the repository checkout."""

    def __init__(self):
        import flashattn_ext
        from flashattn_ext import _ops
        if not _ops.HAS_KVCACHE_OP:
            raise SystemExit(f"flashattn_ext._C has no kvcache_fwd op (build_info: {flashattn_ext.build_info()})")
        self.raw = _ops.kvcache_fwd
        self.DecodeWorkspace = flashattn_ext.DecodeWorkspace
        self.info = flashattn_ext.build_info()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", choices=sorted(CASES), default="peers")
    p.add_argument("--page-sizes", type=int, nargs="+", default=[16, 256])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode.py needs a CUDA GPU; nothing was measured.", file=sys.stderr)
        return 2
    ops = Ops()
    env = report.environment()
    print(env, "\nflashattn_ext:", ops.info, flush=True)
    rows = []
    for B, L in CASES[args.cases]:
        rows.append(bench_case(B, L, args.page_sizes, ops))
        print(rows[-1]["label"], {n: round(r["TBps"], 2) if "TBps" in r else r["error"]
                                  for n, r in rows[-1]["results"].items()}, flush=True)

    methods = [f"ours_ps{ps}" for ps in args.page_sizes] + ["ours_contig"] + list(PEERS)
    ratio_keys = list(rows[0]["ratios"]) if rows else []
    header = ["B x L"] + [f"{m} TB/s (us)" for m in methods] + ratio_keys + ["maxdiff ps" + str(args.page_sizes[0])]
    table, csv_rows = [], []
    for r in rows:
        cells = []
        for m in methods:
            x = r["results"].get(m, {})
            cells.append(f"{x['TBps']:.2f} ({x['us']:.0f})" if "TBps" in x else None)
        d = r["maxdiff_vs_sdpa"].get(f"ours_ps{args.page_sizes[0]}")
        table.append([r["label"]] + cells + [f"{r['ratios'][k]:.2f}x" if k in r["ratios"] else None
                                            for k in ratio_keys] + [None if d is None else f"{d:.1e}"])
        csv_rows.append([r["B"], r["L"]] + [r["results"].get(m, {}).get("us") for m in methods] +
                        [r["results"].get(m, {}).get("TBps") for m in methods] +
                        [r["ratios"].get(k) for k in ratio_keys] + [d])
    print(f"\ndecode, GQA {HQ}/{HKV}, D{D}, bf16, Sq=1, {env.get('device')}, torch {env['torch']} "
          "(TB/s of K+V bytes read; ratios measured in this run)")
    report.print_table(header, table)
    for r in rows:
        for m, x in r["results"].items():
            if "error" in x:
                print(f"n/a {m} at {r['label']}: {x['error']}")
    os.makedirs(args.out, exist_ok=True)
    report.write_json(os.path.join(args.out, "decode_results.json"),
                      {"env": env, "flashattn_ext": ops.info, "args": vars(args), "rows": rows})
    report.write_csv(os.path.join(args.out, "decode_results.csv"),
                     ["B", "L"] + [f"{m}_us" for m in methods] + [f"{m}_TBps" for m in methods] + ratio_keys +
                     ["maxdiff"], csv_rows)
    report.plot_bars(os.path.join(args.out, "decode_tbps.png"), [r["label"] for r in rows],
                     {m: [r["results"].get(m, {}).get("TBps") for r in rows] for m in methods}, "TB/s",
                     f"decode GQA {HQ}/{HKV} D{D}, {env.get('device')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
