import pytest

import torch_hpc


@pytest.fixture(autouse=True)
def emulate_every_shape():
    """Tests exercise the emulation kernels for every shape; the SGEMM fallback for products too
    small to fill the GPU has its own test, which turns it on."""
    with torch_hpc.backends.gemm.flags(sgemm_fallback=False):
        yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Lines tests recorded for the end of the run (e.g. the PyTorch suite's counts)."""
    for line in getattr(config, "torch_hpc_summary", []):
        terminalreporter.write_line(line)
