"""The varlen rows of bench_fwd.py: one packed batch of mixed sequence lengths, built on the CPU, and the
flash-attn-style packed FlexAttention peer (a document mask over the packed sequence).

Everything but ``flex_document_fn`` runs without a GPU, so ``bench_fwd.py --dry-run`` and the CPU tests check the
row construction before a GPU run.
"""
import math
import random
from dataclasses import dataclass

import torch

from timing import attn_fwd_flops

TOTAL, MIN_LEN, MAX_LEN, SEED = 16384, 128, 4096, 0
HEADS, HEAD_DIM = 32, 128


def mixed_lengths(total=TOTAL, lo=MIN_LEN, hi=MAX_LEN, seed=SEED):
    """A fixed (seeded) list of lengths in [lo, hi] summing to ``total`` (needs total >= lo). Log-uniform draws,
    so short and long sequences both occur, as in real batches."""
    rng, lengths, left = random.Random(seed), [], total
    while left > hi:
        n = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        n = max(lo, min(n, left - lo))  # leaves >= lo for the rest
        lengths.append(n)
        left -= n
    lengths.append(left)
    return lengths


@dataclass
class VarlenCase:
    lengths: list
    heads: int
    head_dim: int
    causal: bool

    @property
    def total(self):
        return sum(self.lengths)

    @property
    def max_len(self):
        return max(self.lengths)

    @property
    def label(self):
        return (f"varlen D{self.head_dim} H{self.heads} {len(self.lengths)} seqs {self.total // 1024}k"
                + (" causal" if self.causal else ""))

    def useful_flops(self):
        """Per-sequence FLOPs (square causal halved, as every row counts): what every column is credited with."""
        return sum(attn_fwd_flops(1, self.heads, S, S, self.head_dim, self.causal) for S in self.lengths)

    def dense_flops(self, batch, seqlen):
        return attn_fwd_flops(batch, self.heads, seqlen, seqlen, self.head_dim, self.causal)

    def cu_seqlens(self, device="cpu"):
        """(B + 1,) int32 prefix sums from 0."""
        return torch.tensor([0] + self.lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)

    def document_ids(self, device="cpu"):
        """(total,) int32: the sequence each packed row belongs to (the Flex document mask)."""
        return torch.repeat_interleave(torch.arange(len(self.lengths), dtype=torch.int32),
                                       torch.tensor(self.lengths)).to(device)

    def summary(self):
        return {"label": self.label, "lengths": self.lengths, "total": self.total, "max_len": self.max_len,
                "heads": self.heads, "head_dim": self.head_dim, "causal": self.causal,
                "useful_flops": self.useful_flops(), "padded_shape": [len(self.lengths), self.heads, self.max_len,
                                                                      self.head_dim],
                "dense_shapes": dense_shapes(self)}


def dense_shapes(case):
    """{name: (B, S)} of the dense calls with the case's total tokens: one sequence, and sequences of MAX_LEN."""
    return {f"dense_1x{case.total // 1024}k": (1, case.total),
            f"dense_{case.total // MAX_LEN}x{MAX_LEN // 1024}k": (case.total // MAX_LEN, MAX_LEN)}


def varlen_cases(heads=HEADS, head_dim=HEAD_DIM):
    lengths = mixed_lengths()
    return [VarlenCase(lengths, heads, head_dim, causal) for causal in (False, True)]


def document_mask_mod(doc, causal):
    """FlexAttention mask_mod over the packed sequence: same document (and key at or before the query)."""
    def same_document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def same_document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    return same_document_causal if causal else same_document


def flex_document_fn(case, q, k, v):
    """Callable: compiled FlexAttention over packed (total, H, D) q/k/v as one (1, H, total, D) sequence with the
    document block mask (flex_bench.py's setup: timing.compiled_flex_attention). Returns (total, H, D)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from timing import compiled_flex_attention
    flex = compiled_flex_attention()
    doc = case.document_ids(q.device)
    block_mask = create_block_mask(document_mask_mod(doc, case.causal), None, None, case.total, case.total,
                                   device=q.device)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))  # (1, H, total, D), untimed
    return lambda: flex(q4, k4, v4, block_mask=block_mask)[0].transpose(0, 1)
