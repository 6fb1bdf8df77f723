"""Run under mpiexec or torchrun: the layers users build on torch.distributed, on hpc_mpi with
CPU tensors, each checked against values the ranks compute themselves. Prints one
'RESULT {json}' line per rank and case.

    python ecosystem_worker.py TMPDIR
"""
import contextlib
import json
import sys
import traceback
import warnings

import torch
import torch.distributed as dist

import torch_hpc

warnings.filterwarnings("ignore")
CHECKPOINT_DIR = sys.argv[1]
torch_hpc.distributed.init("hpc_mpi")
RANK, N = dist.get_rank(), dist.get_world_size()
results = {}


@contextlib.contextmanager
def case(name):
    results[name] = []
    try:
        yield results[name]
    except Exception:
        results[name].append(traceback.format_exc(limit=4)[-1500:])


def close(name, got, expected, failures, tol=1e-6):
    if not torch.allclose(got, expected, atol=tol, rtol=tol):
        failures.append(f"{name}: max |diff| {(got - expected).abs().max().item():.3g}")


with case("functional_collectives") as f:
    import torch.distributed._functional_collectives as funcol
    t = torch.arange(4.0) + RANK
    out = funcol.all_reduce(t, "sum", dist.group.WORLD)
    close("all_reduce", out, N * torch.arange(4.0) + N * (N - 1) / 2, f)
    gathered = funcol.all_gather_tensor(torch.full((2,), float(RANK)), 0, dist.group.WORLD)
    close("all_gather_tensor", gathered, torch.arange(N).float().repeat_interleave(2), f)
    y = funcol.all_reduce(torch.ones(3) * (RANK + 1), "sum", dist.group.WORLD)
    close("all_reduce scaled", y, torch.full((3,), N * (N + 1) / 2), f)

with case("autograd_collectives") as f:
    import torch.distributed.nn.functional as dist_autograd
    x = torch.ones(3, requires_grad=True)
    y = dist_autograd.all_reduce(x * (RANK + 1))
    close("forward", y.detach(), torch.full((3,), N * (N + 1) / 2), f)
    y.sum().backward()  # backward of a sum-all_reduce is a sum-all_reduce of the gradient
    close("backward", x.grad, torch.full((3,), float(N * (RANK + 1))), f)

with case("object_collectives") as f:
    objs = [None] * N
    dist.all_gather_object(objs, {"rank": RANK, "name": f"r{RANK}"})
    if objs != [{"rank": r, "name": f"r{r}"} for r in range(N)]:
        f.append(f"all_gather_object: {objs}")
    payload = [("from", 0, [1, 2, 3])] if RANK == 0 else [None]
    dist.broadcast_object_list(payload, src=0)
    if payload != [("from", 0, [1, 2, 3])]:
        f.append(f"broadcast_object_list: {payload}")

with case("new_subgroups") as f:
    sub, subgroups = dist.new_subgroups(group_size=max(1, N // 2))
    t = torch.ones(1) * RANK
    dist.all_reduce(t, group=sub)
    members = dist.get_process_group_ranks(sub)
    close("new_subgroups all_reduce", t, torch.ones(1) * sum(members), f)

with case("coalescing_manager") as f:
    a, b = torch.ones(3) * RANK, torch.ones(5) * (RANK + 1)
    with dist._coalescing_manager(async_ops=True) as cm:
        dist.all_reduce(a)
        dist.all_reduce(b)
    cm.wait()
    close("coalesced a", a, torch.ones(3) * (N * (N - 1) / 2), f)
    close("coalesced b", b, torch.ones(5) * (N * (N + 1) / 2), f)

with case("dtensor") as f:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (N,))
    torch.manual_seed(0)
    full = torch.randn(4 * N, 6)
    sharded = distribute_tensor(full, mesh, [Shard(0)])
    close("shard", sharded.to_local(), full.chunk(N)[RANK], f)
    close("redistribute to Replicate", sharded.redistribute(mesh, [Replicate()]).to_local(), full, f)
    w = distribute_tensor(torch.randn(6, 3), mesh, [Replicate()])
    close("sharded @ replicated", (sharded @ w).full_tensor(), full @ w.to_local(), f, tol=1e-5)

with case("fsdp2") as f:
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    reference.load_state_dict(model.state_dict())
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(7)
    xs = torch.randn(N, 4, 8, generator=g)
    for _ in range(3):
        opt.zero_grad()
        model(xs[RANK]).pow(2).mean().backward()
        opt.step()
        ref_opt.zero_grad()  # the same step on one process: the mean over every rank's batch
        sum(reference(xs[r]).pow(2).mean() for r in range(N)).div(N).backward()
        ref_opt.step()
    got = torch.cat([p.full_tensor().flatten() for p in model.parameters()])
    close("FSDP2 vs one process", got, torch.cat([p.detach().flatten() for p in reference.parameters()]),
          f, tol=1e-5)

with case("distributed_checkpoint") as f:
    import torch.distributed.checkpoint as dcp
    state = {"w": torch.arange(6.0), "step": torch.tensor(3)}
    dcp.save(state, checkpoint_id=CHECKPOINT_DIR)
    loaded = {"w": torch.zeros(6), "step": torch.tensor(0)}
    dcp.load(loaded, checkpoint_id=CHECKPOINT_DIR)
    close("dcp round trip", loaded["w"], torch.arange(6.0), f)
    if int(loaded["step"]) != 3:
        f.append(f"dcp step {int(loaded['step'])}")

dist.barrier()
dist.destroy_process_group()
for name, failures in results.items():
    print("RESULT " + json.dumps({"rank": RANK, "size": N, "case": name,
                                  "failures": [x[:800] for x in failures[:3]]}), flush=True)
