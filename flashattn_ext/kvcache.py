"""Attention against a KV cache (decode and chunked prefill) and the merge of partial attention results.

``attention_with_kvcache`` runs csrc/decode on CUDA (split-KV, paged or contiguous cache, new tokens appended
in-op) and the pure-PyTorch reference (``kvcache_reference``) on CPU. ``merge_states`` combines two partial
results over disjoint key sets with the same online-softmax algebra as the kernels.
"""
import numbers

import torch

from . import _ops, ctor_args, validate
from ._build_config import DECODE_HEAD_DIMS
from .reference import attention_reference, effective_window

MAX_SPLITS = 256
# Variants of the CUDA split kernel (csrc/kernels/decode/decode_launch.cuh, FAE_DECODE_VARIANTS: warps per block,
# ring stages, cp.async gathers or one bulk copy per K/V row, tiles prefetched into L2, kv heads per block). The
# environment variable FAE_DECODE_VARIANT picks one per call (unset: decode_plan there chooses per call);
# benchmarks and tests use it to compare and cover them.
DECODE_VARIANTS = ("bulk_4w3s", "cp_4w3s", "bulk_2w4s", "heads4_3s")
DECODE_VARIANT_ENV = "FAE_DECODE_VARIANT"


def decode_head_dims():
    """Head dims attention_with_kvcache runs on CUDA in this build."""
    return tuple(d for d in DECODE_HEAD_DIMS if d in _ops.SUPPORTED_HEAD_DIMS)


class DecodeWorkspace:
    """Preallocated fp32 scratch for the split-KV partial results, so a decode step allocates nothing but its
    outputs (and the same buffer is reused across CUDA-graph replays). Holds ``max_splits`` partials of
    batch x num_heads_q x seqlen_q rows of head_dim + 1 floats. With ``num_splits=0`` the op uses at most as many
    splits as fit; an explicit ``num_splits`` that does not fit raises."""

    def __init__(self, batch, num_heads_q, seqlen_q, head_dim, max_splits=64, device=None):
        """device: None = the current CUDA device when CUDA is available, else the CPU (where the op does not use
        a workspace). Every count must be an int >= 1; max_splits at most MAX_SPLITS."""
        owner = "DecodeWorkspace"
        rows = 1
        for name, value in (("batch", batch), ("num_heads_q", num_heads_q), ("seqlen_q", seqlen_q)):
            rows *= ctor_args.check_count(value, owner, name)
        head_dim = ctor_args.check_count(head_dim, owner, "head_dim")
        self.max_splits = ctor_args.check_count(max_splits, owner, "max_splits", maximum=MAX_SPLITS)
        device = ctor_args.resolve_device(device, owner)
        self.buffer = torch.empty(self.max_splits * rows * (head_dim + 1), dtype=torch.float32, device=device)

    def __repr__(self):
        return f"DecodeWorkspace(max_splits={self.max_splits}, floats={self.buffer.numel()})"


# ---- reference -------------------------------------------------------------------------------------------

def _cache_slots(k_cache, block_table, b, positions):
    """Index tuple addressing key positions of batch b in a paged (num_pages, page_size, Hkv, D) or contiguous
    (B, Hkv, S_max, D) cache: cache[idx] is (len(positions), Hkv, D) paged, (Hkv, len(positions), D) contiguous."""
    if block_table is None:
        return (b, slice(None), positions)
    page_size = k_cache.shape[1]
    pages = block_table[b].to(torch.long)[positions // page_size]
    return (pages, positions % page_size)


def gather_kv(cache, block_table, b, length):
    """Keys (or values) 0 .. length-1 of batch b as a contiguous (Hkv, length, D) tensor."""
    positions = torch.arange(length, device=cache.device)
    if block_table is None:
        return cache[b, :, :length]
    return cache[_cache_slots(cache, block_table.to(cache.device), b, positions)].transpose(0, 1)


def append_reference(k_cache, v_cache, cache_seqlens, k_new, v_new, block_table=None):
    """Write k_new / v_new (B, Hkv, Sq, D) into the caches at positions cache_seqlens[b] .. + Sq (in place)."""
    lens = [int(x) for x in cache_seqlens.tolist()]
    Sq = k_new.shape[2]
    for b, start in enumerate(lens):
        positions = torch.arange(start, start + Sq, device=k_cache.device)
        bt = None if block_table is None else block_table.to(k_cache.device)
        idx = _cache_slots(k_cache, bt, b, positions)
        if block_table is None:
            k_cache[idx] = k_new[b].to(k_cache.dtype)
            v_cache[idx] = v_new[b].to(v_cache.dtype)
        else:
            k_cache[idx] = k_new[b].transpose(0, 1).to(k_cache.dtype)
            v_cache[idx] = v_new[b].transpose(0, 1).to(v_cache.dtype)


def kvcache_reference(q, k_cache, v_cache, cache_seqlens, block_table=None, k_new=None, v_new=None, causal=True,
                      window=(-1, -1), scale=None, upcast=True):
    """Pure-PyTorch attention_with_kvcache: appends k_new / v_new into the caches (in place, as the CUDA op),
    gathers each sequence's keys into contiguous K/V and runs ``attention_reference`` on them. Returns
    (out, lse)."""
    if k_new is not None:
        append_reference(k_cache, v_cache, cache_seqlens, k_new, v_new, block_table)
    B, Hq, Sq, D = q.shape
    extra = Sq if k_new is not None else 0
    outs, lses = [], []
    for b, start in enumerate(int(x) for x in cache_seqlens.tolist()):
        L = start + extra
        k = gather_kv(k_cache, block_table, b, L).unsqueeze(0)
        v = gather_kv(v_cache, block_table, b, L).unsqueeze(0)
        o, lse = attention_reference(q[b:b + 1], k.to(q.dtype), v.to(q.dtype), causal=causal, scale=scale,
                                     window=window, return_lse=True, upcast=upcast)
        outs.append(o)
        lses.append(lse)
    if B == 0:
        return torch.empty_like(q), torch.empty((0, Hq, Sq), dtype=torch.float32, device=q.device)
    return torch.cat(outs), torch.cat(lses)


def merge_states_reference(o_a, lse_a, o_b, lse_b):
    """merge_states in PyTorch (the CPU path and the test oracle): weights exp(lse - max) per side, a side with
    lse = -inf weighs 0 (its o is not used), both -inf gives o = 0 and lse = -inf."""
    compute = torch.promote_types(o_a.dtype, torch.float32)
    la, lb = lse_a.to(compute), lse_b.to(compute)
    m = torch.maximum(la, lb)
    m0 = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa = torch.where(torch.isneginf(la), torch.zeros_like(la), torch.exp(la - m0))
    wb = torch.where(torch.isneginf(lb), torch.zeros_like(lb), torch.exp(lb - m0))
    l = wa + wb
    inv = torch.where(l > 0, 1.0 / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(l))
    pa, pb = (wa * inv).unsqueeze(-1), (wb * inv).unsqueeze(-1)
    zero = torch.zeros((), dtype=compute, device=o_a.device)
    o = torch.where(pa > 0, o_a.to(compute) * pa, zero) + torch.where(pb > 0, o_b.to(compute) * pb, zero)
    lse = torch.where(l > 0, m0 + torch.log(torch.where(l > 0, l, torch.ones_like(l))),
                      torch.full_like(l, float("-inf")))
    return o.to(o_a.dtype).contiguous(), lse.to(torch.float32).contiguous()


# ---- validation ------------------------------------------------------------------------------------------

def _check_tensor(t, name, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def _check_cuda_layout(t, name):
    """The 16-byte vector loads of the kernels: contiguous last dim, 8-element strides, aligned data."""
    if t.size(-1) != 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {tuple(t.stride())}")
    if any(n > 1 and s % 8 != 0 for n, s in zip(t.shape[:-1], t.stride()[:-1])):
        raise ValueError(f"{name} strides {tuple(t.stride())} must be multiples of 8 elements (16-byte rows); "
                         f"call {name}.contiguous()")
    ptr = validate._data_ptr(t)
    if ptr is not None and ptr % 16 != 0:
        raise ValueError(f"{name}.data_ptr() must be 16-byte aligned, got address % 16 == {ptr % 16}")


def _can_read_values():
    """A host read of cache_seqlens / block_table (a sync) is impossible while capturing a CUDA graph or tracing
    with torch.compile; the kernels' own clamping is then the only guard."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_scalars(causal, window, scale, num_splits, return_lse, workspace, head_dim):
    """The arguments the op cannot check as given; returns ``(scale, left, right)`` with causal folded in."""
    validate.check_bool(causal, "causal")
    validate.check_bool(return_lse, "return_lse")
    validate.check_window(window)
    scale = validate.check_scale(scale, head_dim)
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__}")
    if not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [0, {MAX_SPLITS}] (0 = automatic), got {num_splits}")
    if workspace is not None and not isinstance(workspace, (DecodeWorkspace, torch.Tensor)):
        raise TypeError(f"workspace must be a DecodeWorkspace (or a float32 CUDA tensor), got "
                        f"{type(workspace).__name__}")
    left, right = effective_window(causal, window)
    return scale, left, right


def _capacity(k_cache, block_table):
    """Tokens each sequence can hold: max_pages * page_size (paged) or max_seqlen (contiguous)."""
    return block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[2]


def validate_kvcache_args(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, causal, window, scale,
                          num_splits, return_lse, workspace):
    """Every check of attention_with_kvcache, before anything is written; returns the float softmax scale."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        _check_tensor(t, name)
    for name, t in (("block_table", block_table), ("k_new", k_new), ("v_new", v_new)):
        _check_tensor(t, name, optional=True)
    dev = q.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens),
                    ("block_table", block_table), ("k_new", k_new), ("v_new", v_new)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but q is on {dev}; all tensors must be on one device")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"q is on {dev}; supported devices are cpu and cuda")
    cuda = dev.type == "cuda"
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (batch, heads, seqlen_new, head_dim), got shape {tuple(q.shape)}")
    B, Hq, Sq, D = q.shape
    allowed = validate.CUDA_DTYPES if cuda else validate.CPU_DTYPES
    if q.dtype not in allowed:
        raise TypeError(f"q.dtype must be one of {[str(d) for d in allowed]} on {dev.type}, got {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if t is not None and t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype ({t.dtype}) must equal q.dtype ({q.dtype})")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must be 4-D and of one shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if block_table is not None:
        num_pages, page_size, Hkv, Dc = k_cache.shape
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table must be int32 (batch={B}, max_pages), got {block_table.dtype} "
                             f"{tuple(block_table.shape)}")
        if page_size < 1 or num_pages < 1:
            raise ValueError(f"paged k_cache (num_pages, page_size, kv_heads, head_dim) has shape "
                             f"{tuple(k_cache.shape)}: need num_pages >= 1 and page_size >= 1")
        capacity = block_table.shape[1] * page_size
    else:
        Bc, Hkv, capacity, Dc = k_cache.shape
        if Bc != B:
            raise ValueError(f"contiguous k_cache (batch, kv_heads, max_seqlen, head_dim) has batch {Bc} but q has "
                             f"{B} (a paged cache needs block_table)")
    if Dc != D:
        raise ValueError(f"k_cache head_dim {Dc} must equal q head_dim {D}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of the cache's kv heads Hkv={Hkv}")
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must be int32 of shape (batch,) = ({B},), got {cache_seqlens.dtype} "
                         f"{tuple(cache_seqlens.shape)}")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    if k_new is not None:
        want = (B, Hkv, Sq, D)
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must be (batch, kv_heads, q seqlen, head_dim) = {want}, got "
                                 f"{tuple(t.shape)}")
    scale, _, _ = _check_scalars(causal, window, scale, num_splits, return_lse, workspace, D)
    if cuda:
        validate.check_cuda_runtime(dev)
        if not _ops.HAS_KVCACHE_OP:
            raise RuntimeError("attention_with_kvcache: this build of flashattn_ext._C has no kvcache_fwd op "
                               "(rebuild with head dim 64 or 128); CPU tensors use the reference path")
        dims = decode_head_dims()
        if D not in dims:
            raise ValueError(f"head dim {D} is not supported by the CUDA decode kernels; supported: {list(dims)}")
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
            if t is not None:
                _check_cuda_layout(t, name)
        _check_no_grad(q, k_new, v_new)
    if capacity >= 2**31 - 1 or B * Hq * max(Sq, 1) >= 2**31 - 1:
        raise ValueError("cache capacity and batch * heads * seqlen must be < 2**31 - 1")
    if not cuda:  # the reference indexes the cache with these values: always checked (no sync on CPU)
        _check_values(cache_seqlens, block_table, k_cache, capacity, Sq if k_new is not None else 0)
    return scale


def _check_no_grad(q, k_new, v_new):
    if torch.is_grad_enabled() and (q.requires_grad or (k_new is not None and k_new.requires_grad)
                                    or (v_new is not None and v_new.requires_grad)):
        raise RuntimeError("attention_with_kvcache has no backward: run it under torch.no_grad() / "
                           "torch.inference_mode(), or detach the inputs")


def _check_values(cache_seqlens, block_table, k_cache, capacity, extra):
    """cache_seqlens in range, and every block_table entry the call reads or writes a real page. On CUDA tensors
    this reads them back (one host sync): only with check_values=True."""
    lens = cache_seqlens.to("cpu", torch.int64)
    if lens.numel() == 0:
        return
    if bool((lens < 0).any()):
        b = int(torch.nonzero(lens < 0)[0, 0])
        raise ValueError(f"cache_seqlens[{b}] = {int(lens[b])} is negative")
    total = lens + extra
    if bool((total > capacity).any()):
        b = int(torch.nonzero(total > capacity)[0, 0])
        raise ValueError(f"cache_seqlens[{b}] = {int(lens[b])} + {extra} new tokens = {int(total[b])} exceeds the "
                         f"cache capacity of {capacity} tokens per sequence"
                         + (" (block_table.shape[1] * page_size)" if block_table is not None else " (max_seqlen)"))
    if block_table is None:
        return
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    used = (total + page_size - 1) // page_size  # pages holding positions 0 .. total - 1
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    in_use = cols.unsqueeze(0) < used.to(block_table.device).unsqueeze(1)
    bad = in_use & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        b, j = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a page index in [0, {num_pages}) "
                         f"(sequence {b} uses its first {int(used[b])} entries)")


# ---- public API ------------------------------------------------------------------------------------------

def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table=None, k_new=None, v_new=None,
                           causal=True, window=(-1, -1), scale=None, num_splits=0, return_lse=False,
                           workspace=None, check_values=False):
    """Attention of new queries against a KV cache: decode (Sq_new = 1) and chunked prefill (a few tokens).

    Args:
        q: (B, Hq, Sq_new, D) queries of the new tokens.
        k_cache, v_cache: one layer's cache, either paged (num_pages, page_size, Hkv, D) with ``block_table``
            (B, max_pages) int32 (token t of sequence b in page ``block_table[b, t // page_size]``, row
            ``t % page_size``; any page_size >= 1), or contiguous (B, Hkv, S_max, D) without it.
        cache_seqlens: (B,) int32, tokens already in the cache BEFORE this call. It is not advanced: keeping
            lengths is the caller's job (``PagedKVCache.extend`` does the bookkeeping).
        k_new, v_new: optional (B, Hkv, Sq_new, D) keys / values of the new tokens. They are written into the
            cache at positions ``cache_seqlens[b] .. + Sq_new`` by an append kernel launched on the same stream
            just before the attention kernel, so attention reads them from the cache. Pages for those positions
            must already be in ``block_table``. Attention then covers ``cache_seqlens[b] + Sq_new`` keys;
            without k_new it covers ``cache_seqlens[b]`` keys (the new tokens are already cached).
        causal, window: the mask of ``flashattn_ext.attention``, bottom-right aligned per sequence: query i sits
            at position ``p = i + L_b - Sq_new`` (L_b = keys of sequence b), which is ``cache_seqlens[b] + i``
            when appending. Default causal (chunked prefill).
        scale: softmax scale, default 1/sqrt(D).
        num_splits: split-KV parallelism: 0 = automatic (from batch, kv heads, the cache capacity and the SM
            count: no split when the blocks fill a wave, at most 64 and one per 256 keys), 1 = no split,
            n = n chunks of the keys merged by a deterministic combine kernel.
        return_lse: also return lse (B, Hq, Sq_new) float32, natural log (-inf for a row that sees no key).
        workspace: optional ``DecodeWorkspace``: the split-KV scratch is taken from it instead of being
            allocated (outputs are still allocated by torch's caching allocator, which is CUDA-graph safe).
        check_values: also check the VALUES of cache_seqlens and block_table on the host (lengths within the
            capacity, used block_table entries real pages), raising ValueError before anything is written. On
            CUDA this reads them back: one host synchronisation, so it is off by default (``PagedKVCache``
            keeps host copies of lengths and tables and validates its own bookkeeping without a read). It is
            skipped while a CUDA graph is captured or torch.compile traces. CPU tensors are always checked.

    No host synchronisation: the CUDA path never reads cache_seqlens or block_table on the host, so a decode
    step runs asynchronously and can be captured in a CUDA graph and replayed with new q, cache contents,
    lengths and block tables (same shapes). The kernels clamp every value: a length below 0 counts as 0, one
    past the capacity as the capacity, an out-of-range page index is skipped (its keys read as zeros, appended
    tokens for it dropped), so no value can fault or write outside the cache. Wrong values give wrong
    attention, not a crash: pass ``check_values=True`` while debugging. A call that fails a check raises before
    anything is written: the cache is left bitwise unchanged.

    CUDA: float16 / bfloat16, head dim 64 or 128 (as compiled), compute capability >= 8.0, 16-byte aligned
    rows. Long Sq_new works but re-reads K/V for each block of 16 (query row, head) pairs: use
    ``flashattn_ext.attention`` for long prefills. CPU: ``kvcache_reference`` (float32 math).
    """
    validate.check_bool(check_values, "check_values")
    if _ops.HAS_KVCACHE_OP and isinstance(q, torch.Tensor) and q.is_cuda:
        # The hot path: the op checks shapes, dtypes, devices and layouts in C++ (csrc/host/kvcache.cpp);
        # Python checks only what the op cannot see as given, and reads no device memory.
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
            _check_tensor(t, name)
        for name, t in (("block_table", block_table), ("k_new", k_new), ("v_new", v_new)):
            _check_tensor(t, name, optional=True)
        scale, left, right = _check_scalars(causal, window, scale, num_splits, return_lse, workspace, q.shape[-1])
        _check_no_grad(q, k_new, v_new)
        if check_values and _can_read_values():
            _check_values(cache_seqlens, block_table, k_cache, _capacity(k_cache, block_table),
                          q.shape[2] if k_new is not None else 0)
        if block_table is not None and block_table.shape[1] > 1 and block_table.stride(1) != 1:
            block_table = block_table.contiguous()
        if cache_seqlens.numel() > 1 and cache_seqlens.stride(0) != 1:
            cache_seqlens = cache_seqlens.contiguous()
        ws = workspace.buffer if isinstance(workspace, DecodeWorkspace) else workspace
        out, lse = _ops.kvcache_fwd(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale,
                                    left, right, num_splits, ws)
        return (out, lse) if return_lse else out

    # CPU tensors (and CUDA ones without the extension, which validate refuses): every check in Python.
    scale = validate_kvcache_args(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, causal, window,
                                  scale, num_splits, return_lse, workspace)
    left, right = effective_window(causal, window)
    out, lse = kvcache_reference(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new,
                                 causal=False, window=(left, right), scale=scale)
    return (out, lse) if return_lse else out


def merge_states(o_a, lse_a, o_b, lse_b):
    """Combine attention over two disjoint key sets A and B into attention over A u B.

    o_a, o_b: (B, H, S, D), one float dtype; lse_a, lse_b: (B, H, S) float32 natural-log logsumexp (as returned
    with ``return_lse=True``). Returns (o, lse): o in the inputs' dtype, contiguous. A side with lse = -inf (it saw
    no key) contributes nothing, and its o is not read; both -inf give o = 0, lse = -inf (never NaN).
    CUDA float32/float16/bfloat16 run a kernel using the kernels' SoftmaxState::merge; other cases use
    ``merge_states_reference`` (same math in PyTorch).
    """
    for name, t in (("o_a", o_a), ("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b)):
        _check_tensor(t, name)
        if t.device != o_a.device:
            raise ValueError(f"{name} is on {t.device} but o_a is on {o_a.device}")
    if o_a.dim() != 4 or o_a.shape != o_b.shape:
        raise ValueError(f"o_a and o_b must be (batch, heads, seqlen, head_dim) of one shape, got "
                         f"{tuple(o_a.shape)} and {tuple(o_b.shape)}")
    if not o_a.dtype.is_floating_point or o_a.dtype != o_b.dtype:
        raise TypeError(f"o_a and o_b must have one floating dtype, got {o_a.dtype} and {o_b.dtype}")
    want = tuple(o_a.shape[:3])
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.dtype != torch.float32 or tuple(t.shape) != want:
            raise ValueError(f"{name} must be float32 of shape {want}, got {t.dtype} {tuple(t.shape)}")
    return merge_states_unchecked(o_a, lse_a, o_b, lse_b)


def merge_states_unchecked(o_a, lse_a, o_b, lse_b):
    """merge_states without its argument checks (internal callers that build the inputs themselves): the kernel on
    CUDA for float32/float16/bfloat16, merge_states_reference otherwise (any lse dtype there)."""
    if (o_a.device.type == "cuda" and _ops.HAS_MERGE_OP
            and o_a.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return _ops.merge_states(o_a, lse_a, o_b, lse_b)
    return merge_states_reference(o_a, lse_a, o_b, lse_b)


__all__ = ["attention_with_kvcache", "merge_states", "DecodeWorkspace", "kvcache_reference",
           "merge_states_reference", "gather_kv", "decode_head_dims", "DECODE_VARIANTS", "DECODE_VARIANT_ENV"]
