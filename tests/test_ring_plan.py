"""ring_plan: the calls of every rank at every ring step, put back in whole-sequence positions, must cover each
visible (query, key) pair exactly once and nothing else; zigzag causal must give every rank the same work."""
import itertools

import pytest
import torch

from flashattn_ext.reference import visible_mask
from flashattn_ext.ring_plan import plan_block, ring_plan, segments


def positions(layout, rank, world, local_len):
    """Whole-sequence position of each local row."""
    pos = torch.empty(local_len, dtype=torch.long)
    for seg in segments(layout, rank, world, local_len):
        pos[seg.offset:seg.offset + seg.length] = torch.arange(seg.start, seg.start + seg.length)
    return pos


def coverage(layout, world, Sq_l, Sk_l, causal, window):
    """How many times the plan computes each (query, key) pair of the whole sequence."""
    count = torch.zeros(world * Sq_l, world * Sk_l, dtype=torch.long)
    plan = ring_plan(layout, world, Sq_l, Sk_l, causal, window)
    for rank in range(world):
        assert len(plan[rank]) == len(plan[0])  # every rank takes the same number of ring steps
        rows = positions(layout, rank, world, Sq_l)
        for step, calls in enumerate(plan[rank]):
            keys = positions(layout, (rank - step) % world, world, Sk_l)
            for c in calls:
                assert 0 <= c.q0 < c.q1 <= Sq_l and 0 <= c.k0 < c.k1 <= Sk_l, c
                assert all(w >= -1 for w in c.window), c
                local = visible_mask(c.q1 - c.q0, c.k1 - c.k0, False, c.window)
                a, b = local.nonzero(as_tuple=True)
                count.index_put_((rows[c.q0:c.q1][a], keys[c.k0:c.k1][b]), torch.ones_like(a), accumulate=True)
    return count, plan


WINDOWS = [(-1, -1), (0, 0), (3, -1), (-1, 2), (5, 1), (13, 0), (1, 7)]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_plan_covers_the_mask_exactly_once(layout, world, causal):
    for (Sq_l, Sk_l), window in itertools.product([(6, 6), (2, 2), (4, 10), (10, 4)], WINDOWS):
        count, _ = coverage(layout, world, Sq_l, Sk_l, causal, window)
        want = visible_mask(world * Sq_l, world * Sk_l, causal, window).long()
        assert torch.equal(count, want), (Sq_l, Sk_l, window)


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_causal_is_one_balanced_call_per_step(world):
    S_l = 16
    plan = ring_plan("zigzag", world, S_l, S_l, True, (-1, -1))
    for rank in range(world):
        assert len(plan[rank]) == world
        (diag,) = plan[rank][0]
        assert (diag.q1 - diag.q0, diag.k1 - diag.k0, diag.window) == (S_l, S_l, (-1, 0))  # causal, local
        for calls in plan[rank][1:]:
            (c,) = calls  # half the rows against all keys, or all rows against half the keys; no mask
            assert (c.q1 - c.q0) * (c.k1 - c.k0) == S_l * S_l // 2 and c.window == (-1, -1)


def test_contiguous_causal_skips_blocks_from_later_ranks():
    plan = ring_plan("contiguous", 4, 8, 8, True, (-1, -1))
    for rank in range(4):
        for step, calls in enumerate(plan[rank]):
            src = (rank - step) % 4
            assert bool(calls) == (src <= rank)


def test_sliding_window_stops_the_ring_early():
    # window 3 keys back with 8 rows per rank: only the own shard and the previous rank's are ever seen
    plan = ring_plan("contiguous", 4, 8, 8, True, (3, -1))
    assert len(plan[0]) == 2
    count, _ = coverage("contiguous", 4, 8, 8, True, (3, -1))
    assert torch.equal(count, visible_mask(32, 32, True, (3, -1)).long())


def test_blocks_nobody_sees_have_no_call():
    (qs,), (ks,) = segments("contiguous", 0, 2, 4), segments("contiguous", 1, 2, 4)
    assert plan_block((qs,), (ks,), -float("inf"), 0) == ()


def test_random_configurations_cover_the_mask_exactly_once():
    g = torch.Generator().manual_seed(0)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    for _ in range(60):
        world, layout = rand(2, 8), ("zigzag", "contiguous")[rand(0, 1)]
        Sq_l, Sk_l = 2 * rand(1, 5), 2 * rand(1, 5)
        window = (rand(-1, 3 * Sk_l), rand(-1, 3 * Sk_l))
        causal = bool(rand(0, 1))
        count, _ = coverage(layout, world, Sq_l, Sk_l, causal, window)
        want = visible_mask(world * Sq_l, world * Sk_l, causal, window).long()
        assert torch.equal(count, want), (layout, world, Sq_l, Sk_l, causal, window)
