"""Attention speed and accuracy: torch_hpc.scaled_dot_product_attention against torch's fp32 SDPA
(TF32 off: whichever fp32 backend torch picks) and, for reference, torch's bf16 SDPA
(FlashAttention), measured interleaved in one run.

    python benchmarks/attention.py                                   # seq 512..8192, head dim 64 and 128
    python benchmarks/attention.py --seqs 1024 4096 --dims 128 --causal 1

torch_hpc is the op as users get it (torch_hpc.backends.attention.fused = "auto"); --methods
fused forces the kernel on every shape (where "auto" gives small calls to torch).
Per shape (batch x heads = --bh, split as batch 2), forward and forward + backward: TFLOP/s with
FlashAttention's flop count (forward 4 B H L S D, halved when causal; backward 2.5x the
forward), each method timed by CUDA events in 3 interleaved rounds after warm-up (median), and
the normwise errors of the output and of the query/key/value gradients against fp64 on the
first batch element and head (fresh N(0,1) inputs). Writes a table, JSON and a PNG plot.
"""
import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import torch_hpc
from gemm import time_torch

METHODS = ["fp32", "torch_hpc", "fused", "bf16"]
DEFAULT_METHODS = ["fp32", "torch_hpc", "bf16"]
LABELS = {"fp32": "torch fp32 SDPA (TF32 off)", "torch_hpc": "torch_hpc", "fused": "torch_hpc, fused kernel forced",
          "bf16": "torch bf16 SDPA (less accurate)"}
PASSES = ["forward", "forward+backward"]


def call(method):
    if method == "torch_hpc":  # as users get it (backends.attention.fused = "auto")
        return torch_hpc.scaled_dot_product_attention
    if method == "fused":
        def fused(*args, **kw):
            with torch_hpc.backends.attention.flags(fused=True):
                return torch_hpc.scaled_dot_product_attention(*args, **kw)
        return fused
    return F.scaled_dot_product_attention


def inputs(method, bh, seq, dim, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(2, bh // 2, seq, dim, device=device, generator=g) for _ in range(3))
    if method == "bf16":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    return [t.requires_grad_() for t in (q, k, v)]


def pass_fn(method, passname, q, k, v, causal):
    fn = call(method)
    if passname == "forward":
        def forward():
            with torch.no_grad():
                fn(q, k, v, is_causal=causal)
        return forward
    grad = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype)

    def step():
        out = fn(q, k, v, is_causal=causal)
        torch.autograd.grad(out, (q, k, v), grad)
    return step


def errors(method, seq, dim, causal, device, seed):
    """Normwise errors vs fp64 of the output and the three gradients (one batch element and head)."""
    q, k, v = (t[:1, :1].detach().clone().requires_grad_() for t in inputs(method, 2, seq, dim, device, seed))
    out = call(method)(q, k, v, is_causal=causal)
    g = torch.randn(out.shape, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1))
    grads = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = F.scaled_dot_product_attention(*x64, is_causal=causal)
    grads64 = torch.autograd.grad(out64, x64, g.double())
    rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()  # noqa: E731
    return {"output": rel(out, out64), "grad_q": rel(grads[0], grads64[0]), "grad_k": rel(grads[1], grads64[1]),
            "grad_v": rel(grads[2], grads64[2])}


def bench_point(args, seq, dim, causal, device):
    row = {"seq": seq, "dim": dim, "causal": causal, "bh": args.bh}
    flops_fwd = 4.0 * args.bh * seq * seq * dim * (0.5 if causal else 1.0)
    for passname in PASSES:
        work = flops_fwd * (1.0 if passname == "forward" else 3.5)
        fns = {}
        for m in args.methods:
            q, k, v = inputs(m, args.bh, seq, dim, device, args.seed)
            fns[m] = pass_fn(m, passname, q, k, v, causal)
            time_torch(fns[m], [()], device, args.warmup)
        samples = {m: [] for m in args.methods}
        for _ in range(3):
            for m in args.methods:
                samples[m] += time_torch(fns[m], [()], device, max(1, args.reps // 3))
        for m in args.methods:
            seconds = statistics.median(samples[m])
            row.setdefault(m, {})[passname] = {"seconds": seconds, "tflops": work / seconds / 1e12}
        del fns
        torch.cuda.empty_cache()
    for m in args.methods:
        row[m]["errors"] = errors(m, min(seq, 2048), dim, causal, device, args.seed)
    return row


def print_table(rows, methods, out=None):
    out = out or sys.stdout
    print(f"{'seq':>6} {'dim':>4} {'causal':>6} {'pass':>17} | " + " | ".join(f"{LABELS[m]:>30}" for m in methods),
          file=out)
    for r in rows:
        for p in PASSES:
            cells = []
            for m in methods:
                c = f"{r[m][p]['tflops']:6.1f} TF/s"
                if m != "fp32":
                    c += f" {r['fp32'][p]['seconds'] / r[m][p]['seconds']:5.2f}x"
                cells.append(c)
            print(f"{r['seq']:>6} {r['dim']:>4} {str(r['causal']):>6} {p:>17} | " + " | ".join(f"{c:>30}" for c in cells),
                  file=out)
        errs = " | ".join(f"{m}: " + " ".join(f"{v:.1e}" for v in r[m]["errors"].values()) for m in methods)
        print(f"{'':>37}   errors (out, dq, dk, dv) {errs}", file=out)


def plot(rows, methods, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    labels = [f"{r['seq']}/{r['dim']}{'/c' if r['causal'] else ''}" for r in rows]
    present = [m for m in methods if m != "fp32"]
    for ax, p in zip(axes, PASSES):
        for i, m in enumerate(present):
            ratios = [r["fp32"][p]["seconds"] / r[m][p]["seconds"] for r in rows]
            ax.bar([j + 0.8 * i / len(present) for j in range(len(rows))], ratios, 0.8 / len(present), label=LABELS[m])
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_title(f"{p}: speed vs torch fp32 SDPA (seq/head dim/causal)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--dims", type=int, nargs="*", default=[64, 128])
    p.add_argument("--causal", type=int, nargs="*", default=[0, 1], choices=[0, 1])
    p.add_argument("--bh", type=int, default=32, help="batch x heads (batch 2)")
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=METHODS,
                   help="torch_hpc: as users get it (torch_hpc.backends.attention.fused = 'auto': small calls "
                        "take torch's); fused: the kernel on every call")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a GPU (on CPU torch_hpc takes torch's own call)")
    if "fp32" not in args.methods:
        args.methods = ["fp32"] + args.methods
    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    card = torch.cuda.get_device_name(0)
    print(f"# scaled_dot_product_attention, batch x heads {args.bh}, on {card}, torch {torch.__version__}, "
          f"{datetime.date.today()}", flush=True)
    rows = []
    for dim in args.dims:
        for causal in args.causal:
            for seq in args.seqs:
                print(f"[seq {seq} dim {dim} causal {bool(causal)}] ...", file=sys.stderr, flush=True)
                rows.append(bench_point(args, seq, dim, bool(causal), device))
    print_table(rows, args.methods)
    summary = {}
    for m in args.methods:
        if m == "fp32":
            continue
        summary[m] = {pname: {"min_vs_fp32": min(r["fp32"][pname]["seconds"] / r[m][pname]["seconds"] for r in rows),
                              "max_vs_fp32": max(r["fp32"][pname]["seconds"] / r[m][pname]["seconds"] for r in rows)}
                      for pname in PASSES}
    print(f"\nsummary (speed vs torch fp32 SDPA): {json.dumps(summary, indent=1)}")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"attention-{device}{'-' + args.tag if args.tag else ''}")
    meta = {"card": card, "torch": torch.__version__, "date": str(datetime.date.today()),
            "command": " ".join(["python", sys.argv[0]] + (sys.argv[1:] if argv is None else argv)), **vars(args)}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "rows": rows}, f, indent=1)
    plot(rows, args.methods, stem + ".png", f"scaled_dot_product_attention, batch x heads {args.bh}, {card}, {meta['date']}")
    print(f"wrote {stem}.json and {stem}.png")
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
