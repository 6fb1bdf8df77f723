"""torch_hpc.nn.Linear and emulate_fp32."""
import copy

import pytest
import torch

import torch_hpc
from helpers import DEVICES, generator


class MyLinear(torch.nn.Linear):
    pass


def _model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(),
                               torch.nn.Sequential(torch.nn.Linear(96, 80), MyLinear(80, 80)),
                               torch.nn.Linear(80, 10, bias=False)).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_is_a_drop_in(device):
    ref = torch.nn.Linear(70, 30).to(device)
    lin = torch_hpc.nn.Linear(70, 30).to(device)
    lin.load_state_dict(ref.state_dict())
    assert isinstance(lin, torch.nn.Linear) and lin.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 9, 70, device=device, generator=generator(device, 30))
    exact = torch.nn.functional.linear(x.double(), ref.weight.double(), ref.bias.double())
    err = ((lin(x).double() - exact).norm() / exact.norm()).item()
    assert err < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_emulate_fp32_converts_in_place(device):
    model = _model(device)
    original = copy.deepcopy(model)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    handle = model[0].register_forward_hook(lambda *_: calls.append(1))

    assert torch_hpc.emulate_fp32(model) is model
    assert type(model[0]) is torch_hpc.nn.Linear and type(model[2][0]) is torch_hpc.nn.Linear
    assert type(model[3]) is torch_hpc.nn.Linear
    assert type(model[2][1]) is MyLinear  # subclasses are left alone
    assert all(p is q for p, q in zip(params, model.parameters()))
    torch_hpc.emulate_fp32(model)  # idempotent
    assert type(model[0]) is torch_hpc.nn.Linear

    x = torch.randn(32, 64, device=device, generator=generator(device, 31))
    with torch.no_grad():
        exact = original.double()(x.double())
        got = model(x)
    assert calls and ((got.double() - exact).norm() / exact.norm()).item() < 1e-6
    handle.remove()

    model(x).square().mean().backward()  # the optimizer built before conversion still works
    before = params[0].detach().clone()
    opt.step()
    assert not torch.equal(before, params[0])


def test_emulate_fp32_routes_through_the_op():
    model = torch_hpc.emulate_fp32(torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    with torch.profiler.profile() as prof:
        model(x)
    assert any(e.name.startswith("torch_hpc::mm") for e in prof.events())


def _twin_linears(device, cache):
    torch.manual_seed(5)
    lin = torch_hpc.nn.Linear(300, 200).to(device)
    lin.cache_weight_splits = cache
    return lin


def _step(lin, x):
    out = lin(x)
    (out * out).sum().backward()
    return out.detach(), lin.weight.grad.clone(), lin.bias.grad.clone(), x.grad.clone()


def test_weight_split_ops_have_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        w = torch.empty(200, 300)
        hi, lo, e, f = torch.ops.torch_hpc.split_planes(w)
        out = torch.ops.torch_hpc.mm_planes(torch.empty(7, 300), w.t(), hi, lo, e, f)
    assert hi.shape == lo.shape == (1, 256, 320) and hi.dtype == torch.float16
    assert e.shape == f.shape == (1, 256) and e.dtype == torch.int32
    assert out.shape == (7, 200) and out.dtype == torch.float32


def test_weight_split_cache_is_cuda_only():
    lin = _twin_linears("cpu", True)
    lin(torch.randn(3, 300))
    assert "_weight_splits" not in lin.__dict__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the weight-split cache is CUDA-only")
def test_cuda_weight_split_cache_matches_uncached_and_follows_weight_updates():
    cached, plain = _twin_linears("cuda", True), _twin_linears("cuda", False)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (cached, plain)]
    gen = generator("cuda", 11)
    for step in range(3):
        x = torch.randn(2, 70, 300, device="cuda", generator=gen)
        results = []
        for m, opt in zip((cached, plain), opts):
            opt.zero_grad()
            results.append(_step(m, x.clone().requires_grad_()))
            opt.step()  # in place: the weight's version counter moves
        for got, want in zip(*results):
            assert torch.equal(got, want), f"step {step}: cached and uncached differ"
    planes = cached._weight_splits["rows"][1]
    assert planes[0].shape == (1, 256, 320) and planes[0].dtype == torch.float16
    with torch.no_grad():
        cached(x)
        cached(x)
    assert cached._weight_splits["rows"][1][0] is not planes[0]  # re-split after the last step
    hit = cached._weight_splits["rows"][1][0]
    with torch.no_grad():
        cached(x)
    assert cached._weight_splits["rows"][1][0] is hit  # unchanged weight: no new split
    with torch.no_grad():
        cached.weight.mul_(2)
        plain.weight.mul_(2)
        assert torch.equal(cached(x), plain(x))
    cached.clear_weight_split_cache()
    assert "_weight_splits" not in cached.__dict__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the weight-split cache is CUDA-only")
def test_cuda_weight_split_cache_is_bypassed_in_graphs_and_compile():
    lin = _twin_linears("cuda", True)
    x = torch.randn(64, 300, device="cuda", generator=generator("cuda", 12))
    with torch.no_grad():
        eager = lin(x)
        lin.clear_weight_split_cache()
        compiled = torch.compile(lin, fullgraph=True)(x)
        assert "_weight_splits" not in lin.__dict__
        assert torch.equal(compiled, eager)
        static_x = x.clone()
        lin(static_x)  # warm-up on the side stream is what torch.cuda.graphs recommends
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = lin(static_x)
        static_x.copy_(2 * x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, lin(2 * x))


@pytest.mark.parametrize("device", DEVICES)
def test_emulate_fp32_converts_convolutions(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(3, 8, 3, padding=1),
        torch.nn.Unflatten(2, (4, 4)), torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        torch.nn.Unflatten(2, (2, 2)), torch.nn.Conv3d(8, 4, (1, 3, 3), padding="same", groups=4),
    ).to(device)
    x = torch.randn(2, 3, 16, device=device, generator=generator(device, 5))
    exact = copy.deepcopy(model).double()(x.double())
    params = list(model.parameters())
    torch_hpc.emulate_fp32(model)
    assert [type(m).__name__ for m in model if "Conv" in type(m).__name__] == ["Conv1d", "Conv2d", "Conv3d"]
    assert all(type(m).__module__ == "torch_hpc.nn" for m in model if "Conv" in type(m).__name__)
    assert all(p is q for p, q in zip(params, model.parameters()))
    got = model(x)
    assert got.shape == exact.shape and ((got.double() - exact).norm() / exact.norm()).item() < 1e-6
    got.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_converted_model_traces_with_fx(device):
    """torch.fx.symbolic_trace of a converted model records torch_hpc's calls (the Linear op, the
    conv function), not torch's, and the traced module computes the same values."""
    g = generator(device, 3)
    model = torch_hpc.emulate_fp32(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 5))).to(device)
    x = torch.randn(2, 3, 8, 8, device=device, generator=g)
    traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert targets == [torch_hpc.conv.conv2d, torch.ops.torch_hpc.linear.default]
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_converted_modules_raise_torchs_own_errors(device):
    for module, bad in ((torch.nn.Linear(3, 4), torch.ones(2, 5)),
                        (torch.nn.Conv2d(3, 4, 3), torch.ones(1, 2, 5, 5))):
        module = module.to(device)
        with pytest.raises(Exception) as want:
            module(bad.to(device))
        with pytest.raises(Exception) as got:
            torch_hpc.emulate_fp32(module)(bad.to(device))
        assert type(got.value) is type(want.value) and str(got.value) == str(want.value)
