"""Switches of torch_hpc's GEMM, convolutions and attention, in the style of torch.backends.cuda.matmul:

    torch_hpc.backends.gemm.sgemm_fallback = False   # keep the emulation for small products
    torch_hpc.backends.gemm.kernel = "sm80"          # "auto" | "sm80" | "sm90"
    torch_hpc.backends.gemm.block_exponents = True   # A's rows: an exponent per 64 k where needed
    torch_hpc.backends.conv.implicit_gemm = "auto"   # the implicit-GEMM kernel where it wins
    torch_hpc.backends.attention.fused = True        # the fused attention kernel on every call it covers

sgemm_fallback (default True): products too small to fill the GPU (fewer 128x128 output tiles
than the kernel needs per SM) run on cuBLAS SGEMM with TF32 off, which is faster there and
fp32-accurate. kernel (default "auto"): the tensor-core kernel, "sm90" (wgmma + TMA, compute
capability 9.0 builds with sm_90a) where it runs, else "sm80" (mma.sync); forcing "sm90" where
it cannot run raises at the next product. block_exponents (default False): rows of A whose values
span more than one fp16 window (cross-entropy gradients, softmax outputs) are split with one
exponent per 64 values instead of falling back to the exact fp64 path (sm90 kernel and CPU;
docs/gemm.md); off until its kernel has been measured on a GPU. The values live in the compiled
library and are read by every call, on every thread.

The environment variables TORCH_HPC_SGEMM_FALLBACK (0/1) and TORCH_HPC_GEMM_KERNEL give the
defaults at import; nothing reads them later (see docs/switches.md).
"""
import contextlib
import os

from . import _C


class _Gemm:
    @property
    def sgemm_fallback(self) -> bool:
        return _C._get_sgemm_fallback()

    @sgemm_fallback.setter
    def sgemm_fallback(self, enabled: bool) -> None:
        _C._set_sgemm_fallback(bool(enabled))

    @property
    def kernel(self) -> str:
        return _C._get_gemm_kernel()

    @kernel.setter
    def kernel(self, name: str) -> None:
        _C._set_gemm_kernel(name)

    @property
    def block_exponents(self) -> bool:
        return _C._get_block_exponents()

    @block_exponents.setter
    def block_exponents(self, enabled: bool) -> None:
        _C._set_block_exponents(bool(enabled))

    @contextlib.contextmanager
    def flags(self, sgemm_fallback: bool | None = None, kernel: str | None = None,
              block_exponents: bool | None = None):
        """Sets the given switches inside the `with` block and restores them after."""
        before = (self.sgemm_fallback, self.kernel, self.block_exponents)
        try:
            if sgemm_fallback is not None:
                self.sgemm_fallback = sgemm_fallback
            if kernel is not None:
                self.kernel = kernel
            if block_exponents is not None:
                self.block_exponents = block_exponents
            yield
        finally:
            self.sgemm_fallback, self.kernel, self.block_exponents = before

    def __repr__(self):
        return (f"torch_hpc.backends.gemm(sgemm_fallback={self.sgemm_fallback}, kernel={self.kernel!r}, "
                f"block_exponents={self.block_exponents})")


gemm = _Gemm()


class _Conv:
    """implicit_gemm: where 2-D convolutions with channel counts that are multiples of 64 (groups
    1) run torch_hpc's implicit-GEMM kernel (compute capability 9.0, sm_90a builds). False (the
    default): never, cuDNN fp32 with TF32 off; "auto": each pass (forward, input gradient,
    weight gradient) where the measured table in torch_hpc/conv.py says the kernel beats cuDNN
    fp32, cuDNN's otherwise; True: every pass the kernel covers (measurements). docs/conv.md."""

    _implicit_gemm: bool | str = False

    @property
    def implicit_gemm(self) -> bool | str:
        return self._implicit_gemm

    @implicit_gemm.setter
    def implicit_gemm(self, value: bool | str) -> None:
        if value not in (False, True, "auto") or isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"torch_hpc.backends.conv.implicit_gemm: expected False, True or 'auto', got {value!r}")
        self._implicit_gemm = value

    @contextlib.contextmanager
    def flags(self, implicit_gemm: bool | str | None = None):
        before = self.implicit_gemm
        try:
            if implicit_gemm is not None:
                self.implicit_gemm = implicit_gemm
            yield
        finally:
            self.implicit_gemm = before

    def __repr__(self):
        return f"torch_hpc.backends.conv(implicit_gemm={self.implicit_gemm!r})"


conv = _Conv()


class _Attention:
    """fused: where torch_hpc.scaled_dot_product_attention (and F.scaled_dot_product_attention
    under fp32_emulation()) runs the fused emulated kernel on calls it covers (docs/attention.md).
    "auto" (the default): calls with at least 2^25 query-key pairs (batch x heads x L x S, half
    of it when causal), below which torch's fp32 SDPA was measured faster; True: every call it
    covers; False: never, torch's own call. Lives in the compiled library (read by every call)."""

    @property
    def fused(self) -> bool | str:
        return _C._get_fused_attention()

    @fused.setter
    def fused(self, value: bool | str) -> None:
        if not (isinstance(value, bool) or value == "auto"):
            raise ValueError(f"torch_hpc.backends.attention.fused: expected False, True or 'auto', got {value!r}")
        _C._set_fused_attention(value)

    @contextlib.contextmanager
    def flags(self, fused: bool | str | None = None):
        before = self.fused
        try:
            if fused is not None:
                self.fused = fused
            yield
        finally:
            self.fused = before

    def __repr__(self):
        return f"torch_hpc.backends.attention(fused={self.fused!r})"


attention = _Attention()


def _defaults_from_environment(env=os.environ) -> None:
    value = env.get("TORCH_HPC_SGEMM_FALLBACK")
    if value is not None:
        if value not in ("0", "1"):
            raise ValueError(f"torch_hpc: TORCH_HPC_SGEMM_FALLBACK must be 0 or 1, got {value!r}")
        gemm.sgemm_fallback = value == "1"
    value = env.get("TORCH_HPC_GEMM_KERNEL")
    if value is not None:
        try:
            gemm.kernel = value
        except ValueError:
            raise ValueError("torch_hpc: TORCH_HPC_GEMM_KERNEL must be auto, sm80 or sm90, got "
                             f"{value!r}") from None


_defaults_from_environment()
