"""PagedKVCache: page pool and per-sequence bookkeeping for ``attention_with_kvcache``.

The cache owns two tensors, ``k_pages`` and ``v_pages``, of shape (num_layers, num_pages, page_size,
num_kv_heads, head_dim). A sequence owns a list of pages; its token ``t`` lives in page ``pages[t // page_size]``,
row ``t % page_size``. Pages come from a free pool (lowest id first), are never given to two sequences, and go
back to the pool on ``free``. A request the pool cannot satisfy raises before anything changes.

All bookkeeping (lengths, page lists) lives on the host; the cache never reads device memory. One decode step
for sequences ``seqs`` with ``n`` new tokens each::

    step = cache.step(seqs, n)          # room for n more tokens each; lengths BEFORE the step + block table
    for layer in range(cache.num_layers):
        out = cache.attention(step, layer, q, k_new=k, v_new=v)   # appends k, v, then attends

``step`` is the only way to get device tensors of lengths and pages, and they are right by construction: the
lengths are the ones before the step's tokens (where the append writes), the table covers the step's new pages.
``cache.attention`` refuses a step that is no longer current (any ``step``, ``extend`` or ``free`` since: its
lengths are stale, or a page it lists may belong to another sequence now) and new tokens other than the ``n``
the step made room for. CUDA graphs: copy ``step.cache_seqlens`` / ``step.block_table`` (with a fixed
``max_pages``) into the captured buffers and call ``attention_with_kvcache`` on those. Those raw calls are not
checked against the bookkeeping: a table kept past a ``free`` or lengths read after an ``extend`` write to the
wrong place there. ``seqlens`` / ``block_table`` return host (CPU) copies for inspection; their unused table
entries are -1, which ``attention_with_kvcache`` rejects if an append or read would use them (instead of page 0).
"""
import heapq
import itertools
from dataclasses import dataclass

import torch

from .ctor_args import check_count, check_dtype, resolve_device
from .kvcache import attention_with_kvcache

CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float32: CPU reference path only
NO_PAGE = -1  # block table padding: out of range, so validation refuses a read or write through it


@dataclass(frozen=True, eq=False)  # eq would compare tensors
class DecodeStep:
    """What ``PagedKVCache.step`` hands out: device tensors for one step and the host facts they came from.

    cache_seqlens: (B,) int32 on the cache's device, tokens of each sequence before this step.
    block_table: (B, max_pages) int32 on the cache's device, pages of each sequence after this step, -1 padded.
    """
    seqs: tuple
    n_new: int
    cache_seqlens: torch.Tensor
    block_table: torch.Tensor
    lengths_before: tuple  # host copy of cache_seqlens
    epoch: int             # the cache's bookkeeping epoch when issued
    cache_id: int


class PagedKVCache:
    _ids = itertools.count()  # a step names its cache by this id (not id(), which is reused after collection)

    def __init__(self, num_pages, page_size, num_kv_heads, head_dim, num_layers=1, dtype=torch.bfloat16,
                 device=None):
        """device: where the pages live; None = the current CUDA device when CUDA is available, else the CPU."""
        owner = "PagedKVCache"
        self.num_pages = check_count(num_pages, owner, "num_pages")
        self.page_size = check_count(page_size, owner, "page_size")
        self.num_kv_heads = check_count(num_kv_heads, owner, "num_kv_heads")
        self.head_dim = check_count(head_dim, owner, "head_dim")
        self.num_layers = check_count(num_layers, owner, "num_layers")
        dtype = check_dtype(dtype, owner, CACHE_DTYPES)
        device = resolve_device(device, owner)
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k_pages = torch.zeros(shape, dtype=dtype, device=device)
        self.v_pages = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(num_pages))  # a heap: the lowest free page is handed out first
        self._pages = {}  # seq id -> list of page ids
        self._lens = {}   # seq id -> tokens
        self._next_id = 0
        # Bumped by every change to lengths or page ownership: a DecodeStep is valid only in its own epoch.
        self._epoch = 0
        self._id = next(PagedKVCache._ids)

    # ---- queries --------------------------------------------------------------------------------------

    @property
    def device(self):
        return self.k_pages.device

    @property
    def dtype(self):
        return self.k_pages.dtype

    @property
    def num_free_pages(self):
        return len(self._free)

    @property
    def sequences(self):
        """Ids of the live sequences, in creation order."""
        return list(self._pages)

    def layer(self, i):
        """(k_pages, v_pages) of layer i: (num_pages, page_size, num_kv_heads, head_dim) views."""
        check_count(i, "PagedKVCache.layer", "layer", minimum=0, maximum=self.num_layers - 1)
        return self.k_pages[i], self.v_pages[i]

    def pages(self, seq):
        """A copy of the page ids of ``seq``, in token order."""
        return list(self._pages[self._check_seq(seq, "pages")])

    def seqlen(self, seq):
        return self._lens[self._check_seq(seq, "seqlen")]

    def seqlens(self, seqs):
        """(len(seqs),) int32 on the CPU: tokens of each sequence now (after every ``extend``/``step``). A host
        copy for inspection: the lengths of a step come from ``step``."""
        seqs = self._check_seqs(seqs, "seqlens")
        return torch.tensor([self._lens[s] for s in seqs], dtype=torch.int32)

    def block_table(self, seqs, max_pages=None):
        """(len(seqs), max_pages) int32 on the CPU; row b lists the pages of seqs[b], padded with -1. A host copy
        for inspection: the table of a step comes from ``step``. max_pages defaults to the most pages any of
        seqs holds (at least 1); give a fixed value to keep the shape stable, e.g. for a CUDA graph."""
        seqs = self._check_seqs(seqs, "block_table")
        return self._host_table(seqs, max_pages, "block_table")

    # ---- bookkeeping ----------------------------------------------------------------------------------

    def add_sequence(self, num_tokens=0):
        """A new sequence with room for num_tokens tokens; returns its id. Raises (and creates nothing) when the
        pool has too few free pages."""
        self._check_n(num_tokens, "add_sequence", "num_tokens")
        need = self._pages_for(num_tokens)
        if need > len(self._free):
            raise RuntimeError(
                f"PagedKVCache.add_sequence(num_tokens={num_tokens}) needs {need} pages but only {len(self._free)} "
                f"of {self.num_pages} are free; nothing was allocated")
        seq = self._next_id
        self._next_id += 1
        self._pages[seq] = [heapq.heappop(self._free) for _ in range(need)]
        self._lens[seq] = num_tokens
        return seq

    def extend(self, seq, n):
        """Room for n more tokens of seq (new pages as needed); returns the new length. Page contents are not
        touched. Raises (and changes nothing) when the pool has too few free pages. For a decode or prefill step
        that appends through ``attention_with_kvcache`` use ``step``, which also returns the lengths to append at."""
        self._check_seq(seq, "extend")
        self._check_n(n, "extend", "n")
        self._reserve({seq: n}, f"extend(seq={seq}, n={n})")
        self._epoch += 1
        return self._lens[seq]

    def step(self, seqs, n_new, max_pages=None):
        """Make room for n_new more tokens in each of seqs and return the ``DecodeStep`` for appending them:
        ``cache_seqlens`` (lengths before the step) and ``block_table`` (pages after it), built on the host and
        copied to the cache's device (no device read). Raises, and changes nothing, when the pool is short,
        max_pages is too small, or seqs repeats a sequence. Outstanding steps become stale."""
        seqs = self._check_seqs(seqs, "step")
        self._check_n(n_new, "step", "n_new")
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"PagedKVCache.step: seqs lists a sequence twice: {seqs}")
        before = tuple(self._lens[s] for s in seqs)
        if max_pages is not None:  # checked before anything changes
            need = max([self._pages_for(n + n_new) for n in before] + [1])
            self._check_max_pages(max_pages, need, "step")
        self._reserve({s: n_new for s in seqs}, f"step(seqs={seqs}, n_new={n_new})")
        self._epoch += 1
        table = self._host_table(seqs, max_pages, "step")
        lens = torch.tensor(before, dtype=torch.int32)
        return DecodeStep(seqs=tuple(seqs), n_new=n_new, cache_seqlens=lens.to(self.device),
                          block_table=table.to(self.device), lengths_before=before, epoch=self._epoch,
                          cache_id=self._id)

    def free(self, seq):
        """Return seq's pages to the pool; seq is gone afterwards. Outstanding steps become stale."""
        self._check_seq(seq, "free")
        for page in self._pages.pop(seq):
            heapq.heappush(self._free, page)
        del self._lens[seq]
        self._epoch += 1

    # ---- attention ------------------------------------------------------------------------------------

    def attention(self, step, layer, q, k_new=None, v_new=None, **kwargs):
        """``attention_with_kvcache`` on layer ``layer`` with the step's lengths and table, after host checks
        that the step is this cache's current one and that the new tokens are the n_new it made room for.
        With n_new == 0 the step's tokens are already cached: give no k_new/v_new. Other keyword arguments
        (causal, window, scale, num_splits, return_lse, workspace) go to ``attention_with_kvcache``."""
        self.check_step(step)
        k_pages, v_pages = self.layer(layer)
        if step.n_new == 0:
            if k_new is not None or v_new is not None:
                raise ValueError("PagedKVCache.attention: k_new/v_new given but the step made room for 0 new "
                                 "tokens (cache.step(seqs, n_new) with n_new = the tokens to append)")
        else:
            for name, t in (("k_new", k_new), ("v_new", v_new)):
                if not isinstance(t, torch.Tensor) or t.dim() != 4:
                    raise ValueError(f"PagedKVCache.attention: {name} must be a 4-D tensor (batch, kv_heads, "
                                     f"{step.n_new}, head_dim): the step made room for {step.n_new} new tokens")
                if t.shape[2] != step.n_new:
                    raise ValueError(f"PagedKVCache.attention: {name} has {t.shape[2]} new tokens but the step made "
                                     f"room for {step.n_new}; appending more would write past the extended pages")
        return attention_with_kvcache(q, k_pages, v_pages, step.cache_seqlens, step.block_table, k_new=k_new,
                                      v_new=v_new, **kwargs)

    def check_step(self, step):
        """Raise unless step came from this cache's latest ``step`` with no ``extend``/``free`` since."""
        if not isinstance(step, DecodeStep):
            raise TypeError(f"step must be a DecodeStep from PagedKVCache.step, got {type(step).__name__}")
        if step.cache_id != self._id:
            raise ValueError("step was issued by another PagedKVCache")
        if step.epoch != self._epoch:
            raise ValueError(
                f"step is stale: it was issued at bookkeeping epoch {step.epoch} and the cache is at {self._epoch} "
                "(step/extend/free since). Its lengths may be out of date and its pages may belong to another "
                "sequence now; call cache.step(...) again for the current step")

    # ---- helpers --------------------------------------------------------------------------------------

    def _reserve(self, n_by_seq, call):
        """Take the pages for n_by_seq[seq] more tokens of each seq, all or nothing."""
        need = {s: self._pages_for(self._lens[s] + n) - len(self._pages[s]) for s, n in n_by_seq.items()}
        total = sum(need.values())
        if total > len(self._free):
            raise RuntimeError(f"PagedKVCache.{call} needs {total} more pages but only {len(self._free)} of "
                               f"{self.num_pages} are free; nothing was changed")
        for s, n in n_by_seq.items():
            self._pages[s].extend(heapq.heappop(self._free) for _ in range(need[s]))
            self._lens[s] += n

    def _host_table(self, seqs, max_pages, what):
        need = max([len(self._pages[s]) for s in seqs] + [1])
        if max_pages is None:
            max_pages = need
        self._check_max_pages(max_pages, need, what)
        table = torch.full((len(seqs), max_pages), NO_PAGE, dtype=torch.int32)
        for b, s in enumerate(seqs):
            pages = self._pages[s]
            if pages:
                table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return table

    @staticmethod
    def _check_max_pages(max_pages, need, what):
        check_count(max_pages, f"PagedKVCache.{what}", "max_pages")
        if max_pages < need:
            raise ValueError(f"PagedKVCache.{what}(max_pages={max_pages}): a sequence holds {need} pages")

    def _pages_for(self, tokens):
        return -(-tokens // self.page_size)

    def _check_seq(self, seq, what):
        if isinstance(seq, bool) or not isinstance(seq, int) or seq not in self._pages:
            raise KeyError(f"PagedKVCache.{what}: unknown sequence id {seq!r} (live: {self.sequences})")
        return seq

    def _check_seqs(self, seqs, what):
        if isinstance(seqs, (int, torch.Tensor)):
            raise TypeError(f"PagedKVCache.{what}: seqs must be a list of sequence ids, got {type(seqs).__name__}")
        seqs = list(seqs)
        for s in seqs:
            self._check_seq(s, what)
        return seqs

    @staticmethod
    def _check_n(n, what, name):
        check_count(n, f"PagedKVCache.{what}", name, minimum=0)

    def __repr__(self):
        return (f"PagedKVCache(num_pages={self.num_pages}, page_size={self.page_size}, num_kv_heads="
                f"{self.num_kv_heads}, head_dim={self.head_dim}, num_layers={self.num_layers}, dtype={self.dtype}, "
                f"device={self.device}, sequences={len(self._pages)}, free_pages={len(self._free)})")
