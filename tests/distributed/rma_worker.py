"""Run under mpiexec: the RMA exchange on its own (torch_hpc.distributed.rma), checked by
values the ranks compute. Prints 'RESULT {json}' per rank.

    python rma_worker.py exact                              # concurrent accumulates lose nothing
    python rma_worker.py progress SLEEP_S [--no-progress-thread]  # a sleeping rank does not stall others
"""
import argparse
import json
import time

import torch
import torch.distributed as dist

import torch_hpc
from torch_hpc.distributed import rma

p = argparse.ArgumentParser()
p.add_argument("what", choices=["exact", "progress"])
p.add_argument("sleep", nargs="?", type=float, default=10.0)
p.add_argument("--no-progress-thread", action="store_true")
args = p.parse_args()
launch = torch_hpc.distributed.init("hpc_mpi")
rank, world = launch.rank, launch.world_size
report = {"rank": rank, "size": world}


def exact():
    """Every rank adds 100 integer-valued delta vectors of 1000 elements (10^5 element updates)
    concurrently; totals stay below 2^24, so fp32 sums are exact."""
    numel, steps = 1000, 100
    x = rma.exchange(numel)
    start = torch.arange(numel, dtype=torch.float32)
    x.write(start)
    out = torch.empty(numel)
    for k in range(steps):
        delta = ((torch.arange(numel) * (rank + 1) + k) % 7 - 3).float()
        if k == 17:  # a poisoned delta is skipped, never added
            delta[5] = float("nan")
        x.start(delta, 1.0, out, k + 1, -1)
        x.wait()
    x.finish()
    x.barrier()
    x.read(out)
    expected = start.double().clone()
    for r in range(world):
        for k in range(steps):
            if k != 17:
                expected += ((torch.arange(numel) * (r + 1) + k) % 7 - 3).double()
    report.update(max_error=float((out.double() - expected).abs().max()), skipped=x.skipped,
                  exchanges=x.exchanges, shard=list(x.shard(rank)))
    rma.close(x)


def progress():
    """Rank 1 sleeps in Python without MPI calls; the others run 100 exchanges against its
    shard. On waking, rank 1 reads everyone's step counters: the order of events, not a timer."""
    numel, steps = 4096, 100
    x = rma.exchange(numel, progress_thread=not args.no_progress_thread)
    x.write(torch.zeros(numel))
    out = torch.empty(numel)
    if rank == 1:
        time.sleep(args.sleep)
        counters = x.counters()  # [accumulated_0, completed_0, ...]
        report["completed_before_wake"] = [counters[2 * r + 1] for r in range(world) if r != 1]
    else:
        t0 = time.perf_counter()
        ones = torch.ones(numel)
        for k in range(steps):
            x.start(ones, 1.0, out, k + 1, -1)
            x.wait()
        report["seconds"] = time.perf_counter() - t0
    x.finish()
    x.barrier()
    x.read(out)
    report["total"] = float(out[0])
    report["expected"] = float(steps * (world - 1))
    rma.close(x)


{"exact": exact, "progress": progress}[args.what]()
print("RESULT " + json.dumps(report), flush=True)
dist.destroy_process_group()
