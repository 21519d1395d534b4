"""Sliding-window attention with and without Longformer global tokens: flashattn_ext against FlexAttention
(torch.compile'd, the equivalent block mask) and SDPA with a dense boolean mask, same run, same inputs.

    python bench/bench_window.py [--seqlens 4096 16384 65536] [--windows 512 4096] [--globals 0 16]
                                 [--modes causal bidirectional] [--algorithm auto] [--out DIR]
    python bench/bench_window.py --issue        (issue 16's targets: S 16k and 64k, window 1024, causal, G 0 / 16)
    python bench/bench_window.py --dry-run      (no GPU: list the cases and their useful FLOPs)

Shape B1 H16 D128 bf16, as /work/shared/flex_bench.py (the script behind PEERS.md's FlexAttention rows). Window w
means w keys to the left of the query (and w to the right when bidirectional): causal is flex_bench's
``(i >= j) & (i - j <= w)``, i.e. ``attention(causal=True, window=(w, -1))``; bidirectional is ``|i - j| <= w``,
``window=(w, w)``. G global tokens are the first G positions (``j < G`` or ``i < G``, causal in both directions
when causal), given to us as a GlobalTokens built once outside the timing (the per-layer cost).

Useful TFLOP/s count only visible (query, key) pairs, exactly (4 * B * H * pairs * D forward, 2.5x that backward,
as timing.py and PEERS.md). Forward: ``do_bench`` median of one call without autograd; backward: autograd.grad on
a retained graph (flex_bench's way). SDPA (dense mask, whatever backend accepts it) runs only for S <=
--sdpa-max-seqlen. Prints one table per direction and how time grows with S (ratios between consecutive
lengths; issue 16 asks <= 4.4x from 16k to 64k for window 1024 causal), and writes window_results.json and
window_ms.png into --out (default $OUT, else bench/results).
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
from timing import compiled_flex_attention, median_ms  # noqa: E402

B, H, D = 1, 16, 128
DTYPE = torch.bfloat16
IMPLS = ("ours", "flex", "sdpa_dense_mask")


# ---- the mask, its visible pairs, and the peers' versions of it ------------------------------------------

def kernel_window(window, causal):
    """Our (left, right) for flex_bench's window w."""
    return (window, -1) if causal else (window, window)


def visible_pairs(S, window, causal, G):
    """Visible (query, key) pairs of one head, exactly: the window clipped to [0, S), plus, for a non-global row,
    the global keys j < G outside it (j <= i when causal), and for a global row i < G every key (j <= i)."""
    i = torch.arange(S, dtype=torch.int64)
    lo = (i - window).clamp(min=0)
    hi = i if causal else (i + window).clamp(max=S - 1)
    pairs = hi - lo + 1
    if G > 0:
        extra = lo.clamp(max=G)  # global keys left of the window (all j <= i)
        if not causal:
            extra = extra + (G - 1 - hi).clamp(min=0)  # global keys right of the window
        whole_row = i + 1 if causal else torch.full_like(i, S)
        pairs = torch.where(i < G, whole_row, pairs + extra)
    return int(pairs.sum())


def mask_mod(window, causal, G):
    """FlexAttention mask_mod of the same rule."""
    def mod(b, h, q_idx, kv_idx):
        near = (q_idx - kv_idx <= window) & (kv_idx - q_idx <= (0 if causal else window))
        seen = near | (kv_idx < G) | (q_idx < G) if G > 0 else near
        return seen & (q_idx >= kv_idx) if causal else seen
    return mod


def dense_mask(S, window, causal, G, device):
    """(S, S) bool for SDPA (True = attend), from the reference's rule ((1, S, S) with global tokens)."""
    from flashattn_ext.reference import visible_mask
    gm = None
    if G > 0:
        gm = torch.zeros(1, S, dtype=torch.bool, device=device)
        gm[:, :G] = True
    return visible_mask(S, S, causal, kernel_window(window, causal), device=device, global_mask=gm)


def cases(args):
    return [(S, w, causal, G) for S in args.seqlens for w in args.windows for causal in args.modes
            for G in args.globals]


def case_label(S, w, causal, G):
    return f"S{S // 1024}k w{w} {'causal' if causal else 'bidir'} G{G}"


# ---- timing ----------------------------------------------------------------------------------------------

def ours_fn(q, k, v, window, causal, G, algorithm):
    import flashattn_ext
    tokens = None
    if G > 0:
        gm = torch.zeros(B, q.shape[2], dtype=torch.bool, device=q.device)
        gm[:, :G] = True
        tokens = flashattn_ext.global_tokens(gm)  # once, outside the timing (one sync)
    return lambda: flashattn_ext.attention(q, k, v, causal=causal, window=kernel_window(window, causal),
                                           global_mask=tokens, algorithm=algorithm)


def flex_fn(q, k, v, window, causal, G):
    from torch.nn.attention.flex_attention import create_block_mask
    S = q.shape[2]
    block_mask = create_block_mask(mask_mod(window, causal, G), None, None, S, S, device=q.device)
    flex = compiled_flex_attention()
    return lambda: flex(q, k, v, block_mask=block_mask)


def sdpa_fn(q, k, v, window, causal, G):
    import torch.nn.functional as F
    mask = dense_mask(q.shape[2], window, causal, G, q.device)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def measure(make, S, bwd, flops):
    """{"ms", "tflops"} or {"error"} of the forward (bwd False) or backward alone (bwd True) on fresh inputs."""
    try:
        q, k, v = (torch.randn(B, H, S, D, dtype=DTYPE, device="cuda", requires_grad=bwd) for _ in range(3))
        f = make(q, k, v)
        if bwd:
            out = f()
            dout = torch.randn_like(out)
            fn = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
        else:
            fn = f
        with torch.set_grad_enabled(bwd):
            fn()
            t = median_ms(fn)
        return {"ms": t, "tflops": flops / t / 1e9}
    except Exception as e:  # out of memory, a peer that cannot run the case: recorded, the others go on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    finally:
        torch.cuda.empty_cache()


def run_case(S, w, causal, G, args):
    pairs = visible_pairs(S, w, causal, G)
    fwd_flops = 4 * B * H * pairs * D
    row = {"label": case_label(S, w, causal, G), "S": S, "window": w, "causal": causal, "G": G,
           "visible_pairs": pairs, "fwd_flops": fwd_flops, "fwd": {}, "bwd": {}}
    makers = {"ours": lambda q, k, v: ours_fn(q, k, v, w, causal, G, args.algorithm),
              "flex": lambda q, k, v: flex_fn(q, k, v, w, causal, G)}
    if S <= args.sdpa_max_seqlen:
        makers["sdpa_dense_mask"] = lambda q, k, v: sdpa_fn(q, k, v, w, causal, G)
    for name, make in makers.items():
        row["fwd"][name] = measure(make, S, False, fwd_flops)
        row["bwd"][name] = measure(make, S, True, 2.5 * fwd_flops)
    for direction in ("fwd", "bwd"):
        ours = row[direction]["ours"].get("ms")
        row[direction]["speedup_vs"] = {n: r["ms"] / ours for n, r in row[direction].items()
                                        if n != "ours" and ours and "ms" in r}
    print(row["label"], {d: {n: round(r["ms"], 3) if "ms" in r else "n/a" for n, r in row[d].items()
                             if n in IMPLS} for d in ("fwd", "bwd")}, flush=True)
    return row


def growth(rows):
    """{(window, causal, G, direction, impl): [(S, ms, ratio to the previous S)]} for the printed growth table."""
    out = {}
    for r in sorted(rows, key=lambda r: r["S"]):
        for d in ("fwd", "bwd"):
            for impl in IMPLS:
                ms = r[d].get(impl, {}).get("ms")
                if ms is None:
                    continue
                series = out.setdefault((r["window"], r["causal"], r["G"], d, impl), [])
                series.append((r["S"], ms, ms / series[-1][1] if series else None))
    return out


def print_tables(rows):
    for d in ("fwd", "bwd"):
        print(f"\n{d}: ms (useful TFLOP/s); speedup = peer ms / ours ms")
        report.print_table(
            ["case"] + [f"{i} ms" for i in IMPLS] + [f"{i} TFLOP/s" for i in IMPLS] + ["vs flex", "vs sdpa"],
            [[r["label"]] + [r[d].get(i, {}).get("ms") for i in IMPLS] + [r[d].get(i, {}).get("tflops") for i in IMPLS]
             + [r[d]["speedup_vs"].get("flex"), r[d]["speedup_vs"].get("sdpa_dense_mask")] for r in rows])
    print("\ngrowth with S (ms, and the ratio to the previous length)")
    table = []
    for (w, causal, G, d, impl), series in growth(rows).items():
        table.append([f"w{w} {'causal' if causal else 'bidir'} G{G} {d} {impl}",
                      " -> ".join(f"S{S // 1024}k {ms:.3f}" + (f" (x{ratio:.2f})" if ratio else "")
                                  for S, ms, ratio in series)])
    report.print_table(["series", "time by S"], table)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--windows", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--globals", type=int, nargs="+", default=[0, 16], help="global prefix tokens")
    p.add_argument("--modes", nargs="+", choices=["causal", "bidirectional"], default=["causal", "bidirectional"])
    p.add_argument("--algorithm", default="auto", help="our kernel family for the window part")
    p.add_argument("--sdpa-max-seqlen", type=int, default=16384, help="SDPA's dense mask only up to this S")
    p.add_argument("--issue", action="store_true", help="issue 16's rows: S 16k, 64k, window 1024, causal, G 0, 16")
    p.add_argument("--dry-run", action="store_true", help="list the cases and FLOPs, no GPU")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    if args.issue:
        args.seqlens, args.windows, args.modes, args.globals = [16384, 65536], [1024], ["causal"], [0, 16]
    for name in ("seqlens", "windows", "globals"):
        if any(x < 0 for x in getattr(args, name)) or (name != "globals" and any(x == 0 for x in getattr(args, name))):
            p.error(f"--{name} must be positive" + (" or 0" if name == "globals" else ""))
    if any(G > S for G in args.globals for S in args.seqlens):
        p.error("--globals must not exceed the sequence lengths")
    args.modes = [m == "causal" for m in args.modes]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        report.print_table(["case", "visible pairs", "fwd GFLOP"],
                           [[case_label(*c), visible_pairs(c[0], c[1], c[2], c[3]),
                             4 * B * H * visible_pairs(c[0], c[1], c[2], c[3]) * D / 1e9] for c in cases(args)])
        return 0
    if not torch.cuda.is_available():
        print("bench_window.py needs a CUDA GPU (or --dry-run); nothing was measured.", file=sys.stderr)
        return 2
    env = report.environment()
    print(env, flush=True)
    rows = [run_case(*c, args) for c in cases(args)]
    print_tables(rows)
    os.makedirs(args.out, exist_ok=True)
    report.write_json(os.path.join(args.out, "window_results.json"),
                      {"env": env, "args": vars(args), "shape": {"B": B, "H": H, "D": D},
                       "rows": rows, "growth": [{"series": list(k), "points": v} for k, v in growth(rows).items()]})
    for d in ("fwd", "bwd"):
        report.plot_bars(os.path.join(args.out, f"window_{d}_ms.png"), [r["label"] for r in rows],
                         {i: [r[d].get(i, {}).get("ms") for r in rows] for i in IMPLS}, "ms",
                         f"sliding window + global tokens, {d}, B{B} H{H} D{D} bf16, {env.get('device')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
