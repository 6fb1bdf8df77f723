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
