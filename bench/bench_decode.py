"""Decode benchmark: the public attention_with_kvcache as users call it, against SDPA flash and cuDNN, same run.

    python bench/bench_decode.py [--cases peers|quick] [--page-sizes 1 16 64 256] [--chunked-sq 128 512] [--out DIR]
                                 [--variants all | NAME ...] [--splits N ...]

Decode rows: one new token per sequence (Sq = 1), GQA Hq32/Hkv8, D128, bf16, batch x context 1x32k, 16x8k, 64x4k,
128x2k. For each page size the same keys are copied into a paged cache whose pages are in a random order (table
built on the device), plus one row for the contiguous (B, Hkv, L, D) cache. Ours is timed five ways:

  public        attention_with_kvcache(q, k_pages, v_pages, lens, table): eager, no workspace, as a user calls it
                (includes its argument checks; values are checked only with check_values=True, not here)
  public_ws     the same with a preallocated DecodeWorkspace
  public_graph  the public call with the workspace, captured once in a CUDA graph and replayed
  raw           the raw op (flashattn_ext._ops.kvcache_fwd, C++ checks only) with the workspace
  raw_graph     the raw op replayed from a CUDA graph: the kernels' own time plus one graph launch

all with automatic num_splits. SDPA flash and cuDNN read the contiguous copy with enable_gqa (no repeated K/V).
TB/s = K + V bytes a step must read once (2 * B * Hkv * L * D * 2) / median time of bench/timing.py's timer.
Ratios: public / cuDNN and public / raw_graph (throughput ratios; >= 1.0 is faster than cuDNN, resp. no overhead).

Chunked-prefill rows: Sq_new = 128 and 512 new tokens appended (k_new / v_new) into a 4k-token paged cache
(page 16), causal, B = 4; TFLOP/s over the visible (query, key) pairs, against flashattn_ext.attention on the
same keys stored contiguously and SDPA flash with a bottom-right causal mask (K/V repeated to Hq heads, as its
bottom-right path needs).

Variants (--variants): the split kernel is built in several shapes (flashattn_ext.kvcache.DECODE_VARIANTS; the
op reads FAE_DECODE_VARIANT on every call). The main table is whatever FAE_DECODE_VARIANT says (unset: the
default); each variant named here adds public@NAME (eager, as above) and raw_graph@NAME results, printed as two
more tables of TB/s and ratio to cuDNN per variant, all in the same run. --splits N adds raw_graph@sN: the raw op in a
graph with num_splits = N (default variant), to check the automatic split count against fixed ones.

Writes decode_results.json / .csv and decode_tbps.png into --out (default $OUT, else bench/results). Kept short:
10 ms warm-up and 50 ms of timed reps per measurement (the whole run is well under 3 minutes on an H200).
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
from timing import attn_fwd_flops, decode_bytes, median_ms, peers_fwd  # noqa: E402

CASES = {
    "peers": [(1, 32768), (16, 8192), (64, 4096), (128, 2048)],
    "quick": [(1, 32768), (64, 4096)],
}
HQ, HKV, D = 32, 8, 128
PEERS = ("sdpa_flash", "sdpa_cudnn")
OURS = ("public", "public_ws", "public_graph", "raw", "raw_graph")
VARIANT_ENV = "FAE_DECODE_VARIANT"
WARMUP_MS, REP_MS = 10, 50
CHUNK_B, CHUNK_L, CHUNK_PAGE = 4, 4096, 16


def timed(fn, work, unit_scale):
    """{"us", rate} for fn, rate = work / seconds / unit_scale; {"error"} when fn cannot run this case."""
    try:
        fn()
        ms = median_ms(fn, warmup=WARMUP_MS, rep=REP_MS)
        return {"us": ms * 1e3, "rate": work / (ms * 1e-3) / unit_scale}
    except Exception as e:  # a peer or variant that cannot run this case: n/a, with the reason
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}


def graphed(fn):
    """Capture fn() once in a CUDA graph (after warm-up on a side stream, as torch.cuda.graphs advises); returns
    (replay, outputs of the captured call)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def paged_copy(k, v, page_size, gen):
    """(B, Hkv, L, D) -> k_pages, v_pages (num_pages, page_size, Hkv, D), pages in a random order, and the
    (B, ceil(L / page_size)) int32 block table. Built on the device: page size 1 at 128 x 2k is 262k pages."""
    B, Hkv, L, Dh = k.shape
    per = -(-L // page_size)
    table = torch.randperm(B * per, generator=gen, device=k.device).view(B, per).to(torch.int32)
    pad = per * page_size - L

    def scatter(x):
        pages = torch.empty(B * per, page_size, Hkv, Dh, dtype=x.dtype, device=x.device)
        x = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, Hkv, per, page_size, Dh).permute(0, 2, 3, 1, 4)
        pages[table.long().flatten()] = x.reshape(B * per, page_size, Hkv, Dh)
        return pages

    return scatter(k), scatter(v), table


def our_variants(api, q, kc, vc, lens, table, ws, k_new=None, v_new=None):
    """The five ways of calling our decode (see the module docstring), as zero-argument callables."""
    scale = q.shape[-1] ** -0.5

    def public():
        return api.attention_with_kvcache(q, kc, vc, lens, table, k_new, v_new)

    def public_ws():
        return api.attention_with_kvcache(q, kc, vc, lens, table, k_new, v_new, workspace=ws)

    def raw():
        return api.raw(q, kc, vc, lens, table, k_new, v_new, scale, -1, 0, 0, ws.buffer)[0]

    fns = {"public": public, "public_ws": public_ws, "raw": raw}
    for name, fn in (("public_graph", public_ws), ("raw_graph", raw)):
        try:
            fns[name] = graphed(fn)[0]
        except Exception as e:
            fns[name] = _raiser(f"capture failed: {type(e).__name__}: {e}")
    return fns


def _raiser(msg):
    def fn():
        raise RuntimeError(msg)
    return fn


def ratio(res, a, b):
    x, y = res.get(a, {}), res.get(b, {})
    return x["rate"] / y["rate"] if "rate" in x and "rate" in y else None


class variant_env:
    """Sets FAE_DECODE_VARIANT for a with-block (None: leave it as it is), restoring it after."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.old = os.environ.get(VARIANT_ENV)
        if self.name is not None:
            os.environ[VARIANT_ENV] = self.name

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(VARIANT_ENV, None)
        else:
            os.environ[VARIANT_ENV] = self.old


def extra_columns(api, q, kc, vc, lens, table, ws, nbytes, variants, splits):
    """public@V and raw_graph@V per variant V, raw_graph@sN per split count N (see the module docstring)."""
    res = {}
    for name in variants:
        with variant_env(name):
            fns = our_variants(api, q, kc, vc, lens, table, ws)
            res[f"public@{name}"] = timed(fns["public"], nbytes, 1e12)
            res[f"raw_graph@{name}"] = timed(fns["raw_graph"], nbytes, 1e12)
    scale = q.shape[-1] ** -0.5
    for n in splits:
        try:
            fn = graphed(lambda: api.raw(q, kc, vc, lens, table, None, None, scale, -1, 0, n, ws.buffer)[0])[0]
        except Exception as e:
            fn = _raiser(f"capture failed: {type(e).__name__}: {e}")
        res[f"raw_graph@s{n}"] = timed(fn, nbytes, 1e12)
    return res


def decode_rows(api, B, L, page_sizes, variants=(), splits=()):
    """One row per page size (and one for the contiguous cache) of the B x L decode case."""
    gen = torch.Generator(device="cuda").manual_seed(B * 100003 + L)
    q = torch.randn(B, HQ, 1, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, HKV, L, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, HKV, L, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    nbytes = decode_bytes(B, HKV, L, D)
    ws = api.DecodeWorkspace(B, HQ, 1, D, max_splits=max([64, *splits]))
    peer_fns = peers_fwd(q, k, v, causal=False)
    peers = {name: timed(peer_fns[name], nbytes, 1e12) for name in PEERS}
    try:
        ref = peer_fns["sdpa_flash"]().float()
    except Exception:
        ref = None
    rows = []
    for ps in list(page_sizes) + [None]:
        kc, vc, table = (k, v, None) if ps is None else paged_copy(k, v, ps, gen)
        fns = our_variants(api, q, kc, vc, lens, table, ws)
        res = {name: timed(fns[name], nbytes, 1e12) for name in OURS}
        res.update(extra_columns(api, q, kc, vc, lens, table, ws, nbytes, variants, splits))
        res.update(peers)
        diff = None if ref is None else (fns["public"]().float() - ref).abs().max().item()
        rows.append({"kind": "decode", "B": B, "L": L, "page": "contig" if ps is None else ps, "bytes": nbytes,
                     "results": res, "maxdiff_vs_sdpa_flash": diff,
                     "public/cudnn": ratio(res, "public", "sdpa_cudnn"),
                     "public/raw_graph": ratio(res, "public", "raw_graph")})
        del kc, vc, table, fns
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def chunked_rows(api, sq_list):
    """Chunked prefill: Sq_new tokens appended into a CHUNK_L-token paged cache through the same call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    rows = []
    for Sq in sq_list:
        B, L, Sk = CHUNK_B, CHUNK_L, CHUNK_L + Sq
        gen = torch.Generator(device="cuda").manual_seed(Sq)
        rnd = lambda *s: torch.randn(*s, generator=gen, device="cuda", dtype=torch.bfloat16)
        q, k, v = rnd(B, HQ, Sq, D), rnd(B, HKV, Sk, D), rnd(B, HKV, Sk, D)
        kc, vc, table = paged_copy(k, v, CHUNK_PAGE, gen)  # holds all Sk tokens; the call rewrites the last Sq
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        k_new, v_new = k[:, :, L:].contiguous(), v[:, :, L:].contiguous()
        ws = api.DecodeWorkspace(B, HQ, Sq, D)
        flops = attn_fwd_flops(B, HQ, Sq, Sk, D, causal=True)
        fns = our_variants(api, q, kc, vc, lens, table, ws, k_new, v_new)
        res = {name: timed(fns[name], flops, 1e12) for name in OURS}
        res["ours_prefill_kernel"] = timed(lambda: api.attention(q, k, v, causal=True), flops, 1e12)
        k_rep, v_rep = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        mask = causal_lower_right(Sq, Sk)

        def sdpa_flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask)

        res["sdpa_flash"] = timed(sdpa_flash, flops, 1e12)
        ref = api.attention(q, k, v, causal=True).float()
        diff = (fns["public"]().float() - ref).abs().max().item()
        rows.append({"kind": "chunked_prefill", "B": B, "L": L, "Sq_new": Sq, "page": CHUNK_PAGE, "flops": flops,
                     "results": res, "maxdiff_vs_prefill_kernel": diff,
                     "public/sdpa_flash": ratio(res, "public", "sdpa_flash"),
                     "public/raw_graph": ratio(res, "public", "raw_graph")})
        del q, k, v, kc, vc, k_rep, v_rep, fns
        torch.cuda.empty_cache()
    return rows


class Api:
    """Our calls, imported from the repository checkout."""

    def __init__(self):
        import flashattn_ext
        from flashattn_ext import _ops
        if not _ops.HAS_KVCACHE_OP:
            raise SystemExit(f"flashattn_ext._C has no kvcache_fwd op (build_info: {flashattn_ext.build_info()})")
        if D not in flashattn_ext.kvcache.decode_head_dims():
            raise SystemExit(f"decode head dim {D} not built (have {flashattn_ext.kvcache.decode_head_dims()})")
        self.attention_with_kvcache = flashattn_ext.attention_with_kvcache
        self.attention = flashattn_ext.attention
        self.raw = _ops.kvcache_fwd
        self.DecodeWorkspace = flashattn_ext.DecodeWorkspace
        self.variants = flashattn_ext.kvcache.DECODE_VARIANTS
        self.info = flashattn_ext.build_info()


def cell(res, name):
    x = res.get(name, {})
    return f"{x['rate']:.2f} ({x['us']:.0f})" if "rate" in x else None


def cell_vs_cudnn(res, name):
    x, r = res.get(name, {}), ratio(res, name, "sdpa_cudnn")
    return f"{x['rate']:.2f} ({r:.2f}x)" if "rate" in x and r is not None else cell(res, name)


def fmt_ratio(x):
    return None if x is None else f"{x:.2f}x"


def print_tables(decode, chunked):
    header = ["B x L", "page"] + [f"{m} TB/s (us)" for m in OURS + PEERS] + ["public/cudnn", "public/raw_graph",
                                                                              "maxdiff"]
    report.print_table(header, [[f"{r['B']}x{r['L']}", str(r["page"])] + [cell(r["results"], m) for m in OURS + PEERS]
                                + [fmt_ratio(r["public/cudnn"]), fmt_ratio(r["public/raw_graph"]),
                                   None if r["maxdiff_vs_sdpa_flash"] is None else f"{r['maxdiff_vs_sdpa_flash']:.1e}"]
                                for r in decode])
    extra = sorted({m for r in decode for m in r["results"] if "@" in m})
    for kind, title in (("public", "the public call (eager, no workspace) per variant"),
                        ("raw_graph", "the raw op replayed from a CUDA graph, per variant and fixed split count")):
        cols = [m for m in extra if m.split("@")[0] == kind]
        if cols:
            print(f"\n{title}: TB/s (ratio to cuDNN in this run)")
            report.print_table(["B x L", "page"] + [m.split("@")[1] for m in cols],
                               [[f"{r['B']}x{r['L']}", str(r["page"])] + [cell_vs_cudnn(r["results"], m) for m in cols]
                                for r in decode])
    if chunked:
        cols = OURS + ("ours_prefill_kernel", "sdpa_flash")
        print(f"\nchunked prefill into a {CHUNK_L}-token cache (page {CHUNK_PAGE}, causal), TFLOP/s (us):")
        report.print_table(["B x Sq_new", "L"] + list(cols) + ["public/sdpa_flash", "public/raw_graph", "maxdiff"],
                           [[f"{r['B']}x{r['Sq_new']}", str(r["L"])] + [cell(r["results"], m) for m in cols]
                            + [fmt_ratio(r["public/sdpa_flash"]), fmt_ratio(r["public/raw_graph"]),
                               f"{r['maxdiff_vs_prefill_kernel']:.1e}"] for r in chunked])
    for r in decode + chunked:
        for m, x in r["results"].items():
            if "error" in x:
                print(f"n/a {m} at {r['B']}x{r['L']} page {r['page']}: {x['error']}")


def write_outputs(out_dir, env, info, args, decode, chunked):
    os.makedirs(out_dir, exist_ok=True)
    report.write_json(os.path.join(out_dir, "decode_results.json"),
                      {"env": env, "flashattn_ext": info, "args": vars(args), "rows": decode + chunked})
    names = OURS + PEERS
    report.write_csv(os.path.join(out_dir, "decode_results.csv"),
                     ["B", "L", "page"] + [f"{m}_us" for m in names] + [f"{m}_TBps" for m in names]
                     + ["public/cudnn", "public/raw_graph", "maxdiff"],
                     [[r["B"], r["L"], r["page"]] + [r["results"][m].get("us") for m in names]
                      + [r["results"][m].get("rate") for m in names]
                      + [r["public/cudnn"], r["public/raw_graph"], r["maxdiff_vs_sdpa_flash"]] for r in decode])
    shown = ("public", "public_graph", "raw_graph", "sdpa_flash", "sdpa_cudnn")
    report.plot_bars(os.path.join(out_dir, "decode_tbps.png"), [f"{r['B']}x{r['L']} p{r['page']}" for r in decode],
                     {m: [r["results"][m].get("rate") for r in decode] for m in shown}, "TB/s (K+V bytes read once)",
                     f"decode GQA {HQ}/{HKV} D{D} bf16, {env.get('device')}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", choices=sorted(CASES), default="peers")
    p.add_argument("--page-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--chunked-sq", type=int, nargs="*", default=[128, 512],
                   help="Sq_new of the chunked-prefill rows (none: skip them)")
    p.add_argument("--variants", nargs="*", default=[],
                   help="split-kernel variants to time as extra columns ('all': every built one)")
    p.add_argument("--splits", type=int, nargs="*", default=[],
                   help="fixed num_splits to time as extra raw_graph columns")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode.py needs a CUDA GPU; nothing was measured.", file=sys.stderr)
        return 2
    api = Api()
    if args.variants == ["all"]:
        args.variants = list(api.variants)
    unknown = [v for v in args.variants if v not in api.variants]
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; built: {list(api.variants)}")
    env = report.environment()
    env[VARIANT_ENV] = os.environ.get(VARIANT_ENV)
    print(env, "\nflashattn_ext:", api.info, flush=True)
    decode = []
    with torch.no_grad():
        for B, L in CASES[args.cases]:
            rows = decode_rows(api, B, L, args.page_sizes, args.variants, args.splits)
            decode += rows
            for r in rows:
                print(f"{B}x{L} page {r['page']}:", {m: round(x["rate"], 2) if "rate" in x else "n/a"
                                                     for m, x in r["results"].items()}, flush=True)
        chunked = chunked_rows(api, args.chunked_sq)
    print(f"\ndecode, GQA {HQ}/{HKV}, D{D}, bf16, Sq=1, {env.get('device')}, torch {env['torch']}, cuDNN "
          f"{env.get('cudnn')} (TB/s of K+V bytes read once; us in brackets; ratios of this run)")
    print_tables(decode, chunked)
    write_outputs(args.out, env, api.info, args, decode, chunked)
    return 0


if __name__ == "__main__":
    sys.exit(main())
