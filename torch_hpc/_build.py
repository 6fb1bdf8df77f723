"""Loads the compiled ops and reports how they were built."""
import json
import os

import torch

_INFO_PATH = os.path.join(os.path.dirname(__file__), "_build_info.json")
_REBUILD = "rebuild it with `pip install --no-build-isolation -e .` in the torch_hpc checkout"


def _read_info():
    try:
        with open(_INFO_PATH) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def load_ops():
    info = _read_info()
    if info is None:
        raise ImportError(f"torch_hpc: the compiled module torch_hpc._C was never built; {_REBUILD}")
    if info["torch_version"] != torch.__version__:
        raise ImportError(
            f"torch_hpc: the compiled module was built for torch {info['torch_version']}, "
            f"but torch {torch.__version__} is installed; {_REBUILD}")
    try:
        from . import _C  # noqa: F401  (registers the torch_hpc ops)
    except ImportError as e:
        raise ImportError(f"torch_hpc: the compiled module torch_hpc._C failed to load ({e}); "
                          f"{_REBUILD}") from e
    return info


def build_info():
    """How torch_hpc was built: torch version, CUDA on/off and archs, MPI on/off, plus which
    device kernels are registered in this process."""
    info = dict(_read_info() or {})
    for key in ("CPU", "CUDA"):
        info[f"{key.lower()}_kernels"] = torch._C._dispatch_has_kernel_for_dispatch_key(
            "torch_hpc::mm", key)
    return info
