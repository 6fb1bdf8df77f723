"""Shared pieces of the GEMM tests: devices, references in fp64, error measures."""
import pytest
import torch

import torch_hpc  # noqa: F401  (registers the ops)


def has_kernel(device: str) -> bool:
    key = "CUDA" if device == "cuda" else "CPU"
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("torch_hpc::mm", key)
    return registered and (device != "cuda" or torch.cuda.is_available())


DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not has_kernel("cuda"),
                                                  reason="no CUDA kernel registered or no GPU")),
]

requires_cuda = pytest.mark.skipif(not has_kernel("cuda"), reason="no CUDA kernel registered or no GPU")


def generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(*shape, device="cpu", seed=0, gen=None):
    gen = gen or generator(device, seed)
    return torch.randn(*shape, device=device, generator=gen)


def ref64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a.double(), b.double())


def rel_error(c: torch.Tensor, ref: torch.Tensor) -> float:
    return ((c.double() - ref).norm() / ref.norm()).item()


def fp32_reference_product(a, b):
    """torch's own fp32 product with TF32 off (the baseline the emulation must match)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return torch.matmul(a, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def elementwise_bound_ratio(c, a, b, ref):
    """max_ij |C - C64| / (|A||B|)_ij over entries with (|A||B|)_ij > 0."""
    scale = torch.matmul(a.double().abs(), b.double().abs())
    err = (c.double() - ref).abs()
    mask = scale > 0
    return (err[mask] / scale[mask]).max().item() if mask.any() else 0.0


def contract_constant(k: int) -> float:
    """c in |C - C64| <= c (|A||B|): fp32 GEMM's worst case gamma_K ~ K 2^-24, plus the split's
    own ~2^-22-per-product floor (lo*lo dropped, lo rounded)."""
    return k * 2.0**-24 + 2.0**-20


def poison_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))
