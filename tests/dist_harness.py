"""Runs a function on N spawned processes joined in one torch.distributed group, within a time limit.

The function runs every case of a test file for one world size (spawning is the slow part, so once per world
size) and returns {case name: failure message, "" when the case passed}; run_ranks returns one such dict per rank.
"""
import datetime
import json
import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp

# NCCL's NVLink multicast (NVLS) is off on the lent GPU machines; the same variables go to every launcher.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, fn, world, port, backend, result_dir, timeout_s):
    import torch.distributed as dist

    os.environ.update(NCCL_ENV)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.set_num_threads(1)  # several ranks share a few CPU cores
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        results = fn(rank, world)
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world, backend="gloo", timeout_s=120):
    """fn(rank, world) -> {case: message} on `world` spawned ranks; [results of rank 0, rank 1, ...]. Raises if a
    rank raised (with its traceback) or if the ranks are not done within timeout_s seconds."""
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.start_processes(_rank_main, args=(fn, world, free_port(), backend, result_dir, timeout_s),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{world} ranks running {fn.__name__} did not finish within {timeout_s} s")
        results = []
        for rank in range(world):
            with open(os.path.join(result_dir, f"rank{rank}.json")) as f:
                results.append(json.load(f))
        return results
