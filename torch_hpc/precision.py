"""fp32_emulation: a precision mode that routes fp32 matrix products through torch_hpc's 3xfp16
tensor-core emulation, like torch.backends.cuda.matmul.allow_tf32 switches to TF32.

    with torch_hpc.fp32_emulation():            # CUDA tensors
        loss = model(x).sum(); loss.backward()
    with torch_hpc.fp32_emulation(cpu=True):    # CPU tensors too (the CPU kernel is exact-ish, slow)
        ...
        with torch_hpc.fp32_emulation(False):   # off inside
            ...

Routed: torch.mm, torch.matmul and `@`, torch.bmm, torch.addmm, torch.baddbmm, F.linear (also as
Tensor methods), when every matrix operand is a float32 tensor on a routed device and autocast is
off; anything else (other dtypes, out=, autocast) runs the ordinary op. Autograd works (the
backward products are emulated too). Under torch.compile the mode is traced: compiled graphs
call the torch_hpc custom ops.
"""
import collections
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import ops

_state = threading.local()


def _settings():
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    return stack


def _routed(settings, *tensors) -> bool:
    enabled, cpu = settings
    if not enabled:
        return False
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            return False
        if t.device.type != "cuda" and not (cpu and t.device.type == "cpu"):
            return False
        if torch.is_autocast_enabled(t.device.type):
            return False
    return True


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


# func -> (name, emulated implementation, number of leading matrix operands to check)
_ROUTES = {}


def _route(funcs, name, impl, operands, matrix_positions):
    for f in funcs:
        _ROUTES[f] = (name, impl, operands, matrix_positions)


_route([torch.mm, torch.Tensor.mm], "mm", ops.mm, 2, (0, 1))
_route([torch.bmm, torch.Tensor.bmm], "bmm", ops.bmm, 2, (0, 1))
_route([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__], "matmul", ops.matmul, 2, (0, 1))
_route([torch.addmm, torch.Tensor.addmm], "addmm", _addmm, 3, (0, 1, 2))
_route([torch.baddbmm, torch.Tensor.baddbmm], "baddbmm", _baddbmm, 3, (0, 1, 2))
_route([F.linear], "linear", ops.linear, 3, (0, 1))


class _EmulationMode(TorchFunctionMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__rmatmul__:
            func, args = torch.Tensor.__matmul__, (args[1], args[0])
        route = _ROUTES.get(func)
        if route is not None and _settings():
            name, impl, operands, matrix_positions = route
            allowed = {"beta", "alpha"} if name in ("addmm", "baddbmm") else {"bias"}
            if len(args) <= operands and set(kwargs) <= allowed:
                tensors = [args[i] if i < len(args) else None for i in matrix_positions]
                bias = kwargs.get("bias", args[2] if name == "linear" and len(args) > 2 else None)
                extra = [bias] if bias is not None else []
                if _routed(_settings()[-1], *tensors, *extra) and \
                        all(not isinstance(v, torch.Tensor) for k, v in kwargs.items() if k != "bias"):
                    self.calls[name] += 1
                    return impl(*args, **kwargs)
        return func(*args, **kwargs)


class fp32_emulation:  # noqa: N801 (a context manager, named like torch's)
    """Context manager (and decorator) that turns the emulated fp32 product on (or off, with
    enabled=False) for the code inside. `cpu=True` routes CPU tensors too. Nests; thread-local.
    `.calls` counts the products routed by this context, by function name."""

    def __init__(self, enabled: bool = True, cpu: bool = False):
        self.enabled, self.cpu = bool(enabled), bool(cpu)
        self.calls = collections.Counter()
        self._mode = None

    def __enter__(self):
        _settings().append((self.enabled, self.cpu))
        self._mode = _EmulationMode(self.calls)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self._mode.__exit__(*exc)
        finally:
            _settings().pop()
            self._mode = None
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
