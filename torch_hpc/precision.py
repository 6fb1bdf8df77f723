"""fp32_emulation: a precision mode that routes fp32 matrix products through torch_hpc's 3xfp16
tensor-core emulation, like torch.backends.cuda.matmul.allow_tf32 switches to TF32.

    with torch_hpc.fp32_emulation():            # CUDA tensors
        loss = model(x).sum(); loss.backward()
    with torch_hpc.fp32_emulation(cpu=True):    # CPU tensors too (the CPU kernel is exact-ish, slow)
        ...
        with torch_hpc.fp32_emulation(False):   # off inside
            ...

Routed: torch.mm, torch.matmul and `@`, torch.bmm, torch.addmm, torch.baddbmm, F.linear (also as
Tensor methods and as torch.ops.aten calls), F.conv1d/2d/3d (so nn.Conv*d; see torch_hpc.conv for
where convolutions run), F.scaled_dot_product_attention (so nn.MultiheadAttention and
nn.TransformerEncoderLayer; see torch_hpc.attention for where it runs), when every tensor operand is a dense float32 tensor on a routed device
and autocast is off there; anything else (other dtypes, out=, autocast, tensors inside vmap or
torch.func transforms or with forward-mode AD tangents) runs the ordinary op, and so do bad
arguments (torch's own error is raised). Autograd works: the routed products' gradients
are emulated, and so are the products of torch's own backward formulas when backward() runs
inside the mode. Under torch.compile the routing is traced: compiled graphs call the torch_hpc ops.

The routing happens in the dispatcher, below Python (csrc/gemm/emulation_mode.cpp: a
thread-local dispatch key above autograd, as autocast's): no TorchFunctionMode is installed, so
the mode costs nothing per call on the operations it does not route.
"""
import collections
import threading

from . import _C

# The order of the counts that torch_hpc._C gives (csrc/gemm/emulation_mode.cpp).
_ROUTE_NAMES = ("mm", "bmm", "matmul", "addmm", "baddbmm", "linear", "conv1d", "conv2d", "conv3d",
                "scaled_dot_product_attention")


def _counter(counts) -> collections.Counter:
    return collections.Counter({name: n for name, n in zip(_ROUTE_NAMES, counts) if n})


class fp32_emulation:  # noqa: N801 (a context manager, named like torch's)
    """Context manager (and decorator) that turns the emulated fp32 product on (or off, with
    enabled=False) for the code inside. `cpu=True` routes CPU tensors too. Nests; thread-local
    (threads started inside do not inherit it; autograd's own threads do, for backward()).
    `.calls` counts the calls routed while this context was the innermost, by function name."""

    def __init__(self, enabled: bool = True, cpu: bool = False):
        self.enabled, self.cpu = bool(enabled), bool(cpu)
        self._calls = collections.Counter()
        self._open = {}  # thread id -> depths at which this context is open on that thread

    @property
    def calls(self) -> collections.Counter:
        calls = collections.Counter(self._calls)
        for depth in self._open.get(threading.get_ident(), ()):
            calls += _counter(_C._emulation_counts(depth))
        return calls

    def __enter__(self):
        depths = self._open.setdefault(threading.get_ident(), [])
        depths.append(_C._emulation_state()[0])
        _C._emulation_enter(self.enabled, self.cpu)
        return self

    def __exit__(self, *exc):
        self._calls += _counter(_C._emulation_exit())
        thread = threading.get_ident()
        self._open[thread].pop()
        if not self._open[thread]:
            del self._open[thread]
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
    return _C._emulation_state()[1]
