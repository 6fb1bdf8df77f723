"""DistributedOptimizer under real launchers: equivalence with DDP and synchronous SGD,
convergence on the digits data, bounded staleness, checkpoints and failures that end the job.
(The RMA exchange alone: test_rma_exchange.py.)"""
import time

import pytest
import torch

import torch_hpc
from launchers import EXAMPLES, mpich_family, run_example, run_script, run_workers, \
    torchrun_supported

pytestmark = pytest.mark.skipif(not torch_hpc.build_info().get("mpi"),
                                reason="torch_hpc was built without MPI")


def _skip_torchrun_without_rma():
    """Open MPI 4's torchrun join has no RMA windows (UCX osc refuses joined processes)."""
    if not torchrun_supported():
        pytest.skip("torchrun launches need an MPICH-family MPI or Open MPI 4")
    if not mpich_family():
        pytest.skip("one-sided windows across torchrun-joined processes need an MPICH-family MPI")


def _ok(proc, reports, n):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sorted(r["rank"] for r in reports) == list(range(n)), proc.stderr[-3000:]


@pytest.mark.parametrize("launcher,n", [("mpiexec", 2), ("mpiexec", 4), ("torchrun", 2)])
def test_equivalence_with_ddp_and_sync_sgd(launcher, n):
    if launcher == "torchrun":
        _skip_torchrun_without_rma()
    proc, reports = run_workers(launcher, n, "optim_worker.py", "equivalence", timeout=180)
    _ok(proc, reports, n)
    for r in reports:
        assert r["sync_vs_ddp"] <= 1e-6 and r["bucketed_vs_ddp"] <= 1e-6
        assert r["fp16_vs_ddp"] <= 1e-3
        assert r["async_s0_vs_sync_sgd"] <= 1e-5 and r["async_s0_momentum_vs_ddp"] <= 1e-5
        assert r["async_finite"] and r["async_moved"] < 0.1
        assert r["max_staleness_seen"]["async-0"] == 0
        assert r["sync_buffer_error"] <= 1e-5, r  # float buffers averaged every step
        assert r["sync_bytes_before_first_step"] == r["sync_model_bytes"], r  # ... launched in backward
        assert r["async_buffer_error"] <= 1e-5, r
        for mode in ("sync", "async"):
            assert r[f"{mode}_surface_lr"] == [0.025, 0.05] and r[f"{mode}_surface_finite"]
    for key in ("checksum", "async_checksum", "state_checksum", "sync_surface_checksum",
                "async_surface_checksum"):
        assert len({r[key] for r in reports}) == 1, key  # every rank ends equal


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_equivalence_cuda():
    proc, reports = run_workers("mpiexec", 2, "optim_worker.py", "equivalence", "--device", "cuda",
                                timeout=180)
    _ok(proc, reports, 2)
    for r in reports:
        assert r["sync_vs_ddp"] <= 1e-6 and r["async_s0_vs_sync_sgd"] <= 1e-5


def test_bad_arguments_raise_clear_errors():
    proc, reports = run_workers("mpiexec", 2, "optim_worker.py", "errors", timeout=120)
    _ok(proc, reports, 2)
    for r in reports:
        assert not r["failures"], r["failures"]
        assert r["checks"] >= 15


def test_exception_on_one_rank_ends_async_job():
    start = time.monotonic()
    proc, _ = run_workers("mpiexec", 2, "optim_worker.py", "fail", timeout=90)
    assert proc.returncode != 0 and "planted failure on rank 1" in proc.stderr
    assert time.monotonic() - start < 60


def run_digits(n, *args, launcher="mpiexec"):
    return run_example(launcher, n, "train_digits.py", *args)


def _same_final_parameters(report):
    assert len({r["checksum"] for r in report["ranks"]}) == 1, report["ranks"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_digits_converges_on_four_ranks(mode):
    report = run_digits(4, "--mode", mode, "--steps", 300)
    assert report["final_accuracy"] >= 0.95, report
    _same_final_parameters(report)
    assert all(r["skipped_updates"] == 0 for r in report["ranks"])


def test_digits_under_torchrun():
    _skip_torchrun_without_rma()
    report = run_digits(2, "--mode", "async", "--steps", 200, launcher="torchrun")
    assert report["launcher"] == "torchrun" and report["final_accuracy"] >= 0.95, report
    _same_final_parameters(report)


@pytest.mark.parametrize("staleness", [0, 2])
def test_staleness_bound_holds_with_a_straggler(staleness):
    report = run_digits(4, "--mode", "async", "--staleness", staleness, "--straggler", "1:3",
                         "--steps", 80)
    leads = [r["max_staleness_seen"] for r in report["ranks"]]
    assert max(leads) <= staleness, leads
    _same_final_parameters(report)


def test_checkpoint_resume_continues_the_loss(tmp_path):
    ck = tmp_path / "digits.pt"
    first = run_digits(4, "--mode", "async", "--steps", 150, "--checkpoint", ck, "--eval-every", 50)
    initial = sum(r["first_losses"][0] for r in first["ranks"]) / 4
    ended = sum(sum(r["last_losses"]) / 5 for r in first["ranks"]) / 4
    resumed = run_digits(4, "--mode", "async", "--steps", 20, "--resume", ck, "--seed", 1)
    restart = sum(sum(r["first_losses"]) / 5 for r in resumed["ranks"]) / 4
    assert resumed["start_step"] == 150
    assert restart < 0.2 * initial and restart < ended + 0.2, (initial, ended, restart)
    assert resumed["final_accuracy"] >= 0.95
    # Another world size: the global copy is resharded.
    two = run_digits(2, "--mode", "sync", "--steps", 5, "--resume", ck)
    assert two["final_accuracy"] >= 0.95
    # Another model: refused.
    proc, _ = run_script("mpiexec", 2, EXAMPLES / "train_digits.py", "--quiet", "--width", 128,
                         "--resume", ck)
    assert proc.returncode != 0 and "checkpoint is of a different model" in proc.stderr


@pytest.mark.parametrize("n", [2, 4])
def test_async_exchange_moves_the_model_size_per_step_at_any_world_size(n):
    """Sharded windows: each rank sends (and reads back) the whole parameter vector once per
    step, so the bytes per rank and step are the model's size whatever the number of ranks."""
    import sys
    sys.path.insert(0, str(EXAMPLES))
    import train_digits
    model = train_digits.make_model("mlp", 256)
    numel = sum(t.numel() for t in list(model.parameters()) + list(model.buffers())
                if torch.is_floating_point(t))
    report = run_digits(n, "--mode", "async", "--steps", 40, "--eval-every", 1000)
    for r in report["ranks"]:
        stats = r["exchange"]
        assert stats["exchanges"] == 40, stats
        assert stats["bytes_sent"] == 40 * 4 * numel, (stats, numel)
        assert stats["bytes_received"] >= 40 * 4 * numel
        assert 0 < stats["exchange_seconds"] and 0 <= stats["wait_seconds"] < report["train_seconds"]


@pytest.mark.parametrize("backend", ["hpc_mpi", "gloo"])
def test_digits_ddp_baseline(backend):
    report = run_digits(2, "--mode", "ddp", "--backend", backend, "--steps", 200)
    assert report["final_accuracy"] >= 0.95, report
    _same_final_parameters(report)
    assert all(r["exchange"] is None for r in report["ranks"])
