"""torch_hpc: fp32 GEMM emulated with 3xfp16 on tensor cores, for ordinary PyTorch code.

Importing torch_hpc loads the compiled ops; it never initialises MPI.
"""
from ._build import build_info, load_ops as _load_ops

_load_ops()

from . import attention, backends, conv, distributed, nn, ops, optim  # noqa: E402
from .attention import scaled_dot_product_attention  # noqa: E402
from .conv import conv1d, conv2d, conv3d  # noqa: E402
from .nn import emulate_fp32  # noqa: E402
from .ops import bmm, exact_path_stats, linear, matmul, mm, split  # noqa: E402
from .precision import fp32_emulation, is_fp32_emulation_enabled  # noqa: E402

__version__ = "0.1.0"
__all__ = ["mm", "bmm", "matmul", "linear", "conv1d", "conv2d", "conv3d", "scaled_dot_product_attention", "split", "exact_path_stats", "nn", "ops", "emulate_fp32", "build_info", "backends",
           "distributed", "fp32_emulation", "is_fp32_emulation_enabled", "optim"]
