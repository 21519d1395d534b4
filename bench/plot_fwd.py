"""Forward TFLOP/s against sequence length, one panel per (head dim, causal), in the style of the FlashAttention
papers: our kernels and the SDPA backends side by side, same run.

    python bench/plot_fwd.py RESULTS [--out PNG]

RESULTS is bench_fwd.py's fwd_results.json, or its printed log (the table it ends with), so a run whose JSON did
not come back can still be plotted. bench_fwd.py calls this itself at the end of a run.
"""
import argparse
import json
import os
import re

SERIES = {"fa3": "flashattn_ext fa3 (Hopper)", "fa2": "flashattn_ext FA2", "fa1": "flashattn_ext FA1", "sdpa_flash": "SDPA flash (FA2)",
          "sdpa_cudnn": "SDPA cuDNN", "sdpa_efficient": "SDPA efficient"}
LOG_COLUMNS = {"fa3 TFLOP/s": "fa3", "fa2 TFLOP/s": "fa2", "fa1 TFLOP/s": "fa1", "flash": "sdpa_flash", "cudnn": "sdpa_cudnn",
               "eff": "sdpa_efficient"}


def rows_from_json(path):
    rows = []
    for r in json.load(open(path))["rows"]:
        tf = {m: v.get("tflops") for m, v in r["results"].items()}
        rows.append(dict(D=r["D"], S=r["Sq"], causal=r["causal"], gqa=r["Hq"] != r["Hkv"], dtype=r["dtype"], tf=tf))
    return rows


def rows_from_log(path):
    """Parse the table bench_fwd.py prints: 'shape | fa2 TFLOP/s | ... ' then one row per shape."""
    lines = open(path).read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("shape ") and "TFLOP/s" in l)
    cols = [c.strip() for c in lines[start].split("|")]
    rows = []
    for line in lines[start + 2:]:
        if "|" not in line:
            break
        cells = [c.strip() for c in line.split("|")]
        label = cells[0]
        m = re.match(r"D(\d+) S(\d+)k B\d+ H(\d+)(/\d+)?", label)
        tf = {}
        for col, name in LOG_COLUMNS.items():
            if col in cols:
                v = cells[cols.index(col)]
                tf[name] = float(v) if re.match(r"^[\d.]+$", v) else None
        rows.append(dict(D=int(m.group(1)), S=int(m.group(2)) * 1024, causal="causal" in label,
                         gqa=m.group(4) is not None, dtype="float16" if "fp16" in label else "bfloat16", tf=tf))
    return rows


def plot(rows, out, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["dtype"] == "bfloat16" and not r["gqa"]]  # one comparable family per panel
    panels = sorted({(r["D"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, (D, causal) in zip(axes[0], panels):
        pts = sorted((r for r in rows if r["D"] == D and r["causal"] == causal), key=lambda r: r["S"])
        xs = [r["S"] for r in pts]
        for key, name in SERIES.items():
            ys = [r["tf"].get(key) for r in pts]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x // 1024}k" for x in xs])
        ax.set_title(f"head dim {D}, {'causal' if causal else 'non-causal'}")
        ax.set_xlabel("sequence length (batch x seqlen = 16k)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("forward TFLOP/s")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # a series missing from the first panel (e.g. fa3 at D96) still gets a legend entry
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=120)
    print("wrote", out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="fwd_results.json or a bench_fwd.py log")
    ap.add_argument("--out", default=None, help="PNG path (default: fwd_vs_seqlen.png beside RESULTS)")
    ap.add_argument("--title", default="attention forward, bf16, NVIDIA H200")
    args = ap.parse_args()
    rows = rows_from_json(args.results) if args.results.endswith(".json") else rows_from_log(args.results)
    plot(rows, args.out or os.path.join(os.path.dirname(args.results), "fwd_vs_seqlen.png"), args.title)


if __name__ == "__main__":
    main()
