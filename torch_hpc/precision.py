"""fp32_emulation: a precision mode that routes fp32 matrix products through torch_hpc's 3xfp16
tensor-core emulation, like torch.backends.cuda.matmul.allow_tf32 switches to TF32.

    with torch_hpc.fp32_emulation():            # CUDA tensors
        loss = model(x).sum(); loss.backward()
    with torch_hpc.fp32_emulation(cpu=True):    # CPU tensors too (the CPU kernel is exact-ish, slow)
        ...
        with torch_hpc.fp32_emulation(False):   # off inside
            ...

Routed: torch.mm, torch.matmul and `@`, torch.bmm, torch.addmm, torch.baddbmm, F.linear (also as
Tensor methods), F.conv1d/2d/3d (so nn.Conv*d; see torch_hpc.conv for where convolutions run),
when every matrix operand is a float32 tensor on a routed device and autocast is off; anything
else (other dtypes, out=, autocast) runs the ordinary op, and so do bad arguments (torch's own
error is raised). Autograd works (the backward products are emulated too). Under torch.compile
the mode is traced: compiled graphs call the torch_hpc custom ops.
"""
import collections
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import conv, ops

_state = threading.local()


def _settings():
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    return stack


def _emulated(tensors, cpu: bool) -> bool:
    """Whether every operand is a float32 tensor on a routed device, autocast off there."""
    cuda = False
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dtype is not torch.float32:
            return False
        if t.is_cuda:
            cuda = True
        elif not (cpu and t.is_cpu):
            return False
    return not torch.is_autocast_enabled("cuda" if cuda else "cpu")


def _addmm(input, m1, m2, *, beta=1, alpha=1):
    product = ops.mm(m1, m2)
    if alpha != 1:
        product = product * alpha
    if beta == 0:  # like torch.addmm: input is ignored, its NaN/inf included
        return product
    return product + (input if beta == 1 else beta * input)


def _baddbmm(input, b1, b2, *, beta=1, alpha=1):
    product = ops.bmm(b1, b2)
    if alpha != 1:
        product = product * alpha
    if beta == 0:
        return product
    return product + (input if beta == 1 else beta * input)


def _scalar_kwargs(kwargs) -> bool:
    return kwargs.keys() <= {"beta", "alpha"} and not any(isinstance(v, torch.Tensor) for v in kwargs.values())


# Each route: (name, emulated implementation, operands) where operands(args, kwargs) gives the
# tensors that must qualify, or None when the call uses a form that is not routed (out=, ...).
def _two(args, kwargs):
    return args if len(args) == 2 and not kwargs else None


def _three_scaled(args, kwargs):
    return args if len(args) == 3 and (not kwargs or _scalar_kwargs(kwargs)) else None


def _linear_operands(args, kwargs):
    if len(args) == 3 and not kwargs or len(args) == 2 and kwargs.keys() <= {"bias"}:
        bias = args[2] if len(args) == 3 else kwargs.get("bias")
        return args[:2] if bias is None else (args[0], args[1], bias)
    return None


def _conv_operands(args, kwargs):
    if len(args) >= 2 and kwargs.keys() <= {"bias", "stride", "padding", "dilation", "groups"}:
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return args[:2] if bias is None else (args[0], args[1], bias)
    return None


_ROUTES = {}
for _funcs, _route in (
        ((torch.mm, torch.Tensor.mm), ("mm", ops.mm, _two)),
        ((torch.bmm, torch.Tensor.bmm), ("bmm", ops.bmm, _two)),
        ((torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__), ("matmul", ops.matmul, _two)),
        ((torch.addmm, torch.Tensor.addmm), ("addmm", _addmm, _three_scaled)),
        ((torch.baddbmm, torch.Tensor.baddbmm), ("baddbmm", _baddbmm, _three_scaled)),
        ((F.linear,), ("linear", ops.linear, _linear_operands)),
        ((F.conv1d, torch.conv1d), ("conv1d", conv.conv1d, _conv_operands)),
        ((F.conv2d, torch.conv2d), ("conv2d", conv.conv2d, _conv_operands)),
        ((F.conv3d, torch.conv3d), ("conv3d", conv.conv3d, _conv_operands))):
    for _f in _funcs:
        _ROUTES[_f] = _route


class _EmulationMode(TorchFunctionMode):
    """One per thread while any fp32_emulation(True) context is open; the innermost context (the
    settings stack's top) decides each call and counts it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is None:
            if func is not torch.Tensor.__rmatmul__:
                return func(*args, **kwargs)
            func, args, route = torch.Tensor.__matmul__, (args[1], args[0]), _ROUTES[torch.Tensor.__matmul__]
        name, impl, operands = route
        enabled, cpu, calls, _ = _settings()[-1]
        if enabled:
            tensors = operands(args, kwargs)
            if tensors is not None and _emulated(tensors, cpu):
                try:
                    out = impl(*args, **kwargs)
                except ValueError:  # bad arguments: torch's own call raises torch's own error
                    return func(*args, **kwargs)
                calls[name] += 1
                return out
        return func(*args, **kwargs)


class fp32_emulation:  # noqa: N801 (a context manager, named like torch's)
    """Context manager (and decorator) that turns the emulated fp32 product on (or off, with
    enabled=False) for the code inside. `cpu=True` routes CPU tensors too. Nests; thread-local.
    `.calls` counts the products routed by this context, by function name. Only an enabled
    context with none already open on the thread installs the TorchFunctionMode that routes
    (a disabled one costs nothing per op)."""

    def __init__(self, enabled: bool = True, cpu: bool = False):
        self.enabled, self.cpu = bool(enabled), bool(cpu)
        self.calls = collections.Counter()

    def __enter__(self):
        stack = _settings()
        mode = _EmulationMode() if self.enabled and all(entry[3] is None for entry in stack) else None
        stack.append((self.enabled, self.cpu, self.calls, mode))
        if mode is not None:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        mode = _settings().pop()[3]
        if mode is not None:
            mode.__exit__(*exc)
        return False

    def __call__(self, fn):
        import functools

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with fp32_emulation(self.enabled, self.cpu):
                return fn(*args, **kwargs)
        return wrapper


def is_fp32_emulation_enabled() -> bool:
    """Whether the innermost fp32_emulation context on this thread is on."""
    stack = _settings()
    return bool(stack) and stack[-1][0]
