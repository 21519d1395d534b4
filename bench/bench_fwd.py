"""Forward benchmark: flashattn_ext.attention against the PyTorch SDPA backends and compiled FlexAttention (our causal
mask as a block mask), same run, same inputs.

    python bench/bench_fwd.py [--shapes peers|quick] [--algorithms fa2 [...]] [--dtype bf16|fp16] [--out DIR]

Shapes are the forward rows of /work/shared/PEERS.md (B*S = 16k tokens, Hq*D = 2048). Prints a TFLOP/s table
with our/peer ratios and our max abs difference from an SDPA output (shown, never asserted, so a broken kernel
is visible), the extra memory of one forward at B1 H16 S16k D128, and writes fwd_results.json, fwd_results.csv
fwd_tflops.png and fwd_vs_seqlen.png (bench/plot_fwd.py) into --out (default $OUT, else bench/results).

Varlen rows (bench_varlen, cases from bench/varlen_case.py): attention_varlen over a fixed seeded list of lengths
in [128, 4096] summing to 16k tokens (D128, H32, causal and not). Useful TFLOP/s (per-sequence FLOPs, credited to
every column but dense_*) against flash-attn-style packed FlexAttention (compiled, document block mask), the SDPA
backends on the batch padded to the longest sequence (no padding mask: the padded work only, so SDPA's time is a
lower bound), and our dense call with the same total tokens (1 x 16k and 4 x 4k, their own FLOPs): the "varlen
within 10% of dense" ratio is varlen/dense_*. Also writes fwd_varlen.png.

    python bench/bench_fwd.py --dry-run     # no GPU: builds the rows, prints and writes fwd_plan.json to --out
"""
import argparse
import inspect
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import report  # noqa: E402
import varlen_case  # noqa: E402
from timing import SDPA_BACKENDS, attn_fwd_flops, failed, flex_fwd, median_ms, peers_fwd  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PEERS = list(SDPA_BACKENDS) + ["flex"]  # sdpa_flash, sdpa_cudnn, sdpa_efficient, compiled FlexAttention
SHORT = {"sdpa_flash": "flash", "sdpa_cudnn": "cudnn", "sdpa_efficient": "eff", "flex": "flex"}

# (B, Hq, Hkv, S, D, causal, dtype); dtype None means --dtype. The fp16 row stays fp16 whatever --dtype says.
SHAPES = {
    "peers": [
        (16, 32, 32, 1024, 64, False, None),
        (4, 32, 32, 4096, 64, False, None),
        (1, 32, 32, 16384, 64, False, None),
        (16, 32, 32, 1024, 64, True, None),
        (1, 32, 32, 16384, 64, True, None),
        (16, 16, 16, 1024, 128, False, None),
        (4, 16, 16, 4096, 128, False, None),
        (1, 16, 16, 16384, 128, False, None),
        (16, 16, 16, 1024, 128, True, None),
        (4, 16, 16, 4096, 128, True, None),
        (1, 16, 16, 16384, 128, True, None),
        (4, 16, 16, 4096, 128, False, torch.float16),
        (2, 32, 8, 8192, 128, True, None),
        (4, 16, 16, 4096, 96, True, None),
        (4, 8, 8, 4096, 256, False, None),
        (4, 8, 8, 4096, 256, True, None),
        (1, 8, 8, 16384, 256, True, None),
    ],
    "quick": [
        (16, 32, 32, 1024, 64, False, None),
        (4, 16, 16, 4096, 128, False, None),
        (4, 16, 16, 4096, 128, True, None),
        (2, 32, 8, 8192, 128, True, None),
    ],
}
MEMORY_SHAPE = (1, 16, 16, 16384, 128, False)  # the PEERS.md memory row (SDPA flash: +65 MiB)


def label(B, Hq, Hkv, S, D, causal, dtype):
    heads = f"H{Hq}" if Hq == Hkv else f"H{Hq}/{Hkv}"
    s = f"D{D} S{S // 1024}k B{B} {heads}" if S % 1024 == 0 else f"D{D} S{S} B{B} {heads}"
    return s + (" causal" if causal else "") + (" fp16" if dtype == torch.float16 else "")


def short_error(e):
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:160]


def load_ours():
    """(attention, info). attention is None when the package cannot be imported; the peers still run."""
    try:
        try:
            import flashattn_ext
        except ImportError:  # not pip-installed: use the source tree (setup.py build_ext --inplace)
            sys.path.insert(0, REPO)
            import flashattn_ext
        attention = flashattn_ext.attention
    except Exception as e:
        return None, {"error": short_error(e)}
    try:
        has_alg = "algorithm" in inspect.signature(attention).parameters
    except (TypeError, ValueError):  # no introspectable signature: assume the plain API
        has_alg = False
    info = {"version": getattr(flashattn_ext, "__version__", None), "has_algorithm_arg": has_alg}
    try:
        from flashattn_ext import _ops
        info["has_cuda_ext"] = bool(getattr(_ops, "HAS_CUDA_EXT", False))
        if getattr(_ops, "_C", None) is not None:
            info["build_info"] = _ops._C.build_info()
    except Exception as e:
        info["has_cuda_ext"] = None
        info["ext_error"] = short_error(e)
    return attention, info


def ours_fn(attention, info, algorithm, q, k, v, causal):
    """Callable for one of our algorithms; raises if it cannot be asked for."""
    if attention is None:
        raise RuntimeError("flashattn_ext not importable: " + info["error"])
    if info["has_algorithm_arg"]:
        return lambda: attention(q, k, v, causal=causal, algorithm=algorithm)
    if algorithm != "fa2":  # fa2 is the default; others need the kwarg
        raise RuntimeError("attention() has no algorithm= argument yet")
    return lambda: attention(q, k, v, causal=causal)


def reference(q, k, v, causal):
    """An SDPA output to check ours against (K/V repeated for GQA, so every backend can run it)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    errors = []
    for name, run in peers_fwd(q, k, v, causal).items():
        try:
            return run(), name
        except Exception as e:
            errors.append(short_error(e))
    raise RuntimeError("no SDPA backend for the reference: " + "; ".join(errors))


def max_abs_diff(out, ref):
    d = (out.float() - ref.float()).abs().max().item()
    return d if math.isfinite(d) else str(d)  # keep nan/inf visible, and the JSON valid


def measure(fn, flops):
    """{"tflops", "ms"} of fn, or {"error"}; the first call is outside the timing (compilation, handles)."""
    try:
        out = fn()
        t = median_ms(fn)
        return {"tflops": flops / t / 1e9, "ms": t}, out
    except Exception as e:
        torch.cuda.empty_cache()
        return {"error": short_error(e)}, None


def bench_shape(shape, dtype_default, algorithms, attention, info, with_flex=True):
    B, Hq, Hkv, S, D, causal, dtype = shape
    dtype = dtype or dtype_default
    q = torch.randn(B, Hq, S, D, dtype=dtype, device="cuda")  # random, never zeros
    k = torch.randn(B, Hkv, S, D, dtype=dtype, device="cuda")
    v = torch.randn(B, Hkv, S, D, dtype=dtype, device="cuda")
    flops = attn_fwd_flops(B, Hq, S, S, D, causal)
    row = dict(label=label(B, Hq, Hkv, S, D, causal, dtype), B=B, Hq=Hq, Hkv=Hkv, Sq=S, Sk=S, D=D, causal=causal,
               dtype=str(dtype).replace("torch.", ""), flops=flops, results={}, maxdiff={}, ratios={})
    try:
        ref, row["ref"] = reference(q, k, v, causal)
    except Exception as e:
        ref, row["ref"] = None, short_error(e)
    for alg in algorithms:
        try:
            row["results"][alg], out = measure(ours_fn(attention, info, alg, q, k, v, causal), flops)
        except Exception as e:
            row["results"][alg], out = {"error": short_error(e)}, None
        if out is not None and ref is not None:
            row["maxdiff"][alg] = max_abs_diff(out if torch.is_tensor(out) else out[0], ref)
        del out
    try:  # compiled FlexAttention, our causal mask as a block mask (built here, untimed)
        flex = flex_fwd(q, k, v, causal) if with_flex else failed(RuntimeError("not run (--no-flex)"))
    except Exception as e:
        flex = failed(e)
    for name, fn in dict(peers_fwd(q, k, v, causal), flex=flex).items():
        row["results"][name], out = measure(fn, flops)
        del out
    for alg in algorithms:
        for peer in PEERS:
            a, p = row["results"][alg].get("tflops"), row["results"][peer].get("tflops")
            row["ratios"][f"{alg}/{SHORT[peer]}"] = a / p if a and p else None
    if "fa3" in algorithms and "fa2" in algorithms:  # the Hopper family against our mma.sync kernel, same inputs
        a, p = row["results"]["fa3"].get("tflops"), row["results"]["fa2"].get("tflops")
        row["ratios"]["fa3/fa2"] = a / p if a and p else None
    if "fa2" in algorithms and "fa1" in algorithms:  # the FA1-vs-FA2 comparison of issue 3, same inputs, same run
        a, p = row["results"]["fa2"].get("tflops"), row["results"]["fa1"].get("tflops")
        row["ratios"]["fa2/fa1"] = a / p if a and p else None
    del q, k, v, ref
    torch.cuda.empty_cache()
    return row


def bench_varlen(case, dtype):
    """One varlen row (varlen_case.VarlenCase): {"label", "case", "results": {method: {"tflops", "ms"} or
    {"error"}}, "ratios", "maxdiff"}. Every method but dense_* is credited with the case's useful FLOPs."""
    import flashattn_ext
    H, D, total, B, S_max = case.heads, case.head_dim, case.total, len(case.lengths), case.max_len
    q, k, v = (torch.randn(total, H, D, dtype=dtype, device="cuda") for _ in range(3))
    cu, useful = case.cu_seqlens("cuda"), case.useful_flops()
    row = {"label": case.label, "case": case.summary(), "results": {}, "ratios": {}, "maxdiff": {}}
    row["results"]["varlen"], out = measure(
        lambda: flashattn_ext.attention_varlen(q, k, v, cu, cu, S_max, S_max, causal=case.causal), useful)
    # Flash-attn-style packed FlexAttention: the same packed rows as one sequence with a document block mask.
    try:
        row["results"]["flex_packed"], flex_out = measure(varlen_case.flex_document_fn(case, q, k, v), useful)
    except Exception as e:
        row["results"]["flex_packed"], flex_out = {"error": short_error(e)}, None
    if out is not None and flex_out is not None:
        row["maxdiff"]["varlen-flex_packed"] = max_abs_diff(out, flex_out)
    out = flex_out = None
    # Our dense call with the same total tokens (its own FLOPs): the "within 10% of dense" target.
    for name, (Bd, Sd) in varlen_case.dense_shapes(case).items():
        row["results"][name] = measure_dense(flashattn_ext.attention, case, Bd, Sd, dtype)
    # SDPA backends on the batch padded to the longest sequence, no mask (the padded work only: a lower bound on
    # SDPA's time, so the ratio favours SDPA), credited with the useful FLOPs.
    qp, kp, vp = (torch.randn(B, H, S_max, D, dtype=dtype, device="cuda") for _ in range(3))
    for name, fn in peers_fwd(qp, kp, vp, case.causal).items():
        row["results"][f"padded_{name}"], _ = measure(fn, useful)
    a = row["results"]["varlen"].get("tflops")
    for m, r in row["results"].items():
        if m != "varlen" and a and r.get("tflops"):
            row["ratios"][f"varlen/{m}"] = a / r["tflops"]
    return row  # the caller empties the CUDA cache once these locals are gone


def measure_dense(attention, case, B, S, dtype):
    q, k, v = (torch.randn(B, case.heads, S, case.head_dim, dtype=dtype, device="cuda") for _ in range(3))
    return measure(lambda: attention(q, k, v, causal=case.causal), case.dense_flops(B, S))[0]


def extra_mib(fn):
    """Peak bytes one call allocates beyond what exists before it (output included), in MiB."""
    try:
        del_me = fn()  # warm-up: lazy workspaces and handles stay out of the count
        del del_me
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        del out
        return extra
    except Exception as e:
        torch.cuda.empty_cache()
        return short_error(e)


def bench_memory(dtype, algorithms, attention, info):
    B, Hq, Hkv, S, D, causal = MEMORY_SHAPE
    q = torch.randn(B, Hq, S, D, dtype=dtype, device="cuda")
    k, v = torch.randn_like(q), torch.randn_like(q)
    res = {"label": label(B, Hq, Hkv, S, D, causal, dtype), "extra_MiB": {}}
    for alg in algorithms:
        try:
            res["extra_MiB"][alg] = extra_mib(ours_fn(attention, info, alg, q, k, v, causal))
        except Exception as e:
            res["extra_MiB"][alg] = short_error(e)
    res["extra_MiB"]["sdpa_flash"] = extra_mib(peers_fwd(q, k, v, causal)["sdpa_flash"])
    del q, k, v
    torch.cuda.empty_cache()
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="peers")
    p.add_argument("--algorithms", nargs="+", default=["fa2"], help="our algorithms, space or comma separated")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--dry-run", action="store_true", help="build the rows on the CPU, print them, measure nothing")
    p.add_argument("--no-varlen", action="store_true", help="skip the varlen rows")
    p.add_argument("--no-flex", action="store_true", help="skip the FlexAttention column (its compiles take minutes)")
    a = p.parse_args(argv)
    a.algorithms = [s for arg in a.algorithms for s in arg.split(",") if s]
    return a


def sdp_flags():
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled())


def restore_sdp_flags(flags):
    b = torch.backends.cuda
    for setter, on in zip((b.enable_flash_sdp, b.enable_mem_efficient_sdp, b.enable_math_sdp, b.enable_cudnn_sdp), flags):
        setter(on)


def dry_run(args):
    """Everything a GPU run would set up, without a GPU: the dense shapes and the varlen cases."""
    dtype = DTYPES[args.dtype]
    plan = {"args": vars(args),
            "shapes": [label(B, Hq, Hkv, S, D, causal, dt or dtype) for B, Hq, Hkv, S, D, causal, dt in
                       SHAPES[args.shapes]],
            "varlen": [] if args.no_varlen else [c.summary() for c in varlen_case.varlen_cases()]}
    for s in plan["shapes"]:
        print(s)
    for c in plan["varlen"]:
        print(f"{c['label']}: lengths {c['lengths']}, padded {c['padded_shape']}, "
              f"useful {c['useful_flops'] / 1e12:.2f} TFLOP")
    os.makedirs(args.out, exist_ok=True)
    report.write_json(os.path.join(args.out, "fwd_plan.json"), plan)
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("bench_fwd.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.",
              file=sys.stderr)
        return 2
    attention, info = load_ours()
    env = report.environment()
    print(env, "\nflashattn_ext:", info, flush=True)
    if info.get("has_cuda_ext") is False:
        print("WARNING: flashattn_ext._C is not loaded: 'ours' is not the CUDA kernel", flush=True)

    torch.manual_seed(0)
    flags = sdp_flags()
    rows = []
    try:
        with torch.no_grad():
            for shape in SHAPES[args.shapes]:
                rows.append(bench_shape(shape, DTYPES[args.dtype], args.algorithms, attention, info,
                                        with_flex=not args.no_flex))
                print(rows[-1]["label"], {n: round(r["tflops"], 1) if "tflops" in r else "n/a"
                                          for n, r in rows[-1]["results"].items()}, flush=True)
            memory = bench_memory(DTYPES[args.dtype], args.algorithms, attention, info)
            varlen_rows = []
            for case in [] if args.no_varlen else varlen_case.varlen_cases():
                try:
                    varlen_rows.append(bench_varlen(case, DTYPES[args.dtype]))
                except Exception as e:  # e.g. a package without attention_varlen: the dense rows still count
                    varlen_rows.append({"label": case.label, "error": short_error(e)})
                torch.cuda.empty_cache()
                print(varlen_rows[-1]["label"], {n: round(r["tflops"], 1) if "tflops" in r else "n/a"
                                                 for n, r in varlen_rows[-1].get("results", {}).items()}, flush=True)
    finally:
        restore_sdp_flags(flags)  # sdpa_kernel restores them too; this also covers an exception mid-way

    algs, ratio_keys = args.algorithms, list(rows[0]["ratios"]) if rows else []
    methods = algs + PEERS
    header = ["shape"] + [f"{a} TFLOP/s" for a in algs] + [SHORT[p] for p in PEERS] + ratio_keys + \
             [f"{a} maxdiff" for a in algs] + ["ref"]
    table, csv_rows = [], []
    for r in rows:
        tf = [r["results"][m].get("tflops") for m in methods]
        ratios = [r["ratios"][k] for k in ratio_keys]
        diffs = [r["maxdiff"].get(a) for a in algs]
        table.append([r["label"]] + tf + [None if x is None else f"{x:.2f}x" for x in ratios] +
                     [None if d is None else (f"{d:.1e}" if isinstance(d, float) else d) for d in diffs] +
                     [r.get("ref", "")[:24]])
        csv_rows.append([r["label"], r["B"], r["Hq"], r["Hkv"], r["Sq"], r["Sk"], r["D"], r["causal"], r["dtype"]] +
                        tf + [r["results"][m].get("ms") for m in methods] + ratios + diffs + [r.get("ref")] +
                        ["; ".join(f"{m}: {r['results'][m]['error']}" for m in methods if "error" in r["results"][m])])
    print(f"\nforward TFLOP/s, {env.get('device')}, torch {env['torch']} (ratios measured in this run)")
    report.print_table(header, table)
    print(f"\nextra memory of one forward, {memory['label']}:",
          ", ".join(f"{k} " + (f"+{v:.1f} MiB" if isinstance(v, float) else str(v)) for k, v in memory["extra_MiB"].items()))
    print("\nvarlen (useful TFLOP/s; flex_packed: FlexAttention, document mask over the packed rows; padded_*: SDPA "
          "on the batch padded to the longest sequence, no mask; dense_*: our dense call on the same total tokens, "
          "its own FLOPs)")
    for r in varlen_rows:
        if "error" in r:
            print(f"  {r['label']}: {r['error']}")
            continue
        print(f"  {r['label']}:", ", ".join(f"{m} {x['tflops']:.1f}" if "tflops" in x else f"{m} n/a ({x['error']})"
                                          for m, x in r["results"].items()))
        print("    ratios:", ", ".join(f"{k} {x:.2f}x" for k, x in r["ratios"].items()),
              "| maxdiff:", r.get("maxdiff"))
    errors = {}  # one line per distinct (method, error), not per shape
    for r in rows:
        for m in methods:
            if "error" in r["results"][m]:
                errors.setdefault((m, r["results"][m]["error"]), []).append(r["label"])
    for (m, e), labels in errors.items():
        print(f"n/a {m} on {len(labels)} shape(s) ({labels[0]}{', ...' if len(labels) > 1 else ''}): {e}")

    os.makedirs(args.out, exist_ok=True)
    report.write_json(os.path.join(args.out, "fwd_results.json"),
                      {"env": env, "flashattn_ext": info, "args": vars(args), "rows": rows, "memory": memory,
                       "varlen": varlen_rows})
    csv_header = ["shape", "B", "Hq", "Hkv", "Sq", "Sk", "D", "causal", "dtype"] + \
                 [f"{m}_tflops" for m in methods] + [f"{m}_ms" for m in methods] + ratio_keys + \
                 [f"{a}_maxdiff" for a in algs] + ["ref", "errors"]
    report.write_csv(os.path.join(args.out, "fwd_results.csv"), csv_header, csv_rows)
    measured = [r for r in varlen_rows if "results" in r]
    if measured:
        methods_v = list(dict.fromkeys(m for r in measured for m in r["results"]))
        report.plot_bars(os.path.join(args.out, "fwd_varlen.png"), [r["label"] for r in measured],
                         {m: [r["results"].get(m, {}).get("tflops") for r in measured] for m in methods_v},
                         "TFLOP/s (useful; dense_*: their own)", f"varlen forward, {env.get('device')}")
    report.plot_bars(os.path.join(args.out, "fwd_tflops.png"), [r["label"] for r in rows],
                     {m: [r["results"][m].get("tflops") for r in rows] for m in methods}, "TFLOP/s",
                     f"forward, {env.get('device')}, torch {env['torch']}")
    try:  # the papers' view: TFLOP/s against sequence length, one panel per (head dim, causal)
        import plot_fwd
        plot_fwd.plot(plot_fwd.rows_from_json(os.path.join(args.out, "fwd_results.json")),
                      os.path.join(args.out, "fwd_vs_seqlen.png"), f"attention forward, {env.get('device')}")
    except ImportError as e:
        print("skipping fwd_vs_seqlen.png:", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
