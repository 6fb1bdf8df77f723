"""Whole models, fp32 (TF32 off) against the same model under torch_hpc.fp32_emulation(), and
converted with torch_hpc.emulate_fp32(model) (its nn.Linear modules swapped; other products stay
fp32), in the same run: time per training step (forward + backward + Adam) and the loss curves
of every seed.

    python benchmarks/models.py                                   # every model on the GPU
    python benchmarks/models.py --models mlp --steps 5 --device cpu   # smoke test

Models:
  transformer-4096  2 pre-LN blocks, d_model 4096, 32 heads, seq 2048, batch 8, attention written
                    with matmul and softmax (not fused), learning the next state of Lorenz-96
                    trajectories (40 variables, F = 8, RK4) integrated here
  transformer-1024  the same with 4 blocks, d_model 1024, 16 heads
  encoder-4096      nn.TransformerEncoder (pre-LN, GELU, no dropout, causal): 2 layers, d_model 4096,
                    32 heads, seq 2048, batch 4, the same Lorenz-96 task; its attention is
                    F.scaled_dot_product_attention inside nn.MultiheadAttention
  encoder-1024      the same with 4 layers, d_model 1024, 16 heads, batch 8
  lm-head           a language model's output layer: the Lorenz-96 state embedded to d_model 4096
                    (Linear, GELU, LayerNorm), then Linear(4096, 32000) and cross-entropy over a
                    32000-word vocabulary (the next value of variable 0, binned), 8192 tokens
  mlp               64 -> 256 -> 256 -> 10 on sklearn's digits, batch 256
Each step is timed alone (synchronised); the three runs of a seed (fp32, the mode, the converted
model) advance side by side, one step each in rotating order, so that the host's and the GPU's
drift falls on all three; the speed-up is the ratio of the medians after the warm-up steps. The emulated loss must stay inside the fp32 seeds' spread (widened by the
emulated seeds' own spread), as in benchmarks/mlp.py. Table + JSON + PNG.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import torch_hpc

LORENZ_VARS = 40
MODELS = ["transformer-4096", "transformer-1024", "encoder-4096", "encoder-1024", "lm-head", "mlp"]


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, causal):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        attention = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, d, heads, blocks):
        super().__init__()
        self.embed = nn.Linear(LORENZ_VARS, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.head = nn.Linear(d, LORENZ_VARS)

    def forward(self, x):
        s = x.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, causal)
        return self.head(h)


class Encoder(nn.Module):
    """torch's own pre-LN nn.TransformerEncoder, causal, between Lorenz-96 embeddings."""

    def __init__(self, d, heads, blocks):
        super().__init__()
        self.embed = nn.Linear(LORENZ_VARS, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.head = nn.Linear(d, LORENZ_VARS)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.head(self.encoder(self.embed(x), mask=mask, is_causal=True))


def lorenz96(batch, steps, seed, dt=0.01, forcing=8.0):
    """Trajectories [batch, steps, 40] of Lorenz-96 (RK4), after a spin-up, normalised."""
    g = torch.Generator().manual_seed(seed)
    x = forcing + 0.01 * torch.randn(batch, LORENZ_VARS, generator=g, dtype=torch.float64)

    def f(x):
        return (torch.roll(x, -1, 1) - torch.roll(x, 2, 1)) * torch.roll(x, 1, 1) - x + forcing

    out = []
    for i in range(500 + steps):
        k1 = f(x)
        k2 = f(x + 0.5 * dt * k1)
        k3 = f(x + 0.5 * dt * k2)
        k4 = f(x + dt * k3)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if i >= 500:
            out.append(x)
    traj = torch.stack(out, 1)
    return ((traj - traj.mean()) / traj.std()).float()


VOCAB = 32000


class LMHead(nn.Module):
    def __init__(self, d, vocab):
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(LORENZ_VARS, d), nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.norm(F.gelu(self.embed(x)))).flatten(0, -2)


def model_config(name):
    if name == "lm-head":
        return {"d": 4096, "vocab": VOCAB, "seq": 2048, "batch": 4, "lr": 1e-4}
    if name == "transformer-4096":
        return {"d": 4096, "heads": 32, "blocks": 2, "seq": 2048, "batch": 8, "lr": 1e-4}
    if name == "transformer-1024":
        return {"d": 1024, "heads": 16, "blocks": 4, "seq": 2048, "batch": 8, "lr": 3e-4}
    if name == "encoder-4096":
        return {"d": 4096, "heads": 32, "blocks": 2, "seq": 2048, "batch": 4, "lr": 1e-4}
    if name == "encoder-1024":
        return {"d": 1024, "heads": 16, "blocks": 4, "seq": 2048, "batch": 8, "lr": 3e-4}
    if name == "mlp":
        return {"width": 256, "batch": 256, "lr": 1e-3}
    raise KeyError(name)


PRECISIONS = ("fp32", "emulated", "converted")


def make_task(name, cfg, device):
    """(model factory, batch iterator, loss function)."""
    if name == "mlp":
        from sklearn.datasets import load_digits
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32, device=device) / 16
        y = torch.tensor(digits.target, device=device)
        w = cfg["width"]

        def model():
            return nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))

        def batches(seed):
            g = torch.Generator(device="cpu").manual_seed(seed)
            while True:
                idx = torch.randint(0, len(x), (cfg["batch"],), generator=g).to(device)
                yield x[idx], y[idx]
        return model, batches, F.cross_entropy
    traj = lorenz96(cfg["batch"], cfg["seq"] + 1, seed=1).to(device)
    inputs, targets = traj[:, :-1], traj[:, 1:]
    if name == "lm-head":  # tokens: the next value of variable 0 in VOCAB bins over [-4, 4)
        tokens = ((targets[..., 0] + 4) / 8 * cfg["vocab"]).long().clamp(0, cfg["vocab"] - 1).flatten()

        def lm_batches(seed):
            while True:
                yield inputs, tokens
        return (lambda: LMHead(cfg["d"], cfg["vocab"])), lm_batches, F.cross_entropy

    def model():
        kind = Encoder if name.startswith("encoder") else Transformer
        return kind(cfg["d"], cfg["heads"], cfg["blocks"])

    def batches(seed):
        while True:
            yield inputs, targets
    return model, batches, F.mse_loss


def training(name, cfg, precision, seed, steps, device):
    """One training run as a generator: each next() runs one step and gives (loss, seconds)."""
    make_model, batches, loss_fn = make_task(name, cfg, device)
    torch.manual_seed(seed)
    model = make_model().to(device)
    if precision == "converted":
        torch_hpc.emulate_fp32(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    # the fp32 baseline runs with no context at all (as a user's fp32 code does)
    mode = torch_hpc.fp32_emulation(cpu=device.type == "cpu") if precision == "emulated" \
        else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    data = batches(seed)
    for _ in range(steps):
        x, y = next(data)
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with mode:
            loss = loss_fn(model(x), y)
            loss.backward()
        opt.step()
        sync()
        yield loss.item(), time.perf_counter() - t0


def train_interleaved(name, cfg, seed, steps, device):
    """The three precisions' runs of one seed side by side, step by step (the order rotating
    every step), so that drift of the host's or GPU's speed falls on all of them alike.
    Gives {precision: (losses, seconds)}."""
    runs = {p: training(name, cfg, p, seed, steps, device) for p in PRECISIONS}
    out = {p: ([], []) for p in PRECISIONS}
    for step in range(steps):
        for i in range(len(PRECISIONS)):
            precision = PRECISIONS[(step + i) % len(PRECISIONS)]
            loss, seconds = next(runs[precision])
            out[precision][0].append(loss)
            out[precision][1].append(seconds)
    del runs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def outside_spread(fp32_curves, emulated_curves):
    """Steps at which an emulated loss leaves the fp32 seeds' range widened by either spread."""
    outside = 0
    for i in range(len(fp32_curves[0])):
        lo32, hi32 = min(c[i] for c in fp32_curves), max(c[i] for c in fp32_curves)
        lo_e, hi_e = min(c[i] for c in emulated_curves), max(c[i] for c in emulated_curves)
        width = max(hi32 - lo32, hi_e - lo_e, 1e-7 * abs(hi32))
        outside += any(c[i] < lo32 - width or c[i] > hi32 + width for c in emulated_curves)
    return outside


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=MODELS, choices=MODELS)
    p.add_argument("--steps", type=int, default=None, help="steps per run (transformers 8, mlp 400)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--block-exponents", action="store_true",
                   help="torch_hpc.backends.gemm.block_exponents on for the emulated runs")
    args = p.parse_args(argv)
    torch_hpc.backends.gemm.block_exponents = args.block_exponents
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# whole models, fp32 vs fp32_emulation(), on {card}, torch {torch.__version__}, "
          f"{datetime.date.today()}", flush=True)
    results = {}
    for name in args.models:
        cfg = model_config(name)
        steps = args.steps or (400 if name == "mlp" else 8)
        warmup = min(args.warmup, steps - 1)
        curves, times = ({p: [] for p in PRECISIONS} for _ in range(2))
        torch_hpc.exact_path_stats(device, reset=True)
        for seed in range(args.seeds):
            for precision, (losses, seconds) in train_interleaved(name, cfg, seed, steps, device).items():
                curves[precision].append(losses)
                times[precision].append(statistics.median(seconds[warmup:]))
                print(f"  {name} seed {seed} {precision:9s}: {times[precision][-1] * 1e3:9.2f} ms/step, "
                      f"loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
        fp32_ms = statistics.median(times["fp32"]) * 1e3
        emu_ms = statistics.median(times["emulated"]) * 1e3
        conv_ms = statistics.median(times["converted"]) * 1e3
        results[name] = {"config": cfg, "steps": steps, "fp32_ms_per_step": fp32_ms,
                         "emulated_ms_per_step": emu_ms, "speedup": fp32_ms / emu_ms,
                         "steps_outside_fp32_spread": outside_spread(curves["fp32"], curves["emulated"]),
                         "converted_ms_per_step": conv_ms, "converted_speedup": fp32_ms / conv_ms,
                         "converted_steps_outside_fp32_spread": outside_spread(curves["fp32"], curves["converted"]),
                         "exact_path": torch_hpc.exact_path_stats(device, reset=True),
                         "curves": curves, "step_seconds": times}
    print(f"\n{'model':>18} | {'fp32 ms/step':>12} | {'emulated ms/step':>16} | {'speed-up':>8} | "
          f"loss outside fp32 spread | {'emulate_fp32(model)':>19} | outside | exact path")
    for name, r in results.items():
        print(f"{name:>18} | {r['fp32_ms_per_step']:12.2f} | {r['emulated_ms_per_step']:16.2f} | "
              f"{r['speedup']:7.2f}x | {r['steps_outside_fp32_spread']:>6} of {r['steps']} steps | "
              f"{r['converted_ms_per_step']:8.2f} ({r['converted_speedup']:.2f}x) | "
              f"{r['converted_steps_outside_fp32_spread']:>7} | {100 * r['exact_path']['fraction']:.3g} %")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"models-{device.type}{'-' + args.tag if args.tag else ''}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": {"card": card, "torch": torch.__version__, "date": str(datetime.date.today()),
                            **{k: v for k, v in vars(args).items() if k != "out"}},
                   "results": results}, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        for precision, style in (("fp32", "-"), ("emulated", "--"), ("converted", ":")):
            for seed, losses in enumerate(r["curves"][precision]):
                ax.semilogy(losses, style, label=f"{precision} seed {seed}")
        ax.set_title(f"{name}: {r['speedup']:.2f}x per step", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=6)
    fig.suptitle(f"fp32 vs fp32_emulation() on {card}", fontsize=10)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    print(f"wrote {stem}.json and {stem}.png")
    return results


if __name__ == "__main__":
    main()
