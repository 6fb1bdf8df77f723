"""Data-parallel training on sklearn's bundled digits (8x8 images, 1797 samples, no download)
with torch_hpc's DistributedOptimizer, synchronous or asynchronous, or with plain DDP as the
baseline (`--mode ddp`, on hpc_mpi, `--backend gloo` or, one GPU per rank, `--backend nccl`), or
with no exchange at all (`--mode local`: every rank trains alone, the throughput ceiling).
`--mode sync` runs over hpc_mpi or NCCL (`--backend nccl`: DistributedOptimizer over the NCCL
world group), `--mode async` over hpc_mpi (MPI one-sided windows).

    mpiexec -n 4 python examples/train_digits.py --mode async --straggler 1:2
    mpiexec -n 4 python examples/train_digits.py --mode ddp --backend gloo
    torchrun --nproc_per_node=8 examples/train_digits.py --mode sync --backend nccl --device cuda
    torchrun --nproc_per_node=2 examples/train_digits.py --mode sync --emulate-fp32
    mpiexec -n 2 python examples/train_digits.py --steps 200 --checkpoint ck.pt   # then --resume ck.pt

Each rank trains on its own shard of the training split (train_test_split(test_size=0.25,
random_state=0)); rank 0 evaluates the global parameters on the held-out split as it goes and
prints a summary (and, with --report, a JSON record) at the end.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import torch_hpc
from torch_hpc.optim import DistributedOptimizer, broadcast_optimizer_state, broadcast_parameters


def load_digits_split():
    """(x_train, y_train, x_test, y_test) as float32/int64 tensors, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(data.data / 16.0, data.target,
                                                        test_size=0.25, random_state=0)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


class _Residual(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a skip (a 1x1 projection where the shape changes)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def make_model(kind: str, width: int = 256) -> nn.Module:
    if kind == "mlp":  # BatchNorm's running statistics exercise the buffer averaging
        return nn.Sequential(nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU(),
                             nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    if kind == "cnn":
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(64 * 16, width), nn.ReLU(), nn.Linear(width, 10))
    if kind == "resnet":  # GPU-bound steps: the images upsampled to 32x32, three stages of two residual blocks
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Upsample(size=32, mode="bilinear"),
                             nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                             _Residual(width, width, 1), _Residual(width, width, 1),
                             _Residual(width, 2 * width, 2), _Residual(2 * width, 2 * width, 1),
                             _Residual(2 * width, 4 * width, 2), _Residual(4 * width, 4 * width, 1),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))
    raise ValueError(f"--model must be mlp, cnn or resnet, got {kind!r}")


@torch.no_grad()
def accuracy(model, x, y) -> float:
    was_training = model.training
    model.eval()
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return correct


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["sync", "async", "ddp", "local"], default="async",
                   help="DistributedOptimizer sync/async, torch's DistributedDataParallel, or no "
                        "exchange (local)")
    p.add_argument("--backend", choices=["hpc_mpi", "gloo", "nccl"], default="hpc_mpi",
                   help="process-group backend (async needs hpc_mpi; sync hpc_mpi or nccl; nccl a GPU per rank)")
    p.add_argument("--staleness", type=int, default=None, help="async: bound on steps ahead (default none)")
    p.add_argument("--model", choices=["mlp", "cnn", "resnet"], default="mlp",
                   help="resnet: a residual CNN on the images upsampled to 32x32 (--width channels in its "
                        "first stage; 64 and batch 64 make a GPU-bound step)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=300, help="steps per rank")
    p.add_argument("--emulate-fp32", action="store_true",
                   help="run the model's matrix products through torch_hpc's 3xfp16 emulation")
    p.add_argument("--straggler", default=None, metavar="RANK:FACTOR",
                   help="make RANK FACTOR times slower (sleeps (FACTOR-1) x its measured step time)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: a GPU per local rank if there are enough, else the CPU")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--target", type=float, default=0.95, help="accuracy for time-to-accuracy")
    p.add_argument("--checkpoint", default=None, help="save here at the end (and every --save-every)")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", default=None, help="load this checkpoint first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="rank 0 writes a JSON record here")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def check_args(args):
    """Combinations the example cannot run, refused before any process group exists."""
    if args.mode == "async" and args.backend != "hpc_mpi":
        raise SystemExit("train_digits.py: --mode async runs on --backend hpc_mpi (MPI one-sided windows)")
    if args.mode == "sync" and args.backend not in ("hpc_mpi", "nccl"):
        raise SystemExit("train_digits.py: --mode sync runs on --backend hpc_mpi or nccl")
    if args.backend == "nccl" and (args.device == "cpu" or not torch.cuda.is_available()):
        raise SystemExit("train_digits.py: --backend nccl needs a GPU per rank (--device cuda or auto on a GPU host)")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    if args.mode in ("ddp", "local") and (args.checkpoint or args.resume):
        raise SystemExit("train_digits.py: --checkpoint/--resume are DistributedOptimizer checkpoints "
                         "(--mode sync/async)")
    launch = torch_hpc.distributed.init(args.backend)
    rank, world = launch.rank, launch.world_size
    device = launch.device("cuda" if args.backend == "nccl" else args.device)
    if args.backend == "nccl" and torch.cuda.device_count() < launch.local_world_size:
        raise SystemExit(f"train_digits.py: NCCL needs a GPU per rank: {launch.local_world_size} local ranks, "
                         f"{torch.cuda.device_count()} GPUs (use --backend hpc_mpi to share GPUs)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 and not args.quiet else (lambda *a: None)

    x_train, y_train, x_test, y_test = load_digits_split()
    x_shard, y_shard = x_train[rank::world].to(device), y_train[rank::world].to(device)
    x_test, y_test = x_test.to(device), y_test.to(device)
    model = make_model(args.model, args.width).to(device)
    eval_model = make_model(args.model, args.width).to(device)
    if args.emulate_fp32:
        model = torch_hpc.emulate_fp32(model)
        eval_model = torch_hpc.emulate_fp32(eval_model)
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4) \
        if args.optimizer == "adamw" else torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if args.mode in ("ddp", "local"):  # DDP averages gradients, broadcasts buffers from rank 0
        net = torch.nn.parallel.DistributedDataParallel(model) if args.mode == "ddp" else model
        opt = _PlainOptimizer(inner)
    else:
        net = model
        opt = DistributedOptimizer(inner, named_parameters=model.named_parameters(), mode=args.mode,
                                   staleness=args.staleness, named_buffers=model.named_buffers())
        broadcast_parameters(model.state_dict(), root_rank=0)
        broadcast_optimizer_state(opt, root_rank=0)
    start_step = 0
    if args.resume:
        checkpoint = torch.load(args.resume, map_location=device, weights_only=True)
        opt.load_state_dict(checkpoint["optimizer"])
        start_step = int(checkpoint["step"])
        say(f"resumed from {args.resume} at step {start_step}")

    straggler_rank, factor = (None, 1.0)
    if args.straggler:
        r, f = args.straggler.split(":")
        straggler_rank, factor = int(r), float(f)
    say(f"digits: {world} ranks ({launch.launcher}), {args.mode}"
        f"{'' if args.staleness is None else f' staleness={args.staleness}'}, {args.model} on {device}"
        f"{', emulated fp32' if args.emulate_fp32 else ''}"
        f"{f', rank {straggler_rank} {factor}x slower' if straggler_rank is not None else ''}")

    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    curve, losses, step_time = [], [], None
    time_to_target = None
    dist.barrier()
    t0 = time.perf_counter()
    order = torch.empty(0, dtype=torch.int64)
    for step in range(start_step + 1, start_step + args.steps + 1):
        t_step = time.perf_counter()
        if order.numel() < args.batch_size:
            order = torch.randperm(x_shard.shape[0], generator=generator)
        batch, order = order[:args.batch_size].to(device), order[args.batch_size:]
        loss = F.cross_entropy(net(x_shard[batch]), y_shard[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if rank == straggler_rank:
            elapsed = time.perf_counter() - t_step
            step_time = elapsed if step_time is None else 0.9 * step_time + 0.1 * elapsed
            time.sleep((factor - 1.0) * step_time)
        if rank == 0 and (step % args.eval_every == 0 or step == start_step + args.steps):
            if args.mode == "async":
                eval_model.load_state_dict(model.state_dict())
                opt.copy_global_to(list(eval_model.parameters()) +
                                   [b for b in eval_model.buffers() if torch.is_floating_point(b)])
                acc = accuracy(eval_model, x_test, y_test)
            else:
                acc = accuracy(model, x_test, y_test)
            wall = time.perf_counter() - t0
            curve.append({"step": step, "seconds": wall, "accuracy": acc})
            if time_to_target is None and acc >= args.target:
                time_to_target = wall
            say(f"step {step:5d}  loss {sum(losses[-args.eval_every:]) / len(losses[-args.eval_every:]):.4f}"
                f"  held-out accuracy {acc:.4f}  {wall:6.2f} s")
        if args.checkpoint and args.save_every and step % args.save_every == 0:
            save(opt, step, args.checkpoint, rank)
    train_seconds = time.perf_counter() - t0
    steps_per_second = args.steps / train_seconds

    opt.synchronize()  # every rank ends with the same global parameters
    final_acc = accuracy(model, x_test, y_test)
    if args.checkpoint:
        save(opt, start_step + args.steps, args.checkpoint, rank)
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"rank": rank, "steps_per_second": steps_per_second,
                                      "max_staleness_seen": opt.max_staleness_seen,
                                      "skipped_updates": opt.skipped_updates, "checksum": checksum,
                                      "exchange": opt.exchange_stats(),
                                      "first_losses": losses[:5], "last_losses": losses[-5:]})
    report = {"mode": args.mode, "staleness": args.staleness, "world_size": world,
              "launcher": launch.launcher, "device": str(device), "model": args.model,
              "emulate_fp32": args.emulate_fp32, "straggler": args.straggler, "steps": args.steps,
              "start_step": start_step, "final_accuracy": final_acc, "time_to_target": time_to_target,
              "target": args.target, "train_seconds": train_seconds, "curve": curve, "ranks": per_rank}
    if rank == 0:
        say(f"done: held-out accuracy {final_acc:.4f} on the global parameters; "
            f"{args.steps} steps/rank in {train_seconds:.2f} s "
            f"({', '.join('%.0f' % r['steps_per_second'] for r in per_rank)} steps/s per rank); "
            f"time to {args.target:.0%}: {'%.2f s' % time_to_target if time_to_target else 'not reached'}")
        if args.report:
            with open(args.report, "w") as f:
                json.dump(report, f, indent=1)
        print("RESULT " + json.dumps({k: v for k, v in report.items() if k != "curve"}), flush=True)
    opt.close()
    dist.destroy_process_group()
    return report


class _PlainOptimizer:
    """The DistributedOptimizer calls the loop makes, for a plain optimizer (DDP, local)."""
    max_staleness_seen = skipped_updates = 0

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.zero_grad, self.step = optimizer.zero_grad, optimizer.step
        self.state_dict, self.load_state_dict = optimizer.state_dict, optimizer.load_state_dict

    def synchronize(self):
        pass

    def exchange_stats(self):
        return None

    def close(self):
        pass


def save(opt, step, path, rank):
    state = opt.state_dict()  # collective in async mode
    if rank == 0:
        tmp = f"{path}.tmp"
        torch.save({"optimizer": state, "step": step}, tmp)
        os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
