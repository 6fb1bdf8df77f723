"""Short versions of the examples (the distributed ones run under launchers in test_optim.py)."""
import sys

import pytest

import torch_hpc
from launchers import EXAMPLES, run_example, torchrun_supported

sys.path.insert(0, str(EXAMPLES))


def test_tf32_vs_emulated_shows_tf32_failing(tmp_path):
    import tf32_vs_emulated
    errors = tf32_vs_emulated.main(["--n", "64", "--steps", "60", "--device", "cpu", "--out", str(tmp_path)])
    end = {k: v[-1] for k, v in errors.items()}
    assert end["torch_hpc"] <= 2 * end["fp32"] + 1e-7, end
    assert end["tf32"] > 100 * end["torch_hpc"] and end["bf16"] > end["tf32"], end
    assert (tmp_path / "tf32_vs_emulated-cpu.png").exists()


def _run(launcher, n, script, *args):
    if not torch_hpc.build_info().get("mpi"):
        pytest.skip("torch_hpc was built without MPI")
    if launcher == "torchrun" and not torchrun_supported():
        pytest.skip("torchrun launches need an MPICH-family MPI or Open MPI 4")
    return run_example(launcher, n, script, *args)


def test_insitu_superres_network_beats_plain_dct(tmp_path):
    report = _run("mpiexec", 2, "insitu_superres.py", "--steps", 100, "--out", tmp_path)
    assert report["mean_network_error"] < 0.95 * report["mean_dct_error"], report
    assert (tmp_path / "insitu_superres.png").exists()


def test_insitu_superres_under_torchrun_sync(tmp_path):
    report = _run("torchrun", 2, "insitu_superres.py", "--steps", 60, "--mode", "sync", "--out", tmp_path)
    assert report["launcher"] == "torchrun" and report["mean_network_error"] < report["mean_dct_error"]


def test_train_digits_with_emulated_fp32():
    report = _run("mpiexec", 2, "train_digits.py", "--mode", "sync", "--steps", 150, "--emulate-fp32")
    assert report["emulate_fp32"] and report["final_accuracy"] >= 0.95


def test_train_digits_resnet_in_sync_mode():
    """The residual CNN (the benchmark's GPU-bound model) trains and its BatchNorm buffers end
    equal on every rank."""
    report = _run("mpiexec", 2, "train_digits.py", "--mode", "sync", "--model", "resnet", "--width", 8,
                  "--steps", 60, "--eval-every", 30, "--device", "cpu")
    assert report["model"] == "resnet" and report["final_accuracy"] >= 0.85, report["final_accuracy"]
    assert len({r["checksum"] for r in report["ranks"]}) == 1
