"""bench_fwd.py's varlen rows are built right before any GPU run: lengths, cu_seqlens, document ids, the useful
FLOPs, the Flex document mask (checked as a mask against attention_varlen on the CPU), and ``--dry-run``."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import bench_fwd  # noqa: E402
import varlen_case  # noqa: E402
from timing import attn_fwd_flops  # noqa: E402

from flashattn_ext import attention_varlen  # noqa: E402


def test_lengths_are_fixed_mixed_and_sum_to_16k():
    lengths = varlen_case.mixed_lengths()
    assert lengths == varlen_case.mixed_lengths()  # seeded: every run benches the same batch
    assert sum(lengths) == 16384
    assert all(128 <= n <= 4096 for n in lengths) and len(set(lengths)) > 3
    for seed in range(20):
        other = varlen_case.mixed_lengths(total=5000, lo=7, hi=900, seed=seed)
        assert sum(other) == 5000 and all(7 <= n <= 900 for n in other)


@pytest.mark.parametrize("causal", [False, True])
def test_case_tensors_and_flops(causal):
    case = varlen_case.VarlenCase([5, 1, 17, 9], heads=3, head_dim=8, causal=causal)
    assert case.cu_seqlens().tolist() == [0, 5, 6, 23, 32] and case.cu_seqlens().dtype == torch.int32
    assert case.document_ids().tolist() == [0] * 5 + [1] + [2] * 17 + [3] * 9
    assert case.useful_flops() == sum(attn_fwd_flops(1, 3, n, n, 8, causal) for n in (5, 1, 17, 9))
    assert case.summary()["padded_shape"] == [4, 3, 17, 8]


@pytest.mark.parametrize("causal", [False, True])
def test_flex_document_mask_is_the_varlen_problem(causal):
    # The mask_mod the Flex peer compiles, evaluated densely, gives SDPA over the packed rows the same output as
    # attention_varlen: the peer computes the same thing as ours.
    case = varlen_case.VarlenCase([5, 1, 17, 9], heads=2, head_dim=16, causal=causal)
    doc, idx = case.document_ids(), torch.arange(case.total)
    mask = varlen_case.document_mask_mod(doc, causal)(0, 0, idx[:, None], idx[None, :])
    g = torch.Generator().manual_seed(int(causal))
    q, k, v = (torch.randn(case.total, 2, 16, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=mask).transpose(0, 1)
    cu = case.cu_seqlens()
    got = attention_varlen(q, k, v, cu, cu, case.max_len, case.max_len, causal=causal)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dry_run_builds_every_row_without_a_gpu(tmp_path, capsys):
    assert bench_fwd.main(["--dry-run", "--out", str(tmp_path)]) == 0
    plan = json.loads((tmp_path / "fwd_plan.json").read_text())
    assert len(plan["shapes"]) == len(bench_fwd.SHAPES["peers"])
    assert [c["causal"] for c in plan["varlen"]] == [False, True]
    for c in plan["varlen"]:
        assert c["total"] == 16384 and c["heads"] == 32 and c["head_dim"] == 128
        assert c["dense_shapes"] == {"dense_1x16k": [1, 16384], "dense_4x4k": [4, 4096]}
    assert "varlen D128 H32" in capsys.readouterr().out
