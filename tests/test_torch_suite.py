"""PyTorch's own distributed test suite against hpc_mpi, at world size 2, in two harnesses:
as torch configures it for a third-party backend (BACKEND=hpc_mpi: tests gated on gloo's name
skip), and configured exactly as for gloo with every process group created on hpc_mpi (so the
name-gated tests run too). See tests/distributed/torch_suite.py.

A test may fail only if it is listed in UPSTREAM with the reason, which lies in how PyTorch treats
third-party backends or what the harness asserts, not in hpc_mpi (docs/hpc_mpi.md lists them)."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

import torch_hpc
from launchers import WORKERS

pytestmark = pytest.mark.skipif(not torch_hpc.build_info().get("mpi"),
                                reason="torch_hpc was built without MPI")

DDP_LOGGING = ("DDP's logger reads ProcessGroup::getBackendName(), which is 'custom' for every "
               "third-party backend (torch 2.11-2.13), while dist.get_backend() says 'hpc_mpi'")
UPSTREAM = {
    "standard": {"test_ddp_logging_data_cpu": DDP_LOGGING},
    "as_gloo": {
        "test_ddp_logging_data_cpu": DDP_LOGGING,
        "test_get_backend": "asserts that the backend's name is 'gloo' (the harness configures the "
                            "suite as for gloo)",
        "test_monitored_barrier_gloo": "torch's monitored_barrier refuses every backend but gloo; "
                                       "torch_hpc.distributed.monitored_barrier is the equivalent",
        "test_monitored_barrier_gloo_subgroup": "as test_monitored_barrier_gloo",
        "test_monitored_barrier_gloo_rank_0_timeout": "as test_monitored_barrier_gloo",
        "test_monitored_barrier_allreduce_hang": "as test_monitored_barrier_gloo",
        "test_monitored_barrier_allreduce_hang_wait_all_ranks": "as test_monitored_barrier_gloo",
        "test_monitored_barrier_failure_order": "as test_monitored_barrier_gloo",
        "test_monitored_barrier_wait_all_ranks": "as test_monitored_barrier_gloo",
    },
}


def _run_suite(tmp_path, harness):
    temp_dir = tmp_path / "suite"
    temp_dir.mkdir()
    (temp_dir / "barrier").touch()
    report = tmp_path / "suite.xml"
    env = dict(os.environ, BACKEND="hpc_mpi", WORLD_SIZE="2", TEMP_DIR=str(temp_dir),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if harness == "as_gloo":
        env["TORCH_HPC_SUITE_AS"] = "gloo"
    proc = subprocess.run([sys.executable, "-m", "pytest", str(WORKERS / "torch_suite.py"), "-q",
                           "-p", "no:cacheprovider", f"--junitxml={report}"],
                          capture_output=True, text=True, env=env, timeout=1800,
                          cwd=Path(__file__).resolve().parent)
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcomes[case.get("name")] = ("failed" if kinds & {"failure", "error"} else
                                      "skipped" if "skipped" in kinds else "passed")
    return proc, outcomes


@pytest.mark.parametrize("harness", ["standard", "as_gloo"])
def test_pytorch_distributed_suite(tmp_path, request, harness):
    proc, outcomes = _run_suite(tmp_path, harness)
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
    failed = sorted(name for name, v in outcomes.items() if v == "failed")
    allowed = UPSTREAM[harness]
    summary = getattr(request.config, "torch_hpc_summary", [])
    summary.append(f"PyTorch distributed suite on hpc_mpi ({harness}, world size 2): "
                   f"{counts['passed']} passed, {counts['failed']} failed "
                   f"({', '.join(failed) or 'none'}), {counts['skipped']} skipped")
    request.config.torch_hpc_summary = summary
    assert counts["passed"] > 50, proc.stdout[-3000:]
    unexpected = [name for name in failed if name not in allowed]
    assert not unexpected, f"failed, not an upstream limitation: {unexpected}\n" + proc.stdout[-6000:]
