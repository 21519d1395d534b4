"""Batched greedy generation through flashattn_ext's paged KV cache, checked against transformers.

    python examples/generate.py [--device cuda|cpu] [--layers 4] [--page-size 16] [--new-tokens 24]

A Llama-style model from HF transformers is built from a small random config (no download). Our generation loop
runs the model's own modules (embedding, RMSNorm, rotary, q/k/v/o projections, MLP, lm_head) and sends attention
through ``attention_with_kvcache`` over a ``PagedKVCache``:

  * prompts of different lengths are prefilled one sequence at a time (Sq_new = prompt length, k_new/v_new
    appended by the op), then all live sequences advance one token per step in one batched call per layer;
  * pages are taken as sequences grow; one sequence stops early, its pages go back to the pool and a waiting
    prompt is admitted in its place (it reuses those pages).

Checks, per request, against transformers' own cached generation (``attn_implementation="sdpa"``, DynamicCache,
fed our tokens one at a time): at every step our logits (dtype) are within 2x the error of transformers' logits in
the same dtype, both measured against transformers in float32 (the bf16 rule), plus a small floor; and our greedy
tokens equal ``model.generate``'s (a disagreement is accepted only where the float32 logits of the two tokens
are within that error bound: a tie at this precision). Then tokens/s of both on the same batch (every prompt, the
same number of new tokens; transformers with left padding and its attention mask).

Why our own forward rather than an ``attn_implementation``: in transformers 5.x ``LlamaAttention`` calls
``past_key_values.update(k, v, layer)`` and hands the attention function the keys it returns, i.e. the whole
sequence as one contiguous tensor. A paged cache would need a Cache subclass whose update returns only the new
keys plus per-call lengths and block tables smuggled through kwargs; reusing the model's modules directly keeps
the cache explicit and the loop short.

On CPU, ``attention_with_kvcache`` runs its PyTorch reference path, so the example runs anywhere (slowly).
``run()`` returns the results for tests/test_generate_example.py.
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository checkout
from flashattn_ext import PagedKVCache, attention_with_kvcache  # noqa: E402
from flashattn_ext.kvcache import decode_head_dims  # noqa: E402

QK_GAIN = 4.0
LOGIT_FLOOR = 1e-3  # absolute slack of the per-step logits rule (logits here are O(1))


def build_model(layers, head_dim, seed, device):
    """LlamaForCausalLM with random weights: hidden 512, 8 query / 2 kv heads, vocab 1000; float32, eval mode.
    The q / k projections are scaled by QK_GAIN so attention scores are O(1), not ~0 (see below)."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim,
                                   max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
                                   pad_token_id=0)  # no eos: every request runs to its token budget
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():  # random init gives near-uniform attention (scores ~0.2), which would hide attention
        for layer in model.model.layers:  # errors; x4 on q and k makes the scores O(3), peaked as in trained models
            layer.self_attn.q_proj.weight.mul_(QK_GAIN)
            layer.self_attn.k_proj.weight.mul_(QK_GAIN)
    return model.to(device).eval()


# ---- the paged cache: the only code that does PagedKVCache bookkeeping -------------------------------------

class Pages:
    """Sequences' pages in a PagedKVCache. ``reserve`` is one step's bookkeeping: the lengths before the step and
    the block table after taking room for n new tokens per sequence."""

    def __init__(self, cfg, num_pages, page_size, dtype, device):
        self.cache = PagedKVCache(num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim,
                                  num_layers=cfg.num_hidden_layers, dtype=dtype, device=device)

    def new_sequence(self):
        return self.cache.add_sequence()

    def reserve(self, seqs, n):
        step = self.cache.step(seqs, n)  # host bookkeeping; the lengths and table arrive on the cache's device
        return step.cache_seqlens, step.block_table

    def layer(self, i):
        return self.cache.layer(i)

    def pages(self, seq):
        return self.cache.pages(seq)

    def free(self, seq):
        self.cache.free(seq)


# ---- our forward: the model's modules, attention through attention_with_kvcache ---------------------------

@torch.no_grad()
def forward(model, pages, tokens, seqs):
    """Logits (B, vocab) of the last of the n new tokens (B, n) of sequences seqs, whose K/V are appended."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    m, cfg = model.model, model.config
    B, n = tokens.shape
    lens, table = pages.reserve(seqs, n)
    positions = lens.to(torch.long).unsqueeze(1) + torch.arange(n, device=tokens.device)  # stays on the device
    h = m.embed_tokens(tokens)
    cos, sin = m.rotary_emb(h, positions)
    heads = lambda x, H: x.view(B, n, H, cfg.head_dim).transpose(1, 2)  # (B, H, n, D) views, no copy
    for i, layer in enumerate(m.layers):
        attn, x = layer.self_attn, layer.input_layernorm(h)
        q, k = apply_rotary_pos_emb(heads(attn.q_proj(x), cfg.num_attention_heads),
                                    heads(attn.k_proj(x), cfg.num_key_value_heads), cos, sin)
        v = heads(attn.v_proj(x), cfg.num_key_value_heads)
        k_pages, v_pages = pages.layer(i)
        o = attention_with_kvcache(q, k_pages, v_pages, lens, table, k_new=k, v_new=v, causal=True,
                                   scale=attn.scaling)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(B, n, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(m.norm(h[:, -1]))


def generate(model, pages, requests, max_batch, record=True):
    """Greedy continuous batching. requests: list of (prompt token list, new-token budget). At most max_batch
    sequences are live; a finished one frees its pages and the next waiting request is prefilled in its place.
    Returns per request {"tokens", "logits" (float32 CPU per step, if record), "pages"} and the page-reuse log."""
    device = next(model.parameters()).device
    results = [{"tokens": [], "logits": [], "pages": set()} for _ in requests]
    waiting, live, reused, freed = list(range(len(requests))), {}, [], set()  # live: seq id -> request index

    def admit():
        while waiting and len(live) < max_batch:
            r = waiting.pop(0)
            seq = pages.new_sequence()
            prompt = torch.tensor([requests[r][0]], device=device)
            take(r, forward(model, pages, prompt, [seq]))
            results[r]["pages"].update(pages.pages(seq))
            reused.extend(sorted(results[r]["pages"] & freed))
            live[seq] = r

    def take(r, logits):
        results[r]["tokens"].append(int(logits[0].argmax()))
        if record:
            results[r]["logits"].append(logits[0].float().cpu())

    admit()
    while live:
        seqs = list(live)
        for s in seqs:  # finished requests leave the batch; their pages go back to the pool
            r = live[s]
            if len(results[r]["tokens"]) >= requests[r][1]:
                results[r]["pages"].update(pages.pages(s))
                freed.update(pages.pages(s))
                pages.free(s)
                del live[s]
        admit()
        seqs = list(live)
        if not seqs:
            break
        last = torch.tensor([[results[live[s]]["tokens"][-1]] for s in seqs], device=device)
        logits = forward(model, pages, last, seqs)
        for b, s in enumerate(seqs):
            take(live[s], logits[b:b + 1])
    return results, reused


# ---- transformers' side -------------------------------------------------------------------------------------

@torch.no_grad()
def hf_step_logits(model, prompt, tokens):
    """transformers' cached generation fed prompt then our tokens one at a time: logits (float32 CPU) before each
    of our tokens."""
    from transformers import DynamicCache
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([prompt], device=device), past_key_values=cache, use_cache=True)
    logits = [out.logits[0, -1].float().cpu()]
    for t in tokens[:-1]:
        out = model(input_ids=torch.tensor([[t]], device=device), past_key_values=cache, use_cache=True)
        logits.append(out.logits[0, -1].float().cpu())
    return logits


@torch.no_grad()
def hf_generate(model, prompts, new_tokens):
    """model.generate, greedy, on a left-padded batch; returns the new tokens (B, new_tokens)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)  # no eos in the config: always new_tokens tokens
    return out[:, width:]


def check_request(ours, ref32, ref_lp, hf_tokens):
    """The bf16 rule on every step's logits, and greedy agreement: at every step our token is the argmax of
    transformers' logits in the same dtype on the same history, and model.generate's tokens equal ours up to its
    first difference. A different token is accepted only where the float32 logits of the two tokens are within
    the step's error bound (a tie at this precision); after such a tie model.generate follows another history."""
    steps, ties = [], []

    def tie(t, a, b):
        return abs(ref32[t][a] - ref32[t][b]).item() <= steps[t][1]

    for t, (o, r, lp) in enumerate(zip(ours["logits"], ref32, ref_lp)):
        steps.append(((o - r).abs().max().item(), 2 * (lp - r).abs().max().item() + LOGIT_FLOOR))
        a, b = ours["tokens"][t], int(lp.argmax())
        if a != b:
            ties.append((t, tie(t, a, b)))
    first_diff = next((t for t, (a, b) in enumerate(zip(ours["tokens"], hf_tokens)) if a != b), None)
    generate_ok = first_diff is None or tie(first_diff, ours["tokens"][first_diff], hf_tokens[first_diff])
    return {"steps": steps, "logits_ok": all(e <= b for e, b in steps), "ties": ties,
            "first_generate_diff": first_diff,
            "tokens_ok": all(ok for _, ok in ties) and generate_ok and len(hf_tokens) == len(ours["tokens"])}


def pages_for(tokens, page_size):
    return -(-tokens // page_size)


def timed(fn, device):
    fn()  # warm-up (kernels, allocator, cuDNN / cuBLAS heuristics)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(device="cuda", dtype=torch.bfloat16, layers=4, page_size=16, new_tokens=24, max_batch=4, seed=0,
        bench=True, verbose=True):
    device = torch.device(device)
    dims = decode_head_dims() if device.type == "cuda" else (64,)
    if not dims:
        raise SystemExit("flashattn_ext was built without decode head dims (64 / 128)")
    head_dim = 64 if 64 in dims else dims[0]
    model32 = build_model(layers, head_dim, seed, device)
    model = copy.deepcopy(model32).to(dtype)
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 17, 11, 29, 8]  # the last one waits for the early finisher's slot
    prompts = [torch.randint(1, 1000, (n,), generator=g).tolist() for n in lengths]
    budgets = [new_tokens, max(2, new_tokens // 3), new_tokens, new_tokens, new_tokens]
    requests = list(zip(prompts, budgets))
    # Pool: room for the requests that run together at their peak (the early finisher and the waiting request never
    # do) plus one page of slack, so the waiting request is admitted onto the pages the early finisher returned.
    need = [pages_for(len(p) + n, page_size) for p, n in requests]
    num_pages = sum(need[:max_batch]) - need[1] + max(need[1], need[-1]) + 1
    pages = Pages(model.config, num_pages, page_size, dtype, device)
    results, reused = generate(model, pages, requests, max_batch)

    checks = []
    for r, (prompt, n) in enumerate(requests):
        ours = results[r]
        ref32 = hf_step_logits(model32, prompt, ours["tokens"])
        ref_lp = hf_step_logits(model, prompt, ours["tokens"])
        hf_tokens = hf_generate(model, [prompt], n)[0].tolist()
        checks.append(check_request(ours, ref32, ref_lp, hf_tokens))
        if verbose:
            c = checks[-1]
            worst = max(c["steps"], key=lambda s: s[0] / s[1])
            same = n - len(c["ties"])
            print(f"request {r}: prompt {len(prompt):2d} tokens, {n:2d} new, pages {sorted(ours['pages'])}; logits: "
                  f"worst step err {worst[0]:.2e} vs bound {worst[1]:.2e} ({'ok' if c['logits_ok'] else 'FAIL'}); "
                  f"greedy: {same}/{n} steps pick transformers' token, {len(c['ties'])} ties"
                  f"{'' if all(ok for _, ok in c['ties']) else ' (NOT ties: FAIL)'}; model.generate "
                  + ("agrees on all tokens" if c["first_generate_diff"] is None else
                     f"agrees up to step {c['first_generate_diff']} (then a tie)"))
    out = {"checks": checks, "reused_pages": reused, "num_pages": num_pages, "head_dim": head_dim,
           "ok": all(c["logits_ok"] and c["tokens_ok"] for c in checks) and bool(reused)}
    if verbose:
        print(f"pages reused by the admitted request: {reused} (pool of {num_pages} pages of {page_size})")

    if bench:
        batch = prompts[:max_batch]
        count = len(batch) * new_tokens
        pool = sum(pages_for(len(p) + new_tokens, page_size) for p in batch)
        ours_s = timed(lambda: generate(model, Pages(model.config, pool, page_size, dtype, device),
                                        [(p, new_tokens) for p in batch], max_batch, record=False), device)
        hf_s = timed(lambda: hf_generate(model, batch, new_tokens), device)
        out.update(ours_tokens_per_s=count / ours_s, hf_tokens_per_s=count / hf_s)
        if verbose:
            print(f"tokens/s, batch {len(batch)} x {new_tokens} new tokens, {layers} layers, {dtype}, {device}: "
                  f"flashattn_ext paged {count / ours_s:.0f}, transformers sdpa generate {count / hf_s:.0f}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bench", action="store_true", help="skip the tokens/s comparison")
    args = p.parse_args()
    res = run(args.device, getattr(torch, args.dtype), args.layers, args.page_size, args.new_tokens, seed=args.seed,
              bench=not args.no_bench)
    print("OK" if res["ok"] else "MISMATCH")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
