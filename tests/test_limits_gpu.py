"""Limits of the forward kernels: very long sequences (int32/int64 offsets), more than 100,000 blocks, NaN
inputs confined to the rows they can reach. Sampled rows are checked against a float64 oracle that computes
only those rows, so the check stays cheap at S = 131,072."""
import math

import pytest
import torch

import flashattn_ext
from flashattn_ext.testing import OUT_FLOOR

pytestmark = pytest.mark.requires_cuda_ext

# The Hopper family joins the parametrised tests on compute capability 9.0 with an sm_90a build.
FA3 = (["fa3"] if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
       and "90a" in flashattn_ext.build_info().get("cuda_archs", "").split(";") else [])


def rows_reference(q, k, v, rows, causal, dtype, window=(-1, -1)):
    """Attention of query rows `rows` (bottom-right causal, or the window (left, right) around each row's
    position), computed in `dtype` on the GPU."""
    Sq, Sk, D = q.shape[2], k.shape[2], q.shape[3]
    qs = q[:, :, rows].to(dtype)
    s = torch.matmul(qs, k.to(dtype).transpose(-1, -2)) / math.sqrt(D)
    pos, j = (rows + Sk - Sq)[:, None], torch.arange(Sk, device=q.device)[None, :]
    if causal:
        s = s.masked_fill(j > pos, float("-inf"))
    if window[0] >= 0:
        s = s.masked_fill(j < pos - window[0], float("-inf"))
    if window[1] >= 0:
        s = s.masked_fill(j > pos + window[1], float("-inf"))
    return torch.matmul(torch.softmax(s.float(), dim=-1).to(dtype), v.to(dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("algorithm", ["fa2"] + FA3)
def test_sequence_131072(causal, algorithm):
    S, D = 131_072, 64
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(1, 1, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    q[..., :] /= 2  # keep scores moderate so the softmax is not a one-hot
    out = flashattn_ext.attention(q, k, v, causal=causal, algorithm=algorithm)
    rows = torch.cat([torch.arange(0, 16), torch.randint(16, S - 16, (32,), generator=torch.Generator().manual_seed(0)),
                      torch.arange(S - 16, S)]).to("cuda")
    ref = rows_reference(q, k, v, rows, causal, torch.float64)
    low = rows_reference(q, k, v, rows, causal, torch.bfloat16)
    err = (out[:, :, rows].double() - ref).abs().max().item()
    bound = 2 * (low.double() - ref).abs().max().item() + OUT_FLOOR
    assert err <= bound, f"S=131072 causal={causal}: err {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("window", [(1000, 0), (300, 300)])
@pytest.mark.parametrize("algorithm", ["fa2"] + FA3)
def test_long_band(window, algorithm):
    # A band past 8k keys: the Hopper forward's persistent grid for banded rows (fa3/fwd_launch.cuh), with
    # query tiles from the first (a shorter band) to the last.
    S, D = 20_000, 64
    g = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (torch.randn(1, 2, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    out = flashattn_ext.attention(q, k, v, window=window, algorithm=algorithm)
    rows = torch.cat([torch.arange(0, 130), torch.randint(130, S - 130, (64,), generator=torch.Generator().manual_seed(1)),
                      torch.arange(S - 130, S)]).to("cuda")
    ref = rows_reference(q, k, v, rows, False, torch.float64, window)
    low = rows_reference(q, k, v, rows, False, torch.bfloat16, window)
    err = (out[:, :, rows].double() - ref).abs().max().item()
    bound = 2 * (low.double() - ref).abs().max().item() + OUT_FLOOR
    assert err <= bound, f"S={S} window={window}: err {err:.3e} > bound {bound:.3e}"


def test_more_than_100k_blocks():
    B = 100_003  # one query tile per (batch, head): 100,003 blocks in one launch
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(B, 1, 17, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    out = flashattn_ext.attention(q, k, v, causal=True)
    idx = torch.tensor([0, 1, 65_535, 65_536, 99_999, B - 1], device="cuda")
    rows = torch.arange(17, device="cuda")
    ref = torch.cat([rows_reference(q[i:i + 1], k[i:i + 1], v[i:i + 1], rows, True, torch.float64) for i in idx])
    low = torch.cat([rows_reference(q[i:i + 1], k[i:i + 1], v[i:i + 1], rows, True, torch.bfloat16) for i in idx])
    err = (out[idx].double() - ref).abs().max().item()
    assert err <= 2 * (low.double() - ref).abs().max().item() + OUT_FLOOR


@pytest.mark.parametrize("algorithm", ["fa2", "fa1"] + FA3)
def test_nan_stays_in_the_rows_it_reaches(algorithm):
    B, H, S, D = 1, 2, 200, 64
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    q[0, 0, 10] = float("nan")   # one query row of head 0
    k[0, 1, 150] = float("nan")  # one key of head 1: causal rows >= 150 see it
    out = flashattn_ext.attention(q, k, v, causal=True, algorithm=algorithm)
    torch.cuda.synchronize()  # no hang, no launch error
    bad = out.isnan().any(dim=-1)[0]  # (H, S)
    expect = torch.zeros(H, S, dtype=torch.bool, device="cuda")
    expect[0, 10] = True
    expect[1, 150:] = True
    assert torch.equal(bad, expect), "NaN reached rows that cannot see the NaN input, or vanished"
