"""Context parallelism: one sequence split over the ranks of a torch.distributed group, attended with ring attention.

    q_l, k_l, v_l = (shard_sequence(t, group, layout="zigzag") for t in (q, k, v))
    out_l = ring_attention(q_l, k_l, v_l, group, causal=True, layout="zigzag")    # differentiable
    out = unshard_sequence(out_l, group, layout="zigzag")

``ring_attention`` on the shards equals ``attention()`` on the whole sequence (same causal alignment, window, GQA
and lse) up to rounding. The K/V shards travel around the ring with ``batch_isend_irecv`` (on CUDA from a side
stream, so the transfer of the next block overlaps the attention of the block in hand); the partial results are
merged with ``merge_states``. The backward sends each shard's dK/dV around the ring with it, back to its owner;
dQ stays local. NCCL moves CUDA tensors, gloo CPU tensors (the reference path). docs/distributed.md has the
layouts, the planning rules and what multi-node needs.
"""
import struct
import zlib
from collections import namedtuple

import torch
import torch.distributed as dist

from . import _ops, validate
from .api import attention
from .kvcache import merge_states
from .reference_bwd import attention_backward_reference
from .ring_plan import LAYOUTS, chunk_ids, chunks_per_rank, ring_plan

_KV_TAG, _DKV_TAG = 0, 1  # gloo matches messages by (peer, tag): K/V and dK/dV travel at the same time

# What one ring_attention call runs: this rank's plan (its Calls per ring step) and how to talk to the others.
# comm / compute are True except when bench/bench_context_parallel.py times the parts alone.
_RingSpec = namedtuple("_RingSpec", "group rank world plan scale comm compute")


# ---- the group, the layout and agreement between ranks ----------------------------------------------------

def _rank_and_world(group, what):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what} needs torch.distributed: call torch.distributed.init_process_group first")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
    return rank, dist.get_world_size(group)


def _check_layout(layout):
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _check_sequence_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 3:
        raise ValueError(f"{name} must have the sequence in dim 2, e.g. (batch, heads, seqlen, head_dim); got shape "
                         f"{tuple(t.shape)}")


def _supported_devices(group):
    """Device types the group's backend moves ("nccl" -> cuda, "gloo" -> cpu, "cpu:gloo,cuda:nccl" and
    "undefined", what init_process_group() without a backend makes, -> both); None for other backends."""
    backend = str(dist.get_backend(group))
    if ":" in backend:
        return {part.split(":")[0] for part in backend.split(",")}
    return {"nccl": {"cuda"}, "gloo": {"cpu"}, "undefined": {"cpu", "cuda"}}.get(backend)


def _check_backend(group, device):
    supported = _supported_devices(group)
    if supported is not None and device.type not in supported:
        raise ValueError(f"q, k, v are on {device} but the group's backend ({dist.get_backend(group)}) moves "
                         f"{sorted(supported)} tensors: use NCCL for CUDA tensors and gloo for CPU tensors")


def _exchange_device(group, tensors):
    """Where the small agreement tensor lives: the CPU when the group moves CPU tensors (gloo, or a
    "cpu:gloo,cuda:nccl" group: then the check never waits for the GPU), else the inputs' GPU, else the current
    GPU (NCCL), else the CPU."""
    supported = _supported_devices(group)
    if supported is not None and "cpu" in supported:
        return torch.device("cpu")
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            return t.device
    if supported == {"cuda"}:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dtype_code(t):
    return zlib.crc32(str(t.dtype).encode())  # stable across processes (str hashes are not)


def _float_code(x):
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _agree(group, world, what, names, device, local_checks):
    """Runs local_checks() (argument checks, returning one int per name) on every rank and makes all ranks reach
    the same verdict with one small all_gather: if any rank's checks raised, or the ints differ between ranks,
    every rank raises (its own error, or a ValueError naming the ranks / the value), so that no rank is left
    waiting in a transfer that will never come. Reads the result on the host (a GPU sync if device is a GPU)."""
    try:
        values, error = [int(x) for x in local_checks()], None
    except (TypeError, ValueError, RuntimeError) as e:
        values, error = [0] * len(names), e
    mine = torch.tensor([0 if error else 1] + values, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    table = torch.stack(everyone).tolist()
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(table) if row[0] == 0]
    if failed:
        raise ValueError(f"{what}: rank(s) {failed} of the group rejected their arguments (see the error raised "
                         f"there); every rank raises so that none waits forever")
    for i, name in enumerate(names):
        column = [row[i + 1] for row in table]
        if len(set(column)) > 1:
            raise ValueError(f"{what}: {name} differs across the group's ranks ({column}, in rank order); every "
                             f"rank must pass the same shapes and options")


# ---- sharding -----------------------------------------------------------------------------------------------

def shard_sequence(t, group=None, layout="zigzag"):
    """This rank's part of the sequence (dim 2) of ``t``, which every rank passes whole.

    ``layout="zigzag"``: the sequence is cut into 2W equal chunks and rank r gets chunks r and 2W-1-r, one after
    the other (balanced causal work). ``"contiguous"``: rank r gets the r-th of W equal slices. The length must be
    divisible by 2W (zigzag) or W (contiguous). Works for any tensor with the sequence in dim 2 (q, k, v, out,
    dout; lse is (B, H, S)). Returns a new contiguous tensor, so the whole ``t`` can be freed; differentiable.
    No communication.
    """
    _check_layout(layout)
    _check_sequence_tensor(t, "t")
    rank, world = _rank_and_world(group, "shard_sequence")
    n_chunks = world * chunks_per_rank(layout)
    if t.shape[2] % n_chunks:
        raise ValueError(f"t: sequence length {t.shape[2]} (dim 2) must be divisible by {n_chunks} for "
                         f"layout={layout!r} over {world} ranks")
    c = t.shape[2] // n_chunks
    return torch.cat([t.narrow(2, i * c, c) for i in chunk_ids(layout, rank, world)], dim=2)


def _gather_sequence(t_l, group, layout, world):
    parts = [torch.empty_like(t_l, memory_format=torch.contiguous_format) for _ in range(world)]
    dist.all_gather(parts, t_l.contiguous(), group=group)
    per_rank = chunks_per_rank(layout)
    c = t_l.shape[2] // per_rank
    pieces = [None] * (world * per_rank)
    for r, part in enumerate(parts):
        for i, chunk in enumerate(chunk_ids(layout, r, world)):
            pieces[chunk] = part.narrow(2, i * c, c)
    return torch.cat(pieces, dim=2)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t_l, group, layout, world):
        ctx.group, ctx.layout = group, layout
        return _gather_sequence(t_l, group, layout, world)

    @staticmethod
    def backward(ctx, grad):
        # Every rank holds the whole tensor and (as in training) computes the same loss from it: the gradient of
        # this rank's shard is its rows of that loss's gradient. No communication.
        return shard_sequence(grad, ctx.group, ctx.layout), None, None, None


def unshard_sequence(t_l, group=None, layout="zigzag"):
    """The whole tensor on every rank from the shards ``shard_sequence`` made (all_gather, then the chunks put back
    in sequence order). Every rank must pass a shard of the same shape and dtype (checked, on every rank).
    Differentiable, for the usual case where every rank computes the same loss from the whole tensor: a shard's
    gradient is its rows of this rank's gradient."""
    _check_layout(layout)
    rank, world = _rank_and_world(group, "unshard_sequence")
    device = _exchange_device(group, [t_l])

    def local_checks():
        _check_sequence_tensor(t_l, "t_l")
        if t_l.dim() > 8:
            raise ValueError(f"t_l must have at most 8 dims, got {t_l.dim()}")
        _check_backend(group, t_l.device)
        if layout == "zigzag" and t_l.shape[2] % 2:
            raise ValueError(f"t_l: a zigzag shard holds two equal chunks, so its length (dim 2) must be even, got "
                             f"{t_l.shape[2]}")
        return [t_l.dim()] + list(t_l.shape) + [-1] * (8 - t_l.dim()) + [_dtype_code(t_l)]

    names = ["number of dims"] + [f"size of dim {d}" for d in range(8)] + ["dtype"]
    _agree(group, world, "unshard_sequence", names, device, local_checks)
    return _Unshard.apply(t_l, group, layout, world)


# ---- the ring ---------------------------------------------------------------------------------------------

_COMM_STREAMS = {}


class _Ring:
    """Point-to-point transfers between ranks of the group. On CUDA they are issued from a side stream that first
    waits for the work queued so far (the buffer to send is written, the one to receive into no longer read), so
    the transfer runs while the current stream computes; wait() then orders the current stream after it without
    blocking the host."""

    def __init__(self, spec, device):
        self.group, self.rank, self.world, self.enabled = spec.group, spec.rank, spec.world, spec.comm
        self.stream = None
        if device.type == "cuda":
            if device not in _COMM_STREAMS:
                _COMM_STREAMS[device] = torch.cuda.Stream(device)
            self.stream = _COMM_STREAMS[device]

    def peer(self, offset):
        return (self.rank + offset) % self.world

    def exchange(self, send, send_to, recv, recv_from, tag):
        if not self.enabled:
            return []
        ops = [dist.P2POp(dist.isend, send, group=self.group, tag=tag, group_peer=send_to),
               dist.P2POp(dist.irecv, recv, group=self.group, tag=tag, group_peer=recv_from)]
        if self.stream is None:
            return dist.batch_isend_irecv(ops)
        self.stream.wait_stream(torch.cuda.current_stream(send.device))
        with torch.cuda.stream(self.stream):
            return dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works):
        for w in works:
            w.wait()


def _merge_rows(out, lse, o, l, q0, q1, seqlen):
    """Merge a block's (o, l) over rows [q0, q1) into the running (out, lse) over all rows."""
    if q0 == 0 and q1 == seqlen:
        return (o, l) if out is None else merge_states(out, lse, o, l)
    if out is None:
        out = o.new_zeros(o.shape[:2] + (seqlen, o.shape[3]))
        lse = l.new_full(l.shape[:2] + (seqlen,), float("-inf"))
    merged_o, merged_l = merge_states(out[:, :, q0:q1], lse[:, :, q0:q1], o, l)
    out[:, :, q0:q1] = merged_o
    lse[:, :, q0:q1] = merged_l
    return out, lse


def _ring_forward(q, k, v, spec):
    """(out in q's dtype, lse) of this rank's rows over the keys of every rank."""
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # partial results merged in fp32 (fp64 stays)
    B, Hq, Sq, D = q.shape
    ring = _Ring(spec, q.device)
    kv = torch.stack((k, v))  # K and V in one buffer: one message per step (the only copy of the local shard)
    nxt = torch.empty_like(kv) if len(spec.plan) > 1 else None
    out = lse = None
    for step, calls in enumerate(spec.plan):
        last = step + 1 == len(spec.plan)
        works = [] if last else ring.exchange(kv, ring.peer(1), nxt, ring.peer(-1), _KV_TAG)
        for c in calls if spec.compute else ():
            o, l = attention(q[:, :, c.q0:c.q1], kv[0, :, :, c.k0:c.k1], kv[1, :, :, c.k0:c.k1], scale=spec.scale,
                             window=c.window, return_lse=True)
            out, lse = _merge_rows(out, lse, o.to(acc_dtype), l, c.q0, c.q1, Sq)
        ring.wait(works)
        if works:
            kv, nxt = nxt, kv
    if out is None:  # no row of this rank sees any key
        out = q.new_zeros(q.shape, dtype=acc_dtype)
        lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    return out.to(q.dtype), lse


def _block_backward(dout, q, k, v, out, lse, scale, window, dlse):
    """(dq, dk, dv) of one block of keys given the global out and lse: the kernels' backward on CUDA, the float32
    reference on CPU. The only place that names the CUDA backward op."""
    if q.device.type == "cuda":
        return _ops.bwd(dout, q, k, v, out, lse, scale, window[0], window[1], False, dlse)
    return attention_backward_reference(dout, q, k, v, out, lse, scale, window, dlse)


def _ring_backward(dout, q, k, v, out, lse, dlse, spec):
    """(dq, dk, dv) of this rank's shards. The K/V shards travel as in the forward; with each goes the fp32 sum
    of its dK/dV from the ranks it has visited, and after the last step that sum goes home to the shard's owner."""
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    ring = _Ring(spec, q.device)
    steps = len(spec.plan)
    kv = torch.stack((k, v))
    nxt = torch.empty_like(kv) if steps > 1 else None
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dkv = dkv_recv = None
    dkv_works = []
    for step, calls in enumerate(spec.plan):
        last = step + 1 == steps
        kv_works = [] if last else ring.exchange(kv, ring.peer(1), nxt, ring.peer(-1), _KV_TAG)
        block = torch.zeros(kv.shape, dtype=acc_dtype, device=kv.device)  # dK/dV of the shard held now
        for c in calls if spec.compute else ():
            rows = slice(c.q0, c.q1)
            dq_c, dk_c, dv_c = _block_backward(
                dout[:, :, rows], q[:, :, rows], kv[0, :, :, c.k0:c.k1], kv[1, :, :, c.k0:c.k1], out[:, :, rows],
                lse[:, :, rows], spec.scale, c.window, None if dlse is None else dlse[:, :, rows])
            dq[:, :, rows] += dq_c
            block[0, :, :, c.k0:c.k1] += dk_c
            block[1, :, :, c.k0:c.k1] += dv_c
        ring.wait(dkv_works)
        if dkv_works:
            block += dkv_recv  # what the ranks before this one added to the same shard
        ring.wait(kv_works)
        if kv_works:
            kv, nxt = nxt, kv
        # Pass the sum on: to the next rank, or after the last step home to the owner, rank - step.
        dkv, dkv_recv = block, torch.empty_like(block)
        to, frm = (ring.peer(1), ring.peer(-1)) if not last else (ring.peer(-step), ring.peer(step))
        dkv_works = ring.exchange(dkv, to, dkv_recv, frm, _DKV_TAG) if to != spec.rank else []
    ring.wait(dkv_works)
    mine = dkv_recv if dkv_works else dkv
    return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec):
        out, lse = _ring_forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        ctx.set_materialize_grads(False)  # no lse gradient unless the loss uses lse
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, dlse, ctx.spec)
        return dq, dk, dv, None


_RING_FIELDS = ("batch", "q heads", "k/v heads", "local q length", "local k/v length", "head dim", "dtype",
                "device type", "causal", "window left", "window right", "layout", "scale", "requires grad")


def _ring_spec(q, k, v, group, causal, layout, scale, window, return_lse, comm=True, compute=True):
    """Every check of ring_attention, agreed on by all ranks before any transfer, and this rank's plan."""
    rank, world = _rank_and_world(group, "ring_attention")
    if world < 2:
        raise ValueError("group: ring_attention needs a group of at least 2 ranks (this one has 1); on one GPU "
                         "call flashattn_ext.attention on the whole sequence")
    resolved = {}

    def local_checks():
        _check_layout(layout)
        resolved["scale"] = validate.validate_attention_args(q, k, v, causal, scale, window, return_lse)
        _check_backend(group, q.device)
        if layout == "zigzag":
            for name, t in (("q", q), ("k", k)):
                if t.shape[2] % 2:
                    raise ValueError(f"{name}: local sequence length {t.shape[2]} must be even for layout='zigzag' "
                                     f"(the whole sequence is cut into 2W = {2 * world} equal chunks)")
        B, Hq, Sq, D = q.shape
        grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return [B, Hq, k.shape[1], Sq, k.shape[2], D, _dtype_code(q), q.device.type == "cuda", causal,
                window[0], window[1], LAYOUTS.index(layout), _float_code(resolved["scale"]), grads]

    _agree(group, world, "ring_attention", _RING_FIELDS, _exchange_device(group, [q, k, v]), local_checks)
    if q.numel() == 0 or k.numel() == 0:
        plan = ((),)  # nothing to compute or send (every rank agrees: same shapes)
    else:
        plan = ring_plan(layout, world, q.shape[2], k.shape[2], causal, (int(window[0]), int(window[1])))[rank]
    return _RingSpec(group, rank, world, plan, resolved["scale"], comm, compute)


def ring_attention(q, k, v, group=None, causal=True, layout="zigzag", scale=None, window=(-1, -1), return_lse=False):
    """Attention over a sequence split across the ranks of ``group`` (default: the whole world).

    Args:
        q, k, v: this rank's shards from ``shard_sequence(..., layout=layout)``: q (B, Hq, S/W, D), k/v
            (B, Hkv, Sk/W, D), the same shapes, dtype and options on every rank. CUDA tensors need an NCCL group,
            CPU tensors a gloo group.
        causal, scale, window: as ``flashattn_ext.attention`` for the whole sequence: bottom-right alignment
            (query i sits at p = i + Sk - Sq), GQA when Hq != Hkv, ``window=(left, right)`` any sliding window.
        layout: "zigzag" (rank r holds chunks r and 2W-1-r of 2W equal chunks: the same work on every rank under
            a causal mask) or "contiguous" (rank r holds the r-th slice).
        return_lse: also return this rank's rows of the whole-sequence lse, (B, Hq, S/W) float32.

    Returns this rank's rows of ``attention(q, k, v, ...)`` on the whole sequence, (B, Hq, S/W, D) contiguous in
    q's dtype (and the lse). Differentiable (out and lse); the backward runs the ring again and must run on every
    rank. Partial results and gradients are summed in fp32.

    Every rank takes part in every transfer, so the arguments are checked on all ranks together before anything
    is sent: a bad argument, or shapes and options that differ between ranks, raise on every rank. A group of one
    rank is refused. The check is one small all_gather read on the host, once per call: on the CPU when the group
    also moves CPU tensors (``init_process_group()`` without a backend, or "cpu:gloo,cuda:nccl"), else on the GPU
    (with a pure "nccl" group: one synchronisation per call).
    torch.compile graph-breaks around this function (an autograd.Function issuing collectives).
    """
    spec = _ring_spec(q, k, v, group, causal, layout, scale, window, return_lse)
    out, lse = _RingAttention.apply(q, k, v, spec)
    return (out, lse) if return_lse else out


def _ring_attention_parts(q, k, v, group=None, causal=True, layout="zigzag", comm=True, compute=True):
    """ring_attention with the transfers or the attention work left out, for timing the parts
    (bench/bench_context_parallel.py). With either left out the results are meaningless."""
    spec = _ring_spec(q, k, v, group, causal, layout, None, (-1, -1), False, comm=comm, compute=compute)
    return _RingAttention.apply(q, k, v, spec)[0]


__all__ = ["ring_attention", "shard_sequence", "unshard_sequence"]
