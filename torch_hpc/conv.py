"""conv1d/conv2d/conv3d with F.conv*d's semantics and fp32 accuracy, as emulated matrix products.

A convolution is a product of the weight, (out_channels, in_channels/groups * kernel), with the
input's patches (im2col): the patches are gathered with Tensor.unfold and multiplied with
torch_hpc's emulated product (torch_hpc.linear; torch_hpc.matmul per group), so autograd gives
the input and weight gradients through the same emulated products, and torch.compile traces
the ops it is made of.

Where it runs:
- CPU: the emulated product, every shape (as torch_hpc.mm on CPU).
- CUDA: pointwise convolutions (kernel 1, stride 1, no padding, groups 1) are exactly a GEMM on
  the input as it lies (NCHW: weight @ x per sample; channels_last: rows of pixels @ weight^T),
  with no patch copy; they run the emulated product wherever torch_hpc's GEMM would emulate
  that size (torch.ops.torch_hpc.emulates, decided from shapes: no host sync). With
  torch_hpc.backends.conv.implicit_gemm on (off by default, not yet measured on a GPU), 2-D
  layers with channel counts that are multiples of 64 run the implicit-GEMM kernel on sm90,
  forward and both gradients (as forward convolutions, docs/conv.md).
  Everything else runs cuDNN in fp32 with TF32 off: gathering patches in memory costs more than
  it saves on the current kernels (docs/gemm.md).
Tensors that are not float32, and anything under autocast, go to F.conv*d itself.
"""
import functools
import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from . import backends, ops
from ._build import build_info

_TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def conv1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> Tensor:
    """F.conv1d with the emulated product (input (N, C, L) or (C, L))."""
    if has_torch_function((input, weight, bias)):  # FX proxies, subclasses, TorchFunctionModes
        return handle_torch_function(conv1d, (input, weight, bias), input, weight, bias, stride,
                                     padding, dilation, groups)
    return _conv(1, input, weight, bias, stride, padding, dilation, groups)


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> Tensor:
    """F.conv2d with the emulated product (input (N, C, H, W) or (C, H, W), NCHW or channels_last)."""
    if has_torch_function((input, weight, bias)):  # FX proxies, subclasses, TorchFunctionModes
        return handle_torch_function(conv2d, (input, weight, bias), input, weight, bias, stride,
                                     padding, dilation, groups)
    return _conv(2, input, weight, bias, stride, padding, dilation, groups)


def conv3d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> Tensor:
    """F.conv3d with the emulated product (input (N, C, D, H, W) or (C, D, H, W))."""
    if has_torch_function((input, weight, bias)):  # FX proxies, subclasses, TorchFunctionModes
        return handle_torch_function(conv3d, (input, weight, bias), input, weight, bias, stride,
                                     padding, dilation, groups)
    return _conv(3, input, weight, bias, stride, padding, dilation, groups)


def _emulated(tensors) -> bool:
    for t in tensors:
        if t is not None and (not isinstance(t, Tensor) or t.dtype is not torch.float32):
            return False
    return not torch.is_autocast_enabled(tensors[0].device.type)


def _routed(n, input, weight, bias, stride, padding, dilation, groups, traced):
    """fp32_emulation()'s convolutions (called from csrc/gemm/emulation_mode.cpp); traced: a
    compiler is tracing the call."""
    return _conv(n, input, weight, bias, stride, padding, dilation, groups, traced=traced)


def _conv(n, input, weight, bias, stride, padding, dilation, groups, products=False, traced=False):
    """products=True: the emulated products on CUDA too, whatever the layer (measurements)."""
    if not _emulated((input, weight, bias)):
        return _TORCH_CONV[n](input, weight, bias, stride, padding, dilation, groups)
    name = f"torch_hpc.conv{n}d"
    stride, dilation = _ints(stride, n, "stride", name, 1), _ints(dilation, n, "dilation", name, 1)
    kernel = _check(n, input, weight, bias, groups, name)
    pads = _pads(padding, kernel, stride, dilation, n, name)
    batched = input.dim() == n + 2
    x = input if batched else input.unsqueeze(0)
    sizes = [(x.shape[2 + d] + pads[d][0] + pads[d][1] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1
             for d in range(n)]
    if min(sizes) < 1:
        raise ValueError(f"{name}: the input's spatial size {list(x.shape[2:])} (padded by {pads}) "
                         f"is smaller than the dilated kernel {[dilation[d] * (kernel[d] - 1) + 1 for d in range(n)]}")
    if x.is_cuda and not products and not _pointwise_emulates(x, weight, kernel, stride, pads, groups):
        passes = _implicit_gemm_takes(n, x, weight, stride if n == 2 else (1, stride[0]), pads, groups, traced)
        if passes:
            if n == 1:  # the 2-D kernel with height 1
                out = _implicit_conv2d(x.unsqueeze(2), weight.unsqueeze(2), bias, (1, stride[0]),
                                       (0, pads[0][0]), (1, dilation[0]), passes).squeeze(2)
            else:
                out = _implicit_conv2d(x, weight, bias, stride, [p[0] for p in pads], dilation, passes)
        else:
            out = _cudnn_fp32(n, x, weight, bias, stride, pads, dilation, groups, traced)
    else:
        out = _by_products(n, x, weight, bias, kernel, stride, pads, dilation, groups, sizes)
    return out if batched else out.squeeze(0)


def _ints(value, n, what, name, least):
    values = (value,) * n if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(values) != n or not all(isinstance(v, int) and v >= least for v in values):
        raise ValueError(f"{name}: expected argument '{what}' to be an int >= {least} or {n} of them, "
                         f"got {value!r}")
    return values


def _check(n, input, weight, bias, groups, name):
    if not isinstance(input, Tensor) or input.dim() not in (n + 1, n + 2):
        raise ValueError(f"{name}: expected argument 'input' to be {n + 1}-D (unbatched) or {n + 2}-D "
                         f"(batch, channels, {n} spatial), got shape {list(getattr(input, 'shape', []))}")
    if weight.dim() != n + 2:
        raise ValueError(f"{name}: expected argument 'weight' to be {n + 2}-D (out_channels, "
                         f"in_channels/groups, {n} kernel sizes), got shape {list(weight.shape)}")
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != input.device:
            raise ValueError(f"{name}: expected argument '{what}' on the input's device {input.device}, "
                             f"got {t.device}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{name}: expected argument 'groups' to be an int >= 1, got {groups!r}")
    channels, out_channels = input.shape[-n - 1], weight.shape[0]
    if weight.shape[1] * groups != channels or out_channels % groups:
        raise ValueError(f"{name}: the input has {channels} channels and 'weight' shape "
                         f"{list(weight.shape)} with groups={groups}: expected in_channels = "
                         f"weight.shape[1] * groups and out_channels divisible by groups")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_channels):
        raise ValueError(f"{name}: expected argument 'bias' of shape ({out_channels},), got "
                         f"{list(bias.shape)}")
    kernel = tuple(weight.shape[2:])
    if min(kernel, default=1) < 1:
        raise ValueError(f"{name}: 'weight' has an empty kernel dimension: shape {list(weight.shape)}")
    return kernel


def _pads(padding, kernel, stride, dilation, n, name):
    """(before, after) zero padding per spatial dimension."""
    if padding == "valid":
        return [(0, 0)] * n
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError(f"{name}: padding='same' is not supported for strided convolutions")
        total = [dilation[d] * (kernel[d] - 1) for d in range(n)]
        return [(t // 2, t - t // 2) for t in total]  # the extra one after, as PyTorch does
    if isinstance(padding, str):
        raise ValueError(f"{name}: expected argument 'padding' to be 'same', 'valid', an int or "
                         f"{n} ints, got {padding!r}")
    return [(p, p) for p in _ints(padding, n, "padding", name, 0)]


def _pointwise_emulates(x, weight, kernel, stride, pads, groups):
    """CUDA: a 1x..x1 convolution that is a plain GEMM large enough for the emulation to win."""
    if groups != 1 or any(k != 1 for k in kernel) or any(s != 1 for s in stride) \
            or any(p != (0, 0) for p in pads):
        return False
    pixels = math.prod(x.shape[2:])
    return ops.emulates(x, 1, x.shape[0] * pixels, weight.shape[0], weight.shape[1])


def _implicit_gemm_takes(n, x, weight, stride, pads, groups, traced) -> tuple[bool, bool, bool] | None:
    """The passes the implicit-GEMM kernel takes (_implicit_passes), or None: it takes none, or
    torch_hpc.backends.conv.implicit_gemm is off, or the layer is not one its kernel covers (2-D,
    or 1-D as height 1, groups 1, channel counts multiples of 64, symmetric padding, an sm90
    device, eager)."""
    if not backends.conv.implicit_gemm or traced or torch.compiler.is_compiling():
        return None
    if n not in (1, 2) or groups != 1 or x.shape[1] % 64 or weight.shape[0] % 64 or any(p[0] != p[1] for p in pads):
        return None
    passes = _implicit_passes(x.shape, weight.shape, stride)
    if not any(passes) or not _sm90(x.device.index if x.device.index is not None else torch.cuda.current_device()):
        return None
    return passes


@functools.lru_cache(maxsize=None)
def _sm90_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0) and "sm_90a" in build_info().get("cuda_archs", [])


def _sm90(index: int) -> bool:
    return backends.gemm.kernel != "sm80" and _sm90_device(index)


def _implicit_conv2d(x, weight, bias, stride, padding, dilation, passes):
    out = _ImplicitConv2d.apply(x, weight, tuple(stride), tuple(padding), tuple(dilation), passes)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    # channels_last if the input or the weight is, as cuDNN's convolution gives it
    return out if _channels_last(x, 2) or _channels_last(weight, 2) else out.contiguous()


def _implicit_passes(x_shape, w_shape, stride) -> tuple[bool, bool, bool]:
    """Which of (forward, input gradient, weight gradient) run on the implicit-GEMM kernel; the
    others run cuDNN fp32 (TF32 off). implicit_gemm=True: all three; "auto": the passes the
    measurements (docs/conv.md) found faster than cuDNN fp32 for such a layer."""
    if backends.conv.implicit_gemm is True:
        return (True, True, True)
    return _measured_wins(x_shape[1], w_shape[0], stride)


def _measured_wins(cin, cout, stride) -> tuple[bool, bool, bool]:
    """From benchmarks/conv.py on an H100 (2026-12-07, ResNet-50's layers, batch 64,
    channels_last, benchmarks/README.md): the kernel's forward beat cuDNN fp32 on every strided
    layer with 128 or more input channels (1.05-1.61x); no other pass won reliably (gradients
    0.34-1.07x but for one layer cuDNN is slow on)."""
    return (max(stride) >= 2 and cin >= 128, False, False)


class _ImplicitConv2d(torch.autograd.Function):
    """The implicit-GEMM kernel's forward, and both gradients as forward convolutions on the same
    kernel (_input_grad_by_convs, _weight_grad_by_conv); `passes` sends any of the three to cuDNN
    fp32 instead (_implicit_passes)."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, passes):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, passes)
        if not passes[0]:
            return torch.ops.torch_hpc.conv_fp32(x, weight, None, list(stride), list(padding), list(dilation), 1)
        cl = torch.channels_last
        return _implicit_op(x.contiguous(memory_format=cl), weight.contiguous(memory_format=cl),
                            list(stride), list(padding), list(dilation))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, passes = ctx.conv
        want_x, want_w = _wanted_grads(ctx)[:2]
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable again
            grad_x, grad_w = _differentiable_grads(x, weight, grad, stride, padding, dilation, 1, want_x, want_w)
            return grad_x, grad_w, None, None, None, None
        by_cudnn = [want_x and not passes[1], want_w and not passes[2], False]
        grad_x = grad_w = None
        if any(by_cudnn):
            grad_x, grad_w, _ = torch.ops.torch_hpc.conv_fp32_backward(
                grad, x, weight, list(stride), list(padding), list(dilation), 1, by_cudnn)
            grad_x, grad_w = (g if m else None for g, m in zip((grad_x, grad_w), by_cudnn))
        if (want_x and passes[1]) or (want_w and passes[2]):
            grad = grad.contiguous(memory_format=torch.channels_last)
        if want_x and passes[1]:
            grad_x = _input_grad_by_convs(grad, weight, x.shape[2:], stride, padding, dilation, _implicit_op)
        if want_w and passes[2]:
            grad_w = _weight_grad_by_conv(x, grad, weight.shape[2:], stride, padding, dilation, _implicit_op)
        if grad_x is not None and not _channels_last(x, 2):  # in the input's memory format
            grad_x = grad_x.contiguous()
        if grad_w is not None:
            grad_w = grad_w.contiguous(memory_format=torch.channels_last if _channels_last(weight, 2)
                                       else torch.contiguous_format)
        return grad_x, grad_w, None, None, None, None


def _implicit_op(x, weight, stride, padding, dilation):
    return torch.ops.torch_hpc.conv2d_implicit(x, weight, list(stride), list(padding), list(dilation))


def _input_grad_by_convs(grad, weight, in_size, stride, padding, dilation, conv):
    """dL/dinput of F.conv2d(x, weight, None, stride, padding, dilation) (x of spatial size
    in_size) from the output gradient, as stride-1 convolutions of it: one per stride phase
    (input pixels (i, j) with i % stride_h, j % stride_w fixed), each with the taps that reach
    that phase, flipped and with in/out channels swapped. conv(x, w, stride, padding, dilation)
    is F.conv2d's signature without bias (symmetric padding); tensors channels_last."""
    cl = torch.channels_last
    phases = [[_phase(f, stride[d], padding[d], dilation[d], weight.shape[2 + d], in_size[d],
                      grad.shape[2 + d]) for f in range(min(stride[d], in_size[d]))] for d in range(2)]
    out = None
    if stride[0] * stride[1] > 1:
        out = torch.empty((grad.shape[0], weight.shape[1], *in_size), dtype=grad.dtype,
                          device=grad.device, memory_format=cl)
        if any(p is None for p in phases[0] + phases[1]):
            out.zero_()  # phases no tap reaches
    for fh, ph in enumerate(phases[0]):
        for fw, pw in enumerate(phases[1]):
            if ph is None or pw is None:
                continue
            w = _taps(_taps(weight, 2, ph), 3, pw).transpose(0, 1).contiguous(memory_format=cl)
            y = conv(grad, w, [1, 1], [ph.pad, pw.pad], [ph.dilation, pw.dilation])
            y = y[:, :, ph.offset:ph.offset + ph.length, pw.offset:pw.offset + pw.length]
            if out is None:  # stride 1: the one phase is the whole gradient
                return y if y.is_contiguous(memory_format=cl) else y.contiguous(memory_format=cl)
            out[:, :, fh::stride[0], fw::stride[1]] = y
    return out


class _Phase:
    """One stride phase of an input gradient along one dimension: input positions f + stride j,
    j < length, are sum over u of grad[j + u dilation - pad + offset] weight[taps[u]]."""
    __slots__ = ("taps", "dilation", "pad", "offset", "length")

    def __init__(self, taps, dilation, pad, offset, length):
        self.taps, self.dilation, self.pad, self.offset, self.length = taps, dilation, pad, offset, length


def _taps(weight, dim, phase):
    """weight's taps of a phase along dim, in the phase's (descending) order: a strided slice of
    the flipped kernel (the taps are evenly spaced), so no index tensor and no host sync."""
    first, last = phase.taps[0], phase.taps[-1]
    step = first - phase.taps[1] if len(phase.taps) > 1 else 1
    span = weight.flip(dim).narrow(dim, weight.shape[dim] - 1 - first, first - last + 1)
    return span[(slice(None),) * dim + (slice(None, None, step),)]


def _phase(f, stride, padding, dilation, kernel, size, out_size):
    """Input position i = f + stride j receives grad[o] weight[r] where o stride = i + padding -
    r dilation: taps r with (f + padding - r dilation) % stride == 0, at o = j + t_r. In
    descending r, t_r rises by dilation / gcd(stride, dilation): a stride-1 convolution."""
    taps = [r for r in range(kernel - 1, -1, -1) if (f + padding - r * dilation) % stride == 0]
    length = (size - f + stride - 1) // stride
    if not taps or length <= 0:
        return None
    step = dilation // math.gcd(stride, dilation)
    first = (f + padding - taps[0] * dilation) // stride  # t of the first (largest) tap
    before = -first
    after = (length - 1) + first + step * (len(taps) - 1) - (out_size - 1)
    pad = max(before, after, 0)
    return _Phase(taps, step, pad, pad - before, length)


def _weight_grad_by_conv(x, grad, kernel, stride, padding, dilation, conv, channel_multiple=64):
    """dL/dweight of F.conv2d(x, weight, None, stride, padding, dilation) as one convolution:
    dW[k, c, r, s] = sum over (n, p, q) of grad[n, k, p, q] x[n, c, p stride + r dilation - pad]
    = conv(x^T, grad^T, stride=dilation, padding, dilation=stride)[c, k, r, s], with x^T the
    input's channels as images and its batch as channels (zero-padded to channel_multiple),
    grad^T likewise the weight. conv as in _input_grad_by_convs; the result is a view of its
    output."""
    def images_as_channels(t):
        t = t.contiguous(memory_format=torch.channels_last)
        if t.is_cuda:
            return torch.ops.torch_hpc.images_as_channels(t, channel_multiple)
        padded = -(-t.shape[0] // channel_multiple) * channel_multiple
        out = t.new_zeros((t.shape[1], padded, *t.shape[2:])).contiguous(memory_format=torch.channels_last)
        out[:, :t.shape[0]].copy_(t.transpose(0, 1))
        return out

    y = conv(images_as_channels(x), images_as_channels(grad), list(dilation), list(padding), list(stride))
    return y[:, :, :kernel[0], :kernel[1]].transpose(0, 1)


def _cudnn_fp32(n, input, weight, bias, stride, pads, dilation, groups, traced=False):
    padding = [p[0] for p in pads]
    if any(p[0] != p[1] for p in pads):  # 'same' with an even dilated kernel
        input = F.pad(input, [v for p in reversed(pads) for v in p])
        padding = [0] * n
    if traced or torch.compiler.is_compiling():
        return torch.ops.torch_hpc.conv_fp32(input, weight, bias, list(stride), padding, list(dilation), groups)
    # eager: torch's own call and its own backward node (which computes only the gradients a pass
    # asks for), with TF32 off while each of them runs
    with _tf32_off():
        out = _TORCH_CONV[n](input, weight, bias, stride, padding, dilation, groups)
    if out.grad_fn is not None:
        out.grad_fn.register_prehook(_backward_tf32_off)
        out.grad_fn.register_hook(_backward_tf32_restored)
    return out


_backward_lock = threading.Lock()
_backward_state = {"depth": 0, "tf32": False}  # convolution backward nodes running, switch before


# The switch itself, as torch.backends.cudnn.allow_tf32's setter sets it, but also where
# torch.testing has frozen assignments to torch.backends' flags (PyTorch's own test harness).
_set_cudnn_tf32 = torch._C._set_cudnn_allow_tf32


def _backward_tf32_off(grad_outputs):
    with _backward_lock:
        if _backward_state["depth"] == 0:
            _backward_state["tf32"] = torch.backends.cudnn.allow_tf32
        _set_cudnn_tf32(False)
        _backward_state["depth"] += 1


def _backward_tf32_restored(grad_inputs, grad_outputs):
    with _backward_lock:
        _backward_state["depth"] -= 1
        if _backward_state["depth"] == 0:
            _set_cudnn_tf32(_backward_state["tf32"])


class _tf32_off:  # noqa: N801
    """cuDNN with TF32 off inside (PyTorch's default is on for convolutions); the flag is only
    touched when it is on (convolution_backward has no argument for it)."""

    def __enter__(self):
        self._flags = None
        if torch.backends.cudnn.allow_tf32:
            self._flags = torch.backends.cudnn.flags(
                enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                deterministic=torch.backends.cudnn.deterministic, allow_tf32=False)
            self._flags.__enter__()

    def __exit__(self, *exc):
        if self._flags is not None:
            self._flags.__exit__(*exc)
        return False


# cuDNN's convolution with TF32 off in the forward and in both gradients (the backward runs
# later, where the global switch may be on again), as custom ops: torch.compile keeps them
# whole (fullgraph too) instead of tracing into a switch it cannot see.
@torch.library.custom_op("torch_hpc::conv_fp32", mutates_args=())
def _conv_fp32(input: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
               dilation: list[int], groups: int) -> Tensor:
    cudnn = torch.backends.cudnn
    return torch.ops.aten._convolution(  # TF32 off as an argument: no global switch touched
        input, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups,
        cudnn.benchmark, cudnn.deterministic, cudnn.enabled, False)


@_conv_fp32.register_fake
def _(input, weight, bias, stride, padding, dilation, groups):
    return torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, False,
                                      [0] * len(stride), groups)


@torch.library.custom_op("torch_hpc::conv_fp32_backward", mutates_args=())
def _conv_fp32_backward(grad: Tensor, input: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                        dilation: list[int], groups: int, mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(input, weight, bias) gradients where mask says so, else empty tensors."""
    with _tf32_off():
        grads = torch.ops.aten.convolution_backward(
            grad, input, weight, [weight.shape[0]], stride, padding, dilation, False,
            [0] * len(stride), groups, mask)
    return tuple(g if m else grad.new_empty(0) for g, m in zip(grads, mask))


@_conv_fp32_backward.register_fake
def _(grad, input, weight, stride, padding, dilation, groups, mask):
    shapes = (input, weight, grad.new_empty(weight.shape[0]))
    return tuple(torch.empty_like(t) if m else grad.new_empty(0) for t, m in zip(shapes, mask))


def _wanted_grads(ctx) -> list[bool]:
    """Which of (input, weight, bias) this backward pass needs: autograd.grad(y, x) asks for the
    input's alone, as torch's own convolution backward computes it (not merely every input that
    requires grad, which would double the work)."""
    edges = list(ctx.next_functions) + [(None, 0)] * 3  # one per tensor argument: none for bias=None
    return [bool(needed) and _will_run(node) for needed, (node, _) in zip(ctx.needs_input_grad[:3], edges[:3])]


def _will_run(node) -> bool:
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # a leaf under autograd.grad, or a compiler tracing the backward
        return True


def _differentiable_grads(input, weight, grad, stride, padding, dilation, groups, want_input, want_weight):
    """(input, weight) gradients (None where not wanted) through torch's own convolution with TF32
    off, differentiable again (backward with create_graph=True)."""
    wanted = [t for t, m in ((input, want_input), (weight, want_weight)) if m]
    if not wanted:
        return None, None
    with _tf32_off():
        out = _TORCH_CONV[len(stride)](input, weight, None, stride, padding, dilation, groups)
        grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
    return (next(grads) if want_input else None), (next(grads) if want_weight else None)


def _conv_fp32_setup(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv = (stride, padding, dilation, groups, bias is not None)


def _conv_fp32_grads(ctx, grad):
    input, weight = ctx.saved_tensors
    stride, padding, dilation, groups, has_bias = ctx.conv
    mask = _wanted_grads(ctx)
    mask[2] = mask[2] and has_bias
    grad_input = grad_weight = grad_bias = None
    if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable again
        grad_input, grad_weight = _differentiable_grads(input, weight, grad, stride, padding, dilation,
                                                        groups, mask[0], mask[1])
        if mask[2]:
            grad_bias = grad.sum([d for d in range(grad.dim()) if d != 1])
    elif any(mask):
        grads = torch.ops.torch_hpc.conv_fp32_backward(grad, input, weight, stride, padding, dilation,
                                                      groups, mask)
        grad_input, grad_weight, grad_bias = (g if m else None for g, m in zip(grads, mask))
    return grad_input, grad_weight, grad_bias, None, None, None, None


_conv_fp32.register_autograd(_conv_fp32_grads, setup_context=_conv_fp32_setup)


def _channels_last(x, n) -> bool:
    fmt = _CHANNELS_LAST.get(n)
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _by_products(n, x, weight, bias, kernel, stride, pads, dilation, groups, sizes):
    """The convolution as products of the weight with the input's patches; the output in the
    input's memory format, as F.conv*d gives it."""
    batch, channels = x.shape[:2]
    out_channels = weight.shape[0]
    channels_last = _channels_last(x, n)
    if all(k == 1 for k in kernel) and all(s == 1 for s in stride) and groups == 1 \
            and all(p == (0, 0) for p in pads):
        return _pointwise(n, x, weight, bias)
    if any(p != (0, 0) for p in pads):
        x = F.pad(x, [v for p in reversed(pads) for v in p])
    for d in range(n):  # (B, C, S...) -> (B, C, O..., K...)
        x = x.unfold(2 + d, dilation[d] * (kernel[d] - 1) + 1, stride[d])
        if dilation[d] > 1:
            x = x[..., ::dilation[d]]
    patch = (channels // groups) * math.prod(kernel)
    rows = batch * math.prod(sizes)
    spatial = list(range(3, 3 + n))
    taps = list(range(3 + n, 3 + 2 * n))
    cols = x.reshape(batch, groups, channels // groups, *sizes, *kernel) \
        .permute(1, 0, *spatial, 2, *taps).reshape(groups, rows, patch)
    if groups == 1:
        out = ops.linear(cols[0], weight.reshape(out_channels, patch), bias)  # (rows, out)
    else:
        w = weight.reshape(groups, out_channels // groups, patch).transpose(1, 2)
        out = ops.matmul(cols, w)  # (groups, rows, out/groups)
        out = out.permute(1, 0, 2).reshape(rows, out_channels)
        if bias is not None:
            out = out + bias
    out = out.reshape(batch, *sizes, out_channels).movedim(-1, 1)  # channels-last strides
    return out if channels_last else out.contiguous()


def _pointwise(n, x, weight, bias):
    batch, channels = x.shape[:2]
    w = weight.reshape(weight.shape[0], channels)
    if _channels_last(x, n):
        rows = x.movedim(1, -1).reshape(-1, channels)  # a view: pixels x channels
        return ops.linear(rows, w, bias).reshape(batch, *x.shape[2:], -1).movedim(-1, 1)
    out = ops.matmul(w, x.reshape(batch, channels, -1))  # (B, out, pixels)
    if bias is not None:
        out = out + bias.unsqueeze(-1)
    return out.reshape(batch, -1, *x.shape[2:])
