"""opcheck, autograd against fp64 gradients, double backward, torch.compile(fullgraph=True)."""
import pytest
import torch

import torch_hpc
from helpers import DEVICES, generator


def _samples(device):
    gen = generator(device, 20)
    r = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
    return [
        ("mm", (r(5, 7), r(7, 3))),
        ("mm", (r(70, 33).t(), r(70, 9))),
        ("mm", (r(4, 0), r(0, 6))),
        ("bmm", (r(3, 5, 7), r(3, 7, 2))),
        ("mm_bias", (r(5, 7), r(7, 3), r(3))),
        ("matmul", (r(2, 5, 7), r(7, 3))),
        ("matmul", (r(7,), r(4, 7, 3))),
        ("linear", (r(2, 5, 7), r(3, 7), r(3))),
        ("linear", (r(5, 7), r(3, 7), None)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    for name, args in _samples(device):
        args = tuple(a.clone().requires_grad_(requires_grad) if a is not None else None
                     for a in args)
        torch.library.opcheck(getattr(torch.ops.torch_hpc, name).default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_fp64(device):
    gen = generator(device, 21)
    x = torch.randn(2, 33, 70, device=device, generator=gen, requires_grad=True)
    w = torch.randn(50, 70, device=device, generator=gen, requires_grad=True)
    bias = torch.randn(50, device=device, generator=gen, requires_grad=True)
    v = torch.randn(50, 40, device=device, generator=gen, requires_grad=True)
    out = torch_hpc.matmul(torch.tanh(torch_hpc.linear(x, w, bias)), v)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, bias, v), upstream)

    leaves = [t.detach().double().requires_grad_() for t in (x, w, bias, v)]
    ref = torch.matmul(torch.tanh(torch.nn.functional.linear(*leaves[:3])), leaves[3])
    ref_grads = torch.autograd.grad(ref, leaves, upstream.double())
    for name, g, r in zip(("x", "w", "bias", "v"), grads, ref_grads):
        assert g.dtype == torch.float32
        err = ((g.double() - r).norm() / r.norm()).item()
        assert err < 1e-6, f"grad of {name}: relative error {err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward(device):
    a = torch.randn(6, 9, device=device, dtype=torch.float32, requires_grad=True)
    b = torch.randn(9, 4, device=device, requires_grad=True)
    (ga,) = torch.autograd.grad(torch_hpc.mm(a, b).pow(2).sum(), a, create_graph=True)
    (gb,) = torch.autograd.grad(ga.sum(), b)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    (ga64,) = torch.autograd.grad((a64 @ b64).pow(2).sum(), a64, create_graph=True)
    (gb64,) = torch.autograd.grad(ga64.sum(), b64)
    torch.testing.assert_close(gb.double(), gb64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def f(x, w, b, v):
        h = torch.relu(torch_hpc.linear(x, w, b))
        return torch_hpc.matmul(h, v) + torch_hpc.mm(h[0], v).sum()

    gen = generator(device, 22)
    args = [torch.randn(*s, device=device, generator=gen) for s in ((3, 16, 24), (32, 24), (32,), (32, 8))]
    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    inductor = torch.compile(f, fullgraph=True)(*args)
    torch.testing.assert_close(inductor, eager, rtol=1e-6, atol=1e-5)
    # dynamic shapes with gradients: the autograd kernels see symbolic sizes
    leaves = [t.clone().requires_grad_() for t in args]
    dynamic = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    out = dynamic(*leaves)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-5)
    ref = [t.clone().requires_grad_() for t in args]
    f(*ref).sum().backward()
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_direct_entry_points_defer_to_torch_function_handlers(device):
    """torch_hpc.mm & co. enter the ops through torch_hpc._C directly, but a tensor subclass with
    its own __torch_function__, or an active TorchFunctionMode, still sees the torch.ops call;
    nn.Parameter takes the direct entry and keeps autograd."""
    from torch.overrides import TorchFunctionMode
    g = generator(device, 0)
    a, b = (torch.randn(8, 8, device=device, generator=g) for _ in range(2))
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    out = torch_hpc.mm(a.as_subclass(Logged), b)
    assert seen == [torch.ops.torch_hpc.mm.default] and isinstance(out, Logged)
    with Mode():
        torch_hpc.linear(a, b)
        torch_hpc.matmul(a, b)
    assert seen[1:] == [torch.ops.torch_hpc.linear.default, torch.ops.torch_hpc.matmul.default]
    weight = torch.nn.Parameter(b.clone())
    torch_hpc.mm(a, weight).sum().backward()
    torch.testing.assert_close(weight.grad, a.sum(0)[:, None].expand(8, 8))
    with pytest.raises(RuntimeError, match="Expected a value of type 'Tensor'"):
        torch_hpc.mm(a, 3)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        torch_hpc.bmm(a[None], b[None, :3])
