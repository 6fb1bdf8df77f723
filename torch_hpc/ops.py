"""The emulated-fp32 ops: thin wrappers over torch.ops.torch_hpc, their fake (meta)
implementations for torch.compile, and autograd whose backward uses the same emulated product.

mm and bmm are the compiled kernels, with autograd in C++ (csrc/gemm/autograd.cpp); matmul
(torch.matmul semantics) and linear (F.linear semantics) are C++ composite ops over them.
Tensors that are not float32 reaching matmul/linear go to the ordinary PyTorch op, and so does
everything under autocast.
"""
import torch
from torch import Tensor

from . import _C  # the kernels' plane padding (TILE_ROWS, TILE_K), for the fake impls

_ops = torch.ops.torch_hpc


# Outside torch.compile the ops are entered through torch_hpc._C's direct entry points, which
# skip torch.ops' schema-driven argument parsing (microseconds per call: a small product's whole
# kernel time); they return NotImplemented for anything but plain tensors, which then take the
# torch.ops overload (subclasses with __torch_function__, proxies, an active TorchFunctionMode).
_compiling = torch.compiler.is_compiling


def mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 2-D float32 tensors, with fp32 accuracy from three fp16 tensor-core products."""
    if not _compiling():
        out = _C._mm(a, b)
        if out is not NotImplemented:
            return out
    return _ops.mm.default(a, b)


def bmm(a: Tensor, b: Tensor) -> Tensor:
    """Batched a @ b for 3-D float32 tensors (like torch.bmm)."""
    if not _compiling():
        out = _C._bmm(a, b)
        if out is not NotImplemented:
            return out
    return _ops.bmm.default(a, b)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """torch.matmul (1-D promotion, batch broadcasting) with the emulated product."""
    if not _compiling():
        out = _C._matmul(a, b)
        if out is not NotImplemented:
            return out
    return _ops.matmul.default(a, b)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear (input @ weight.T + bias) with the emulated product."""
    if not _compiling():
        out = _C._linear(input, weight, bias)
        if out is not NotImplemented:
            return out
    return _ops.linear.default(input, weight, bias)


def emulates(like: Tensor, batch: int, m: int, n: int, k: int) -> bool:
    """Whether a [batch x] (m x k) @ (k x n) product on like's device runs the emulation (not the
    SGEMM fallback); decided from sizes, no host sync."""
    if not _compiling():
        out = _C._emulates(like, batch, m, n, k)
        if out is not NotImplemented:
            return out
    return _ops.emulates.default(like, batch, m, n, k)


def split(x: Tensor):
    """The split of each row of a 2-D float32 tensor: (hi, lo, exponent, fallback) with
    row = 2**exponent * (hi + 2**-11 * lo); fallback rows are computed exactly instead."""
    return _ops.split.default(x)


def exact_path_stats(device=None, reset: bool = False) -> dict:
    """How much of torch_hpc's emulated work the exact path did on a device since the last
    reset: {"outputs": outputs the emulated products and convolutions computed, "exact_outputs":
    those the exact fp64 path recomputed (rows whose range the split's fp16 window cannot hold,
    inf/NaN; for the implicit-GEMM convolution, outputs that received an exact correction, once
    per flagged 64-value block they read: an upper bound), "fraction": their ratio}. Products that took torch's own call (the
    SGEMM fallback) are not counted. device: "cpu" or a CUDA device (default: the current one);
    on CUDA the read waits for the device. reset=True zeroes the counts after reading them."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"torch_hpc.exact_path_stats: expected a CPU or CUDA device, got {device}")
    exact, total = _ops.exact_path_counts.default(torch.empty(0, device=device), reset)
    return {"outputs": total, "exact_outputs": exact, "fraction": exact / total if total else 0.0}


def _check_matmul_args(a: Tensor, b: Tensor, dims: int, op: str) -> None:
    # Mirrors csrc/gemm/gemm.cpp so that fake tensors raise the same errors as the kernels.
    for name, t in (("a", a), ("b", b)):
        if t.dtype != torch.float32:
            raise ValueError(f"torch_hpc.{op}: expected argument '{name}' to have dtype "
                             f"torch.float32, got {t.dtype}")
    if a.device != b.device:
        raise ValueError(f"torch_hpc.{op}: expected arguments 'a' and 'b' on the same device, "
                         f"got {a.device} and {b.device}")
    for name, t in (("a", a), ("b", b)):
        if t.dim() != dims:
            raise ValueError(f"torch_hpc.{op}: expected argument '{name}' to be {dims}-D, got a "
                             f"{t.dim()}-D tensor of shape {list(t.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"torch_hpc.{op}: inner dimensions differ: 'a' has shape "
                         f"{list(a.shape)} and 'b' has shape {list(b.shape)}")
    if dims == 3 and a.shape[0] != b.shape[0]:
        raise ValueError(f"torch_hpc.{op}: batch sizes differ: 'a' has shape {list(a.shape)} "
                         f"and 'b' has shape {list(b.shape)}")


@torch.library.register_fake("torch_hpc::mm")
def _mm_fake(a, b):
    _check_matmul_args(a, b, 2, "mm")
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.register_fake("torch_hpc::bmm")
def _bmm_fake(a, b):
    _check_matmul_args(a, b, 3, "bmm")
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


@torch.library.register_fake("torch_hpc::mm_bias")
def _mm_bias_fake(a, b, bias):
    _check_matmul_args(a, b, 2, "mm_bias")
    if bias.dtype != torch.float32 or bias.dim() != 1 or bias.shape[0] != b.shape[1] or bias.device != b.device:
        raise ValueError(f"torch_hpc.mm_bias: expected argument 'bias' to be a 1-D torch.float32 tensor "
                         f"of {b.shape[1]} elements on {b.device}, got {bias.dtype} of shape "
                         f"{list(bias.shape)} on {bias.device}")
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.register_fake("torch_hpc::split")
def _split_fake(x):
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"torch_hpc.split: expected argument 'x' to be a 2-D torch.float32 "
                         f"tensor, got {x.dtype} of shape {list(x.shape)}")
    rows, k = x.shape
    return (x.new_empty((rows, k), dtype=torch.float16), x.new_empty((rows, k), dtype=torch.float16),
            x.new_empty((rows,), dtype=torch.int32), x.new_empty((rows,), dtype=torch.bool))


def _round_up(v, m):
    return (v + m - 1) // m * m


# split_planes / mm_planes serve torch_hpc.nn.Linear's weight-split cache (CUDA kernels only;
# the cache is bypassed under torch.compile, these let fake tensors through all the same).
@torch.library.register_fake("torch_hpc::split_planes")
def _split_planes_fake(x):
    rows_pad, k_pad = _round_up(x.shape[0], _C.TILE_ROWS), _round_up(x.shape[1], _C.TILE_K)
    return (x.new_empty((1, rows_pad, k_pad), dtype=torch.float16),
            x.new_empty((1, rows_pad, k_pad), dtype=torch.float16),
            x.new_empty((1, rows_pad), dtype=torch.int32), x.new_empty((1, rows_pad), dtype=torch.int32))


@torch.library.register_fake("torch_hpc::mm_planes")
def _mm_planes_fake(a, b, b_hi, b_lo, b_exponent, b_fallback):
    _check_matmul_args(a, b, 2, "mm_planes")
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.register_fake("torch_hpc::conv2d_implicit")
def _conv2d_implicit_fake(input, weight, stride, padding, dilation):
    n, _, h, w = input.shape
    k, _, r, s = weight.shape
    oh = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return input.new_empty((n, k, oh, ow)).contiguous(memory_format=torch.channels_last)


@torch.library.register_fake("torch_hpc::images_as_channels")
def _images_as_channels_fake(x, multiple):
    n, c, h, w = x.shape
    return x.new_empty((c, -(-n // multiple) * multiple, h, w)).contiguous(memory_format=torch.channels_last)


_MAX_ATTENTION_DIM = 128  # csrc/gemm/checks.h
_ATTENTION_QUERY_BLOCK = 128  # rows of the saved log-sum-exp are padded to it (csrc/gemm/cuda/attention.h)


def _check_attention_args(query, key, value, mask, op):
    # Mirrors csrc/gemm/checks.cpp (check_attention_args) so that fake tensors raise its errors.
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype != torch.float32:
            raise ValueError(f"torch_hpc.{op}: expected argument '{name}' to have dtype torch.float32, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"torch_hpc.{op}: expected argument '{name}' to be 4-D (batch, heads, length, dim), "
                             f"got shape {list(t.shape)}")
        if t.device != query.device:
            raise ValueError(f"torch_hpc.{op}: expected argument '{name}' on {query.device}, got {t.device}")
    b, h, length, e = query.shape
    if not (key.shape[0] == b == value.shape[0] and key.shape[1] == value.shape[1] and key.shape[1] > 0
            and h % key.shape[1] == 0 and key.shape[2] == value.shape[2] and key.shape[3] == e):
        raise ValueError(f"torch_hpc.{op}: expected 'key' (B, H / G, S, E) and 'value' (B, H / G, S, Ev) for "
                         f"'query' (B, H, L, E), got query {list(query.shape)}, key {list(key.shape)}, "
                         f"value {list(value.shape)}")
    if length == 0 or key.shape[2] == 0 or b * h == 0:
        raise ValueError(f"torch_hpc.{op}: expected nonempty batch, heads and lengths, got query "
                         f"{list(query.shape)} and key {list(key.shape)}")
    if not (0 < e <= _MAX_ATTENTION_DIM and 0 < value.shape[3] <= _MAX_ATTENTION_DIM):
        raise ValueError(f"torch_hpc.{op}: expected head dimensions from 1 to {_MAX_ATTENTION_DIM}, got {e} (query, key) "
                         f"and {value.shape[3]} (value)")
    if mask is not None:
        if mask.dtype != torch.float32 or mask.dim() != 4 or mask.device != query.device:
            raise ValueError(f"torch_hpc.{op}: expected argument 'mask' to be a 4-D torch.float32 tensor on "
                             f"{query.device}, got {mask.dtype} of shape {list(mask.shape)} on {mask.device}")
        full = (b, h, length, key.shape[2])
        if any(m not in (1, f) for m, f in zip(mask.shape, full)):
            raise ValueError(f"torch_hpc.{op}: argument 'mask' of shape {list(mask.shape)} does not broadcast "
                             f"to {list(full)}")


@torch.library.register_fake("torch_hpc::attention")
def _attention_fake(query, key, value, mask, is_causal, scale):
    _check_attention_args(query, key, value, mask, "attention")
    return query.new_empty((*query.shape[:3], value.shape[3]))


@torch.library.register_fake("torch_hpc::attention_forward")
def _attention_forward_fake(query, key, value, mask, is_causal, scale):
    _check_attention_args(query, key, value, mask, "attention_forward")
    b, h, length, _ = query.shape
    rows = -(-length // _ATTENTION_QUERY_BLOCK) * _ATTENTION_QUERY_BLOCK
    return query.new_empty((b, h, length, value.shape[3])), query.new_empty((b, h, rows))


@torch.library.register_fake("torch_hpc::attention_backward")
def _attention_backward_fake(grad, query, key, value, out, lse, mask, is_causal, scale):
    _check_attention_args(query, key, value, mask, "attention_backward")
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)
