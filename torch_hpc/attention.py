"""Attention with fp32 accuracy on tensor cores: torch_hpc.scaled_dot_product_attention.

Same arguments and results as F.scaled_dot_product_attention. Float32 CUDA tensors (compute
capability 8.0 or newer) with head dimensions up to 128, dropout_p == 0 and a mask that is bool
or float32 and does not require grad run a fused, flash-style kernel (csrc/gemm/cuda/attention_*):
q k^T and p v, and in backward the four gradient products, each as three fp16 tensor-core
products of split operands (hi + 2^-11 lo under one power of two per 64-row tile), softmax online
in fp32, no L x S matrix in memory. Everything else (other dtypes, CPU tensors, dropout, larger
head dimensions, masks that require grad, symbolic shapes under torch.compile's dynamic mode,
functorch transforms, deterministic algorithms with inputs that require grad, and calls smaller
than torch_hpc.backends.attention.fused = "auto" takes) runs torch's own call, which also raises
torch's errors for bad arguments. Double backward through the kernel raises NotImplementedError. Under fp32_emulation() F.scaled_dot_product_attention is routed here, so
nn.MultiheadAttention (need_weights=False) and nn.TransformerEncoderLayer get it.

Rows whose keys are all masked give 0 (as torch's kernels do). Non-finite inputs give NaN in the
rows they reach (torch gives inf or NaN there).
"""
import torch
from torch import Tensor

_ops = torch.ops.torch_hpc


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """F.scaled_dot_product_attention with the emulated fp32 products (see the module's doc)."""
    return _ops.scaled_dot_product_attention.default(query, key, value, attn_mask, dropout_p, is_causal,
                                                     scale=scale, enable_gqa=enable_gqa)
