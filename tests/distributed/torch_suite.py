"""PyTorch's own distributed test suite (torch.testing._internal.distributed.distributed_test,
the one torch holds gloo and NCCL to) run against hpc_mpi. Run by tests/test_torch_suite.py:

    BACKEND=hpc_mpi WORLD_SIZE=2 TEMP_DIR=$(mktemp -d) python -m pytest tests/distributed/torch_suite.py

Every rank is a process the suite spawns itself; they rendezvous through a file store, and
hpc_mpi forms their MPI world from that store.

TORCH_HPC_SUITE_AS=gloo configures the suite exactly as for gloo (so nothing is skipped for the
backend's name) while every process group is created on hpc_mpi.
"""
import os

import torch.distributed as dist

import torch_hpc  # noqa: F401  (registers hpc_mpi in every spawned process)

if os.environ.get("TORCH_HPC_SUITE_AS") == "gloo":
    os.environ["BACKEND"] = "gloo"
    _init, _new_group = dist.init_process_group, dist.new_group

    def _on_hpc_mpi(kwargs):
        if kwargs.get("backend") in (None, "gloo", dist.Backend.GLOO):
            kwargs["backend"] = "hpc_mpi"
        return kwargs

    def init_process_group(*args, **kwargs):
        return _init(*args, **_on_hpc_mpi(kwargs))

    def new_group(*args, **kwargs):
        return _new_group(*args, **_on_hpc_mpi(kwargs))

    dist.init_process_group, dist.new_group = init_process_group, new_group

from torch.testing._internal.common_utils import run_tests  # noqa: E402
from torch.testing._internal.distributed.distributed_test import (  # noqa: E402
    DistributedTest,
    TestDistBackend,
)


class TestHpcMpiWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    def setUp(self):
        super().setUp()
        self._spawn_processes()


if __name__ == "__main__":
    run_tests()
