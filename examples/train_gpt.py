"""Train a small GPT twice from the same seed and data order: attention through flashattn_ext, then torch SDPA.

    python examples/train_gpt.py [--device cuda|cpu] [--steps N] [--layers L] [--d-model D] [--heads H]
                                 [--kv-heads HKV] [--seq S] [--batch B] [--lr LR] [--out DIR] [--seed SEED]

Corpus: the source text of the Python standard library that ships with the interpreter running this script (the
top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, sorted by name, concatenated), tokenised at byte
level (vocabulary 256). Nothing is downloaded. Every step draws B windows of S + 1 bytes at offsets taken from a
generator seeded with --seed, drawn once for the whole run, so both runs see the same batches in the same order.

Model: pre-LayerNorm GPT: byte and learned position embeddings, L blocks of causal self-attention (one fused qkv
projection viewed as (B, S, H + 2 HKV, D), whose q / k / v slices go to attention as (B, H, S, D) views, no copy;
GQA when HKV < H) and a 4x GELU MLP, then an untied byte head. AdamW (betas 0.9 / 0.95, weight decay 0.1 on
matrices), linear warm-up over the first 10% of steps (at most 50), cosine decay to 10% of --lr, gradients
clipped to norm 1. The weights are made once from --seed and copied, so both runs start from the same model.
Attention is the only difference between the runs:

  * flashattn_ext: ``flashattn_ext.attention(q, k, v, causal=True)``
    (CUDA: the hand-written forward and backward; CPU: the reference path, PyTorch's fused CPU attention);
  * sdpa: ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=HKV < H)``.

On CUDA both runs use bf16 autocast (float32 weights and optimizer); on CPU they run in float32 (``run(...,
precision=)`` overrides either).

Pass rule (exit status 1 otherwise), on the loss curves smoothed by a trailing mean over SMOOTH = 10 steps:
  1. the two curves agree: the mean |smoothed flashattn_ext - smoothed sdpa| over the last TAIL = 50 steps (all
     steps if fewer) is below 0.05 nats with bf16 autocast, 1e-3 nats in float32.
     Why 0.05 in bf16: the runs differ only in the rounding of attention (bf16 inputs, fp32 accumulation, other
     summation orders), but in bf16 that difference grows into two slightly different trajectories, a drift that
     has to be allowed. The batches are identical, so batch-to-batch noise cancels in the difference and what is
     left is that drift. Measured on CPU under bf16 autocast (both paths in bf16, 2 layers, d_model 256, 2 / 1
     heads, seq 256, batch 4, lr 2e-3, 30 steps): 0.002 nats mean, 0.027 at the worst single unsmoothed step.
     0.05 leaves room for that drift to grow over a few hundred steps; a wrong mask, scale or gradient changes
     what the model learns, a gap that grows with training instead of staying at rounding level.
     Why 1e-3 in float32 (CPU): both paths run the same math up to summation order, so the curves coincide (the
     CPU test sees < 1e-4 at every step); a causal leak (attention to future bytes) already fails this rule after
     20 steps of a tiny model (tests/test_train_gpt_example.py), long before it shows at bf16 scale.
  2. both runs learn: each curve's last smoothed loss is at least MIN_DROP = 1 nat below its first loss (ln 256 =
     5.55 at initialisation; the byte frequencies alone give the corpus's unigram entropy, 3.15 for Python 3.11's).

Output: loss curves at ten checkpoints and tokens/s of both runs (optimizer steps included; the first
min(10, steps / 5) steps are warm-up and not timed); under --out, train_gpt.json (configuration, both curves,
tokens/s, the checks) and train_gpt.png (both curves; matplotlib if installed, otherwise train_gpt.csv).
Defaults: on CUDA, 4 layers, d_model 1024, 8 heads (head dim 128), seq 4096, batch 8, 300 steps; on CPU a tiny
model (2 layers, d_model 64, seq 128, batch 4, 60 steps) that runs in seconds.
tests/test_train_gpt_example.py calls ``main()`` and ``run()``.
"""
import argparse
import copy
import glob
import json
import math
import os
import sys
import sysconfig
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository checkout
import flashattn_ext  # noqa: E402

SMOOTH = 10  # steps of the trailing mean applied before comparing curves
TAIL = 50  # the curves are compared over this many last steps
TOLERANCE = {"bf16": 0.05, "fp32": 1e-3}  # nats, mean |difference| of the smoothed curves over the tail
MIN_DROP = 1.0  # nats: each run's last smoothed loss must be this far below its first loss

GPU_DEFAULTS = dict(steps=300, layers=4, d_model=1024, heads=8, kv_heads=8, seq=4096, batch=8, lr=6e-4)
CPU_DEFAULTS = dict(steps=60, layers=2, d_model=64, heads=4, kv_heads=2, seq=128, batch=4, lr=3e-3)


# ---- data ---------------------------------------------------------------------------------------------------

def stdlib_corpus():
    """The bytes of the standard library's top-level .py files, sorted by name (uint8 tensor)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    data = b"".join(open(path, "rb").read() for path in files)
    if len(data) < 1 << 20:
        raise SystemExit(f"only {len(data)} bytes of stdlib source found next to {sys.executable}: need 1 MiB")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class Batches:
    """Step i's (inputs, targets), each (batch, seq) int64 on the device, from offsets drawn once from seed."""

    def __init__(self, corpus, steps, batch, seq, seed, device):
        g = torch.Generator().manual_seed(seed)
        self.corpus = corpus.to(device)
        self.offsets = torch.randint(0, len(corpus) - seq - 1, (steps, batch), generator=g).to(device)
        self.window = torch.arange(seq + 1, device=device)

    def __getitem__(self, i):
        tokens = self.corpus[self.offsets[i].unsqueeze(1) + self.window].long()  # gathered on the device
        return tokens[:, :-1], tokens[:, 1:]


# ---- model --------------------------------------------------------------------------------------------------

def flashattn_ext_attention(q, k, v):
    return flashattn_ext.attention(q, k, v, causal=True)


def sdpa_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


class Block(nn.Module):
    def __init__(self, d_model, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d_model // heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model, bias=False), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model, bias=False))

    def forward(self, x, attend):
        B, S, _ = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, S, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2))
        o = attend(q, k, v)  # (B, H, S, D)
        x = x + self.proj(o.transpose(1, 2).reshape(B, S, -1))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, layers, d_model, heads, kv_heads, seq, vocab=256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(seq, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, kv_heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab, bias=False)
        for name, p in self.named_parameters():  # GPT-2's init: N(0, 0.02), residual outputs scaled by depth
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens, attend):
        x = self.tok(tokens) + self.pos.weight[:tokens.shape[1]]
        for block in self.blocks:
            x = block(x, attend)
        return self.head(self.norm(x))


# ---- training -----------------------------------------------------------------------------------------------

def lr_at(step, steps, lr):
    warm = max(1, min(50, steps // 10))
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(model, attend, batches, steps, lr, device, bf16):
    """Trains model in place (under bf16 autocast if bf16). Returns (per-step losses as a float list, tokens/s
    over the timed steps). Losses stay on the device until the end: no host synchronisation inside the loop."""
    cuda = device.type == "cuda"
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=cuda)
    losses = torch.empty(steps, device=device)
    warmup = min(10, steps // 5)  # untimed first steps: kernel selection, allocator growth, autotuning
    start = None
    for step in range(steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        inputs, targets = batches[step]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs, attend)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = loss.detach()
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    tokens = (steps - warmup) * inputs.numel()
    return losses.tolist(), tokens / elapsed


def smooth(losses, window=SMOOTH):
    """Trailing mean over up to `window` steps (the first steps average what there is)."""
    out, total = [], 0.0
    for i, x in enumerate(losses):
        total += x - (losses[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def compare(ours, ref, tolerance):
    """The pass rule of the module docstring on two loss curves (float lists of equal length)."""
    a, b = smooth(ours), smooth(ref)
    tail = min(TAIL, len(a))
    diffs = [abs(x - y) for x, y in zip(a[-tail:], b[-tail:])]
    drops = {"flashattn_ext": ours[0] - a[-1], "sdpa": ref[0] - b[-1]}
    mean_diff = sum(diffs) / tail
    agree, learn = mean_diff < tolerance, all(d >= MIN_DROP for d in drops.values())
    return {"tail_steps": tail, "mean_abs_diff": mean_diff, "max_abs_diff": max(diffs), "tolerance": tolerance,
            "curves_agree": agree, "drops": drops, "min_drop": MIN_DROP, "both_learn": learn, "ok": agree and learn}


def check_config(device, steps, d_model, heads, kv_heads):
    if steps < 1:
        raise SystemExit(f"need steps >= 1 (got {steps})")
    if d_model % heads or heads % kv_heads:
        raise SystemExit(f"need d_model % heads == 0 and heads % kv_heads == 0 (got {d_model}, {heads}, {kv_heads})")
    head_dim = d_model // heads
    if device.type == "cuda":
        dims = flashattn_ext.build_info()["head_dims"]
        if head_dim not in dims:
            raise SystemExit(f"head dim {head_dim} (= d_model / heads) is not in this build's head dims {dims}")
    return head_dim


def run(device="cuda", steps=300, layers=4, d_model=1024, heads=8, kv_heads=8, seq=4096, batch=8, lr=6e-4,
        seed=0, precision=None, attentions=None, verbose=True):
    """Both training runs and the comparison. precision: "bf16" (autocast; the default on CUDA) or "fp32" (the
    default on CPU). attentions: {"flashattn_ext": fn, "sdpa": fn}, the default pair (tests swap in a wrong one to
    see the rule fail). Returns a JSON-ready dict."""
    device = torch.device(device)
    head_dim = check_config(device, steps, d_model, heads, kv_heads)
    attentions = attentions or {"flashattn_ext": flashattn_ext_attention, "sdpa": sdpa_attention}
    corpus = stdlib_corpus()
    batches = Batches(corpus, steps, batch, seq, seed, device)
    torch.manual_seed(seed)
    initial = GPT(layers, d_model, heads, kv_heads, seq)  # made once on the CPU: both runs copy these weights
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    config = dict(device=str(device), steps=steps, layers=layers, d_model=d_model, heads=heads, kv_heads=kv_heads,
                  head_dim=head_dim, seq=seq, batch=batch, lr=lr, seed=seed, precision=precision,
                  corpus_bytes=len(corpus), params=sum(p.numel() for p in initial.parameters()))
    if device.type == "cuda":
        config.update(gpu=torch.cuda.get_device_name(device),
                      family=flashattn_ext.resolve_algorithm("auto", device, head_dim))
    if verbose:
        print("config:", ", ".join(f"{k} {v}" for k, v in config.items()))
    losses, tokens_per_s = {}, {}
    for name, attend in attentions.items():
        model = copy.deepcopy(initial).to(device)
        losses[name], tokens_per_s[name] = train(model, attend, batches, steps, lr, device, precision == "bf16")
        if verbose:
            print(f"{name}: {tokens_per_s[name]:,.0f} tokens/s")
    ours, ref = losses.values()
    checks = compare(ours, ref, TOLERANCE[precision])
    if verbose:
        a, b = smooth(ours), smooth(ref)
        print("step   loss flashattn_ext   loss sdpa   (smoothed over", SMOOTH, "steps)")
        stride = max(1, steps // 10)
        for i in sorted({0, steps - 1, *range(stride - 1, steps, stride)}):
            print(f"{i + 1:5d}   {a[i]:18.4f}   {b[i]:9.4f}")
        print(f"curves: mean |diff| over the last {checks['tail_steps']} steps {checks['mean_abs_diff']:.4f} nats "
              f"(max {checks['max_abs_diff']:.4f}), tolerance {checks['tolerance']} "
              f"({'ok' if checks['curves_agree'] else 'FAIL'}); loss drop "
              + ", ".join(f"{k} {v:.2f}" for k, v in checks["drops"].items())
              + f" nats, need >= {MIN_DROP} ({'ok' if checks['both_learn'] else 'FAIL'})")
        print(f"tokens/s: flashattn_ext {tokens_per_s['flashattn_ext']:,.0f}, sdpa {tokens_per_s['sdpa']:,.0f} "
              f"(ratio {tokens_per_s['flashattn_ext'] / tokens_per_s['sdpa']:.2f})")
    return {"config": config, "tokens_per_s": tokens_per_s, "losses": losses, "checks": checks,
            "ok": checks["ok"]}


# ---- output -------------------------------------------------------------------------------------------------

def write_outputs(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "train_gpt.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    written = [path]
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on the GPU machine
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is None:
        path = os.path.join(out_dir, "train_gpt.csv")
        with open(path, "w") as f:
            f.write("step,loss_flashattn_ext,loss_sdpa\n")
            for i, (a, b) in enumerate(zip(*result["losses"].values())):
                f.write(f"{i + 1},{a:.6f},{b:.6f}\n")
        print("matplotlib is not installed: no PNG; the curves are in", path)
    else:
        cfg = result["config"]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for (name, losses), color in zip(result["losses"].items(), ("tab:blue", "tab:orange")):
            steps = range(1, len(losses) + 1)
            ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(losses), color=color, linestyle="-" if name == "sdpa" else "--",
                    zorder=3 if name == "sdpa" else 4,  # the dashed curve on top: overlapping curves stay visible
                    label=f"{name} ({result['tokens_per_s'][name]:,.0f} tokens/s)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats / byte)")
        ax.set_title(f"GPT {cfg['layers']}L d{cfg['d_model']} {cfg['heads']}/{cfg['kv_heads']} heads, "
                     f"seq {cfg['seq']}, batch {cfg['batch']}, {cfg['precision']}, {cfg.get('gpu', cfg['device'])}",
                     fontsize=9)
        ax.legend()
        ax.grid(alpha=0.3)
        path = os.path.join(out_dir, "train_gpt.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    print("wrote", ", ".join(written))
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in GPU_DEFAULTS:
        p.add_argument("--" + name.replace("_", "-"), type=float if name == "lr" else int, default=None,
                       help=f"default {GPU_DEFAULTS[name]} on CUDA, {CPU_DEFAULTS[name]} on CPU")
    p.add_argument("--out", default="out", help="directory for train_gpt.json and the plot (default ./out)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    defaults = GPU_DEFAULTS if torch.device(args.device).type == "cuda" else CPU_DEFAULTS
    sizes = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in defaults}
    result = run(args.device, seed=args.seed, **sizes)
    write_outputs(result, args.out)
    print("OK" if result["ok"] else "MISMATCH")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
