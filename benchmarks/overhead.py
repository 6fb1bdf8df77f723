"""Per-call cost of torch_hpc's ops, of the fp32_emulation() mode (its routing of products and of
F.scaled_dot_product_attention: "mode sdpa", small enough that torch's SDPA runs) and of torch_hpc.nn.Linear,
beside torch's own call for the same shape, forward and forward + backward.

    python benchmarks/overhead.py                  # GPU: squares 128..1024
    python benchmarks/overhead.py --sizes 16 64    # CPU (informative: the CPU kernel differs)

Each number is the wall time per call of --calls back-to-back calls (synchronised only at the
ends), median of --rounds rounds; torch and torch_hpc alternate within a round. torch's
products run in fp32 with TF32 off. "over torch" is torch_hpc's time minus torch's: host work
(dispatch, autograd, the mode's routing) plus any extra GPU work. Passes: fwd; fwd+bwd (a
backward() after every call: each pays the autograd engine's start, 150-350 us on a GPU host,
which swamps what differs); fwd+bwd once (every call's forward, then one backward() over all of
their outputs: the per-node cost of backward without the engine's start, as in a model whose one
backward() runs many products). Table + JSON + PNG.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import torch_hpc

BATCH = 8  # bmm / batched matmul cases


def cases(n, device, cpu_mode):
    """name -> (inputs maker, torch call, torch_hpc call, context of the torch_hpc calls)."""
    def two(*lead):
        return lambda: (torch.randn(*lead, n, n, device=device), torch.randn(*lead, n, n, device=device))

    def linear_inputs():
        return (torch.randn(n, n, device=device), torch.randn(n, n, device=device),
                torch.randn(n, device=device))

    def module_pair():
        torch.manual_seed(0)
        plain = torch.nn.Linear(n, n, device=device)
        emulated = torch_hpc.emulate_fp32(torch.nn.Linear(n, n, device=device))
        emulated.load_state_dict(plain.state_dict())
        return plain, emulated

    def at(a, b):
        return a @ b

    def attention_inputs():  # BATCH heads of length n, head dim 64: under "auto" torch's SDPA runs (the route's cost)
        return tuple(torch.randn(1, BATCH, n, 64, device=device) for _ in range(3))

    none = contextlib.nullcontext
    out = {
        "mm": (two(), torch.mm, torch_hpc.mm, none),
        "bmm": (two(BATCH), torch.bmm, torch_hpc.bmm, none),
        "matmul": (two(BATCH), torch.matmul, torch_hpc.matmul, none),
        "linear": (linear_inputs, F.linear, torch_hpc.linear, none),
        "mode a @ b": (two(), at, at, lambda: torch_hpc.fp32_emulation(cpu=cpu_mode)),
        "mode sdpa": (attention_inputs, F.scaled_dot_product_attention, F.scaled_dot_product_attention,
                      lambda: torch_hpc.fp32_emulation(cpu=cpu_mode)),
    }
    plain, emulated = module_pair()
    out["nn.Linear"] = (lambda: (torch.randn(n, n, device=device),), plain, emulated, none)
    return out


PASSES = ("fwd", "fwd+bwd", "fwd+bwd once")


def run_calls(fn, inputs, calls, pass_name, sync):
    """Seconds per call: forward only, a backward() after each call, or one over all of them."""
    backward = pass_name != "fwd"
    if backward:
        inputs = [t.detach().requires_grad_() for t in inputs]
        grad = None
    outputs = []
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        y = fn(*inputs)
        if backward:
            if grad is None:
                grad = torch.ones_like(y)
            if pass_name == "fwd+bwd":
                y.backward(grad)
            else:
                outputs.append(y)
    if outputs:
        torch.autograd.backward(outputs, [grad] * len(outputs))
    sync()
    return (time.perf_counter() - t0) / calls


def measure(n, device, calls, rounds, cpu_mode):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for name, (make, torch_fn, hpc_fn, hpc_context) in cases(n, device, cpu_mode).items():
        inputs = make()
        for pass_name in PASSES:
            with torch.no_grad() if pass_name == "fwd" else torch.enable_grad():
                run_calls(torch_fn, inputs, max(3, calls // 10), pass_name, sync)  # warm-up
                with hpc_context():
                    run_calls(hpc_fn, inputs, max(3, calls // 10), pass_name, sync)
                t_torch, t_hpc = [], []
                for _ in range(rounds):
                    t_torch.append(run_calls(torch_fn, inputs, calls, pass_name, sync))
                    with hpc_context():
                        t_hpc.append(run_calls(hpc_fn, inputs, calls, pass_name, sync))
            torch_us, hpc_us = statistics.median(t_torch) * 1e6, statistics.median(t_hpc) * 1e6
            rows.append({"n": n, "case": name, "pass": pass_name,
                         "torch_us": torch_us, "torch_hpc_us": hpc_us, "over_us": hpc_us - torch_us})
            print(f"{n:>6} {name:>12} {rows[-1]['pass']:>12} | {torch_us:9.1f} | {hpc_us:11.1f} | "
                  f"{hpc_us - torch_us:+9.1f}", flush=True)
    return rows


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(PASSES), figsize=(17, 4.5), sharey=True)
    for ax, pass_name in zip(axes, PASSES):
        for case in dict.fromkeys(r["case"] for r in rows):
            pts = [r for r in rows if r["case"] == case and r["pass"] == pass_name]
            ax.plot([r["n"] for r in pts], [r["over_us"] for r in pts], "o-", label=case)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n (n x n operands)")
        ax.set_title(pass_name)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("torch_hpc - torch, us per call")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    cuda = torch.cuda.is_available() and torch_hpc.build_info()["cuda_kernels"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", type=int, nargs="*", help="square sizes (GPU 128..1024, CPU 16 64)")
    p.add_argument("--calls", type=int, default=100, help="back-to-back calls per timing")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    device = args.device
    sizes = args.sizes or ([128, 256, 512, 1024] if device == "cuda" else [16, 64])
    torch.backends.cuda.matmul.allow_tf32 = False
    card = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine())
    print(f"# per-call overhead on {card} ({device}), torch {torch.__version__}, {datetime.date.today()}, "
          f"{args.calls} calls x {args.rounds} rounds")
    print(f"{'n':>6} {'case':>12} {'pass':>12} | {'torch us':>9} | {'torch_hpc us':>11} | {'over':>9}")
    rows = [r for n in sizes for r in measure(n, device, args.calls, args.rounds, cpu_mode=device == "cpu")]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"overhead-{device}{'-' + args.tag if args.tag else ''}")
    meta = {"card": card, "device": device, "torch": torch.__version__, "date": str(datetime.date.today()),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "calls": args.calls,
            "rounds": args.rounds, "build": torch_hpc.build_info()}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    plot(rows, stem + ".png", f"Per-call overhead on {card}, {meta['date']}")
    print(f"\nwrote {stem}.json and {stem}.png")
    return rows


if __name__ == "__main__":
    main()
