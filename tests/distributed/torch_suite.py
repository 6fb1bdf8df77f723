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


def _child_skip(method):
    """The skip a test would take inside its spawned ranks, decided here in the parent: the
    decorators of torch's common_distributed that exit a rank with a skip code (too few GPUs, a
    small or odd world) are re-run around a stand-in for the test body, so that a test that would
    skip costs no spawn of its ranks (two interpreters importing torch: most of the suite's time
    on a CPU machine). Returns the skip message, or None."""
    import sys
    import types

    from torch.testing._internal import common_distributed as cd
    skippers = {f(lambda: None).__code__ for f in (cd.skip_if_no_gpu, cd.skip_if_small_worldsize,
                                                   cd.skip_if_odd_worldsize)}
    skippers |= {cd.skip_if_lt_x_gpu(2)(lambda: None).__code__,
                 cd.require_n_gpus_for_nccl_backend(2, "nccl")(lambda: None).__code__}
    codes = {v.exit_code: v.message for v in cd.TEST_SKIPS.values()}
    layer = getattr(method, "__func__", method)
    while layer is not None:
        code = getattr(layer, "__code__", None)
        if code in skippers and "func" in code.co_freevars:
            cells = [types.CellType(lambda *a, **k: None) if name == "func" else cell
                     for name, cell in zip(code.co_freevars, layer.__closure__)]
            probe = types.FunctionType(code, layer.__globals__, layer.__name__, layer.__defaults__, tuple(cells))
            try:
                probe(method.__self__)
            except SystemExit as e:
                if e.code in codes:
                    return codes[e.code]
                raise
        layer = getattr(layer, "__wrapped__", None)
    return None


class TestHpcMpiWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    def setUp(self):
        skip = _child_skip(getattr(self, self._testMethodName))
        if skip is not None:  # before the harness's own set-up: nothing to tear down
            self.skipTest(skip)
        super().setUp()
        self._spawn_processes()


if __name__ == "__main__":
    run_tests()
