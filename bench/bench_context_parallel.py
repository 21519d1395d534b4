"""Context-parallel scaling: ring_attention on W GPUs against attention() on one, per attention layer.

    python bench/bench_context_parallel.py --nproc 2 [--seqlens 32768,65536,131072] [--layouts zigzag] [--out DIR]
    torchrun --nproc-per-node 2 bench/bench_context_parallel.py [...]       (any torchrun-style launch, multi-node too)

With --nproc the script launches itself on that many local GPUs (NCCL, NVLink multicast off); under torchrun it
reads RANK / WORLD_SIZE / LOCAL_RANK. Shapes: B1, Hq32/Hkv8, D128, causal, bf16. For each sequence length S:
- t1: attention() on the whole sequence on one GPU (every rank times it on its own GPU at the same time),
- tW: ring_attention on the shards (the slowest rank, all ranks started together),
- efficiency = t1 / (W * tW), for the forward and for forward+backward,
- communication hidden = (ta + tc - tW) / tc clipped to [0, 1], where ta is the same ring with the transfers left
  out (only the attention calls and merges) and tc the transfers alone.
Writes cp_results.json and cp_scaling.png into --out (default $OUT, else bench/results).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import report  # noqa: E402
from timing import attn_fwd_flops  # noqa: E402

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
B, HQ, HKV, D = 1, 32, 8, 128
CPU_SHAPE = (1, 4, 2, 16)  # --cpu: a smoke run of the script itself (gloo), its times mean nothing


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=0, help="launch this many local ranks (0: already launched)")
    ap.add_argument("--seqlens", default="32768,65536,131072")
    ap.add_argument("--layouts", default="zigzag", help="comma list of zigzag, contiguous")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per measurement (3 above 64k)")
    ap.add_argument("--cpu", action="store_true", help="smoke-test the script on CPU with gloo and tiny heads")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    return ap.parse_args(argv)


def _call_ms(fn, device):
    if device == "cpu":
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_ms(fn, reps, device):
    """Median ms of fn() over reps calls after one warm-up, every rank starting each call together; returns
    (max over ranks, [each rank's median])."""
    fn()
    times = []
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        dist.barrier()
        times.append(_call_ms(fn, device))
    mine = torch.tensor([statistics.median(times)], device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    per_rank = [t.item() for t in every]
    return max(per_rank), per_rank


def fwd_and_fwdbwd(forward, inputs, dout, reps, device):
    """(forward ms, forward+backward ms) of forward(*inputs), each as (max over ranks, per rank)."""
    grad = lambda: torch.autograd.grad(forward(*inputs), inputs, dout)
    with torch.no_grad():
        f = time_ms(lambda: forward(*inputs), reps, device)
    return f, time_ms(grad, reps, device)


def hidden_share(t_ring, t_attn, t_comm):
    if t_comm <= 0:
        return None
    return min(1.0, max(0.0, (t_attn + t_comm - t_ring) / t_comm))


def measure(S, layout, reps, world, device):
    import flashattn_ext
    from flashattn_ext.distributed import _ring_attention_parts, ring_attention, shard_sequence

    g = torch.Generator(device=device).manual_seed(S)  # same seed on every rank: the same whole sequence
    mk = lambda H: torch.randn(B, H, S, D, device=device, dtype=torch.bfloat16, generator=g)
    q, k, v, dout = mk(HQ), mk(HKV), mk(HKV), mk(HQ)
    full = [t.requires_grad_() for t in (q, k, v)]
    t1_f, t1_fb = fwd_and_fwdbwd(lambda *t: flashattn_ext.attention(*t, causal=True), full, dout, reps, device)
    shards = [shard_sequence(t.detach(), layout=layout).requires_grad_() for t in full]
    dout_l = shard_sequence(dout, layout=layout)
    del q, k, v, dout, full
    if device != "cpu":
        torch.cuda.empty_cache()

    ring = lambda *t: ring_attention(*t, causal=True, layout=layout)
    attn_only = lambda *t: _ring_attention_parts(*t, causal=True, layout=layout, comm=False)
    comm_only = lambda *t: _ring_attention_parts(*t, causal=True, layout=layout, compute=False)
    tw_f, tw_fb = fwd_and_fwdbwd(ring, shards, dout_l, reps, device)
    ta_f, ta_fb = fwd_and_fwdbwd(attn_only, shards, dout_l, reps, device)
    tc_f, tc_fb = fwd_and_fwdbwd(comm_only, shards, dout_l, reps, device)
    flops = attn_fwd_flops(B, HQ, S, S, D, True)
    # t1 is rank 0's (every GPU ran it at once; all ranks' are kept), tW the slowest rank's
    row = dict(S=S, layout=layout, world=world,
               t1_fwd_ms=t1_f[1][0], t1_fwdbwd_ms=t1_fb[1][0], t1_fwd_ms_per_rank=t1_f[1],
               t1_fwdbwd_ms_per_rank=t1_fb[1], tW_fwd_ms=tw_f[0], tW_fwdbwd_ms=tw_fb[0],
               tW_fwd_ms_per_rank=tw_f[1], tW_fwdbwd_ms_per_rank=tw_fb[1],
               attn_only_fwd_ms=ta_f[0], attn_only_fwdbwd_ms=ta_fb[0], comm_only_fwd_ms=tc_f[0],
               comm_only_fwdbwd_ms=tc_fb[0])
    row["efficiency_fwd"] = row["t1_fwd_ms"] / (world * row["tW_fwd_ms"])
    row["efficiency_fwdbwd"] = row["t1_fwdbwd_ms"] / (world * row["tW_fwdbwd_ms"])
    row["comm_hidden_fwd"] = hidden_share(tw_f[0], ta_f[0], tc_f[0])
    row["comm_hidden_fwdbwd"] = hidden_share(tw_fb[0], ta_fb[0], tc_fb[0])
    row["tflops_per_gpu_fwd_1gpu"] = flops / row["t1_fwd_ms"] / 1e9
    row["tflops_per_gpu_fwd_ring"] = flops / world / row["tW_fwd_ms"] / 1e9
    del shards, dout_l
    if device != "cpu":
        torch.cuda.empty_cache()
    return row


def seqlen_label(S):
    return f"{S // 1024}k" if S % 1024 == 0 else str(S)


def write_results(args, world, rows):
    os.makedirs(args.out, exist_ok=True)
    header = ["S", "layout", "t1 fwd ms", "tW fwd ms", "eff fwd", "hidden fwd", "t1 f+b ms", "tW f+b ms", "eff f+b",
              "hidden f+b"]
    share = lambda x: None if x is None else f"{x:.3f}"
    table = [[seqlen_label(r["S"]), r["layout"], r["t1_fwd_ms"], r["tW_fwd_ms"], share(r["efficiency_fwd"]),
              share(r["comm_hidden_fwd"]), r["t1_fwdbwd_ms"], r["tW_fwdbwd_ms"], share(r["efficiency_fwdbwd"]),
              share(r["comm_hidden_fwdbwd"])] for r in rows]
    ranks = "CPU ranks (smoke run)" if args.cpu else "GPUs"
    print(f"\ncontext parallel, {world} {ranks}, B{B} H{HQ}/{HKV} D{D} causal bf16 "
          f"(efficiency = t1 / (W * tW); hidden = share of the transfer time overlapped)")
    report.print_table(header, table)
    report.write_json(os.path.join(args.out, "cp_results.json"),
                      {"env": report.environment(), "world": world, "device": "cpu (smoke)" if args.cpu else "cuda",
                       "shape": dict(B=B, Hq=HQ, Hkv=HKV, D=D), "rows": rows})
    labels = [f"S{seqlen_label(r['S'])} {r['layout']}" for r in rows]
    series = {name: [r[key] for r in rows] for name, key in (
        ("efficiency fwd", "efficiency_fwd"), ("efficiency fwd+bwd", "efficiency_fwdbwd"),
        ("comm hidden fwd", "comm_hidden_fwd"), ("comm hidden fwd+bwd", "comm_hidden_fwdbwd"))}
    report.plot_bars(os.path.join(args.out, "cp_scaling.png"), labels, series, "fraction",
                     f"ring_attention on {world} GPUs vs attention() on 1 (B{B} H{HQ}/{HKV} D{D} causal bf16)")


def worker(args):
    global B, HQ, HKV, D
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.cpu:
        device = "cpu"
        B, HQ, HKV, D = CPU_SHAPE
        dist.init_process_group("gloo")
    else:
        device = "cuda"
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        rows = []
        for layout in args.layouts.split(","):
            for S in (int(s) for s in args.seqlens.split(",")):
                reps = args.reps if S <= 65536 else min(args.reps, 3)
                rows.append(measure(S, layout, reps, world, device))
                if rank == 0:
                    r = rows[-1]
                    print(f"S={S} {layout}: efficiency fwd {r['efficiency_fwd']:.3f} fwd+bwd "
                          f"{r['efficiency_fwdbwd']:.3f}", flush=True)
        if rank == 0:
            write_results(args, world, rows)
    finally:
        dist.destroy_process_group()


def _spawned(local_rank, args, port):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(args.nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    worker(args)


def main():
    args = parse_args()
    os.environ.update(NCCL_ENV)  # inherited by spawned ranks; under torchrun set them in the launching shell too
    if "RANK" in os.environ:
        worker(args)
        return
    if args.nproc < 1:
        print("run under torchrun, or pass --nproc N to launch N local ranks", file=sys.stderr)
        sys.exit(2)
    if not args.cpu and torch.cuda.device_count() < args.nproc:
        print(f"--nproc {args.nproc} needs {args.nproc} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        sys.exit(2)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_spawned, args=(args, port), nprocs=args.nproc, start_method="spawn")


if __name__ == "__main__":
    main()
