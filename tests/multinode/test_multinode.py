"""torch_hpc across two nodes (network namespaces, see conftest.py), 2 ranks per node: the MPI
world and rendezvous under mpiexec with a host list and under multi-node torchrun, hpc_mpi
collectives and DDP, the asynchronous exchange (no lost update; a sleeping rank on one node does
not stall the other), and the digits example in both modes."""
import sys

import pytest

import torch_hpc
from launchers import EXAMPLES, WORKERS, mpich_family, parse_reports
from torch_hpc.distributed import launcher

pytestmark = pytest.mark.skipif(not torch_hpc.build_info().get("mpi"),
                                reason="torch_hpc was built without MPI")


def _mpiexec(nodes, n, *args):
    """mpiexec across both nodes, ranks filled node by node (2 per node), started from node 0;
    Hydra starts its proxy on each node through the namespace stand-in for ssh."""
    if not mpich_family():
        pytest.skip("the host-list launch uses MPICH's Hydra (-launcher-exec)")
    exe, _, count, python = launcher.mpiexec_command(n, python=True)
    return [exe, "-launcher", "ssh", "-launcher-exec", nodes.rsh, "-hosts", ",".join(nodes.addresses),
            "-ppn", "2", "-n", count, python, *map(str, args)]


def _ok(proc, reports, n):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sorted(r["rank"] for r in reports) == list(range(n)), proc.stdout[-2000:] + proc.stderr[-3000:]


def _torchrun(nodes, script, *args, timeout=90, port=29461):
    """torchrun --nnodes=2 --nproc_per_node=2 on each node, c10d rendezvous on node 0's address
    (a join that does not complete in 60 s fails instead of waiting torchrun's 600 s)."""
    if not mpich_family():
        pytest.skip("joining torchrun's processes across nodes is tested with MPICH")
    procs = []
    for node, address in enumerate(nodes.addresses):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={nodes.addresses[0]}:{port}", "--rdzv-id=thpc",
               f"--rdzv-conf=is_host={int(node == 0)},join_timeout=60", f"--local-addr={address}",
               str(script), *args]
        procs.append((nodes.popen(node, cmd), cmd))
    done = [nodes.finish(p, timeout, cmd) for p, cmd in procs]
    return [(d.returncode, d.stdout, d.stderr) for d in done]


def test_mpiexec_world_across_nodes(nodes):
    proc = nodes.run(0, _mpiexec(nodes, 4, WORKERS / "mpi_world_worker.py"))
    reports = parse_reports(proc.stdout)
    _ok(proc, reports, 4)
    for r in reports:
        assert r["size"] == 4 and r["sum"] == 10 and r["ranks"] == [0, 1, 2, 3]
        assert r["shared_memory_peers"] == 2  # two ranks per node share memory, not four
        assert r["rma"] and r["launcher"] == "mpich"


def test_torchrun_world_across_nodes(nodes):
    outs = _torchrun(nodes, WORKERS / "mpi_world_worker.py")
    for code, out, err in outs:
        assert code == 0, out[-2000:] + err[-4000:]
    reports = [r for _, out, _ in outs for r in parse_reports(out)]
    assert sorted(r["rank"] for r in reports) == [0, 1, 2, 3]
    for r in reports:
        assert r["size"] == 4 and r["sum"] == 10 and r["launcher"] == "torchrun"
        assert r["shared_memory_peers"] == 2 and r["launch_rank"] == r["rank"]


def test_launch_info_and_master_address_across_nodes(nodes):
    code = ("import json, os, torch.distributed as dist, torch_hpc; "
            "i = torch_hpc.distributed.init(); "
            "print('RESULT ' + json.dumps({'rank': i.rank, 'size': i.world_size, 'local_rank': i.local_rank, "
            "'local_size': i.local_world_size, 'master': os.environ['MASTER_ADDR']}), flush=True); "
            "dist.barrier(); dist.destroy_process_group()")
    cmd = _mpiexec(nodes, 4, "-c", code)
    proc = nodes.run(0, cmd)
    reports = parse_reports(proc.stdout)
    _ok(proc, reports, 4)
    for r in reports:
        assert r["size"] == 4 and r["local_size"] == 2 and r["local_rank"] == r["rank"] % 2
        assert r["master"] == nodes.addresses[0], r  # reachable from node 1, not a loopback name


def test_collectives_and_ddp_across_nodes(nodes):
    proc = nodes.run(0, _mpiexec(nodes, 4, WORKERS / "collectives_worker.py", "cpu"), timeout=150)
    lines = parse_reports(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sorted({line["rank"] for line in lines}) == [0, 1, 2, 3]
    failures = [f"rank {line['rank']} {line['case']}: {f}" for line in lines for f in line["failures"]]
    assert not failures, "\n".join(failures[:20])
    assert {line["case"] for line in lines} >= {"all_reduce-float32", "ddp_vs_gloo", "send_recv-int64"}


def test_async_exchange_loses_no_update_across_nodes(nodes):
    proc = nodes.run(0, _mpiexec(nodes, 4, WORKERS / "rma_worker.py", "exact"))
    reports = parse_reports(proc.stdout)
    _ok(proc, reports, 4)
    for r in reports:
        assert r["max_error"] == 0.0 and r["exchanges"] == 100 and r["skipped"] == 1


def test_sleeping_rank_on_one_node_does_not_stall_the_other(nodes):
    # 3 ranks: 0 and 1 on node 0 (rank 1 sleeps 8 s), rank 2 on node 1 accumulating into it
    proc = nodes.run(0, _mpiexec(nodes, 3, WORKERS / "rma_worker.py", "progress", 8))
    reports = parse_reports(proc.stdout)
    _ok(proc, reports, 3)
    sleeper = next(r for r in reports if r["rank"] == 1)
    assert all(c >= 100 for c in sleeper["completed_before_wake"]), sleeper
    assert all(r["total"] == r["expected"] for r in reports)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_digits_across_nodes(nodes, mode):
    proc = nodes.run(0, _mpiexec(nodes, 4, EXAMPLES / "train_digits.py", "--quiet", "--mode", mode,
                                 "--steps", "300"), timeout=150)
    reports = parse_reports(proc.stdout)
    assert proc.returncode == 0 and len(reports) == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert reports[0]["world_size"] == 4 and reports[0]["final_accuracy"] >= 0.95, reports[0]
