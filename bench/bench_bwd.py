"""Backward benchmark: flashattn_ext.attention's backward against the PyTorch SDPA backends, same run, same inputs.

    python bench/bench_bwd.py [--shapes peers|quick] [--algorithms fa2,fa1] [--out DIR]   ("ours" = auto)

Shapes are the backward rows of /work/shared/PEERS.md (B*S = 16k tokens, Hq*D = 2048, bf16); the peers are the
SDPA backends and compiled FlexAttention (our causal mask as a block mask). For each shape it times the backward alone (autograd.grad on a retained graph) and forward+backward, counting backward FLOPs as
2.5x forward (PEERS.md), and prints TFLOP/s with our/peer ratios. It also measures the peak memory of one
forward+backward at B1 H16 S16k D128 (ours vs SDPA flash) and, for GQA, Hq32/Hkv8 against MHA 8/8.
Writes bwd_results.json, bwd_results.csv and bwd_tflops.png into --out (default $OUT, else bench/results).
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import report  # noqa: E402
from timing import SDPA_BACKENDS, attn_fwd_flops, failed, flex_fwd, median_ms, peers_fwd  # noqa: E402

SHAPES = {  # (B, Hq, Hkv, S, D, causal)
    "peers": [
        (4, 16, 16, 4096, 128, False),
        (1, 16, 16, 16384, 128, False),
        (4, 16, 16, 4096, 128, True),
        (1, 16, 16, 16384, 128, True),
        (2, 32, 8, 8192, 128, True),
        (4, 32, 32, 4096, 64, False),
        (4, 32, 32, 4096, 64, True),
    ],
    "quick": [(4, 16, 16, 4096, 128, False), (4, 16, 16, 4096, 128, True), (4, 32, 32, 4096, 64, False)],
}
SHORT = {"sdpa_flash": "flash", "sdpa_cudnn": "cudnn", "sdpa_efficient": "eff"}


def label(B, Hq, Hkv, S, D, causal):
    heads = f"H{Hq}" if Hq == Hkv else f"H{Hq}/{Hkv}"
    return f"D{D} S{S // 1024}k B{B} {heads}" + (" causal" if causal else "")


def inputs(B, Hq, Hkv, S, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda H: torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    return mk(Hq), mk(Hkv), mk(Hkv)


def timed_pair(fwd, q, k, v):
    """(backward-only ms, forward+backward ms) for a forward callable fwd() using q, k, v."""
    out = fwd()
    dout = torch.randn_like(out)
    bwd_ms = median_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    both_ms = median_ms(lambda: torch.autograd.grad(fwd(), (q, k, v), dout))
    return bwd_ms, both_ms


def peak_mib(fwd, q, k, v):
    """Peak memory above the inputs of one forward+backward, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fwd()
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    torch.cuda.synchronize()
    del out, grads
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="peers")
    ap.add_argument("--algorithms", default="fa2",
                    help="comma list of extra columns besides 'ours' (= algorithm 'auto': fa3 on Hopper, else fa2): "
                         "fa2, fa1, fa3")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_bwd.py needs a CUDA GPU", file=sys.stderr)
        sys.exit(2)
    import flashattn_ext
    os.makedirs(args.out, exist_ok=True)

    extra = [a for a in args.algorithms.split(",") if a]
    header = ["shape", "ours bwd", "flash bwd", "cudnn bwd", "eff bwd", "flex bwd", "ours/flash", "ours/cudnn",
              "ours/flex", "ours f+b", "flash f+b", "cudnn f+b", "flex f+b", "f+b ours/flash"]
    for a in extra:
        header += [f"{a} bwd", f"ours/{a}"]
    rows, results, errors = [], [], {}
    for B, Hq, Hkv, S, D, causal in SHAPES[args.shapes]:
        q, k, v = inputs(B, Hq, Hkv, S, D)
        fwd_flops = attn_fwd_flops(B, Hq, S, S, D, causal)
        methods = {"ours": lambda: flashattn_ext.attention(q, k, v, causal=causal)}  # "ours" = algorithm "auto"
        methods.update(peers_fwd(q, k, v, causal))
        try:  # compiled FlexAttention with our causal mask as a block mask (the mask is built here, untimed)
            methods["flex"] = flex_fwd(q, k, v, causal)
        except Exception as e:
            methods["flex"] = failed(e)
        for a in extra:
            methods[a] = lambda a=a: flashattn_ext.attention(q, k, v, causal=causal, algorithm=a)
        tf = {}
        for name, fn in methods.items():
            try:
                bwd_ms, both_ms = timed_pair(fn, q, k, v)
                tf[name] = (2.5 * fwd_flops / bwd_ms / 1e9, 3.5 * fwd_flops / both_ms / 1e9)
            except Exception as e:  # a peer that cannot run this case (e.g. GQA on efficient)
                tf[name] = (None, None)
                errors.setdefault(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", []).append(
                    label(B, Hq, Hkv, S, D, causal))
        ratio = lambda a, b: (a / b) if a and b else None
        row = [label(B, Hq, Hkv, S, D, causal), tf["ours"][0], tf["sdpa_flash"][0], tf["sdpa_cudnn"][0],
               tf["sdpa_efficient"][0], tf["flex"][0], ratio(tf["ours"][0], tf["sdpa_flash"][0]),
               ratio(tf["ours"][0], tf["sdpa_cudnn"][0]), ratio(tf["ours"][0], tf["flex"][0]), tf["ours"][1],
               tf["sdpa_flash"][1], tf["sdpa_cudnn"][1], tf["flex"][1], ratio(tf["ours"][1], tf["sdpa_flash"][1])]
        for a in extra:
            row += [tf[a][0], ratio(tf["ours"][0], tf[a][0])]
        rows.append(row)
        results.append(dict(zip(header, row), B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, causal=causal))
        print(row[0], {n: tuple(round(x, 1) if x else x for x in t) for n, t in tf.items()}, flush=True)
        del q, k, v
        torch.cuda.empty_cache()

    print(f"\nbackward TFLOP/s (bwd FLOPs = 2.5x fwd), {torch.cuda.get_device_name()}, torch {torch.__version__}")
    report.print_table(header, [[report.fmt(x, 2) if isinstance(x, float) and x < 10 else report.fmt(x)
                                 for x in r] for r in rows])
    for err, shapes in errors.items():
        print(f"n/a {err} on {len(shapes)} shape(s)")

    memory = {}
    if args.no_memory:
        return
    q, k, v = inputs(1, 16, 16, 16384, 128)
    memory["ours_mha16_S16k"] = peak_mib(lambda: flashattn_ext.attention(q, k, v), q, k, v)
    memory["sdpa_flash_mha16_S16k"] = peak_mib(peers_fwd(q, k, v, False)["sdpa_flash"], q, k, v)
    del q, k, v
    for Hq, Hkv in [(32, 8), (32, 32), (8, 8)]:  # GQA must not cost more than MHA with the same query heads
        q, k, v = inputs(1, Hq, Hkv, 8192, 128)
        memory[f"ours_{Hq}_{Hkv}_S8k"] = peak_mib(lambda: flashattn_ext.attention(q, k, v, causal=True), q, k, v)
        del q, k, v
    print("peak memory of one forward+backward above the inputs (MiB):",
          {k: round(v, 1) for k, v in memory.items()})

    report.write_json(os.path.join(args.out, "bwd_results.json"),
                      {"env": report.environment(), "results": results, "memory_mib": memory, "errors": errors})
    report.write_csv(os.path.join(args.out, "bwd_results.csv"), header, rows)
    report.plot_bars(os.path.join(args.out, "bwd_tflops.png"), [r[0] for r in rows],
                     {"ours": [r[1] for r in rows], "SDPA flash": [r[2] for r in rows],
                      "SDPA cuDNN": [r[3] for r in rows], "SDPA efficient": [r[4] for r in rows],
                      "FlexAttention": [r[5] for r in rows]},
                     "backward TFLOP/s", "attention backward, bf16")


if __name__ == "__main__":
    main()
