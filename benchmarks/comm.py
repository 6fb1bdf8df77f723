"""Collective bandwidth and latency: hpc_mpi (through torch.distributed, and its ProcessGroup
call without torch.distributed's Python) vs gloo vs raw mpi4py on the same buffers.

    mpiexec -n 2 python benchmarks/comm.py                 # CPU tensors, 4 B ... 256 MiB
    mpiexec -n 2 python benchmarks/comm.py --device cuda   # CUDA tensors (mpi4py on host copies)
    mpiexec -n 2 python benchmarks/comm.py --layers        # where hpc_mpi's per-call time goes

--layers times one hpc_mpi operation entered at each layer: mpi4py (the MPI call alone), the
hpc_mpi backend object, the ProcessGroup (c10d's dispatcher) and torch.distributed (Python).

Bus bandwidth follows nccl-tests: all_reduce moves 2(n-1)/n of the buffer per rank, broadcast
the buffer, all_gather (into one tensor) (n-1)/n of the output. Each time is the slowest rank's
median over the repetitions; the three implementations run in blocks of back-to-back calls that
take turns (--interleave: call by call).
Rank 0 prints the table, the targets below and whether they hold, and writes JSON and a PNG.

Targets: the ProcessGroup call >= 0.9x raw mpi4py from 1 MiB; torch.distributed end to end
>= 0.95x raw mpi4py from 4 MiB; never below gloo from 4 KiB. (torch.distributed's own Python
layer costs more than 10 % of a 1 MiB call on small machines, whatever the backend: --layers.)
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import torch_hpc

OPS = ["all_reduce", "broadcast", "all_gather"]
IMPLS = ["hpc_mpi", "process_group", "gloo", "mpi4py"]
TARGETS = [  # (name, implementation, baseline, from bytes, at least)
    ("process_group/mpi4py from 1 MiB", "process_group", "mpi4py", 1 << 20, 0.9),
    ("hpc_mpi/mpi4py from 4 MiB", "hpc_mpi", "mpi4py", 4 << 20, 0.95),
    ("hpc_mpi/gloo from 4 KiB", "hpc_mpi", "gloo", 4 << 10, 1.0),
]
LAYERS = ["mpi4py", "backend", "process_group", "hpc_mpi"]


def bus_factor(op, n):
    return {"all_reduce": 2 * (n - 1) / n, "broadcast": 1.0, "all_gather": (n - 1) / n}[op]


def make_call(op, impl, buf, out, gloo, comm, MPI):
    if impl == "mpi4py":
        host = buf.numpy() if buf.device.type == "cpu" else None
        host_out = out.numpy() if out.device.type == "cpu" else None

        def staged(fn):
            def call():
                h = host if host is not None else buf.cpu().numpy()
                o = host_out if host_out is not None else np.empty(out.numel(), dtype=h.dtype)
                fn(h, o)
            return call
        if op == "all_reduce":
            return staged(lambda h, o: comm.Allreduce(MPI.IN_PLACE, h))
        if op == "broadcast":
            return staged(lambda h, o: comm.Bcast(h, root=0))
        return staged(lambda h, o: comm.Allgather(h, o))
    if impl in ("backend", "process_group"):  # the layers below torch.distributed's Python
        pg = dist.group.WORLD
        target = pg._get_backend(buf.device) if impl == "backend" else pg
        from torch._C._distributed_c10d import AllgatherOptions, AllreduceOptions, BroadcastOptions
        opts = {"all_reduce": AllreduceOptions, "broadcast": BroadcastOptions,
                "all_gather": AllgatherOptions}[op]()
        opts.asyncOp = False
        if op == "all_reduce":
            return lambda: target.allreduce([buf], opts).wait()
        if op == "broadcast":
            opts.rootRank = 0
            return lambda: target.broadcast([buf], opts).wait()
        return lambda: target._allgather_base(out, buf, opts).wait()
    group = gloo if impl == "gloo" else None
    if op == "all_reduce":
        return lambda: dist.all_reduce(buf, group=group)
    if op == "broadcast":
        return lambda: dist.broadcast(buf, src=0, group=group)
    return lambda: dist.all_gather_into_tensor(out, buf, group=group)


def time_calls(calls, reps, comm, device, interleave=False, rounds=4):
    """Median seconds per call, the slowest rank's; every call starts after a barrier.

    Default: each implementation runs blocks of back-to-back calls (as a training loop or
    nccl-tests would), the blocks taking turns over `rounds` rounds so drift of a shared machine
    hits all alike; the first two calls of a block are warm-up. interleave=True instead rotates
    the implementations call by call, so every call follows another library's call."""
    times = {name: [] for name in calls}
    names = list(calls)
    if interleave:
        schedule = [(names[(i + j) % len(names)], i >= 2) for i in range(reps + 2) for j in range(len(names))]
    else:
        per_block = -(-reps // rounds)
        schedule = [(names[(r + j) % len(names)], k >= 2) for r in range(rounds)
                    for j in range(len(names)) for k in range(per_block + 2)]
    for name, keep in schedule:
        comm.Barrier()
        t0 = time.perf_counter()
        calls[name]()
        if device == "cuda":
            torch.cuda.synchronize()
        if keep:
            times[name].append(time.perf_counter() - t0)
    from mpi4py import MPI
    return {name: comm.allreduce(statistics.median(t), op=MPI.MAX) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--min-bytes", type=int, default=4)
    p.add_argument("--max-bytes", type=int, default=256 << 20)
    p.add_argument("--ops", nargs="*", default=OPS, choices=OPS)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--interleave", action="store_true",
                   help="rotate the implementations call by call instead of in blocks")
    p.add_argument("--layers", action="store_true",
                   help="time hpc_mpi entered at each layer instead of hpc_mpi vs gloo vs mpi4py")
    args = p.parse_args()
    impls = LAYERS if args.layers else IMPLS

    launch = torch_hpc.distributed.init("hpc_mpi")
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, n = dist.get_rank(), dist.get_world_size()
    gloo = None if args.layers else dist.new_group(backend="gloo")
    device = torch.device("cuda", launch.local_rank % torch.cuda.device_count()) \
        if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    machine = torch.cuda.get_device_name(device) if args.device == "cuda" else \
        f"{platform.machine()} CPU, {os.cpu_count()} cores"
    mpi_version = MPI.Get_library_version().splitlines()[0].strip()
    if rank == 0:
        print(f"# collectives on {machine}, {n} ranks, {mpi_version}, torch {torch.__version__}, "
              f"{datetime.date.today()}", flush=True)

    rows = []
    size = args.min_bytes
    while size <= args.max_bytes:
        numel = max(1, size // 4)
        reps = int(min(200, max(10, 1e9 / max(size, 1) / n)))
        for op in args.ops:
            row = {"op": op, "bytes": numel * 4}
            # One input and one output buffer, shared by the three implementations.
            buf = torch.full((numel,), float(rank + 1), device=device)
            out = torch.empty(numel * n, device=device)
            calls = {impl: make_call(op, impl, buf, out, gloo, comm, MPI) for impl in impls}
            measured = time_calls(calls, reps, comm, args.device, args.interleave)
            for impl, seconds in measured.items():
                row[impl] = {"us": seconds * 1e6,
                             "busbw_GBps": numel * 4 * (n if op == "all_gather" else 1)
                             * bus_factor(op, n) / seconds / 1e9}
            rows.append(row)
            if rank == 0:
                print(f"  {op:10s} {numel * 4:>10d} B  " + "  ".join(
                    f"{impl} {row[impl]['busbw_GBps']:7.2f} GB/s {row[impl]['us']:9.1f} us"
                    for impl in impls), file=sys.stderr, flush=True)
        size *= 4

    if rank == 0:
        others = [i for i in impls if i not in ("mpi4py", "gloo")]
        header = [f"{i}/mpi4py" for i in others] + (["hpc_mpi/gloo"] if "gloo" in impls else [])
        print(f"\n{'op':10s} {'bytes':>10s} | " + " | ".join(f"{i:>22s}" for i in impls)
              + " | " + " | ".join(header))
        for r in rows:
            cells = [f"{r[i]['busbw_GBps']:8.2f} GB/s {r[i]['us']:8.1f}us" for i in impls]
            quotients = [r[i]["busbw_GBps"] / r["mpi4py"]["busbw_GBps"] for i in others]
            if "gloo" in impls:
                quotients.append(r["hpc_mpi"]["busbw_GBps"] / r["gloo"]["busbw_GBps"])
            print(f"{r['op']:10s} {r['bytes']:>10d} | " + " | ".join(cells) + " | " +
                  " | ".join(f"{q:{len(h)}.2f}" for q, h in zip(quotients, header)))
        summary = {}
        for name, impl, base, start, floor in TARGETS:
            ratios = [(r[impl]["busbw_GBps"] / r[base]["busbw_GBps"], r["op"], r["bytes"])
                      for r in rows if r["bytes"] >= start and impl in r and base in r]
            if not ratios:
                continue
            worst = min(ratios)
            summary[name] = {"min": worst[0], "at": f"{worst[1]} {worst[2]} B", "target": floor,
                             "met": worst[0] >= floor}
            print(f"{name:34s} min {worst[0]:5.2f}x ({worst[1]} {worst[2]} B), target {floor}x: "
                  f"{'met' if worst[0] >= floor else 'NOT met'}")
        print(f"\nsummary: {json.dumps(summary)}")
        os.makedirs(args.out, exist_ok=True)
        kind = "comm-layers" if args.layers else "comm"
        stem = os.path.join(args.out, f"{kind}-{args.device}-{n}ranks{'-' + args.tag if args.tag else ''}")
        meta = {"machine": machine, "ranks": n, "mpi": mpi_version, "torch": torch.__version__,
                "date": str(datetime.date.today()), "device": args.device,
                "schedule": "interleaved" if args.interleave else "blocks",
                "command": " ".join(["mpiexec", "-n", str(n), "python"] + sys.argv)}
        with open(stem + ".json", "w") as f:
            json.dump({"meta": meta, "summary": summary, "rows": rows}, f, indent=1)
        plot(rows, impls, stem + ".png", f"{n} ranks, {machine}, {meta['date']}")
        print(f"wrote {stem}.json and {stem}.png")
    dist.destroy_process_group()


def plot(rows, impls, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops = sorted({r["op"] for r in rows}, key=OPS.index)
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        sel = [r for r in rows if r["op"] == op]
        for impl in impls:
            ax.plot([r["bytes"] for r in sel], [r[impl]["busbw_GBps"] for r in sel], "o-", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("bytes per rank")
        ax.set_ylabel("bus bandwidth (GB/s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
