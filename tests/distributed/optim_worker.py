"""Run under mpiexec or torchrun: DistributedOptimizer, checked by values the ranks compute.
Prints 'RESULT {json}' per rank. (The exchange alone: rma_worker.py.)

    python optim_worker.py equivalence [--device ...]     # sync == DDP on gloo; async s=0 == sync
    python optim_worker.py errors                         # bad arguments raise clear errors
    python optim_worker.py fail                           # rank 1 raises: the job must end
"""
import argparse
import json

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import torch_hpc
from torch_hpc.distributed import rma
from torch_hpc.optim import DistributedOptimizer, broadcast_optimizer_state, broadcast_parameters

p = argparse.ArgumentParser()
p.add_argument("what", choices=["equivalence", "errors", "fail"])
p.add_argument("--device", default="cpu")
args = p.parse_args()
launch = torch_hpc.distributed.init("hpc_mpi")
rank, world = launch.rank, launch.world_size
device = torch.device("cuda", launch.local_rank % torch.cuda.device_count()) \
    if args.device == "cuda" else torch.device("cpu")
report = {"rank": rank, "size": world}


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(device)
    g = torch.Generator().manual_seed(100 + rank)
    xs = torch.randn(8, 16, 16, generator=g).to(device)
    ys = torch.randint(0, 4, (8, 16), generator=g).to(device)
    return model, xs, ys


def train(opt_factory, steps=8):
    model, xs, ys = model_and_data()
    opt = opt_factory(model)
    for k in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(xs[k % 8]), ys[k % 8]).backward()
        opt.step()
    if isinstance(opt, DistributedOptimizer):
        opt.synchronize()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().cpu()
    if isinstance(opt, DistributedOptimizer):
        report.setdefault("max_staleness_seen", {})[f"{opt.mode}-{opt.staleness}"] = opt.max_staleness_seen
        opt.close()
    return flat


def equivalence():
    gloo = dist.new_group(backend="gloo")
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)  # noqa: E731

    reference_model, xs, ys = model_and_data()
    wrapped = nn.parallel.DistributedDataParallel(reference_model, process_group=gloo)
    opt = sgd(reference_model)
    for k in range(8):
        opt.zero_grad()
        F.cross_entropy(wrapped(xs[k % 8]), ys[k % 8]).backward()
        opt.step()
    reference = torch.cat([q.detach().reshape(-1) for q in reference_model.parameters()]).double().cpu()
    sync = train(lambda m: DistributedOptimizer(sgd(m), m.named_parameters(), mode="sync"))
    sync_bucketed = train(lambda m: DistributedOptimizer(sgd(m), m.named_parameters(), mode="sync",
                                                         bucket_cap_mb=0.001))
    fp16 = train(lambda m: DistributedOptimizer(sgd(m), m.named_parameters(), mode="sync",
                                                compression="fp16"))
    s0 = train(lambda m: DistributedOptimizer(sgd(m), m.named_parameters(), mode="async", staleness=0))
    plain_sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    s0_plain = train(lambda m: DistributedOptimizer(plain_sgd(m), m.named_parameters(),
                                                    mode="async", staleness=0))
    sync_plain = train(lambda m: DistributedOptimizer(plain_sgd(m), m.named_parameters(), mode="sync"))
    unbounded = train(lambda m: DistributedOptimizer(sgd(m), m.named_parameters(), mode="async"))
    report.update(
        sync_vs_ddp=float((sync - reference).abs().max()),
        bucketed_vs_ddp=float((sync_bucketed - reference).abs().max()),
        fp16_vs_ddp=float((fp16 - reference).abs().max()),
        async_s0_vs_sync_sgd=float((s0_plain - sync_plain).abs().max()),
        async_s0_momentum_vs_ddp=float((s0 - reference).abs().max()),
        async_moved=float((unbounded - reference).abs().max()),
        async_finite=bool(torch.isfinite(unbounded).all()),
        checksum=float(sync.sum()), async_checksum=float(unbounded.sum()))
    # LR scheduler, clipping after synchronize(), GradScaler: the torch.optim surface works.
    for mode in ("sync", "async"):
        model, xs, ys = model_and_data()
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.2}]
        opt = DistributedOptimizer(torch.optim.SGD(groups, lr=0.1), model.named_parameters(), mode=mode)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10)
        for k in range(4):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(xs[k]), ys[k])).backward()
            if mode == "sync":
                opt.synchronize()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
            sched.step()
        opt.synchronize()
        flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()]).double().cpu()
        report[f"{mode}_surface_lr"] = [g["lr"] for g in opt.optimizer.param_groups]
        report[f"{mode}_surface_checksum"] = float(flat.sum())
        report[f"{mode}_surface_finite"] = bool(torch.isfinite(flat).all())
        opt.close()
    # Buffers: BatchNorm on the input, so its running statistics after each step are the
    # average over ranks of what each rank's batch gives (every rank can compute all batches).
    batches = [torch.randn(6, 16, 16, generator=torch.Generator().manual_seed(200 + r)).to(device)
               for r in range(world)]
    momentum = 0.1
    expected_mean, expected_var = torch.zeros(16, device=device), torch.ones(16, device=device)
    for k in range(6):
        expected_mean = (1 - momentum) * expected_mean + momentum * torch.stack(
            [b[k].mean(0) for b in batches]).mean(0)
        expected_var = (1 - momentum) * expected_var + momentum * torch.stack(
            [b[k].var(0, unbiased=True) for b in batches]).mean(0)
    for mode in ("sync", "async"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.BatchNorm1d(16, momentum=momentum), nn.Linear(16, 4)).to(device)
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                   mode=mode, named_buffers=model.named_buffers(),
                                   **({"staleness": 0} if mode == "async" else {}))
        for k in range(6):
            opt.zero_grad()
            model(batches[rank][k]).square().mean().backward()
            if mode == "sync" and k == 0:  # buffers already on their way: step() starts nothing
                report["sync_bytes_before_first_step"] = opt.exchange_stats()["bytes_sent"]
                report["sync_model_bytes"] = 4 * sum(t.numel() for t in model.state_dict().values()
                                                     if torch.is_floating_point(t))
            opt.step()
        opt.synchronize()
        bn = model[0]
        report[f"{mode}_buffer_error"] = float(max((bn.running_mean - expected_mean).abs().max(),
                                                   (bn.running_var - expected_var).abs().max()))
        opt.close()
    # Optimizer state broadcast: rank 0's moments reach everyone.
    model, _, _ = model_and_data(seed=rank)
    broadcast_parameters(model.state_dict(), root_rank=0)
    inner = torch.optim.Adam(model.parameters())
    if rank == 0:
        model(torch.ones(2, 16, device=device)).sum().backward()
        inner.step()
    broadcast_optimizer_state(inner, root_rank=0)
    exp_avg = inner.state[next(iter(model.parameters()))]["exp_avg"]
    report["state_checksum"] = float(exp_avg.double().sum())


def expect_error(kind, fragment, fn):
    try:
        fn()
    except kind as e:
        if fragment not in str(e):
            report.setdefault("failures", []).append(f"{fragment!r} not in {e}")
        return
    report.setdefault("failures", []).append(f"no {kind.__name__} for {fragment!r}")


def errors():
    """Bad arguments raise clear errors on every rank; nothing is half-built."""
    report["failures"] = []
    model, _, _ = model_and_data()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    named = list(model.named_parameters())
    D = DistributedOptimizer
    expect_error(ValueError, "mode must be 'sync' or 'async'", lambda: D(sgd, named, mode="fast"))
    expect_error(ValueError, "staleness must be None", lambda: D(sgd, named, mode="sync", staleness=1))
    expect_error(ValueError, "staleness must be None", lambda: D(sgd, named, mode="async", staleness=-1))
    expect_error(ValueError, "compression must be", lambda: D(sgd, named, compression="int8"))
    expect_error(ValueError, "op must be", lambda: D(sgd, named, op="max"))
    expect_error(ValueError, "backward_passes_per_step", lambda: D(sgd, named, backward_passes_per_step=0))
    expect_error(TypeError, "must be a torch.optim.Optimizer", lambda: D(model, named))
    expect_error(ValueError, "not in named_parameters", lambda: D(sgd, named[:1]))
    opt = D(sgd, named, mode="async")
    other_opt = D(torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1), mode="async")
    expect_error(ValueError, "different model", lambda: opt.load_state_dict(other_opt.state_dict()))
    expect_error(ValueError, "not a DistributedOptimizer state_dict",
                 lambda: opt.load_state_dict(sgd.state_dict()))
    x = rma.exchange(10)
    expect_error(ValueError, "contiguous CPU float32 tensor of 10 elements",
                 lambda: x.start(torch.zeros(9), 1.0, torch.zeros(10), 1, -1))
    expect_error(ValueError, "contiguous CPU float32 tensor of 10 elements",
                 lambda: x.start(torch.zeros(10, dtype=torch.float64), 1.0, torch.zeros(10), 1, -1))
    expect_error(ValueError, "contiguous CPU float32 tensor of 10 elements",
                 lambda: x.read(torch.zeros(20)[::2]))
    for o in (opt, other_opt):
        o.close()
    rma.close(x)
    expect_error(RuntimeError, "after close()", lambda: x.start(torch.zeros(10), 1.0, torch.zeros(10), 1, -1))
    report["checks"] = 15


def fail():
    """Rank 1 raises in the middle of asynchronous training; the others would wait for it
    forever at synchronize() unless the job ends."""
    model, xs, ys = model_and_data()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model.named_parameters(),
                               mode="async", staleness=1)
    for k in range(10 ** 6):
        opt.zero_grad()
        F.cross_entropy(model(xs[k % 8]), ys[k % 8]).backward()
        opt.step()
        if rank == 1 and k == 20:
            raise RuntimeError("planted failure on rank 1")
        if k == 200:
            break
    opt.synchronize()


{"equivalence": equivalence, "errors": errors, "fail": fail}[args.what]()
print("RESULT " + json.dumps(report), flush=True)
dist.destroy_process_group()
