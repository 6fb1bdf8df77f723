"""nn drop-ins: nn.Linear and nn.Conv1d/2d/3d computed with the emulated fp32 product, and a
model converter."""
import torch

from . import conv, ops

_ops = torch.ops.torch_hpc


class Linear(torch.nn.Linear):
    """torch.nn.Linear computed with torch_hpc.linear (same parameters and state_dict).

    On CUDA the fp16 splits of the weight are cached: one split of its rows (forward) and one of
    its columns (input gradient), each 4 bytes per weight element plus padding, i.e. up to twice
    the fp32 weight's memory in all. They are made again only when the weight changes (its data
    pointer or version counter moves: optimizer steps, in-place copies), so repeated forwards
    (inference, gradient accumulation) skip the weight's split. Under torch.compile, during CUDA
    graph capture, under autocast, and for products small enough to run on cuBLAS SGEMM (see
    torch_hpc.backends.gemm.sgemm_fallback) the cache is bypassed. Set `cache_weight_splits = False` on
    a module (or the class) to turn it off; `clear_weight_split_cache()` frees it.
    """

    cache_weight_splits = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self._can_cache(input):
            return _CachedSplitLinear.apply(input, self.weight, self.bias, self)
        try:
            return ops.linear(input, self.weight, self.bias)
        except ValueError:  # bad input: nn.Linear's own error, as a drop-in must raise
            return torch.nn.functional.linear(input, self.weight, self.bias)

    def clear_weight_split_cache(self) -> None:
        self.__dict__.pop("_weight_splits", None)

    def _can_cache(self, input: torch.Tensor) -> bool:
        # cheapest first: small products (SGEMM fallback) leave after the size rule
        w = self.weight
        return (isinstance(input, torch.Tensor) and self.cache_weight_splits and w.is_cuda
                and input.device == w.device
                and input.dtype == torch.float32 and w.dtype == torch.float32 and w.dim() == 2
                and input.dim() >= 1 and input.shape[-1] == w.shape[1] and w.numel() > 0
                and input.numel() > 0
                and not torch.compiler.is_compiling()
                and ops.emulates(w, 1, input.numel() // w.shape[1], w.shape[0], w.shape[1])
                and not torch.cuda.is_current_stream_capturing()
                and not torch.is_autocast_enabled("cuda"))

    def _weight_split(self, which: str):
        """Planes of the weight's rows ("rows", forward: B = W^T) or columns ("cols", backward:
        B = W), made again when the weight has changed since they were cached."""
        w = self.weight
        key = (w.data_ptr(), w._version, tuple(w.shape), tuple(w.stride()), w.device)
        cache = self.__dict__.setdefault("_weight_splits", {})
        hit = cache.get(which)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                planes = _ops.split_planes.default(w if which == "rows" else w.t())
            cache[which] = hit = (key, planes)
        return hit[1]


class _CachedSplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, module):
        x2 = input.reshape(-1, input.shape[-1])
        out = _ops.mm_planes.default(x2, weight.t(), *module._weight_split("rows"))
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(x2, weight)
        ctx.module, ctx.input_shape = module, input.shape
        ctx.bias_shape = None if bias is None else bias.shape
        return out.view(*input.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, weight.shape[0])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # create_graph: keep the product differentiable
                grad_input = ops.mm(g2, weight)
            else:
                grad_input = _ops.mm_planes.default(g2, weight, *ctx.module._weight_split("cols"))
            grad_input = grad_input.view(ctx.input_shape)
        # the same products and reductions as autograd through torch_hpc.linear, bit for bit
        if ctx.needs_input_grad[1]:
            grad_weight = ops.mm(x2.t(), g2).t()
        if ctx.bias_shape is not None and ctx.needs_input_grad[2]:
            grad_bias = grad.sum_to_size(ctx.bias_shape)
        return grad_input, grad_weight, grad_bias, None


class _ConvMixin:
    """nn.Conv*d's forward with torch_hpc.conv*d (padding modes other than zeros pad first,
    as nn.Conv*d does)."""

    _hpc_conv = None

    def _conv_forward(self, input, weight, bias):
        try:
            if self.padding_mode != "zeros":
                padded = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                                 mode=self.padding_mode)
                return self._hpc_conv(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
            return self._hpc_conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        except ValueError:  # bad input: nn.Conv*d's own error, as a drop-in must raise
            return super()._conv_forward(input, weight, bias)


class Conv1d(_ConvMixin, torch.nn.Conv1d):
    """torch.nn.Conv1d computed with torch_hpc.conv1d (same parameters and state_dict)."""
    _hpc_conv = staticmethod(conv.conv1d)


class Conv2d(_ConvMixin, torch.nn.Conv2d):
    """torch.nn.Conv2d computed with torch_hpc.conv2d (same parameters and state_dict)."""
    _hpc_conv = staticmethod(conv.conv2d)


class Conv3d(_ConvMixin, torch.nn.Conv3d):
    """torch.nn.Conv3d computed with torch_hpc.conv3d (same parameters and state_dict)."""
    _hpc_conv = staticmethod(conv.conv3d)


_CONVERTED = {torch.nn.Linear: Linear, torch.nn.Conv1d: Conv1d, torch.nn.Conv2d: Conv2d,
              torch.nn.Conv3d: Conv3d}


def emulate_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Makes every exact torch.nn.Linear and nn.Conv1d/2d/3d in `model` (subclasses are left
    alone) its torch_hpc.nn counterpart, in place: the modules, their Parameters and hooks stay
    the same objects, so optimizers built before keep working. Idempotent; returns `model`."""
    for module in model.modules():
        converted = _CONVERTED.get(type(module))
        if converted is not None:
            module.__class__ = converted
    return model
