"""Convolution speed and accuracy: torch_hpc.conv2d against cuDNN fp32 (TF32 off), TF32 and fp16
(channels_last), on every convolution shape of ResNet-50 (torchvision v1.5: stride on the 3x3),
forward, input gradient and weight gradient, measured in the same run.

    python benchmarks/conv.py                   # batch 64, 224x224, on the GPU
    python benchmarks/conv.py --device cpu --batch 2 --scale 8 --reps 2   # a quick CPU check
    python benchmarks/conv.py --networks resnet50 superres --layers        # whole training steps only

Effective TFLOP/s count the direct convolution's 2*N*Cout*Hout*Wout*Cin/groups*kh*kw flops for
each pass; times are medians of --reps calls (CUDA events) after warm-up, the three methods of a
pass interleaved in rounds. Error is ||y - y64|| / ||y64|| of the forward output (and of both
gradients) on the first samples of the batch, fresh N(0,1) inputs. The summary weights each
layer by how often ResNet-50 uses it. --networks times whole training steps (forward, backward,
SGD) of ResNet-50 (written here, torchvision's v1.5 layout) and of the in-situ super-resolution
example's CNN, in fp32 (TF32 off), TF32 and after torch_hpc.emulate_fp32(model). Writes a table,
JSON and a PNG.
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

import torch
import torch.nn.functional as F
from torch import nn

import torch_hpc
from gemm import time_torch

# (name, in, out, kernel, stride, input size at 224, count in ResNet-50)
RESNET50 = [
    ("stem 7x7 3->64 s2", 3, 64, 7, 2, 224, 1),
    ("1x1 64->64", 64, 64, 1, 1, 56, 1),
    ("3x3 64->64", 64, 64, 3, 1, 56, 3),
    ("1x1 64->256", 64, 256, 1, 1, 56, 4),
    ("1x1 256->64", 256, 64, 1, 1, 56, 2),
    ("1x1 256->128", 256, 128, 1, 1, 56, 1),
    ("3x3 128->128 s2", 128, 128, 3, 2, 56, 1),
    ("3x3 128->128", 128, 128, 3, 1, 28, 3),
    ("1x1 128->512", 128, 512, 1, 1, 28, 4),
    ("1x1 256->512 s2", 256, 512, 1, 2, 56, 1),
    ("1x1 512->128", 512, 128, 1, 1, 28, 3),
    ("1x1 512->256", 512, 256, 1, 1, 28, 1),
    ("3x3 256->256 s2", 256, 256, 3, 2, 28, 1),
    ("3x3 256->256", 256, 256, 3, 1, 14, 5),
    ("1x1 256->1024", 256, 1024, 1, 1, 14, 6),
    ("1x1 512->1024 s2", 512, 1024, 1, 2, 28, 1),
    ("1x1 1024->256", 1024, 256, 1, 1, 14, 5),
    ("1x1 1024->512", 1024, 512, 1, 1, 14, 1),
    ("3x3 512->512 s2", 512, 512, 3, 2, 14, 1),
    ("3x3 512->512", 512, 512, 3, 1, 7, 2),
    ("1x1 512->2048", 512, 2048, 1, 1, 7, 3),
    ("1x1 1024->2048 s2", 1024, 2048, 1, 2, 14, 1),
    ("1x1 2048->512", 2048, 512, 1, 1, 7, 2),
]
METHODS = ["fp32", "tf32", "fp16", "torch_hpc", "im2col", "implicit"]
DEFAULT_METHODS = METHODS[:4]
LABELS = {"fp32": "cuDNN fp32 (TF32 off)", "tf32": "cuDNN TF32", "fp16": "fp16 channels_last",
          "torch_hpc": "torch_hpc.conv2d", "im2col": "patches x emulated GEMM",
          "implicit": "implicit-GEMM kernel"}
PASSES = ["forward", "input grad", "weight grad"]


def implicit_conv2d(x, w, b, stride=1, padding=0):
    with torch_hpc.backends.conv.flags(implicit_gemm=True):
        return torch_hpc.conv2d(x, w, b, stride, padding)


def conv_call(method):
    if method == "torch_hpc":
        return torch_hpc.conv2d
    if method == "implicit":  # torch_hpc.backends.conv.implicit_gemm on (its backward keeps the route)
        return implicit_conv2d
    if method == "im2col":
        return lambda x, w, b, stride=1, padding=0: torch_hpc.conv._conv(2, x, w, b, stride, padding, 1, 1,
                                                                        products=True)
    return F.conv2d


def prepare(layer, method, batch, scale, device, seed, channels_last=False):
    name, cin, cout, k, stride, size, _ = layer
    size = max(k, size // scale)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, cin, size, size, device=device, generator=g)
    w = torch.randn(cout, cin, k, k, device=device, generator=g) / math.sqrt(cin * k * k)
    if method == "fp16":
        x = x.half().contiguous(memory_format=torch.channels_last)
        w = w.half().contiguous(memory_format=torch.channels_last)
    elif channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), w.requires_grad_(), {"stride": stride, "padding": k // 2}


def flops(x, w, y):
    return 2.0 * y.numel() * w.shape[1] * w.shape[2] * w.shape[3]


def pass_fn(method, passname, x, w, kw):
    fn = conv_call(method)
    if passname == "forward":
        return lambda: fn(x, w, None, **kw)
    y = fn(x, w, None, **kw)
    grad = torch.randn_like(y)
    target = x if passname == "input grad" else w
    return lambda: torch.autograd.grad(y, target, grad, retain_graph=True)


def exact_fraction(fn, device):
    """Share of torch_hpc's emulated outputs that one more call of fn sends to the exact path."""
    torch_hpc.exact_path_stats(device, reset=True)
    fn()
    return torch_hpc.exact_path_stats(device, reset=True)["fraction"]


def accuracy(layer, method, batch, scale, device, seed, samples):
    """Normwise errors vs fp64 of the output and both gradients on the first samples."""
    x, w, kw = prepare(layer, method, batch, scale, device, seed)
    x = x.detach()[:samples].float().contiguous().requires_grad_()
    w = w.detach().float().contiguous().requires_grad_()
    if method == "fp16":
        x, w = x.half().requires_grad_(), w.half().requires_grad_()
    y = conv_call(method)(x, w, None, **kw)
    grad = torch.randn(y.shape, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1))
    gx, gw = torch.autograd.grad(y, (x, w), grad.to(y.dtype))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = F.conv2d(x64, w64, None, **kw)
    gx64, gw64 = torch.autograd.grad(y64, (x64, w64), grad.double())
    rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()  # noqa: E731
    return {"forward": rel(y, y64), "input grad": rel(gx, gx64), "weight grad": rel(gw, gw64)}


def kernel_breakdown(layer, args, device, top=8):
    """Each pass of torch_hpc's implicit-GEMM route under torch.profiler: its kernels' device
    time (one call after warm-up), largest first."""
    import torch.profiler as tp
    out = {}
    for passname in PASSES:
        x, w, kw = prepare(layer, "implicit", args.batch, args.scale, device, args.seed, args.channels_last)
        fn = pass_fn("implicit", passname, x, w, kw)
        time_torch(fn, [()], device, 2)
        with tp.profile(activities=[tp.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        out[passname] = print_kernels(prof, f"{layer[0]}, {passname}", top)
    return out


def print_kernels(prof, title, top):
    """Device time per kernel name of a torch.profiler run, largest first (the first top)."""
    kernels, launches = {}, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time_total
            launches[e.name] = launches.get(e.name, 0) + 1
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    print(f"  {title}: {sum(kernels.values()):.0f} us in {len(kernels)} kernels")
    for name, us in ranked:
        print(f"    {us:9.1f} us {launches[name]:4d}x  {name[:110]}")
    return ranked


def bench_layer(layer, args, device):
    row = {"layer": layer[0], "count": layer[6]}
    methods = [m for m in args.methods if device == "cuda" or m in ("fp32", "torch_hpc")]
    for passname in PASSES:
        fns, work = {}, None
        for method in methods:
            x, w, kw = prepare(layer, method, args.batch, args.scale, device, args.seed, args.channels_last)
            torch.backends.cudnn.allow_tf32 = method == "tf32"
            fns[method] = pass_fn(method, passname, x, w, kw)
            time_torch(fns[method], [()], device, args.warmup)
            if work is None:
                with torch.no_grad():
                    work = flops(x, w, conv_call(method)(x, w, None, **kw))
        samples = {m: [] for m in methods}
        rounds = 3
        for _ in range(rounds):
            for method in methods:
                torch.backends.cudnn.allow_tf32 = method == "tf32"
                samples[method] += time_torch(fns[method], [()], device, max(1, args.reps // rounds))
        torch.backends.cudnn.allow_tf32 = False
        for method in methods:
            seconds = statistics.median(samples[method])
            row.setdefault(method, {})[passname] = {"seconds": seconds, "tflops": work / seconds / 1e12,
                                                    "exact_fraction": exact_fraction(fns[method], device)}
        del fns
    for method in methods:
        torch.backends.cudnn.allow_tf32 = method == "tf32"
        errors = accuracy(layer, method, args.batch, args.scale, device, args.seed, args.samples)
        torch.backends.cudnn.allow_tf32 = False
        for passname in PASSES:
            row[method][passname]["error"] = errors[passname]
    return row


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


def resnet50(classes=1000):
    layers, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                   nn.MaxPool2d(3, 2, 1)], 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = 4 * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def network(name, batch, scale, device):
    """(model, input, loss function) for a whole-network step."""
    g = torch.Generator(device=device).manual_seed(0)
    if name == "resnet50":
        size = max(32, 224 // scale)
        x = torch.randn(batch, 3, size, size, device=device, generator=g)
        y = torch.randint(0, 1000, (batch,), device=device, generator=g)
        return resnet50().to(device), x, lambda out: F.cross_entropy(out, y)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    from insitu_superres import SuperResolution
    size = max(16, 256 // scale)
    x = torch.randn(batch, size, size, device=device, generator=g)
    target = torch.randn(batch, size, size, device=device, generator=g)
    return SuperResolution().to(device), x, lambda out: F.mse_loss(out, target)


def network_step(name, precision, args, device):
    """Median seconds of a training step, after warm-up."""
    torch.manual_seed(0)
    model, x, loss_fn = network(name, args.batch, args.scale, device)
    if args.channels_last and x.dim() == 4:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if precision in ("torch_hpc", "implicit", "implicit-auto"):
        torch_hpc.emulate_fp32(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = []
    torch_hpc.exact_path_stats(device, reset=True)
    try:
        switch = {"implicit": True, "implicit-auto": "auto"}.get(precision, False)
        with torch_hpc.backends.conv.flags(implicit_gemm=switch):
            for i in range(args.warmup + args.reps):
                sync()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x)).backward()
                opt.step()
                sync()
                if i >= args.warmup:
                    seconds.append(time.perf_counter() - t0)
        fraction = torch_hpc.exact_path_stats(device, reset=True)["fraction"]
        if args.profile and device == "cuda" and precision.startswith("implicit"):
            import torch.profiler as tp
            with torch_hpc.backends.conv.flags(implicit_gemm=switch), \
                    tp.profile(activities=[tp.ProfilerActivity.CUDA]) as prof:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x)).backward()
                opt.step()
                sync()
            print_kernels(prof, f"{name} step, {precision}", 15)
    finally:
        torch.backends.cudnn.allow_tf32 = False
    return statistics.median(seconds), fraction


def bench_networks(args, device):
    precisions = ["fp32", "tf32", "torch_hpc"] if device == "cuda" else ["fp32", "torch_hpc"]
    if device == "cuda" and "implicit" in args.methods:
        precisions += ["implicit", "implicit-auto"]
    out = {}
    for name in args.networks:
        steps = {p: network_step(name, p, args, device) for p in precisions}
        times = {p: t for p, (t, _) in steps.items()}
        out[name] = {p: {"ms_per_step": 1e3 * t, "speedup_vs_fp32": times["fp32"] / t, "exact_fraction": e}
                     for p, (t, e) in steps.items()}
        print(f"{name}: " + ", ".join(f"{p} {1e3 * t:.2f} ms/step ({times['fp32'] / t:.2f}x fp32"
                                      + (f", exact path {100 * e:.3g} %" if p.startswith(("torch_hpc", "implicit")) else "")
                                      + ")" for p, (t, e) in steps.items()), flush=True)
    return out


def summarize(rows, methods):
    """Per method: time of the whole network's convolutions (each layer times its count), forward
    + both gradients, as a ratio to cuDNN fp32; and the slowest layer's ratio."""
    out = {}
    total = lambda r, m: sum(r[m][p]["seconds"] for p in PASSES)  # noqa: E731
    base = sum(r["count"] * total(r, "fp32") for r in rows)
    for m in methods:
        if not all(m in r for r in rows):
            continue
        mine = sum(r["count"] * total(r, m) for r in rows)
        per_layer = [total(r, "fp32") / total(r, m) for r in rows]
        out[m] = {"speedup_vs_fp32_all_layers": base / mine, "slowest_layer_vs_fp32": min(per_layer),
                  "slowest_layer": rows[per_layer.index(min(per_layer))]["layer"]}
    return out


def print_table(rows, methods, out=sys.stdout):
    present = [m for m in methods if all(m in r for r in rows)]
    print(f"{'layer':>20} {'pass':>12} | " + " | ".join(f"{LABELS[m]:>26}" for m in present), file=out)
    for r in rows:
        for p in PASSES:
            cells = [f"{r[m][p]['tflops']:7.3g} TF/s err {r[m][p]['error']:.1e}"
                     + (f" ex {100 * r[m][p]['exact_fraction']:.2g}%" if r[m][p]["exact_fraction"] else "")
                     for m in present]
            print(f"{r['layer']:>20} {p:>12} | " + " | ".join(f"{c:>26}" for c in cells), file=out)


def plot(rows, methods, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), sharey=True)
    present = [m for m in methods if m != "fp32" and all(m in r for r in rows)]
    for ax, p in zip(axes, PASSES):
        for i, m in enumerate(present):
            ratios = [r["fp32"][p]["seconds"] / r[m][p]["seconds"] for r in rows]
            ax.bar([j + 0.8 * i / len(present) for j in range(len(rows))], ratios, 0.8 / len(present), label=LABELS[m])
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["layer"] for r in rows], rotation=90, fontsize=6)
        ax.set_title(f"{p}: speed vs cuDNN fp32", fontsize=9)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--scale", type=int, default=1, help="divide every input size by this (quick runs)")
    p.add_argument("--layers", nargs="*", default=None,
                   help="names or indices (0 = the stem) of RESNET50 layers (default: all; the flag "
                        "alone: none)")
    p.add_argument("--networks", nargs="*", default=[], choices=["resnet50", "superres"],
                   help="also time whole training steps of these networks")
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=METHODS,
                   help="im2col: the emulated products on every layer (torch_hpc.conv2d takes them "
                        "only for large pointwise layers), to measure where they would win; implicit: "
                        "torch_hpc.conv2d with torch_hpc.backends.conv.implicit_gemm on")
    p.add_argument("--channels-last", action="store_true",
                   help="inputs and weights (layers; model and input with --networks) in channels_last, "
                        "for every method")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--samples", type=int, default=4, help="batch samples the accuracy uses")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--profile", action="store_true",
                   help="print each pass's kernels (torch.profiler) for the implicit-GEMM route, per layer, and "
                        "one training step's with --networks")
    args = p.parse_args(argv)
    device = args.device
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    layers = [layer for i, layer in enumerate(RESNET50)
              if args.layers is None or layer[0] in args.layers or str(i) in args.layers]
    card = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
    print(f"# ResNet-50 convolutions, batch {args.batch}, input {224 // args.scale}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, on {card}, "
          f"torch {torch.__version__}, {datetime.date.today()}", flush=True)
    rows, tf32 = [], torch.backends.cudnn.allow_tf32
    try:
        for i, layer in enumerate(layers):
            print(f"[{i + 1}/{len(layers)}] {layer[0]} ...", file=sys.stderr, flush=True)
            rows.append(bench_layer(layer, args, device))
            if args.profile and device == "cuda":
                rows[-1]["implicit_kernels"] = kernel_breakdown(layer, args, device)
            if device == "cuda":
                torch.cuda.empty_cache()
        summary = {}
        if rows:
            print_table(rows, args.methods)
            summary = summarize(rows, args.methods)
            print(f"\nsummary (forward + both gradients, layers weighted by their count): "
                  f"{json.dumps(summary, indent=1)}")
        networks = bench_networks(args, device) if args.networks else {}
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"conv-{device}{'-' + args.tag if args.tag else ''}")
    meta = {"card": card, "device": device, "torch": torch.__version__, "date": str(datetime.date.today()),
            "command": " ".join(["python", sys.argv[0]] + (sys.argv[1:] if argv is None else argv)),
            **vars(args)}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "rows": rows, "networks": networks}, f, indent=1)
    if rows:
        plot(rows, args.methods, stem + ".png", f"ResNet-50 convolutions, batch {args.batch}, {card}, {meta['date']}")
    print(f"wrote {stem}.json{' and ' + stem + '.png' if rows else ''}")
    return {"rows": rows, "summary": summary, "networks": networks}


if __name__ == "__main__":
    main()
