"""GEMM speed and accuracy: torch_hpc.mm against the fp32 baselines, measured in the same run.

    python benchmarks/gemm.py                      # square sizes 256..8192 on the GPU (CPU: 256..1024)
    python benchmarks/gemm.py --sizes 4096 8192 --shapes 64x8192x8192 8192x8192x256
    python benchmarks/gemm.py --grid --methods fp32 torch_hpc torch_hpc_emulated
                                                   # every shape family torch_hpc must not lose on

--grid sweeps squares 128..16384, skinny products, small K, batched attention products (QK^T and
PV), broadcasting matmul and the Linear layers of common models. Batched points run
torch.matmul against torch_hpc.matmul; "torch_hpc_emulated" is torch_hpc with the SGEMM
fallback off (the tensor-core path alone), which shows where the fallback rule should switch;
"torch_hpc_blocks" is that with torch_hpc.backends.gemm.block_exponents on. --a-range 40 gives A
rows spanning 2^40 (one fp16 window per row cannot hold them: the exact path, or block exponents).

TFLOP/s counts 2*M*N*K fp32-equivalent flops. Each point times its methods in 5 interleaved
rounds after warm-up, --reps calls per method in all, inputs rotated so the L2 cache does not
flatter small sizes: torch calls by CUDA events around each call (device time), JAX by
back-to-back calls synchronised once per round (its asynchronous dispatch hides the per-call
host overhead); the median sample counts. Error is
||C - C64||_F / ||C64||_F on fresh N(0,1) inputs. Writes a table, JSON and a PNG plot.
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

import torch_hpc

METHODS = ["fp32", "tf32", "fp16_1pass", "naive_3xfp16", "torch_hpc", "torch_hpc_emulated",
           "torch_hpc_blocks", "jax_bf16_x3", "jax_bf16_x6"]
DEFAULT_METHODS = [m for m in METHODS if m not in ("torch_hpc_emulated", "torch_hpc_blocks")]
LABELS = {
    "fp32": "torch fp32 (TF32 off)", "tf32": "torch TF32", "fp16_1pass": "fp16 1-pass",
    "naive_3xfp16": "naive 3xfp16 (3 torch.mm)", "torch_hpc": "torch_hpc",
    "torch_hpc_emulated": "torch_hpc, no SGEMM fallback",
    "torch_hpc_blocks": "torch_hpc, block exponents",
    "jax_bf16_x3": "JAX BF16_BF16_F32_X3", "jax_bf16_x6": "JAX BF16_BF16_F32_X6",
}
TWO_D_ONLY = {"fp16_1pass", "naive_3xfp16"}


def naive_3xfp16(a, b):
    """Split in PyTorch (no scaling) and three fp16 GEMMs with fp32 output."""
    a_hi = a.half()
    a_lo = ((a - a_hi.float()) * 2048).half()
    b_hi = b.half()
    b_lo = ((b - b_hi.float()) * 2048).half()
    mm = lambda x, y: torch.mm(x, y, out_dtype=torch.float32)  # noqa: E731
    return mm(a_hi, b_hi) + (mm(a_hi, b_lo) + mm(a_lo, b_hi)) / 2048


def emulated_only(a, b):
    with torch_hpc.backends.gemm.flags(sgemm_fallback=False):
        return torch_hpc.matmul(a, b)


def with_block_exponents(a, b):
    with torch_hpc.backends.gemm.flags(sgemm_fallback=False, block_exponents=True):
        return torch_hpc.matmul(a, b)


def torch_method(name, device):
    if name == "fp32":
        return torch.matmul, None
    if name == "tf32":
        return torch.matmul, "tf32"
    if name == "fp16_1pass":  # operands converted ahead of time: the GEMM alone is timed
        return lambda a, b: torch.mm(a, b, out_dtype=torch.float32), "fp16_inputs"
    if name == "naive_3xfp16":  # fp16 GEMMs with fp32 output exist on CUDA only
        return naive_3xfp16, "gpu_only"
    if name == "torch_hpc":
        return torch_hpc.matmul, None
    if name == "torch_hpc_emulated":
        return emulated_only, None
    if name == "torch_hpc_blocks":
        return with_block_exponents, None
    raise KeyError(name)


def jax_methods():
    try:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import jax
        import jax.numpy as jnp
    except Exception:  # jax missing or broken: its columns stay empty
        return {}
    if not any(d.platform == "gpu" for d in jax.devices()):
        return {}
    out = {}
    for name, preset in (("jax_bf16_x3", "BF16_BF16_F32_X3"), ("jax_bf16_x6", "BF16_BF16_F32_X6")):
        algo = getattr(jax.lax.DotAlgorithmPreset, preset)
        fn = jax.jit(lambda a, b, algo=algo: jnp.matmul(a, b, precision=algo,
                                                         preferred_element_type=jnp.float32))
        out[name] = fn
    return out


def time_torch(fn, inputs, device, calls, first=0):
    """Seconds of each of `calls` calls, inputs rotated from `first`: device time (CUDA events
    around each call) on the GPU, wall time on the CPU."""
    if device == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
        torch.cuda.synchronize()
        for i in range(calls):
            starts[i].record()
            fn(*inputs[(first + i) % len(inputs)])
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn(*inputs[(first + i) % len(inputs)])
        times.append(time.perf_counter() - t0)
    return times


def time_jax(fn, inputs, calls, first=0):
    """Seconds per call of `calls` back-to-back calls, synchronised once at the end: JAX's
    dispatch is asynchronous, so its per-call host overhead hides behind the GPU's work (at
    most one dispatch and one synchronisation per batch are charged)."""
    t0 = time.perf_counter()
    out = None
    for i in range(calls):
        out = fn(*inputs[(first + i) % len(inputs)])
    out.block_until_ready()
    return [(time.perf_counter() - t0) / calls]


def rel_error(c, ref):
    return ((c.double() - ref).norm() / ref.norm()).item()


def point(a_shape, b_shape, label=None, group="mm"):
    """A product torch.matmul(a, b) of the given shapes: M, N, K, the broadcast batch, a label."""
    m, k, n = a_shape[-2], a_shape[-1], b_shape[-1]
    batch = math.prod(torch.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2])))
    if label is None:
        label = f"{m}x{n}x{k}" if len(a_shape) == len(b_shape) == 2 else \
            f"{'x'.join(map(str, a_shape))} @ {'x'.join(map(str, b_shape))}"
    return {"a": list(a_shape), "b": list(b_shape), "m": m, "n": n, "k": k, "batch": batch,
            "label": label, "group": group}


def grid_points():
    pts = [point((n, n), (n, n), group="square") for n in (128, 256, 512, 1024, 2048, 4096, 8192, 16384)]
    for s in (1, 16, 64, 256):
        pts.append(point((s, 8192), (8192, 8192), group="skinny"))
        pts.append(point((8192, 8192), (8192, s), group="skinny"))
    for k in (16, 64, 128):
        for n in (4096, 8192):
            pts.append(point((n, k), (k, n), group="small K"))
    for bh, seq in ((32, 512), (512, 512), (32, 1024), (256, 1024), (32, 2048), (128, 2048), (32, 4096)):
        for d in (64, 128):
            pts.append(point((bh, seq, d), (bh, d, seq), f"QK^T {bh}x({seq}x{d} . {d}x{seq})", "attention"))
            pts.append(point((bh, seq, seq), (bh, seq, d), f"PV {bh}x({seq}x{seq} . {seq}x{d})", "attention"))
    pts.append(point((8, 16, 512, 64), (16, 64, 512), group="broadcast"))
    pts.append(point((16, 1024, 1024), (1024, 4096), group="broadcast"))
    pts.append(point((4, 1, 1024, 128), (1, 16, 128, 1024), group="broadcast"))
    # Linear layers (tokens x in) @ (in x out), and their weight gradients (out x tokens) @ (tokens x in)
    for name, tokens, d_in, d_out in (("BERT-base qkv", 4096, 768, 768), ("BERT-base ffn1", 4096, 768, 3072),
                                      ("BERT-base ffn2", 4096, 3072, 768), ("GPT-2 XL ffn1", 8192, 1600, 6400),
                                      ("Llama-7B attn", 2048, 4096, 4096), ("Llama-7B up", 2048, 4096, 11008),
                                      ("Llama-7B down", 2048, 11008, 4096), ("ResNet-50 fc", 256, 2048, 1000)):
        pts.append(point((tokens, d_in), (d_in, d_out), f"{name} {tokens}x{d_out}x{d_in}", "linear"))
        pts.append(point((d_out, tokens), (tokens, d_in), f"{name} wgrad {d_out}x{d_in}x{tokens}", "linear"))
    return pts


def wide_rows(shape, bits, gen, device):
    """N(0,1) values, each run of 64 along a row scaled by 2^u, u uniform in [-bits/2, bits/2]:
    rows that no single fp16 window holds once bits > 28 (a cross-entropy gradient's rows)."""
    x = torch.randn(shape, device=device, generator=gen)
    blocks = (shape[-1] + 63) // 64
    u = (torch.rand((*shape[:-1], blocks), device=device, generator=gen) - 0.5) * bits
    return x * torch.exp2(u.round()).repeat_interleave(64, dim=-1)[..., :shape[-1]]


def input_sets(pt, device, l2_bytes, seed, a_range=0):
    per_set = 4 * (math.prod(pt["a"]) + math.prod(pt["b"]))
    count = max(2, min(8, math.ceil(3 * l2_bytes / per_set)))
    gen = torch.Generator(device=device).manual_seed(seed)
    make_a = (lambda: wide_rows(pt["a"], a_range, gen, device)) if a_range else \
        (lambda: torch.randn(pt["a"], device=device, generator=gen))
    return [(make_a(), torch.randn(pt["b"], device=device, generator=gen)) for _ in range(count)]


def bench_point(pt, device, methods, jax_fns, reps, warmup, l2_bytes, seed, rounds=5, a_range=0):
    """One point, every method timed in `rounds` interleaved rounds (clock and thermal drift hit
    all alike); each method's time is the median of its samples."""
    sets = input_sets(pt, device, l2_bytes, seed, a_range)
    a0, b0 = sets[0]
    ref = torch.matmul(a0.double(), b0.double())
    flops = 2.0 * pt["batch"] * pt["m"] * pt["n"] * pt["k"]
    row = dict(pt)
    two_d = len(pt["a"]) == len(pt["b"]) == 2
    timers, errors = {}, {}
    for name in methods:
        if name.startswith("jax"):
            if name not in jax_fns:
                continue
            import jax.numpy as jnp
            fn = jax_fns[name]
            jsets = [(jnp.asarray(a.cpu().numpy()), jnp.asarray(b.cpu().numpy())) for a, b in sets]
            c = torch.from_numpy(np.array(fn(*jsets[0]))).to(device)
            time_jax(fn, jsets, warmup)
            timers[name] = lambda calls, first, fn=fn, jsets=jsets: time_jax(fn, jsets, calls, first)
        else:
            if name in TWO_D_ONLY and not two_d:
                continue
            fn, mode = torch_method(name, device)
            if device != "cuda" and mode is not None:
                continue  # TF32 / fp16 tensor-core methods are GPU-only
            run_sets = [(a.half(), b.half()) for a, b in sets] if mode == "fp16_inputs" else sets

            def timer(calls, first, fn=fn, run_sets=run_sets, tf32=mode == "tf32"):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                try:
                    return time_torch(fn, run_sets, device, calls, first)
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = False
            c = fn(*run_sets[0])
            timer(warmup, 0)
            timers[name] = timer
        errors[name] = rel_error(c.float(), ref)
        del c
    per_round = max(1, math.ceil(reps / rounds))
    samples = {name: [] for name in timers}
    for r in range(rounds):
        for name, timer in timers.items():
            samples[name] += timer(per_round, r * per_round)
    for name in timers:
        seconds = statistics.median(samples[name])
        row[name] = {"tflops": flops / seconds / 1e12, "seconds": seconds, "error": errors[name]}
    return row


def print_table(rows, methods, out=sys.stdout):
    present = [m for m in methods if any(m in r for r in rows)]
    width = max(20, max(len(r["label"]) for r in rows))
    head = f"{'product':>{width}} | " + " | ".join(f"{LABELS[m]:>28}" for m in present)
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        cells = []
        for m in present:
            v = r.get(m)
            cells.append(f"{v['tflops']:8.3g} TF/s  err {v['error']:.1e}" if v else f"{'-':>28}")
        print(f"{r['label']:>{width}} | " + " | ".join(f"{c:>28}" for c in cells), file=out)
    for method in ("torch_hpc", "torch_hpc_emulated", "torch_hpc_blocks"):
        both = [r for r in rows if "fp32" in r and method in r]
        if not both:
            continue
        print(f"\n{LABELS[method]} vs fp32 (speed, error):", file=out)
        for r in both:
            speed = r[method]["tflops"] / r["fp32"]["tflops"]
            error = r[method]["error"] / r["fp32"]["error"]
            flag = "  <-- below 0.95x" if speed < 0.95 else ""
            print(f"  {r['label']:>{width}}: {speed:5.2f}x, {error:5.2f}x{flag}", file=out)
        speeds = [r[method]["tflops"] / r["fp32"]["tflops"] for r in both]
        print(f"  lowest {min(speeds):.2f}x, points below 0.95x: {sum(v < 0.95 for v in speeds)} of "
              f"{len(speeds)}, highest error ratio {max(r[method]['error'] / r['fp32']['error'] for r in both):.2f}x",
              file=out)


def print_ratio_to_x3(rows, out=sys.stdout):
    both = [r for r in rows if "torch_hpc" in r and "jax_bf16_x3" in r]
    if not both:
        return
    width = max(20, max(len(r["label"]) for r in both))
    print(f"\n{LABELS['torch_hpc']} vs {LABELS['jax_bf16_x3']} (speed, error; fp32 for scale):", file=out)
    for r in both:
        x3, mine = r["jax_bf16_x3"], r["torch_hpc"]
        vs_fp32 = f", {mine['tflops'] / r['fp32']['tflops']:.2f}x fp32's speed, " \
                  f"{mine['error'] / r['fp32']['error']:.2f}x its error" if "fp32" in r else ""
        print(f"  {r['label']:>{width}}: {mine['tflops'] / x3['tflops']:5.2f}x, "
              f"{mine['error'] / x3['error']:5.2f}x{vs_fp32}", file=out)


def plot(rows, methods, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    square = [r for r in rows if r["m"] == r["n"] == r["k"] and r["batch"] == 1]
    if not square:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in methods:
        pts = [(r["n"], r[m]) for r in square if m in r]
        if not pts:
            continue
        ax1.plot([p[0] for p in pts], [p[1]["tflops"] for p in pts], "o-", label=LABELS[m])
        ax2.plot([p[0] for p in pts], [p[1]["error"] for p in pts], "o-", label=LABELS[m])
    for ax, ylabel in ((ax1, "TFLOP/s (fp32-equivalent)"), (ax2, "||C - C64|| / ||C64||")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n (square n x n x n)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_shape(text):
    m, n, k = (int(v) for v in text.lower().split("x"))
    return m, n, k


def main(argv=None):
    cuda = torch.cuda.is_available() and torch_hpc.build_info()["cuda_kernels"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", type=int, nargs="*", help="square sizes n (M = N = K = n)")
    p.add_argument("--shapes", nargs="*", default=[], help="extra MxNxK shapes")
    p.add_argument("--grid", action="store_true", help="the shape grid (see above) instead of --sizes")
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=METHODS)
    p.add_argument("--reps", type=int, default=None, help="timed runs per method (GPU default 30)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                   help="folder for the JSON and PNG")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--a-range", type=int, default=0, metavar="BITS",
                   help="A's rows span 2^BITS (each 64 values scaled by 2^u, |u| <= BITS/2; 0: N(0,1))")
    args = p.parse_args(argv)

    device = args.device
    if args.sizes is None:
        args.sizes = [] if args.grid else [256, 512, 1024, 2048, 4096, 8192] if device == "cuda" else [256, 512, 1024]
    reps = args.reps or (30 if device == "cuda" else 5)
    points = [point((n, n), (n, n)) for n in args.sizes] + \
        [point((m, k), (k, n)) for m, n, k in map(parse_shape, args.shapes)] + (grid_points() if args.grid else [])
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        card, l2 = props.name, props.L2_cache_size
    else:
        card, l2 = platform.processor() or platform.machine(), 32 * 2**20
    jax_fns = jax_methods() if device == "cuda" and any(m.startswith("jax") for m in args.methods) else {}
    print(f"# GEMM benchmark on {card} ({device}), torch {torch.__version__}, "
          f"{datetime.date.today()}, {reps} timed runs per point"
          f"{f', rows of A spanning 2^{args.a_range}' if args.a_range else ''}", flush=True)

    rows = []
    for i, pt in enumerate(points):
        print(f"[{i + 1}/{len(points)}] {pt['label']} ...", file=sys.stderr, flush=True)
        rows.append(bench_point(pt, device, args.methods, jax_fns, reps, args.warmup, l2, args.seed + i,
                                a_range=args.a_range))
        if device == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, args.methods)
    print_ratio_to_x3(rows)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"gemm-{device}{'-' + args.tag if args.tag else ''}")
    meta = {"card": card, "device": device, "torch": torch.__version__, "date": str(datetime.date.today()),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "reps": reps,
            "build": torch_hpc.build_info()}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    plot(rows, args.methods, stem + ".png", f"GEMM on {card}, {meta['date']}")
    print(f"\nwrote {stem}.json and {stem}.png")
    return rows


if __name__ == "__main__":
    main()
