"""Time to accuracy and throughput of DistributedOptimizer: sync vs async vs async staleness=2,
with and without a straggler, on sklearn's digits (examples/train_digits.py under mpiexec).

    python benchmarks/train.py                       # 4 ranks, 3 runs per configuration
    python benchmarks/train.py --model cnn --width 512 --steps 600   # heavier model

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
CONFIGS = [("sync", None), ("async", None), ("async", 2)]


def mpiexec(n):
    cmd = mpiexec_command(n, bind_to_none=True, python=True)
    version = subprocess.run([cmd[0], "--version"], capture_output=True, text=True).stdout
    return cmd, version.splitlines()[0] if version else "?"


def run(args, mode, staleness, straggler, seed, report_path):
    cmd, _ = mpiexec(args.ranks)
    cmd += [EXAMPLE, "--quiet", "--mode", mode, "--model", args.model,
            "--width", str(args.width), "--steps", str(args.steps), "--eval-every",
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS per rank (measured: 4 ranks x 4 threads on 16 cores made "
                        "async 5x slower; intra-op threads spin and starve the exchange thread)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args()

    _, mpi_version = mpiexec(args.ranks)
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"# DistributedOptimizer on digits: {args.ranks} ranks, {args.model} width {args.width}, "
          f"{args.steps} steps/rank, {args.repeats} runs each, {machine}, {mpi_version}, "
          f"{datetime.date.today()}", flush=True)
    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for straggler in (False, True):
            for mode, staleness in CONFIGS:
                name = mode + ("" if staleness is None else f" s={staleness}")
                runs = []
                for seed in range(args.repeats):
                    r = run(args, mode, staleness, straggler, seed, os.path.join(tmp, "r.json"))
                    runs.append(r)
                    tta = r["time_to_target"]
                    print(f"  {name:10s} straggler={straggler!s:5s} seed {seed}: accuracy "
                          f"{r['final_accuracy']:.4f}, time to {args.target:.0%} "
                          f"{'%.2f s' % tta if tta else '-'}, {r['train_seconds']:.2f} s", flush=True)
                reached = [r["time_to_target"] for r in runs if r["time_to_target"] is not None]
                row = {
                    "config": name, "straggler": straggler,
                    "time_to_target_s": statistics.median(reached) if len(reached) == len(runs) else None,
                    "steps_per_s_per_rank": statistics.median(
                        statistics.mean(x["steps_per_second"] for x in r["ranks"]) for r in runs),
                    "final_accuracy": statistics.median(r["final_accuracy"] for r in runs),
                    "train_seconds": statistics.median(r["train_seconds"] for r in runs),
                    "runs": [{k: r[k] for k in ("final_accuracy", "time_to_target", "train_seconds")}
                             for r in runs]}
                rows.append(row)
                curves[f"{name}{' +straggler' if straggler else ''}"] = runs[0]["curve"]

    def cell(config, straggler, key):
        return next(r[key] for r in rows if r["config"] == config and r["straggler"] == straggler)

    print(f"\n{'config':10s} {'straggler':>9s} | {'time to ' + format(args.target, '.0%'):>12s} | "
          f"{'steps/s/rank':>12s} | {'accuracy':>8s}")
    for r in rows:
        tta = f"{r['time_to_target_s']:.2f} s" if r["time_to_target_s"] else "not reached"
        print(f"{r['config']:10s} {str(r['straggler']):>9s} | {tta:>12s} | "
              f"{r['steps_per_s_per_rank']:12.1f} | {r['final_accuracy']:8.4f}")
    sync_tta, async_tta = cell("sync", True, "time_to_target_s"), cell("async", True, "time_to_target_s")
    summary = {
        "straggler_async_over_sync_time_to_target":
            async_tta / sync_tta if sync_tta and async_tta else None,
        "no_straggler_async_over_sync_throughput":
            cell("async", False, "steps_per_s_per_rank") / cell("sync", False, "steps_per_s_per_rank"),
        "no_straggler_accuracy_difference_points":
            100 * (cell("async", False, "final_accuracy") - cell("sync", False, "final_accuracy")),
    }
    print(f"\nsummary: {json.dumps(summary)}")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train-{args.model}-{args.ranks}ranks{'-' + args.tag if args.tag else ''}")
    meta = {"machine": machine, "mpi": mpi_version, "date": str(datetime.date.today()),
            "command": " ".join(["python"] + sys.argv), **vars(args)}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "rows": rows, "curves": curves}, f, indent=1)
    plot(curves, args.target, stem + ".png", f"digits, {args.ranks} ranks, {machine}, {meta['date']}")
    print(f"wrote {stem}.json and {stem}.png")


def plot(curves, target, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot([c["seconds"] for c in curve], [c["accuracy"] for c in curve], label=name,
                linestyle="--" if "straggler" in name else "-")
    ax.axhline(target, color="gray", linewidth=0.8)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("held-out accuracy (global parameters)")
    ax.set_ylim(0.5, 1.0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
