"""PagedKVCache: page pool and per-sequence bookkeeping for ``attention_with_kvcache``.

The cache owns two tensors, ``k_pages`` and ``v_pages``, of shape (num_layers, num_pages, page_size,
num_kv_heads, head_dim). A sequence owns a list of pages; its token ``t`` lives in page ``pages[t // page_size]``,
row ``t % page_size``. Pages come from a free pool (lowest id first), are never given to two sequences, and go
back to the pool on ``free``. A request the pool cannot satisfy raises before anything changes.

One decode step for sequences ``seqs`` with one new token each::

    lens = cache.seqlens(seqs)              # tokens already cached (before this step), int32 on the device
    for s in seqs:
        cache.extend(s, 1)                  # bookkeeping: room for the new token (may take a new page)
    table = cache.block_table(seqs)
    for layer in range(cache.num_layers):
        k_pages, v_pages = cache.layer(layer)
        out = attention_with_kvcache(q, k_pages, v_pages, lens, table, k_new=k, v_new=v)  # writes k, v

``attention_with_kvcache`` never changes lengths: ``extend`` is the only bookkeeping.
"""
import heapq

import torch


class PagedKVCache:
    def __init__(self, num_pages, page_size, num_kv_heads, head_dim, num_layers=1, dtype=torch.bfloat16,
                 device="cuda"):
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_layers = num_layers
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k_pages = torch.zeros(shape, dtype=dtype, device=device)
        self.v_pages = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(num_pages))  # a heap: the lowest free page is handed out first
        self._pages = {}  # seq id -> list of page ids
        self._lens = {}   # seq id -> tokens
        self._next_id = 0

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
        return self.k_pages[i], self.v_pages[i]

    def pages(self, seq):
        """A copy of the page ids of ``seq``, in token order."""
        return list(self._pages[self._check_seq(seq, "pages")])

    def seqlen(self, seq):
        return self._lens[self._check_seq(seq, "seqlen")]

    def seqlens(self, seqs):
        """(len(seqs),) int32 on the cache's device: tokens of each sequence."""
        seqs = self._check_seqs(seqs, "seqlens")
        return torch.tensor([self._lens[s] for s in seqs], dtype=torch.int32, device=self.device)

    def block_table(self, seqs, max_pages=None):
        """(len(seqs), max_pages) int32 on the cache's device; row b lists the pages of seqs[b], padded with 0
        (entries past a sequence's pages are never read or written: the kernels stop at the sequence length).
        max_pages defaults to the most pages any of seqs holds (at least 1); give a fixed value to keep the shape
        stable, e.g. for a CUDA graph."""
        seqs = self._check_seqs(seqs, "block_table")
        need = max([len(self._pages[s]) for s in seqs] + [1])
        if max_pages is None:
            max_pages = need
        elif max_pages < need:
            raise ValueError(f"block_table(max_pages={max_pages}): sequence holds {need} pages")
        table = torch.zeros((len(seqs), max_pages), dtype=torch.int32)
        for b, s in enumerate(seqs):
            pages = self._pages[s]
            if pages:
                table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return table.to(self.device)

    # ---- bookkeeping ----------------------------------------------------------------------------------

    def add_sequence(self, num_tokens=0):
        """A new sequence with room for num_tokens tokens; returns its id. Raises (and creates nothing) when the
        pool has too few free pages."""
        self._check_count(num_tokens, "add_sequence", "num_tokens")
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
        touched. Raises (and changes nothing) when the pool has too few free pages."""
        self._check_seq(seq, "extend")
        self._check_count(n, "extend", "n")
        new_len = self._lens[seq] + n
        need = self._pages_for(new_len) - len(self._pages[seq])
        if need > len(self._free):
            raise RuntimeError(
                f"PagedKVCache.extend(seq={seq}, n={n}) needs {need} more pages (length {self._lens[seq]} -> "
                f"{new_len}) but only {len(self._free)} of {self.num_pages} are free; nothing was changed")
        self._pages[seq].extend(heapq.heappop(self._free) for _ in range(need))
        self._lens[seq] = new_len
        return new_len

    def free(self, seq):
        """Return seq's pages to the pool; seq is gone afterwards."""
        self._check_seq(seq, "free")
        for page in self._pages.pop(seq):
            heapq.heappush(self._free, page)
        del self._lens[seq]

    # ---- helpers --------------------------------------------------------------------------------------

    def _pages_for(self, tokens):
        return -(-tokens // self.page_size)

    def _check_seq(self, seq, what):
        if seq not in self._pages:
            raise KeyError(f"PagedKVCache.{what}: unknown sequence id {seq!r} (live: {self.sequences})")
        return seq

    def _check_seqs(self, seqs, what):
        seqs = list(seqs)
        for s in seqs:
            self._check_seq(s, what)
        return seqs

    @staticmethod
    def _check_count(n, what, name):
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"PagedKVCache.{what}: {name} must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"PagedKVCache.{what}: {name} must be >= 0, got {n}")

    def __repr__(self):
        return (f"PagedKVCache(num_pages={self.num_pages}, page_size={self.page_size}, num_kv_heads="
                f"{self.num_kv_heads}, head_dim={self.head_dim}, num_layers={self.num_layers}, dtype={self.dtype}, "
                f"device={self.device}, sequences={len(self._pages)}, free_pages={len(self._free)})")
