"""Shared measurement helpers for the benchmarks: one timer, FLOP/byte counts, and the SDPA peers.

Everything here follows /work/shared/peer_bench.py (the script behind PEERS.md) so that our numbers and
the peers' numbers mean the same thing: do_bench median, 4*B*Hq*Sq*Sk*D forward FLOPs (halved for square
causal), backward 2.5x forward, decode counts K+V bytes read.
"""
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # triton's do_bench flushes L2 between reps and is what PEERS.md used
    from triton.testing import do_bench as _do_bench
except Exception:  # triton missing or broken: fall back to CUDA events
    _do_bench = None


def median_ms(fn, warmup=25, rep=100):
    """Median milliseconds of one call of fn. warmup and rep are milliseconds of run time, as in do_bench."""
    if _do_bench is not None:
        return _do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    return _event_median_ms(fn, warmup, rep)


def _event_median_ms(fn, warmup, rep):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)  # turn the ms budgets into call counts
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # evict L2 like do_bench does
    for _ in range(max(1, int(warmup / est))):
        fn()
    n = max(1, int(rep / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


# ---- work counts ---------------------------------------------------------------------------------------

def visible_pairs(Sq, Sk, causal):
    """(query, key) pairs one head sees. Causal is bottom-right aligned: query i sees key j iff
    j <= i + Sk - Sq (the CONTRACT.md convention)."""
    if not causal:
        return Sq * Sk
    off = Sk - Sq
    first = max(0, -off)  # rows before this see no key at all (only when Sq > Sk)
    n = Sq - first
    # row i sees i + off + 1 keys; an arithmetic series from (first + off + 1) up to Sk
    return n * (first + off + 1 + Sk) // 2


def attn_fwd_flops(B, Hq, Sq, Sk, D, causal):
    """Forward FLOPs: two matmuls, 4*D per visible pair. Square causal uses exactly half (the papers' and
    PEERS.md convention, not S*(S+1)/2); other causal shapes count visible pairs exactly."""
    if causal and Sq == Sk:
        return 4 * B * Hq * Sq * Sk * D / 2
    return 4 * B * Hq * visible_pairs(Sq, Sk, causal) * D


def attn_bwd_flops(B, Hq, Sq, Sk, D, causal):
    """Backward FLOPs: five matmuls against the forward's two."""
    return 2.5 * attn_fwd_flops(B, Hq, Sq, Sk, D, causal)


def decode_bytes(B, Hkv, L, D, elem_bytes=2):
    """Bytes a decode step must read: the K and V cache (q and out are negligible), as PEERS.md counts."""
    return 2 * B * Hkv * L * D * elem_bytes


# ---- peers ---------------------------------------------------------------------------------------------

SDPA_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def failed(error):
    """A callable that raises `error`: a peer that could not even be set up, recorded as n/a like one that fails
    when run."""
    def run():
        raise error
    return run


def peers_fwd(q, k, v, causal):
    """Callables running each SDPA backend forward on (B, H, S, D) inputs, as peer_bench.py does: the backend
    forced with sdpa_kernel inside the call, GQA through enable_gqa (no repeated K/V). A backend that cannot run
    the case raises when called; callers catch that and record n/a."""
    gqa = q.shape[1] != k.shape[1]
    if causal and q.shape[2] != k.shape[2]:
        # SDPA's is_causal is top-left aligned; ours is bottom-right: only square causal is comparable
        unsupported = failed(ValueError("SDPA is_causal is top-left aligned; compare causal only with Sq == Sk"))
        return {name: unsupported for name in SDPA_BACKENDS}

    def make(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        return run

    return {name: make(backend) for name, backend in SDPA_BACKENDS.items()}


_FLEX = {}


def compiled_flex_attention():
    """torch.compile(flex_attention, dynamic=False), once per process: flex_bench.py's setup (the script behind
    PEERS.md's FlexAttention rows). Dynamo's recompile limits are raised: every block-mask shape is a new graph."""
    if not _FLEX:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.cache_size_limit = 256
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def causal_mask_mod(Sq, Sk):
    """FlexAttention mask_mod of our causal mask, bottom-right aligned: query i sees key j iff j <= i + Sk - Sq."""
    offset = Sk - Sq
    return lambda b, h, i, j: j <= i + offset


def flex_fwd(q, k, v, causal):
    """Callable running compiled FlexAttention forward on (B, H, S, D) inputs: no mask, or our causal mask as a
    block mask (built here, outside the timing); GQA through enable_gqa. Raises when called if Flex cannot run it."""
    from torch.nn.attention.flex_attention import create_block_mask

    Sq, Sk = q.shape[2], k.shape[2]
    block_mask = create_block_mask(causal_mask_mod(Sq, Sk), None, None, Sq, Sk, device=q.device) if causal else None
    flex, gqa = compiled_flex_attention(), q.shape[1] != k.shape[1]
    return lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
