"""A long chain of matrix products where TF32 visibly fails and torch_hpc keeps fp32 accuracy.

Physics: 2-D linear advection of a Gaussian pulse on a periodic n x n grid, central differences
in space, Crank-Nicolson in time. The one-step operator U = (I + (c dt/2) D)^-1 (I - (c dt/2) D)
is orthogonal (D is skew-symmetric), so the exact evolution u <- U u U^T preserves the field's
energy forever, and every error a product makes stays in the solution. Each step is two GEMMs.

The same evolution runs in fp64 (the reference), fp32 (TF32 off), TF32, bf16 and torch_hpc's
3xfp16 emulation; the script prints the relative error ||u - u64|| / ||u64|| and the energy
drift along the way, and saves a PNG of error vs step and a JSON record.

    python examples/tf32_vs_emulated.py                    # n = 1024, 400 steps, GPU if present
    python examples/tf32_vs_emulated.py --n 96 --steps 40  # CPU-sized (TF32 simulated by rounding)
On the CPU, TF32 is simulated exactly as the tensor cores do it: operands rounded to 10
mantissa bits, fp32 accumulation.
"""
import argparse
import json
import math
import os
import time

import torch

import torch_hpc


def advection_operator(n: int, courant: float) -> torch.Tensor:
    """Crank-Nicolson step of u_t + u_x = 0 on a periodic grid (fp64)."""
    d = torch.zeros(n, n, dtype=torch.float64)
    i = torch.arange(n)
    d[i, (i + 1) % n] = 0.5
    d[i, (i - 1) % n] = -0.5  # centred difference, skew-symmetric
    eye = torch.eye(n, dtype=torch.float64)
    return torch.linalg.solve(eye + 0.5 * courant * d, eye - 0.5 * courant * d)


def initial_field(n: int) -> torch.Tensor:
    x = torch.linspace(0, 1, n + 1, dtype=torch.float64)[:-1]
    gx = torch.exp(-((x - 0.3) / 0.05) ** 2)
    gy = torch.exp(-((x - 0.6) / 0.08) ** 2)
    return torch.outer(gx, gy) + 0.25 * torch.outer(torch.sin(2 * math.pi * x), torch.cos(4 * math.pi * x))


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest value with TF32's 10 mantissa bits (ties to even), kept in fp32."""
    bits = t.view(torch.int32)
    rounding = ((bits >> 13) & 1) + 0xFFF
    return ((bits + rounding) & ~0x1FFF).view(torch.float32)


def product(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if kind == "fp64":
        return a @ b
    if kind == "fp32":
        return a @ b
    if kind == "tf32":
        if a.is_cuda:
            return a @ b  # allow_tf32 is on for this kind
        return round_to_tf32(a) @ round_to_tf32(b)
    if kind == "bf16":
        return (a.bfloat16() @ b.bfloat16()).float()
    if kind == "torch_hpc":
        return torch_hpc.mm(a, b)
    raise ValueError(kind)


def evolve(kind, u0, op, steps, record_every):
    dtype = torch.float64 if kind == "fp64" else torch.float32
    u, op = u0.to(dtype), op.to(dtype)
    op_t = op.t().contiguous()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
    try:
        history = [u.clone()]
        for step in range(1, steps + 1):
            u = product(kind, product(kind, op, u), op_t)
            if step % record_every == 0:
                history.append(u.clone())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return history


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--courant", type=float, default=0.8)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "local"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    record_every = max(1, args.steps // 40)
    op = advection_operator(args.n, args.courant).to(device)
    u0 = initial_field(args.n).to(device)
    kinds = ["fp64", "fp32", "tf32", "bf16", "torch_hpc"]
    runs, seconds = {}, {}
    for kind in kinds:
        t0 = time.perf_counter()
        runs[kind] = evolve(kind, u0, op, args.steps, record_every)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[kind] = time.perf_counter() - t0
    ref = runs["fp64"]
    energy0 = ref[0].norm().item()
    steps = [i * record_every for i in range(len(ref))]
    errors = {k: [((u.double() - r).norm() / r.norm()).item() for u, r in zip(runs[k], ref)] for k in kinds[1:]}
    drift = {k: abs(runs[k][-1].double().norm().item() / energy0 - 1) for k in kinds}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"2-D advection, Crank-Nicolson, {args.n}x{args.n} grid, {args.steps} steps "
          f"({2 * args.steps} GEMMs) on {name}")
    print(f"{'product':10s} | {'rel. error at end':>17s} | {'energy drift':>12s} | {'seconds':>8s}")
    for k in kinds[1:]:
        print(f"{k:10s} | {errors[k][-1]:17.3e} | {drift[k]:12.3e} | {seconds[k]:8.2f}")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"tf32_vs_emulated-{device.type}")
    with open(stem + ".json", "w") as f:
        json.dump({"device": name, "n": args.n, "steps": steps, "errors": errors, "energy_drift": drift,
                   "seconds": seconds, "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k in kinds[1:]:
        ax.semilogy(steps[1:], errors[k][1:], label=k)
    ax.set_xlabel("time step (two GEMMs each)")
    ax.set_ylabel("||u - u_fp64|| / ||u_fp64||")
    ax.set_title(f"advection {args.n}x{args.n}, {name}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    print(f"wrote {stem}.json and {stem}.png")
    return errors


if __name__ == "__main__":
    main()
