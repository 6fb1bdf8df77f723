"""End-to-end: a 4-layer MLP converted by torch_hpc.emulate_fp32 vs plain fp32 (TF32 off).

    python benchmarks/mlp.py                       # hidden 8192, batch 8192, 50 steps, 3 seeds (GPU)
    python benchmarks/mlp.py --hidden 64 --batch 64 --steps 5 --device cpu   # smoke test

Times forward+backward (the products the emulation replaces) and the whole step including the
Adam update (medians over the steps after 3 warm-up steps), records the loss curves of every
seed in both precisions, and checks that the emulated curve stays within the spread of the fp32
curves (widened by the spread of the emulated ones). Table + JSON + PNG.
"""
import argparse
import datetime
import json
import os
import statistics
import time

import torch
from torch import nn

import torch_hpc
from models import outside_spread


def model_for(hidden, seed, device):
    torch.manual_seed(seed)
    layers = []
    for i in range(4):
        layers += [nn.Linear(hidden, hidden)] + ([nn.GELU()] if i < 3 else [])
    return nn.Sequential(*layers).to(device)


def data_for(hidden, batch, device):
    g = torch.Generator(device="cpu").manual_seed(1234)
    x = torch.randn(batch, hidden, generator=g)
    teacher = torch.randn(hidden, hidden, generator=g) / hidden ** 0.5
    y = torch.tanh(x @ teacher)
    return x.to(device), y.to(device)


def train(precision, args, seed, device, x, y):
    model = model_for(args.hidden, seed, device)
    if precision == "emulated":
        torch_hpc.emulate_fp32(model)  # every nn.Linear -> torch_hpc.nn.Linear
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses, fwd_bwd, whole = [], [], []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(args.steps):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        fwd_bwd.append(t1 - t0)
        whole.append(time.perf_counter() - t0)
        losses.append(loss.item())
    steady = lambda t: statistics.median(t[3:] if len(t) > 3 else t)  # noqa: E731
    return losses, steady(fwd_bwd), steady(whole)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    x, y = data_for(args.hidden, args.batch, device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# 4-layer MLP, hidden {args.hidden}, batch {args.batch}, {args.steps} steps x "
          f"{args.seeds} seeds on {card}, {datetime.date.today()}", flush=True)
    curves = {"fp32": [], "emulated": []}
    fwd_bwd_seconds, step_seconds = {"fp32": [], "emulated": []}, {"fp32": [], "emulated": []}
    for seed in range(args.seeds):
        for precision in ("fp32", "emulated"):
            losses, fb, whole = train(precision, args, seed, device, x, y)
            curves[precision].append(losses)
            fwd_bwd_seconds[precision].append(fb)
            step_seconds[precision].append(whole)
            print(f"  seed {seed} {precision:8s}: forward+backward {fb * 1e3:8.2f} ms, with Adam "
                  f"{whole * 1e3:8.2f} ms; loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    med = lambda d, k: statistics.median(d[k])  # noqa: E731
    fp32_s, emu_s = med(fwd_bwd_seconds, "fp32"), med(fwd_bwd_seconds, "emulated")
    fp32_step, emu_step = med(step_seconds, "fp32"), med(step_seconds, "emulated")
    outside = outside_spread(curves["fp32"], curves["emulated"])
    summary = {"speedup": fp32_s / emu_s, "fp32_forward_backward_ms": fp32_s * 1e3,
               "emulated_forward_backward_ms": emu_s * 1e3, "step_speedup": fp32_step / emu_step,
               "fp32_step_ms": fp32_step * 1e3, "emulated_step_ms": emu_step * 1e3,
               "loss_first_last_fp32": [curves["fp32"][0][0], curves["fp32"][0][-1]],
               "steps_outside_fp32_spread": outside}
    print(f"\nforward+backward: fp32 {fp32_s * 1e3:.2f} ms, emulated {emu_s * 1e3:.2f} ms "
          f"({summary['speedup']:.2f}x); whole step with Adam {summary['step_speedup']:.2f}x; "
          f"emulated loss outside the fp32 spread at {outside} of {args.steps} steps")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"mlp-{device.type}{'-' + args.tag if args.tag else ''}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": {"card": card, "date": str(datetime.date.today()), **vars(args)},
                   "summary": summary, "curves": curves,
                   "forward_backward_seconds": fwd_bwd_seconds, "step_seconds": step_seconds}, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for precision, style in (("fp32", "-"), ("emulated", "--")):
        for seed, losses in enumerate(curves[precision]):
            ax.semilogy(losses, style, label=f"{precision} seed {seed}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"MLP {args.hidden}, batch {args.batch}, {card}: {summary['speedup']:.2f}x", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
