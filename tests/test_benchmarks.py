"""The benchmarks end to end at small sizes (numbers come from real runs of them, not here):
they run, report every case, and write their JSON and PNG."""
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import attention  # noqa: E402
import conv  # noqa: E402
import gemm  # noqa: E402
import models  # noqa: E402
import overhead  # noqa: E402
import train  # noqa: E402


def test_overhead_benchmark_reports_every_case(tmp_path):
    rows = overhead.main(["--device", "cpu", "--sizes", "8", "--calls", "5", "--rounds", "2",
                          "--out", str(tmp_path)])
    cases = {"mm", "bmm", "matmul", "linear", "mode a @ b", "mode sdpa", "nn.Linear"}
    assert {(r["case"], r["pass"]) for r in rows} == {(c, p) for c in cases for p in overhead.PASSES}
    assert all(r["torch_us"] > 0 and r["torch_hpc_us"] > 0 for r in rows)
    assert (tmp_path / "overhead-cpu.png").exists()
    assert len(json.loads((tmp_path / "overhead-cpu.json").read_text())["rows"]) == len(rows)


def test_gemm_grid_covers_the_shape_families():
    points = gemm.grid_points()
    groups = {p["group"] for p in points}
    assert groups == {"square", "skinny", "small K", "attention", "broadcast", "linear"}
    squares = [p["m"] for p in points if p["group"] == "square"]
    assert min(squares) == 128 and max(squares) == 16384
    for p in points:  # shapes are consistent products
        torch.empty(p["a"], device="meta") @ torch.empty(p["b"], device="meta")


def test_gemm_benchmark_batched_and_2d_points(tmp_path):
    rows = gemm.main(["--device", "cpu", "--sizes", "24", "--shapes", "1x40x16", "--reps", "2",
                      "--methods", "fp32", "torch_hpc", "torch_hpc_emulated", "--out", str(tmp_path)])
    assert [r["label"] for r in rows] == ["24x24x24", "1x40x16"]
    batched = gemm.bench_point(gemm.point((3, 1, 8, 16), (2, 16, 8)), "cpu", ["fp32", "torch_hpc"],
                               {}, reps=2, warmup=1, l2_bytes=2**20, seed=0)
    assert batched["batch"] == 6
    for row in rows + [batched]:
        assert row["torch_hpc"]["error"] <= 2 * row["fp32"]["error"] + 1e-7
    assert (tmp_path / "gemm-cpu.json").exists() and (tmp_path / "gemm-cpu.png").exists()


def test_models_benchmark_mlp_on_digits(tmp_path):
    pytest.importorskip("sklearn")
    results = models.main(["--models", "mlp", "--steps", "4", "--seeds", "2", "--warmup", "1",
                           "--device", "cpu", "--out", str(tmp_path)])
    r = results["mlp"]
    assert len(r["curves"]["fp32"]) == len(r["curves"]["emulated"]) == len(r["curves"]["converted"]) == 2
    assert r["steps_outside_fp32_spread"] == 0 and r["converted_steps_outside_fp32_spread"] == 0
    assert r["converted_ms_per_step"] > 0
    assert (tmp_path / "models-cpu.png").exists()


def test_lorenz96_trajectories_are_chaotic_not_constant():
    traj = models.lorenz96(batch=2, steps=300, seed=0)
    assert traj.shape == (2, 300, models.LORENZ_VARS)
    assert torch.isfinite(traj).all() and traj.std() > 0.5
    assert not torch.allclose(traj[0], traj[1])  # different initial perturbations diverge


def test_train_benchmark_runs_each_config_and_merges_runs(tmp_path):
    pytest.importorskip("sklearn")
    small = ["--ranks", "2", "--repeats", "1", "--steps", "30", "--eval-every", "10", "--target", "0.5",
             "--out", str(tmp_path)]
    ddp = train.main(small + ["--configs", "DDP hpc_mpi", "--tag", "ddp"])
    dist_opt = train.main(small + ["--configs", "async", "--tag", "async"])
    for result, config in ((ddp, "DDP hpc_mpi"), (dist_opt, "async")):
        assert {(r["config"], r["straggler"]) for r in result["rows"]} == {(config, False), (config, True)}
    merged = train.main(["--merge", ddp["json"], dist_opt["json"], "--out", str(tmp_path), "--tag", "both"])
    assert len(merged["rows"]) == 4
    ratio = merged["summary"]["2"]["async / DDP hpc_mpi steps/s per rank, no straggler"]
    assert ratio is not None and ratio > 0
    async_row = next(r for r in merged["rows"] if r["config"] == "async" and not r["straggler"])
    assert async_row["exchange_bytes_per_step"] > 0
    assert (tmp_path / "train-mlp-2ranks-both.png").exists()


def test_conv_benchmark_reports_every_pass_and_accuracy(tmp_path):
    layers = ["stem 7x7 3->64 s2", "1x1 256->64"]
    result = conv.main(["--device", "cpu", "--batch", "1", "--scale", "16", "--reps", "3", "--warmup", "1",
                        "--samples", "1", "--layers", *layers, "--out", str(tmp_path)])
    assert [r["layer"] for r in result["rows"]] == layers
    for r in result["rows"]:
        for method in ("fp32", "torch_hpc"):
            for p in conv.PASSES:
                assert r[method][p]["seconds"] > 0 and 0 < r[method][p]["error"] < 1e-5
    assert set(result["summary"]) == {"fp32", "torch_hpc"}
    assert (tmp_path / "conv-cpu.png").exists()


def test_conv_benchmark_whole_network_steps(tmp_path):
    result = conv.main(["--device", "cpu", "--batch", "2", "--scale", "8", "--reps", "1", "--warmup", "1",
                        "--layers", "--networks", "resnet50", "superres", "--out", str(tmp_path)])
    assert result["rows"] == [] and set(result["networks"]) == {"resnet50", "superres"}
    for times in result["networks"].values():
        assert set(times) == {"fp32", "torch_hpc"} and all(t["ms_per_step"] > 0 for t in times.values())
    assert sum(isinstance(m, torch.nn.Conv2d) for m in conv.resnet50().modules()) == 53


def test_attention_benchmark_needs_a_gpu_and_reports_its_rows(tmp_path, capsys):
    """On CPU the script says it needs a GPU; its table and plot take the rows it measures."""
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a GPU"):
            attention.main(["--out", str(tmp_path)])
    cell = lambda s: {"forward": {"seconds": s, "tflops": 1 / s}, "forward+backward": {"seconds": 3 * s, "tflops": 1 / s}}  # noqa: E731
    errors = {"output": 1e-7, "grad_q": 2e-7, "grad_k": 2e-7, "grad_v": 1e-7}
    rows = [{"seq": 1024, "dim": 64, "causal": c, "bh": 32, "fp32": {**cell(2.0), "errors": errors},
             "torch_hpc": {**cell(1.0), "errors": errors}} for c in (False, True)]
    attention.print_table(rows, ["fp32", "torch_hpc"])
    assert capsys.readouterr().out.count(" 2.00x") == 4
    attention.plot(rows, ["fp32", "torch_hpc"], str(tmp_path / "a.png"), "test")
    assert (tmp_path / "a.png").exists()


def test_train_benchmark_configs_follow_the_device():
    """NCCL configurations (DDP and DistributedOptimizer sync over NCCL) only on GPUs, where DDP on
    NCCL is the baseline; on CPUs DDP on hpc_mpi is."""
    assert not train.NCCL_CONFIGS & set(train.default_configs("cpu"))
    assert train.NCCL_CONFIGS <= set(train.default_configs("cuda"))
    assert train.baseline(train.default_configs("cuda")) == "DDP nccl"
    assert train.baseline(train.default_configs("cpu")) == "DDP hpc_mpi"
    with pytest.raises(SystemExit, match="NCCL runs with --device cuda only"):
        train.main(["--configs", "DDP nccl", "--device", "cpu"])


def test_train_digits_refuses_what_it_cannot_run():
    sys.path.insert(0, str(BENCHMARKS.parent / "examples"))
    import train_digits
    for argv, message in [(["--mode", "async", "--backend", "gloo"], "async runs on --backend hpc_mpi"),
                          (["--mode", "sync", "--backend", "gloo"], "sync runs on --backend hpc_mpi or nccl"),
                          (["--mode", "ddp", "--backend", "nccl", "--device", "cpu"], "nccl needs a GPU per rank")]:
        with pytest.raises(SystemExit, match=message):
            train_digits.check_args(train_digits.parse_args(argv))
    train_digits.check_args(train_digits.parse_args(["--mode", "sync", "--backend", "hpc_mpi"]))
