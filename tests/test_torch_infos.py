"""PyTorch's own test inputs as the conformance bar of the drop-ins: the OpInfo samples
(torch.testing._internal.common_methods_invocations) of every op fp32_emulation() routes, and the
ModuleInfo inputs (common_modules) of every module emulate_fp32 converts. Each gives torch's fp32
values and gradients, and torch's own exception where torch raises one."""
import copy
import warnings

import pytest
import torch

import torch_hpc
from helpers import DEVICES

op_db = pytest.importorskip("torch.testing._internal.common_methods_invocations").op_db
module_db = pytest.importorskip("torch.testing._internal.common_modules").module_db
# torch.testing's common_utils freezes assignments to torch.backends' flags at import, for
# PyTorch's own suite; the other tests of this process set them, so undo that here.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

ROUTED = ["mm", "bmm", "matmul", "__rmatmul__", "addmm", "baddbmm", "nn.functional.linear",
          "nn.functional.conv1d", "nn.functional.conv2d", "nn.functional.conv3d",
          "nn.functional.scaled_dot_product_attention"]
OPS = [o for o in op_db if o.name in ROUTED and o.variant_test_name in ("", "decomposed")]


def _samples(op, device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield from op.sample_inputs(device, torch.float32, requires_grad=True)
        yield from op.reference_inputs(device, torch.float32, requires_grad=False)


def _run(op, sample, emulated, routed=None):
    args = (sample.input, *sample.args)
    with torch_hpc.fp32_emulation(cpu=True) if emulated else torch_hpc.fp32_emulation(False) as mode:
        try:
            return op.op(*args, **sample.kwargs)
        except Exception as e:  # noqa: BLE001  (compared with torch's below)
            return e
        finally:
            if routed is not None:
                routed.append(sum(mode.calls.values()))


def _inputs_needing_grad(sample):
    leaves = [sample.input, *sample.args, *sample.kwargs.values()]
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=[f"{o.name}{'-' + o.variant_test_name if o.variant_test_name else ''}"
                                         for o in OPS])
def test_routed_op_matches_torch_on_its_opinfo_samples(op, device):
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    tf32 = matmul.allow_tf32
    matmul.allow_tf32 = False  # torch's fp32 reference products
    routed = []
    try:  # (the fused attention kernel on every sample it covers, not only on large ones)
        with cudnn.flags(enabled=cudnn.enabled, allow_tf32=False), torch_hpc.backends.attention.flags(fused=True):
            count = _compare_every_sample(op, device, routed)
    finally:
        matmul.allow_tf32 = tf32
    assert count > 0 and sum(routed) > 0  # the mode took the calls (not torch alone)


def _compare_every_sample(op, device, routed):
    count = 0
    for sample in _samples(op, device):
        count += 1
        want, got = _run(op, sample, emulated=False), _run(op, sample, emulated=True, routed=routed)
        if isinstance(want, Exception):
            assert type(got) is type(want) and str(got) == str(want), (sample, got, want)
            continue
        assert not isinstance(got, Exception), (sample, got)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        leaves = _inputs_needing_grad(sample)
        if leaves and want.requires_grad:
            grad_out = torch.randn_like(want)
            want_grads = torch.autograd.grad(want, leaves, grad_out, allow_unused=True)
            got_grads = torch.autograd.grad(got, leaves, grad_out, allow_unused=True)
            for g, w in zip(got_grads, want_grads):
                assert (g is None) == (w is None), sample
                if w is not None:
                    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    return count


CONVERTED = [m for m in module_db
             if m.module_cls in (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("info", CONVERTED, ids=[m.name for m in CONVERTED])
def test_converted_module_matches_torch_on_its_moduleinfo_inputs(info, device):
    cudnn = torch.backends.cudnn
    count = 0
    with cudnn.flags(enabled=cudnn.enabled, allow_tf32=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for inputs in info.module_inputs_func(info, device=device, dtype=torch.float32,
                                              requires_grad=True, training=True):
            if inputs.forward_input is None:
                continue
            count += 1
            torch.manual_seed(0)
            module = info.module_cls(*inputs.constructor_input.args,
                                     **inputs.constructor_input.kwargs).to(device)
            converted = torch_hpc.emulate_fp32(copy.deepcopy(module))
            assert type(converted).__module__ == "torch_hpc.nn"
            args, kwargs = inputs.forward_input.args, inputs.forward_input.kwargs
            want, got = module(*args, **kwargs), converted(*args, **kwargs)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            grad_out = torch.randn_like(want)
            for g, w in zip(torch.autograd.grad(got, list(converted.parameters()), grad_out),
                            torch.autograd.grad(want, list(module.parameters()), grad_out)):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert count > 0
