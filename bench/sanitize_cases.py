"""Small cases of every kernel, for compute-sanitizer (bench/sanitize.sh). Odd sizes, GQA, causal, window,
transposed layouts: the paths where an out-of-bounds access or a missing barrier would hide."""
import os

import torch

import flashattn_ext
from flashattn_ext.testing import FA3_HEAD_DIMS, HAS_FA3

CASES = [  # (B, Hq, Hkv, Sq, Sk, D, causal, window, transposed)
    (1, 2, 1, 17, 97, 64, True, (-1, -1), False),
    (2, 4, 2, 130, 65, 128, False, (-1, -1), True),
    (1, 2, 2, 97, 97, 96, False, (5, 3), False),
    (1, 1, 1, 1, 33, 32, True, (-1, -1), False),
    (1, 2, 1, 65, 130, 256, True, (-1, -1), True),
    (2, 4, 1, 200, 333, 64, False, (40, 7), False),
]


# FAE_SANITIZE_ALGOS=fa3 (say) checks one family ("decode": the KV-cache kernels only): racecheck over every family
# outlasts one device call.
ONLY = tuple(a for a in os.environ.get("FAE_SANITIZE_ALGOS", "").split(",") if a)
# FAE_SANITIZE_CASES=0,1 (indices into CASES) runs a subset, for the same reason.
PICK = tuple(int(i) for i in os.environ.get("FAE_SANITIZE_CASES", "").split(",") if i)


def make(B, H, S, D, transposed):
    if transposed:
        return torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    return torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)


def main():
    has_bwd = hasattr(torch.ops.flashattn_ext, "bwd")
    for B, Hq, Hkv, Sq, Sk, D, causal, window, tr in (CASES[i] for i in PICK) if PICK else CASES:
        q, k, v = make(B, Hq, Sq, D, tr), make(B, Hkv, Sk, D, tr), make(B, Hkv, Sk, D, tr)
        algorithms = ("fa2", "fa1") + (("fa3",) if HAS_FA3 and D in FA3_HEAD_DIMS else ())
        algorithms = tuple(a for a in algorithms if a in ONLY) if ONLY else algorithms
        for algorithm in algorithms:
            flashattn_ext.attention(q, k, v, causal=causal, window=window, algorithm=algorithm)
        if has_bwd:
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            for algorithm in algorithms:
                out = flashattn_ext.attention(q, k, v, causal=causal, window=window, algorithm=algorithm)
                out.backward(torch.randn_like(out))
            for algorithm in (a for a in algorithms if a != "fa1"):  # fa1 has no deterministic backward
                out = flashattn_ext.attention(q, k, v, causal=causal, window=window, deterministic=True,
                                              algorithm=algorithm)
                out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        print("ok", B, Hq, Hkv, Sq, Sk, D, causal, window, tr, "bwd" if has_bwd else "")
    varlen_cases(has_bwd)  # every family with varlen kernels (FAE_SANITIZE_ALGOS filters them)
    if not ONLY or "fa2" in ONLY or "decode" in ONLY:  # decode (FA2-family math; FAE_SANITIZE_ALGOS=decode: alone)
        for variant in flashattn_ext.kvcache.DECODE_VARIANTS:  # each split-kernel variant (FAE_DECODE_VARIANT)
            os.environ["FAE_DECODE_VARIANT"] = variant
            print("decode variant", variant)
            decode_cases()
        os.environ.pop("FAE_DECODE_VARIANT", None)


def varlen_cases(has_bwd):
    """attention_varlen on every family with varlen kernels (fa2; fa3 on Hopper): empty and odd sequences, Sq != Sk,
    GQA, tiles that run past their sequence into the next one; the per-sequence padded backward rows."""
    built = flashattn_ext.build_info()["head_dims"]
    seqs = [(17, 5), (0, 3), (1, 1), (130, 200), (4, 0), (97, 97), (300, 1)]
    cu_q, cu_k = ([0] + [sum(s[i] for s in seqs[:b + 1]) for b in range(len(seqs))] for i in (0, 1))
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device="cuda") for c in (cu_q, cu_k))
    mq, mk = max(s[0] for s in seqs), max(s[1] for s in seqs)
    dims = [d for d in (64, 128) if d in built]
    # fa2 at one head dim (as before); fa3 at both: D128's dQ is a bulk reduce into the padded rows, D64's atomics.
    runs = [("fa2", d) for d in dims[:1]] + [("fa3", d) for d in dims if HAS_FA3 and d in FA3_HEAD_DIMS]
    for algorithm, D in (r for r in runs if not ONLY or r[0] in ONLY):
        for causal, window in ((True, (-1, -1)), (False, (9, 4))):
            q = torch.randn(int(cu_q[-1]), 4, D, device="cuda", dtype=torch.bfloat16, requires_grad=has_bwd)
            k, v = (torch.randn(int(cu_k[-1]), 2, D, device="cuda", dtype=torch.bfloat16, requires_grad=has_bwd)
                    for _ in range(2))
            for det in (False, True):
                out = flashattn_ext.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal, window=window,
                                                     deterministic=det, algorithm=algorithm)
                if has_bwd:
                    out.backward(torch.randn_like(out))
            torch.cuda.synchronize()
            print("ok varlen", algorithm, D, seqs, causal, window, "bwd" if has_bwd else "")


def decode_cases():
    """Paged decode with in-kernel append, split-KV + combine, and merge_states."""
    if not hasattr(torch.ops.flashattn_ext, "kvcache_fwd"):
        return
    B, Hq, Hkv, D, page = 2, 16, 8, 128, 16  # 8 kv heads: the heads-per-block variants run their own kernel
    lens = torch.tensor([37, 100], dtype=torch.int32, device="cuda")
    pages_per_seq = 8
    k_pages = torch.randn(B * pages_per_seq, page, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v_pages = torch.randn_like(k_pages)
    table = torch.randperm(B * pages_per_seq, device="cuda").to(torch.int32).view(B, pages_per_seq)
    q = torch.randn(B, Hq, 3, D, device="cuda", dtype=torch.bfloat16)
    k_new = torch.randn(B, Hkv, 3, D, device="cuda", dtype=torch.bfloat16)
    v_new = torch.randn_like(k_new)
    for splits in (1, 3, 0):
        o, lse = flashattn_ext.attention_with_kvcache(q, k_pages, v_pages, lens, table, k_new, v_new,
                                                      num_splits=splits, return_lse=True)
    o2, lse2 = flashattn_ext.merge_states(o, lse, o, lse)
    torch.cuda.synchronize()
    print("ok decode + merge_states")
    garbage_cases()


INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)


def garbage_cases():
    """Lengths and block tables no caller should pass, with the value check off (the default): the kernels must
    clamp them. compute-sanitizer memcheck sees any access outside an allocation; the guard pages (never named by
    a valid table entry) catch writes that stay inside the pool but leave the sequence's pages."""
    dims = [d for d in (128, 64) if d in flashattn_ext.kvcache.decode_head_dims()]
    if not dims:
        return
    B, Hq, Hkv, D, page, per_seq, guard = 4, 16, 8, dims[0], 16, 3, 2  # 8 kv heads: see decode_cases
    num_pages = B * per_seq + guard
    capacity = per_seq * page
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    k_pages, v_pages = torch.randn(num_pages, page, Hkv, D, **bf16), torch.randn(num_pages, page, Hkv, D, **bf16)
    q = torch.randn(B, Hq, 3, D, **bf16)
    k_new, v_new = torch.randn(B, Hkv, 3, D, **bf16), torch.randn(B, Hkv, 3, D, **bf16)
    table = torch.arange(B * per_seq, dtype=torch.int32, device="cuda").view(B, per_seq)
    bad_table = table.clone()
    bad_table[0, 0], bad_table[1, 1], bad_table[2, 2], bad_table[3, 0] = -1, num_pages, INT32_MAX, INT32_MIN
    length_sets = {
        "negative": [-5, -1, INT32_MIN, 0],
        "over_capacity": [capacity, capacity - 1, capacity + 7, INT32_MAX],
        "mixed": [INT32_MAX - 1, -3, 5, capacity - 2],
    }
    k_guard, v_guard = k_pages[B * per_seq:].clone(), v_pages[B * per_seq:].clone()
    for name, lens in length_sets.items():
        lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        for tbl in (table, bad_table):
            for splits in (1, 3, 0):
                out = flashattn_ext.attention_with_kvcache(q, k_pages, v_pages, lens, tbl, k_new, v_new,
                                                           num_splits=splits)
                assert torch.isfinite(out).all(), f"non-finite output for {name} lengths"
        k_cont, v_cont = torch.randn(B, Hkv, capacity, D, **bf16), torch.randn(B, Hkv, capacity, D, **bf16)
        out = flashattn_ext.attention_with_kvcache(q, k_cont, v_cont, lens, None, k_new, v_new)
        assert torch.isfinite(out).all(), f"non-finite output for {name} lengths (contiguous cache)"
    torch.cuda.synchronize()
    assert torch.equal(k_pages[B * per_seq:], k_guard) and torch.equal(v_pages[B * per_seq:], v_guard), \
        "a write left the pages of the block table"
    print("ok decode with garbage lengths and block tables (clamped, guard pages untouched)")


if __name__ == "__main__":
    main()
