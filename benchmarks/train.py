"""Time to accuracy and throughput of DistributedOptimizer (sync, async, async staleness=2)
against DDP (on hpc_mpi and on gloo; on GPUs also on NCCL, with DistributedOptimizer sync over
NCCL), with and without a straggler, at several rank counts, on sklearn's digits
(examples/train_digits.py under mpiexec).

    python benchmarks/train.py                       # 2 and 4 ranks, 3 runs per configuration
    python benchmarks/train.py --ranks 2 4 8 16      # a 16-core node
    python benchmarks/train.py --model cnn --width 512 --steps 600   # heavier model
    python benchmarks/train.py --device cuda --ranks 1 2 4 8 --model resnet --width 64 --batch-size 64  # a GPU per rank
    python benchmarks/train.py --device cuda --ranks 2 --configs "DDP hpc_mpi" sync async  # ranks sharing a GPU

On --device cuda every rank takes the GPU of its local rank (shared round-robin where there are
fewer GPUs than ranks, which NCCL refuses: leave its configurations out there); the ratios are
then to DDP on NCCL.

The straggler (rank 1) sleeps as long as its own measured step time after every step (2x
slower). Each cell is the median of the runs; rank 0 evaluates the global parameters on the
held-out split every --eval-every steps. Prints a table, writes JSON and a PNG of accuracy
against wall time.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

from torch_hpc.distributed.launcher import mpiexec_command

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "examples", "train_digits.py")
# (name, --mode, --backend, --staleness). The baseline of the ratios: DDP on NCCL on GPUs (one
# per rank), DDP on hpc_mpi on CPUs.
CONFIGS = [("DDP hpc_mpi", "ddp", "hpc_mpi", None), ("DDP gloo", "ddp", "gloo", None),
           ("DDP nccl", "ddp", "nccl", None), ("sync", "sync", "hpc_mpi", None),
           ("sync nccl", "sync", "nccl", None), ("async", "async", "hpc_mpi", None),
           ("async s=2", "async", "hpc_mpi", 2)]
NCCL_CONFIGS = {name for name, _, backend, _ in CONFIGS if backend == "nccl"}


def default_configs(device):
    """Every configuration the device can run (NCCL ones need GPUs)."""
    return [name for name, *_ in CONFIGS if device == "cuda" or name not in NCCL_CONFIGS]


def baseline(configs):
    return "DDP nccl" if "DDP nccl" in configs else "DDP hpc_mpi"


def mpiexec(n):
    cmd = mpiexec_command(n, bind_to_none=True, python=True)
    version = subprocess.run([cmd[0], "--version"], capture_output=True, text=True).stdout
    return cmd, version.splitlines()[0] if version else "?"


def run(args, ranks, mode, backend, staleness, straggler, seed, report_path):
    cmd, _ = mpiexec(ranks)
    cmd += [EXAMPLE, "--quiet", "--mode", mode, "--backend", backend, "--model", args.model,
            "--width", str(args.width), "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--eval-every",
            str(args.eval_every), "--seed", str(seed), "--device", args.device,
            "--report", report_path, "--target", str(args.target)]
    if staleness is not None:
        cmd += ["--staleness", str(staleness)]
    if straggler:
        cmd += ["--straggler", "1:2"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(report_path) as f:
        return json.load(f)


def exchange_cost(runs):
    """Per step, median over runs of the mean over ranks: bytes sent, ms in the exchange thread,
    ms step() waited for it (DistributedOptimizer's exchange_stats; empty for DDP)."""
    per_run = []
    for r in runs:
        stats = [x["exchange"] for x in r["ranks"] if x.get("exchange")]
        if not stats:
            return {}
        steps = [max(1, s["exchanges"]) for s in stats]
        per_run.append({
            "exchange_bytes_per_step": statistics.mean(s["bytes_sent"] / n for s, n in zip(stats, steps)),
            "exchange_ms_per_step": None if stats[0]["exchange_seconds"] is None else
            statistics.mean(1e3 * s["exchange_seconds"] / n for s, n in zip(stats, steps)),
            "wait_ms_per_step": statistics.mean(1e3 * s["wait_seconds"] / n for s, n in zip(stats, steps))})
    return {k: None if per_run[0][k] is None else statistics.median(p[k] for p in per_run)
            for k in per_run[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn", "resnet"])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS per rank (measured: 4 ranks x 4 threads on 16 cores made "
                        "async 5x slower; intra-op threads spin and starve the exchange thread)")
    p.add_argument("--configs", nargs="*", default=None, choices=[c[0] for c in CONFIGS],
                   help="default: every configuration the device runs (the NCCL ones on --device cuda)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="run nothing: combine the rows of earlier runs' JSON files (e.g. the 16-rank "
                        "DDP gloo cells measured apart) into one table, JSON and PNG")
    args = p.parse_args(argv)
    if args.configs is None:
        args.configs = default_configs(args.device)
    if args.device != "cuda" and NCCL_CONFIGS & set(args.configs):
        sys.exit(f"--configs {sorted(NCCL_CONFIGS & set(args.configs))}: NCCL runs with --device cuda only")
    if args.merge:
        rows, curves, meta = merged(args.merge)
        args.ranks = sorted({r["ranks"] for r in rows})
        args.target, args.model = meta["target"], meta["model"]
        return report(args, rows, curves, meta)

    _, mpi_version = mpiexec(2)
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    if args.device == "cuda":
        import torch
        machine += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    print(f"# digits: DistributedOptimizer vs DDP, ranks {args.ranks}, {args.model} width {args.width}, "
          f"{args.steps} steps/rank, {args.repeats} runs each, {machine}, {mpi_version}, "
          f"{datetime.date.today()}", flush=True)
    rows, curves = [], {}
    configs = [c for c in CONFIGS if c[0] in args.configs]
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            for straggler in (False, True):
                for name, mode, backend, staleness in configs:
                    runs = []
                    for seed in range(args.repeats):
                        r = run(args, ranks, mode, backend, staleness, straggler, seed,
                                os.path.join(tmp, "r.json"))
                        runs.append(r)
                        tta = r["time_to_target"]
                        print(f"  {ranks:2d} ranks {name:12s} straggler={straggler!s:5s} seed {seed}: "
                              f"accuracy {r['final_accuracy']:.4f}, time to {args.target:.0%} "
                              f"{'%.2f s' % tta if tta else '-'}, {r['train_seconds']:.2f} s", flush=True)
                    reached = [r["time_to_target"] for r in runs if r["time_to_target"] is not None]
                    cost = exchange_cost(runs)
                    rows.append({**cost,
                        "ranks": ranks, "config": name, "straggler": straggler,
                        "time_to_target_s": statistics.median(reached) if len(reached) == len(runs) else None,
                        "steps_per_s_per_rank": statistics.median(
                            statistics.mean(x["steps_per_second"] for x in r["ranks"]) for r in runs),
                        "final_accuracy": statistics.median(r["final_accuracy"] for r in runs),
                        "train_seconds": statistics.median(r["train_seconds"] for r in runs),
                        "runs": [{k: r[k] for k in ("final_accuracy", "time_to_target", "train_seconds")}
                                 for r in runs]})
                    curves[f"{ranks} ranks {name}{' +straggler' if straggler else ''}"] = runs[0]["curve"]

    meta = {"machine": machine, "mpi": mpi_version, "date": str(datetime.date.today()),
            "command": " ".join(["python", sys.argv[0]] + (sys.argv[1:] if argv is None else argv)),
            **vars(args)}
    return report(args, rows, curves, meta)


def merged(paths):
    """Rows and curves of several train.py JSON files (a later file's cell replaces an earlier's)."""
    cells, curves, metas = {}, {}, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        metas.append(data["meta"])
        cells.update({(r["ranks"], r["config"], r["straggler"]): r for r in data["rows"]})
        curves.update(data["curves"])
    order = {name: i for i, (name, *_) in enumerate(CONFIGS)}
    rows = sorted(cells.values(), key=lambda r: (r["ranks"], r["straggler"], order[r["config"]]))
    if len({(m["machine"], m["mpi"], m["target"]) for m in metas}) != 1:
        sys.exit("--merge: the files come from different machines, MPIs or targets")
    meta = {**metas[0], "command": " ; ".join(m["command"] for m in metas),
            "merged_from": [os.path.basename(p) for p in paths]}
    return rows, curves, meta


def report(args, rows, curves, meta):
    """Prints the table and the ratios to the baseline; writes JSON and PNG."""
    def cell(ranks, config, straggler, key):
        return next((r[key] for r in rows if r["ranks"] == ranks and r["config"] == config
                     and r["straggler"] == straggler), None)

    def ratio(a, b):
        return a / b if a and b else None

    base = baseline({r["config"] for r in rows})

    print(f"\n{'ranks':>5} {'config':12s} {'straggler':>9s} | {'time to ' + format(args.target, '.0%'):>12s} | "
          f"{'steps/s/rank':>12s} | {'accuracy':>8s} | {'KiB/step':>8s} | {'exch ms':>7s} | {'wait ms':>7s}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for r in rows:
        tta = f"{r['time_to_target_s']:.2f} s" if r["time_to_target_s"] else "not reached"
        kib = r.get("exchange_bytes_per_step")
        print(f"{r['ranks']:>5} {r['config']:12s} {str(r['straggler']):>9s} | {tta:>12s} | "
              f"{r['steps_per_s_per_rank']:12.1f} | {r['final_accuracy']:8.4f} | "
              f"{fmt(kib and kib / 1024, '8.1f'):>8s} | {fmt(r.get('exchange_ms_per_step'), '7.3f'):>7s} | "
              f"{fmt(r.get('wait_ms_per_step'), '7.3f'):>7s}")
    summary = {}
    for ranks in args.ranks:
        others = [c for c in ("sync", "sync nccl", "async", "DDP gloo", "DDP hpc_mpi") if c != base]
        summary[str(ranks)] = {
            f"{c} / {base} steps/s per rank, no straggler":
                ratio(cell(ranks, c, False, "steps_per_s_per_rank"), cell(ranks, base, False, "steps_per_s_per_rank"))
            for c in others if cell(ranks, c, False, "steps_per_s_per_rank") is not None}
        summary[str(ranks)][f"async / {base} time to target, straggler"] = ratio(
            cell(ranks, "async", True, "time_to_target_s"), cell(ranks, base, True, "time_to_target_s"))
        for c in ("sync", "sync nccl", "async"):
            a, b = cell(ranks, c, False, "final_accuracy"), cell(ranks, base, False, "final_accuracy")
            if a is not None and b is not None:
                summary[str(ranks)][f"{c} - {base} final accuracy, points"] = 100 * (a - b)
    print(f"\nsummary: {json.dumps(summary, indent=1)}")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train-{args.model}-{'-'.join(map(str, args.ranks))}ranks"
                                  f"{'-' + args.tag if args.tag else ''}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "rows": rows, "curves": curves}, f, indent=1)
    plot(rows, curves, args, stem + ".png", f"digits, {meta['machine']}, {meta['mpi']}, {meta['date']}")
    print(f"wrote {stem}.json and {stem}.png")
    return {"rows": rows, "summary": summary, "json": stem + ".json"}


def plot(rows, curves, args, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in dict.fromkeys(r["config"] for r in rows):
        pts = [r for r in rows if r["config"] == name and not r["straggler"]]
        ax1.plot([r["ranks"] for r in pts], [r["steps_per_s_per_rank"] for r in pts], "o-", label=name)
        pts = [r for r in rows if r["config"] == name and r["straggler"] and r["time_to_target_s"]]
        ax2.plot([r["ranks"] for r in pts], [r["time_to_target_s"] for r in pts], "o-", label=name)
    for ax, ylabel in ((ax1, "steps/s per rank (no straggler)"),
                       (ax2, f"time to {args.target:.0%} (s), one rank 2x slower")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    most = max(args.ranks)
    for name, curve in curves.items():
        if name.startswith(f"{most} ranks"):
            ax3.plot([c["seconds"] for c in curve], [c["accuracy"] for c in curve], label=name[len(f"{most} ranks "):],
                     linestyle="--" if "straggler" in name else "-")
    ax3.axhline(args.target, color="gray", linewidth=0.8)
    ax3.set_xlabel("wall time (s)")
    ax3.set_ylabel(f"held-out accuracy, {most} ranks")
    ax3.set_ylim(0.5, 1.0)
    ax3.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
