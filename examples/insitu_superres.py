"""In situ learning in miniature: each rank runs a 2-D advection-diffusion simulation, compresses
every frame with a truncated DCT (what an HPC code would keep), and a small network is trained
*while the simulations run* (asynchronously across ranks, torch_hpc's DistributedOptimizer) to
map compressed frames back to full ones.

    mpiexec -n 4 python examples/insitu_superres.py
    torchrun --nproc_per_node=2 examples/insitu_superres.py --steps 200 --mode sync

Simulation: u_t + a(x, y, t) . grad u = nu lap u on a periodic n x n grid, a time-varying
cellular flow, 2nd-order central differences, RK4 in time; each rank starts from its own random
Gaussian blobs and restarts from new ones every --restart frames. Compression: keep the k x k
lowest 2-D DCT-II coefficients of each frame (n^2 / k^2 times fewer numbers). The network sees
the inverse DCT of the kept coefficients and predicts the full frame (residual CNN with periodic
padding). Rank 0 reports, on a held-out trajectory with an unseen seed, the relative L2 error of
plain DCT reconstruction and of the network frame by frame, and saves a PNG (a frame, its
compressed version, the reconstruction, the error curves) and a JSON record.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import torch_hpc
from torch_hpc.optim import DistributedOptimizer, broadcast_parameters


class AdvectionDiffusion:
    """Periodic 2-D advection-diffusion, RK4 time stepping on a batch of fields (B, n, n)."""

    def __init__(self, n, nu=1e-3, speed=1.0, device="cpu"):
        self.n, self.nu, self.speed, self.h = n, nu, speed, 1.0 / n
        x = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * self.h
        self.y, self.x = torch.meshgrid(x, x, indexing="ij")
        self.dt = 0.4 * self.h / speed  # CFL 0.4 for the advection, diffusion is far below its limit
        self.t = 0.0

    def velocity(self, t):
        phase = 0.5 * math.sin(2 * math.pi * t)
        ax = self.speed * torch.sin(2 * math.pi * (self.y + phase))
        ay = self.speed * torch.cos(2 * math.pi * (self.x - phase))
        return ax, ay

    def rhs(self, u, t):
        ax, ay = self.velocity(t)
        dx = (torch.roll(u, -1, -1) - torch.roll(u, 1, -1)) / (2 * self.h)
        dy = (torch.roll(u, -1, -2) - torch.roll(u, 1, -2)) / (2 * self.h)
        lap = (torch.roll(u, -1, -1) + torch.roll(u, 1, -1) + torch.roll(u, -1, -2)
               + torch.roll(u, 1, -2) - 4 * u) / self.h ** 2
        return -(ax * dx + ay * dy) + self.nu * lap

    def step(self, u):
        dt, t = self.dt, self.t
        k1 = self.rhs(u, t)
        k2 = self.rhs(u + 0.5 * dt * k1, t + 0.5 * dt)
        k3 = self.rhs(u + 0.5 * dt * k2, t + 0.5 * dt)
        k4 = self.rhs(u + dt * k3, t + dt)
        self.t += dt
        return u + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    def blobs(self, generator, count=6):
        u = torch.zeros(self.n, self.n, device=self.x.device)
        for _ in range(count):
            cx, cy, width, amp = torch.rand(4, generator=generator).tolist()
            dx = torch.remainder(self.x - cx + 0.5, 1.0) - 0.5
            dy = torch.remainder(self.y - cy + 0.5, 1.0) - 0.5
            u += (2 * amp - 1) * torch.exp(-(dx ** 2 + dy ** 2) / (0.002 + 0.01 * width))
        return u


def dct_matrix(n, device):
    """Orthonormal DCT-II matrix C: coefficients = C X C^T, X = C^T coefficients C."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.float().to(device)


class Compressor:
    def __init__(self, n, keep, device):
        self.c, self.keep = dct_matrix(n, device), keep

    def compress(self, frames):
        """The keep x keep lowest coefficients of each frame."""
        return (self.c @ frames @ self.c.t())[..., :self.keep, :self.keep]

    def decompress(self, coefficients):
        ck = self.c[:self.keep]
        return ck.t() @ coefficients @ ck


class SuperResolution(nn.Module):
    def __init__(self, channels=16):
        super().__init__()
        conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1, padding_mode="circular")  # noqa: E731
        self.net = nn.Sequential(conv(1, channels), nn.GELU(), conv(channels, channels), nn.GELU(),
                                 conv(channels, channels), nn.GELU(), conv(channels, 1))
        nn.init.zeros_(self.net[-1].weight)  # starts as the identity: never worse than the DCT
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return x + self.net(x.unsqueeze(1)).squeeze(1)


def relative_errors(pred, truth):
    return ((pred - truth).flatten(1).norm(dim=1) / truth.flatten(1).norm(dim=1)).tolist()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="grid points per side")
    p.add_argument("--keep", type=int, default=12, help="DCT coefficients kept per side")
    p.add_argument("--steps", type=int, default=400, help="training steps per rank")
    p.add_argument("--stride", type=int, default=4, help="RK4 steps between frames")
    p.add_argument("--restart", type=int, default=40, help="frames before a new initial condition")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--buffer", type=int, default=64, help="frames kept for training")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--mode", choices=["sync", "async"], default="async")
    p.add_argument("--emulate-fp32", action="store_true",
                   help="matrix products and convolutions via torch_hpc (on CPU: slow, exact-ish)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: a GPU per local rank if there are enough, else the CPU")
    p.add_argument("--eval-frames", type=int, default=40)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "local"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    launch = torch_hpc.distributed.init("hpc_mpi")
    rank, world = launch.rank, launch.world_size
    device = launch.device(args.device)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 and not args.quiet else (lambda *a: None)
    precision = torch_hpc.fp32_emulation(args.emulate_fp32, cpu=args.emulate_fp32)

    torch.manual_seed(0)
    model = SuperResolution().to(device)
    opt = DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=args.lr),
                               named_parameters=model.named_parameters(), mode=args.mode)
    broadcast_parameters(model.state_dict(), root_rank=0)
    sim = AdvectionDiffusion(args.n, device=device)
    codec = Compressor(args.n, args.keep, device)
    generator = torch.Generator().manual_seed(1000 + rank)
    say(f"in situ super-resolution: {world} ranks ({launch.launcher}), {args.mode}, {args.n}x{args.n} "
        f"grid, DCT keeps {args.keep}x{args.keep} ({args.n ** 2 / args.keep ** 2:.0f}x compression), {device}")

    u = sim.blobs(generator)
    frames, losses, t0 = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        for _ in range(args.stride):  # the simulation advances between training steps
            u = sim.step(u)
        if step % args.restart == 0:
            u = sim.blobs(generator)
        frames = (frames + [u])[-args.buffer:]
        batch = torch.stack([frames[i] for i in torch.randint(len(frames), (args.batch,), generator=generator)])
        scale = batch.flatten(1).abs().amax(1).clamp_min(1e-6).view(-1, 1, 1)
        target = batch / scale
        with precision:
            compressed = codec.decompress(codec.compress(target))
            loss = F.mse_loss(model(compressed), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            say(f"step {step:5d}  loss {sum(losses[-50:]) / 50:.3e}  {time.perf_counter() - t0:6.1f} s")
    train_seconds = time.perf_counter() - t0
    opt.synchronize()

    # Held-out trajectory (a seed no rank trained on), evaluated on the global parameters.
    held_out = AdvectionDiffusion(args.n, device=device)
    v = held_out.blobs(torch.Generator().manual_seed(999_999))
    truth = []
    for _ in range(args.eval_frames):
        for _ in range(args.stride):
            v = held_out.step(v)
        truth.append(v)
    truth = torch.stack(truth)
    with torch.no_grad(), precision:
        dct_only = codec.decompress(codec.compress(truth))
        scale = truth.flatten(1).abs().amax(1).view(-1, 1, 1)
        network = model(dct_only / scale) * scale
    dct_err, net_err = relative_errors(dct_only, truth), relative_errors(network, truth)
    report = {"ranks": world, "launcher": launch.launcher, "mode": args.mode, "device": str(device),
              "n": args.n, "keep": args.keep, "steps": args.steps, "train_seconds": train_seconds,
              "dct_error": dct_err, "network_error": net_err,
              "mean_dct_error": sum(dct_err) / len(dct_err), "mean_network_error": sum(net_err) / len(net_err),
              "first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:])}
    if rank == 0:
        say("frame | DCT error | network error")
        for i in range(0, args.eval_frames, max(1, args.eval_frames // 8)):
            say(f"{i:5d} | {dct_err[i]:9.4f} | {net_err[i]:13.4f}")
        say(f"mean  | {report['mean_dct_error']:9.4f} | {report['mean_network_error']:13.4f}   "
            f"({train_seconds:.1f} s of in situ training)")
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, "insitu_superres")
        with open(stem + ".json", "w") as f:
            json.dump(report, f, indent=1)
        save_figure(stem + ".png", truth, dct_only, network, dct_err, net_err, args)
        say(f"wrote {stem}.json and {stem}.png")
        print("RESULT " + json.dumps({k: v for k, v in report.items() if k not in ("dct_error", "network_error")}), flush=True)
    opt.close()
    dist.destroy_process_group()
    return report


def save_figure(path, truth, dct_only, network, dct_err, net_err, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    i = len(truth) // 2
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    lo, hi = truth[i].min().item(), truth[i].max().item()
    for ax, image, title in zip(axes[:3], (truth[i], dct_only[i], network[i]),
                                ("simulated frame", f"DCT {args.keep}x{args.keep} (compressed)",
                                 "network reconstruction")):
        ax.imshow(image.cpu(), vmin=lo, vmax=hi, cmap="RdBu_r")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    axes[3].plot(dct_err, label="plain DCT")
    axes[3].plot(net_err, label="network")
    axes[3].set_xlabel("held-out frame")
    axes[3].set_ylabel("relative L2 error")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
