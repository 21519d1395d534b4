"""Output of benchmark results: console table, JSON, CSV and an optional matplotlib bar chart."""
import csv
import datetime
import json
import os

import torch


def environment():
    """What a result depends on, recorded beside every result file."""
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    env["cudnn"] = _try(torch.backends.cudnn.version)
    env["triton"] = _try(lambda: __import__("triton").__version__)
    p = _try(lambda: torch.cuda.get_device_properties(0))
    env.update(device=getattr(p, "name", None), sms=getattr(p, "multi_processor_count", None))
    return env


def _try(f):
    """An optional environment field: None rather than a failed benchmark."""
    try:
        return f()
    except Exception:
        return None


def fmt(x, nd=1):
    """A table cell: numbers rounded, missing values as n/a."""
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 10 ** -nd or x == 0 else f"{x:.1e}"
    return str(x)


def print_table(header, rows):
    """Plain aligned text table (no dependency on tabulate)."""
    cells = [header] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(line(cells[0]))
    print("-+-".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print("wrote", path)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(["" if c is None else c for c in r] for r in rows)
    print("wrote", path)


def plot_bars(path, labels, series, ylabel, title):
    """Grouped bars: one group per case, one bar per series {name: [value or None per label]}."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on the GPU machine
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping", os.path.basename(path))
        return
    n = len(series)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(labels) * max(n, 2) / 2), 5))
    for i, (name, vals) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [0 if v is None else v for v in vals], width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print("wrote", path)
