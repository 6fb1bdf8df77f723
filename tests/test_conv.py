"""torch_hpc.conv1d/2d/3d: F.conv*d's semantics, accuracy against fp64 (outputs and both
gradients), inf/NaN, errors, torch.compile. CUDA cases check the cuDNN (TF32 off) and pointwise
GEMM routes."""
import pytest
import torch
import torch.nn.functional as F

import torch_hpc
from helpers import DEVICES, contract_constant, requires_cuda

TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
HPC_CONV = {1: torch_hpc.conv1d, 2: torch_hpc.conv2d, 3: torch_hpc.conv3d}

# (dims, batch, in, out, size, kernel, keyword arguments)
CASES = [
    (1, 2, 4, 6, 11, 3, {}),
    (1, 3, 8, 4, 20, 5, {"stride": 2, "padding": 2, "dilation": 2}),
    (1, 2, 8, 8, 9, 4, {"padding": "same", "groups": 4}),
    (2, 2, 4, 6, 9, 3, {"stride": 2, "padding": 1}),
    (2, 2, 6, 4, 10, 3, {"stride": (1, 2), "padding": (2, 0), "dilation": (1, 2)}),
    (2, 1, 8, 6, 8, 2, {"padding": "same"}),
    (2, 2, 6, 9, 7, 3, {"padding": "valid", "groups": 3}),
    (2, 3, 5, 7, 6, 1, {}),
    (2, 0, 4, 6, 9, 3, {"padding": 1}),
    (3, 2, 4, 6, 6, 3, {"padding": (1, 0, 2), "stride": (1, 2, 1)}),
    (3, 1, 4, 4, 5, 2, {"dilation": 2, "padding": "same", "groups": 2}),
]


def _ids(case):
    n, batch, cin, cout, size, k, kw = case
    return f"{n}d-b{batch}-{cin}to{cout}-k{k}-" + "-".join(f"{a}{b}" for a, b in kw.items()).replace(" ", "")


def _inputs(case, device, seed=0, bias=True):
    n, batch, cin, cout, size, k, kw = case
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, cin, *[size] * n, device=device, generator=g)
    w = torch.randn(cout, cin // kw.get("groups", 1), *[k] * n, device=device, generator=g)
    b = torch.randn(cout, device=device, generator=g) if bias else None
    return x, w, b


def _contract_ratio(out, ref, x, w, n, kw):
    """max |out - ref| / (|x| * |w|) over entries where the scale is > 0 (the GEMM's contract)."""
    scale = TORCH_CONV[n](x.double().abs(), w.double().abs(), None, **kw)
    err = (out.double() - ref).abs()
    mask = scale > 0
    return (err[mask] / scale[mask]).max().item() if mask.any() else 0.0


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_matches_fp64_within_the_contract(case, bias, device):
    n, _, cin, _, _, k, kw = case
    x, w, b = _inputs(case, device, bias=bias)
    ref = TORCH_CONV[n](x.double(), w.double(), None if b is None else b.double(), **kw)
    out = HPC_CONV[n](x, w, b, **kw)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    patch = cin // kw.get("groups", 1) * k ** n
    assert _contract_ratio(out - (0 if b is None else b.view(-1, *[1] * n)),
                           ref - (0 if b is None else b.double().view(-1, *[1] * n)),
                           x, w, n, kw) <= contract_constant(patch)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_unbatched_and_channels_last_keep_torchs_layout(device):
    x, w, b = _inputs((2, 3, 8, 16, 9, 3, {}), device)
    for layout in (x, x.contiguous(memory_format=torch.channels_last)):
        out, ref = torch_hpc.conv2d(layout, w, b, padding=1), F.conv2d(layout, w, b, padding=1)
        assert out.shape == ref.shape
        for fmt in (torch.contiguous_format, torch.channels_last):
            assert out.is_contiguous(memory_format=fmt) == ref.is_contiguous(memory_format=fmt)
    pointwise = torch.randn(16, 8, 1, 1, device=device)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch_hpc.conv2d(cl, pointwise).is_contiguous(memory_format=torch.channels_last)
    x3 = torch.randn(2, 8, 4, 5, 6, device=device).contiguous(memory_format=torch.channels_last_3d)
    out = torch_hpc.conv3d(x3, torch.randn(4, 8, 3, 3, 3, device=device), padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    single = torch_hpc.conv2d(x[0], w, b, padding=1)
    assert single.shape == (16, 9, 9)
    torch.testing.assert_close(single, torch_hpc.conv2d(x[:1], w, b, padding=1)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [(2, 4, 32, 32, 12, 3, {"padding": 1}),
                                  (2, 4, 64, 64, 8, 3, {"stride": 2, "padding": 1}),
                                  (3, 2, 16, 16, 6, 3, {"padding": "same"}),
                                  (1, 8, 32, 16, 30, 5, {"groups": 2, "dilation": 2})], ids=_ids)
def test_conv_output_and_gradients_at_least_as_accurate_as_fp32(case, device):
    """Normwise error against fp64 of the output, the input and weight (and bias) gradients is
    no worse than torch's fp32 convolution's (TF32 off) on the same inputs."""
    n = case[0]
    kw = case[-1]
    x, w, b = _inputs(case, device)
    leaves64 = [t.double().requires_grad_() for t in (x, w, b)]
    ref = TORCH_CONV[n](*leaves64, **kw)
    grad = torch.randn(ref.shape, device=device, generator=torch.Generator(device=device).manual_seed(9))
    ref.backward(grad.double())
    errors = {}
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for name, fn in (("torch_hpc", HPC_CONV[n]), ("fp32", TORCH_CONV[n])):
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            out = fn(*leaves, **kw)
            out.backward(grad)
            errors[name] = [_rel(out, ref)] + [_rel(t.grad, t64.grad) for t, t64 in zip(leaves, leaves64)]
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    for what, mine, theirs in zip(("output", "input grad", "weight grad"), errors["torch_hpc"], errors["fp32"]):
        assert mine <= theirs * 1.05 + 1e-9, f"{what}: {mine:.2e} vs fp32's {theirs:.2e}"
    # the bias gradient is a plain fp32 sum (no product), summed in another order than torch's
    assert errors["torch_hpc"][3] <= 2 * errors["fp32"][3] + 1e-9, errors


@pytest.mark.parametrize("device", DEVICES)
def test_conv_inf_and_nan_as_fp64_gives(device):
    x, w, b = _inputs((2, 2, 4, 6, 8, 3, {}), device)
    x[0, 1, 2, 3] = float("inf")
    x[1, 0, 5, 5] = float("nan")
    w[2, 1, 0, 0] = float("-inf")
    out = torch_hpc.conv2d(x, w, b, padding=1)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.equal(out[torch.isinf(ref)], ref[torch.isinf(ref)].float())


def test_conv_other_dtypes_and_autocast_go_to_torch():
    x, w, b = (t.double() for t in _inputs((2, 2, 4, 6, 8, 3, {}), "cpu"))
    assert torch.equal(torch_hpc.conv2d(x, w, b, padding=1), F.conv2d(x, w, b, padding=1))
    x, w, b = _inputs((2, 2, 4, 6, 8, 3, {}), "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch_hpc.conv2d(x, w, b).dtype == F.conv2d(x, w, b).dtype == torch.bfloat16


@pytest.mark.parametrize("call,fragment", [
    (lambda x, w: torch_hpc.conv2d(x, w[0]), "'weight' to be 4-D"),
    (lambda x, w: torch_hpc.conv2d(x[0, 0], w), "'input' to be 3-D (unbatched) or 4-D"),
    (lambda x, w: torch_hpc.conv2d(x, w, groups=3), "groups=3"),
    (lambda x, w: torch_hpc.conv2d(x, w, torch.zeros(5)), "'bias' of shape (6,)"),
    (lambda x, w: torch_hpc.conv2d(x, w, stride=2, padding="same"), "strided convolutions"),
    (lambda x, w: torch_hpc.conv2d(x, w, padding="full"), "'padding' to be 'same', 'valid'"),
    (lambda x, w: torch_hpc.conv2d(x, w, stride=0), "'stride' to be an int >= 1"),
    (lambda x, w: torch_hpc.conv2d(x, w, padding=(1, 2, 3)), "'padding' to be an int >= 0 or 2"),
    (lambda x, w: torch_hpc.conv2d(x[..., :2, :2], w), "smaller than the dilated kernel"),
    (lambda x, w: torch_hpc.conv2d(x, w, groups=0), "'groups' to be an int >= 1"),
    (lambda x, w: torch_hpc.conv2d(x, w, dilation=1.5), "'dilation' to be an int >= 1"),
], ids=["weight-dims", "input-dims", "groups", "bias", "same-strided", "padding-word", "stride",
        "padding-len", "too-small", "groups-zero", "dilation-float"])
def test_conv_bad_arguments_name_what_was_expected(call, fragment):
    x, w, _ = _inputs((2, 2, 4, 6, 8, 3, {}), "cpu")
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        call(x, w)


def test_conv_traces_under_torch_compile_with_its_backward():
    x, w, b = _inputs((2, 2, 8, 6, 9, 3, {}), "cpu")
    compiled = torch.compile(lambda x, w, b: torch_hpc.conv2d(x, w, b, padding=1, stride=2),
                             backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    eager_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = compiled(*leaves)
    eager = torch_hpc.conv2d(*eager_leaves, padding=1, stride=2)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    out.sum().backward()
    eager.sum().backward()
    for t, e in zip(leaves, eager_leaves):
        torch.testing.assert_close(t.grad, e.grad, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [{"padding": 1, "groups": 2}, {"padding": "same"}, {"stride": 2}])
def test_fp32_convolution_fallback_values_and_gradients(kw):
    """The CUDA fallback's ops (TF32 off in forward and backward), run on the CPU
    here: F.conv2d's values and gradients, bias or not, 'same' with an even kernel."""
    for bias in (True, False):
        groups = kw.get("groups", 1)
        x, w, b = _inputs((2, 2, 4, 6, 8, 2 if kw.get("padding") == "same" else 3, {"groups": groups}),
                          "cpu", bias=bias)
        k = w.shape[-1]
        pads = torch_hpc.conv._pads(kw.get("padding", 0), (k, k), (kw.get("stride", 1),) * 2, (1, 1), 2, "t")
        leaves = [None if t is None else t.clone().requires_grad_() for t in (x, w, b)]
        out = torch_hpc.conv._cudnn_fp32(2, *leaves, (kw.get("stride", 1),) * 2, pads, (1, 1), groups)
        ref_leaves = [None if t is None else t.clone().requires_grad_() for t in (x, w, b)]
        ref = F.conv2d(*ref_leaves, **kw)
        torch.testing.assert_close(out, ref)
        grad = torch.randn_like(ref)
        out.backward(grad)
        ref.backward(grad)
        for mine, theirs in zip(leaves, ref_leaves):
            if mine is not None:
                torch.testing.assert_close(mine.grad, theirs.grad)
    # double backward (a gradient penalty): differentiable gradients
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w)]
    for (xs, ws), mine in ((leaves, True), (ref_leaves, False)):
        out = torch_hpc.conv._cudnn_fp32(2, xs, ws, None, (1, 1), [(1, 1), (1, 1)], (1, 1), groups) if mine \
            else F.conv2d(xs, ws, None, padding=1, groups=groups)
        (gx,) = torch.autograd.grad(out.square().sum(), xs, create_graph=True)
        gx.square().sum().backward()
    torch.testing.assert_close(leaves[1].grad, ref_leaves[1].grad)
    torch.testing.assert_close(leaves[0].grad, ref_leaves[0].grad)


@requires_cuda
def test_conv_cuda_routes_cudnn_fp32_or_the_pointwise_gemm():
    """A 3x3 layer runs cuDNN with TF32 off (even with PyTorch's default allow_tf32 = True):
    the same values as F.conv2d with TF32 off; the TF32 switch is restored."""
    x, w, b = _inputs((2, 8, 64, 64, 28, 3, {}), "cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):  # PyTorch's default
        out = torch_hpc.conv2d(x, w, b, padding=1)
        assert torch.backends.cudnn.allow_tf32
    # fp32 accuracy against fp64 (TF32's would be ~1e-4, 1000x fp32's); cuDNN's fp32 algorithms
    # differ in summation order, so values are compared through their errors, not bit for bit
    leaves64 = [t.double().requires_grad_() for t in (x, w, b)]
    out64 = F.conv2d(*leaves64, padding=1)
    grad = torch.randn_like(out64)
    out64.backward(grad)
    errors = {}
    for name, conv, tf32 in (("torch_hpc", torch_hpc.conv2d, True), ("fp32", F.conv2d, False)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):  # True: PyTorch's default
            out = conv(*leaves, padding=1)
            out.backward(grad.float())  # gradients with TF32 off too, though the switch is on
            assert torch.backends.cudnn.allow_tf32 == tf32
        errors[name] = [_rel(out, out64)] + [_rel(t.grad, t64.grad) for t, t64 in zip(leaves, leaves64)]
    for mine, theirs in zip(errors["torch_hpc"], errors["fp32"]):
        assert mine <= 2 * theirs + 1e-9, errors
    # A large pointwise layer (ResNet-50's 1x1 1024->2048 at 14x14, batch 64) is the GEMM itself
    big = torch.randn(64, 1024, 14, 14, device="cuda").contiguous(memory_format=torch.channels_last)
    expand = torch.randn(2048, 1024, 1, 1, device="cuda") / 32
    assert torch.ops.torch_hpc.emulates(big, 1, 64 * 14 * 14, 2048, 1024)
    pointwise = torch_hpc.conv2d(big, expand)
    assert pointwise.is_contiguous(memory_format=torch.channels_last)
    rows = big.movedim(1, -1).reshape(-1, 1024)
    assert torch.equal(pointwise.movedim(1, -1).reshape(-1, 2048), torch_hpc.linear(rows, expand.view(2048, 1024)))
    ref = F.conv2d(big.double(), expand.double())
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert _rel(pointwise, ref) <= _rel(F.conv2d(big, expand), ref)


def test_fp32_convolution_keeps_tf32_off_in_torchs_own_backward(monkeypatch):
    """Eager, the cuDNN route is torch's own convolution (its backward node computes only the
    gradients a pass asks for) with cuDNN's TF32 switch off while the forward and that node run,
    restored after; the switch is global, so this holds on the CPU too."""
    x, w, b = (t.requires_grad_() for t in _inputs((2, 2, 4, 6, 8, 3, {}), "cpu"))
    seen = []
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        real = torch.nn.functional.conv2d
        monkeypatch.setitem(torch_hpc.conv._TORCH_CONV, 2, lambda *a: seen.append(torch.backends.cudnn.allow_tf32) or real(*a))
        out = torch_hpc.conv._cudnn_fp32(2, x, w, b, (1, 1), [(1, 1), (1, 1)], (1, 1), 1)
        assert type(out.grad_fn).__name__ == "ConvolutionBackward0" and seen == [False]
        assert torch.backends.cudnn.allow_tf32
        out.grad_fn.register_prehook(lambda grads: seen.append(torch.backends.cudnn.allow_tf32))
        (gx,) = torch.autograd.grad(out.square().sum(), x)
        assert seen == [False, False] and torch.backends.cudnn.allow_tf32
    torch.testing.assert_close(gx, torch.autograd.grad(F.conv2d(x, w, b, padding=1).square().sum(), x)[0])


def test_fp32_convolution_op_computes_only_the_gradients_asked_for(monkeypatch):
    """The custom op (the route under torch.compile, and a public op) computes the input gradient
    alone for autograd.grad(y, x) where the engine can tell (inputs that are not leaves)."""
    asked = []
    wanted = torch_hpc.conv._wanted_grads
    monkeypatch.setattr(torch_hpc.conv, "_wanted_grads", lambda ctx: asked.append(wanted(ctx)) or asked[-1])
    leaves = [t.requires_grad_() for t in _inputs((2, 2, 4, 6, 8, 3, {}), "cpu")]
    x, w, b = (t * 1 for t in leaves)
    conv = lambda: torch.ops.torch_hpc.conv_fp32(x, w, b, [1, 1], [1, 1], [1, 1], 1)  # noqa: E731
    ref = F.conv2d(x, w, b, padding=1)
    for target, mask in ((x, [True, False, False]), (w, [False, True, False]), (b, [False, False, True])):
        (mine,) = torch.autograd.grad(conv().square().sum(), target)
        (theirs,) = torch.autograd.grad(ref.square().sum(), target, retain_graph=True)
        torch.testing.assert_close(mine, theirs)
        assert asked[-1] == mask
    conv().sum().backward()
    assert asked[-1] == [True, True, True]
    (gx,) = torch.autograd.grad(conv().sum(), x, create_graph=True)  # double backward path too
    assert asked[-1] == [True, False, False] and gx.requires_grad


def test_fp32_convolution_ops_pass_opcheck_and_compile_whole():
    """The cuDNN route's ops (run on the CPU here) pass torch.library.opcheck, and
    torch.compile(fullgraph=True) keeps them whole: same values and gradients as eager."""
    x, w, b = _inputs((2, 3, 4, 8, 8, 3, {}), "cpu")
    args = (x, w, b, [1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.torch_hpc.conv_fp32, args)
    grad = torch.randn(3, 8, 8, 8)
    torch.library.opcheck(torch.ops.torch_hpc.conv_fp32_backward,
                          (grad, x, w, [1, 1], [1, 1], [1, 1], 1, [True, False, True]))
    conv = lambda x, w, b: torch_hpc.conv._cudnn_fp32(2, x, w, b, (1, 1), [(1, 1), (1, 1)], (1, 1), 1)  # noqa: E731
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out, ref = compiled(*leaves), F.conv2d(*ref_leaves, padding=1)
    torch.testing.assert_close(out, ref)
    out.backward(grad)
    ref.backward(grad)
    for mine, theirs in zip(leaves, ref_leaves):
        torch.testing.assert_close(mine.grad, theirs.grad)


@requires_cuda
def test_cuda_cudnn_route_backward_with_frozen_backend_flags():
    """PyTorch's own test harness (torch.testing) freezes assignments to torch.backends' flags;
    the route's backward hooks still turn TF32 off while they run and restore it."""
    flags = torch.backends.flags_frozen.__globals__
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(2, 8, 9, 9, device="cuda", generator=g, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, device="cuda", generator=g, requires_grad=True)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        flags["__allow_nonbracketed_mutation_flag"] = False
        try:
            torch_hpc.conv2d(x, w, padding=1).sum().backward()
            tf32_after = torch.backends.cudnn.allow_tf32
        finally:
            flags["__allow_nonbracketed_mutation_flag"] = True
    assert tf32_after and x.grad is not None and w.grad is not None


@pytest.mark.parametrize("kernel,stride,padding,dilation,size", [
    ((3, 3), (1, 1), (1, 1), (1, 1), (9, 9)),
    ((3, 3), (2, 2), (1, 1), (1, 1), (9, 8)),
    ((1, 1), (2, 2), (0, 0), (1, 1), (7, 8)),
    ((7, 7), (2, 2), (3, 3), (1, 1), (12, 11)),
    ((2, 3), (3, 2), (3, 2), (2, 3), (10, 13)),
    ((3, 1), (2, 1), (2, 4), (2, 1), (1, 5)),
    ((5, 5), (1, 1), (0, 0), (2, 2), (9, 9)),
    ((3, 3), (4, 4), (2, 2), (2, 2), (6, 9)),
], ids=lambda c: "x".join(map(str, c)))
def test_gradients_as_forward_convolutions_match_torchs(kernel, stride, padding, dilation, size):
    """The implicit-GEMM route's gradients as forward convolutions (the input gradient by stride
    phases, the weight gradient with the batch as channels), here with F.conv2d in fp64 as the
    convolution; every call is stride 1 (input gradient) and channels_last, as the kernel takes."""
    from torch_hpc.conv import _input_grad_by_convs, _weight_grad_by_conv
    calls = []

    def conv(x, w, s, p, d):
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert w.is_contiguous(memory_format=torch.channels_last)
        calls.append((s, x.shape[1]))
        return F.conv2d(x, w, None, s, p, d)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, *size, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, *kernel, dtype=torch.float64, generator=g, requires_grad=True)
    y = F.conv2d(x, w, None, stride, padding, dilation)
    grad = torch.randn(y.shape, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last)
    want_x, want_w = torch.autograd.grad(y, (x, w), grad)
    got_x = _input_grad_by_convs(grad, w.detach(), size, stride, padding, dilation, conv)
    assert all(s == [1, 1] for s, _ in calls)
    got_w = _weight_grad_by_conv(x.detach(), grad, kernel, stride, padding, dilation, conv, channel_multiple=8)
    assert calls[-1][1] == 8  # the batch of 3, zero-padded to 8 channels
    torch.testing.assert_close(got_x, want_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)


def _sm90_device() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
            and "sm_90a" in torch_hpc.build_info().get("cuda_archs", []))


def test_implicit_gemm_switch_takes_false_true_or_auto_and_flags_restore_it():
    conv = torch_hpc.backends.conv
    assert conv.implicit_gemm is False
    with conv.flags(implicit_gemm="auto"):
        assert conv.implicit_gemm == "auto" and "auto" in repr(conv)
        with conv.flags(implicit_gemm=True):
            assert conv.implicit_gemm is True
        assert conv.implicit_gemm == "auto"
    assert conv.implicit_gemm is False
    for bad in (1, 0, "on", None):
        with pytest.raises(ValueError, match="implicit_gemm: expected False, True or 'auto'"):
            conv.implicit_gemm = bad
    assert conv.implicit_gemm is False
    # "auto": the measured table takes the forward of strided layers with >= 128 input channels
    assert torch_hpc.conv._measured_wins(128, 128, (2, 2)) == (True, False, False)
    assert torch_hpc.conv._measured_wins(64, 64, (1, 1)) == (False, False, False)


requires_sm90 = pytest.mark.skipif(not _sm90_device(), reason="needs compute capability 9.0 and an sm_90a build")

# (batch, in, out, size, kernel, stride, padding, dilation)
IMPLICIT_CASES = [
    (2, 64, 64, 9, 3, 1, 1, 1),
    (3, 128, 64, 14, 3, 2, 1, 1),
    (2, 64, 192, 11, 1, 1, 0, 1),
    (1, 64, 128, 13, 5, 1, 2, 2),
    (2, 192, 64, 7, 3, 1, 0, 1),
    (130, 64, 64, 3, 3, 1, 1, 1),  # more images than one 128-row plane tile
    (1, 128, 64, 24, 9, 1, 4, 1),  # 5 tiles, 162 k-blocks: K split in slices
]


def _poisoned_allocator(*shape):
    """Fills the caching allocator's next block of this size with NaN: an output element a kernel
    leaves unwritten stays NaN."""
    torch.full(shape, float("nan"), device="cuda")


@requires_sm90
@pytest.mark.parametrize("case", IMPLICIT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_implicit_gemm_conv2d_against_fp64(case):
    batch, cin, cout, size, k, stride, padding, dilation = case
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(batch, cin, size, size, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    kw = {"stride": stride, "padding": padding, "dilation": dilation}
    ref = F.conv2d(x.double(), w.double(), None, **kw)
    _poisoned_allocator(*ref.shape)
    got = torch.ops.torch_hpc.conv2d_implicit(x, w, [stride] * 2, [padding] * 2, [dilation] * 2)
    assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(got).all()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        cudnn = F.conv2d(x, w, None, **kw)
    rel = lambda t: ((t.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(got) <= 2 * max(rel(cudnn), 1e-7), (rel(got), rel(cudnn))  # fp32 rounding level
    assert _contract_ratio(got, ref, x, w, 2, kw) <= contract_constant(cin * k * k)


@requires_sm90
def test_cuda_implicit_gemm_conv2d_flagged_pixels_and_channels_are_exact():
    """Exponents per pixel and 64 channels: a pixel holding inf, a pixel whose 64 channels span
    more than the split's window, and a weight block with NaN go to the exact path (their
    products added in fp64 to the emulated rest: inf/NaN where fp64 has them, the outputs that
    read the wide pixel within the contract, which they miss by a whole block if the correction
    is lost); a pixel whose channels are 2^20 above the rest of its image and a channel block
    2^-20 below the pixel's others stay emulated, within the contract."""
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(3, 128, 8, 8, device="cuda", generator=g)
    w = torch.randn(128, 128, 3, 3, device="cuda", generator=g)
    x[0, 5, 2, 3] = float("inf")
    x[1, 7, 4, 4] = 1e-30                # pixel (4, 4) of image 1, channels 0-63: flagged
    x[2, :64, 1, 6] *= 2.0**20           # one pixel far above its image: not flagged
    x[2, 64:, 5, 5] *= 2.0**-20          # one channel block far below the pixel's other: not flagged
    w[17, 2, 1, 1] = float("nan")
    x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    ref = F.conv2d(x.double(), w.double(), None, padding=1)
    _poisoned_allocator(*ref.shape)
    torch.ops.torch_hpc.exact_path_counts(x, True)
    got = torch.ops.torch_hpc.conv2d_implicit(x, w, [1, 1], [1, 1], [1, 1])
    exact, total = torch.ops.torch_hpc.exact_path_counts(x, True)
    assert total == 3 * 64 * 128 and exact == 2 * 9 * 128 + 3 * 64, (exact, total)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.equal(got.isinf(), got.isinf() & (got.sign() == ref.sign()))
    keep = [c for c in range(128) if c != 17]
    for image in (1, 2):  # image 1: the outputs that read pixel (4, 4) take its block's correction
        mine, want = got[image, keep], ref[image, keep]
        assert _contract_ratio(mine.unsqueeze(0), want.unsqueeze(0), x[image:image + 1], w[keep], 2,
                               {"padding": 1}) <= contract_constant(128 * 9)


@requires_sm90
def test_cuda_implicit_gemm_route_makes_no_host_synchronisation():
    """Forward and both gradients of the implicit-GEMM route, the split K and the exact path
    included, decide on the device: torch's sync debug mode raises on any host synchronisation."""
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(4, 64, 20, 20, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(128, 64, 3, 3, device="cuda", generator=g) / 24).requires_grad_()
    x.requires_grad_()
    with torch_hpc.backends.conv.flags(implicit_gemm=True):
        torch_hpc.conv2d(x, w, None, stride=2, padding=1).sum().backward()  # warm-up (cuBLAS, caches)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = torch_hpc.conv2d(x, w, None, stride=2, padding=1)
            out.backward(torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert _graph_has(out.grad_fn, "ImplicitConv2d")


@requires_sm90
def test_cuda_implicit_gemm_training_keeps_real_tensors_off_the_exact_path():
    """A few training steps of a small CNN on sklearn's digits (upsampled to 32x32, 64-channel
    convolutions, ReLU): its activations, output gradients and weights, in all three passes of
    the implicit-GEMM route, send less than 1 % of the outputs to the exact path."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.tensor(digits.images[:256], dtype=torch.float32, device="cuda").unsqueeze(1) / 16
    images = F.interpolate(images, size=32, mode="bilinear").repeat(1, 64, 1, 1)
    labels = torch.tensor(digits.target[:256], device="cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(128, 128, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 10)).cuda()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch_hpc.exact_path_stats("cuda", reset=True)
    with torch_hpc.backends.conv.flags(implicit_gemm=True), torch_hpc.fp32_emulation():
        for step in range(6):
            batch = slice(64 * (step % 4), 64 * (step % 4 + 1))
            loss = F.cross_entropy(model(images[batch].contiguous(memory_format=torch.channels_last)),
                                   labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    stats = torch_hpc.exact_path_stats("cuda", reset=True)
    assert stats["outputs"] > 0 and stats["fraction"] < 0.01, stats
    assert torch.isfinite(loss)


def _graph_has(fn, name, depth=6):
    return fn is not None and depth > 0 and (name in type(fn).__name__ or any(
        _graph_has(nxt, name, depth - 1) for nxt, _ in fn.next_functions))


@requires_sm90
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("layer", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (3, 1, 2, 2)],
                         ids=lambda c: "k{}-s{}-p{}-d{}".format(*c))
def test_cuda_implicit_gemm_route_values_gradients_and_layout(channels_last, layer):
    """Forward and both gradients on the kernel (strided input gradients by phases, the weight
    gradient as a convolution with the batch, 5 here, padded to 64 channels, K split): each
    within cuDNN fp32's normwise error (TF32 off) of fp64."""
    k, stride, padding, dilation = layer
    kw = {"stride": stride, "padding": padding, "dilation": dilation}
    g = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(5, 64, 12, 12, device="cuda", generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 64, k, k, device="cuda", generator=g) / (8 * k)
    b = torch.randn(128, device="cuda", generator=g)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    with torch_hpc.backends.conv.flags(implicit_gemm=True):
        out = torch_hpc.conv2d(x, w, b, **kw)
    grad = torch.randn(out.shape, device="cuda", generator=g)
    _poisoned_allocator(*x.shape)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), grad)
    assert _graph_has(out.grad_fn, "ImplicitConv2d")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        cudnn = F.conv2d(x, w, b, **kw)
        cudnn_grads = torch.autograd.grad(cudnn, (x, w, b), grad)
    assert out.stride() == cudnn.stride() and gx.stride() == x.stride() and gw.shape == w.shape
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.conv2d(x64, w64, b64, **kw)
    refs = (ref, *torch.autograd.grad(ref, (x64, w64, b64), grad.double()))
    rel = lambda t, want: ((t.double() - want).norm() / want.norm()).item()  # noqa: E731
    for name, got, base, want in zip(("output", "input grad", "weight grad", "bias grad"),
                                     (out, gx, gw, gb), (cudnn, *cudnn_grads), refs):
        # at most twice cuDNN fp32's error: both sit at fp32's rounding level here (~1e-7)
        assert rel(got, want) <= 2 * max(rel(base, want), 1e-7), (name, rel(got, want), rel(base, want))


@requires_sm90
def test_cuda_implicit_gemm_route_computes_only_the_gradients_asked_for(monkeypatch):
    """autograd.grad(y, x) runs the input gradient's convolutions alone, as cuDNN's backward
    does (not the weight gradient merely because the weight requires grad); backward() both."""
    calls = []
    for name in ("_input_grad_by_convs", "_weight_grad_by_conv"):
        real = getattr(torch_hpc.conv, name)
        monkeypatch.setattr(torch_hpc.conv, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    g = torch.Generator(device="cuda").manual_seed(13)
    leaf = torch.randn(2, 64, 10, 10, device="cuda", generator=g, requires_grad=True)
    w = torch.randn(64, 64, 3, 3, device="cuda", generator=g, requires_grad=True)
    with torch_hpc.backends.conv.flags(implicit_gemm=True):
        out = torch_hpc.conv2d(leaf * 1, w, None, 1, 1)
    torch.autograd.grad(out.sum(), leaf, retain_graph=True)
    assert calls == ["_input_grad_by_convs"]
    out.sum().backward()
    assert calls[1:] == ["_input_grad_by_convs", "_weight_grad_by_conv"] and w.grad is not None


@requires_sm90
@pytest.mark.parametrize("passes", [(True, False, True), (False, True, False), (False, False, False)])
def test_cuda_implicit_gemm_auto_sends_each_pass_where_the_table_says(monkeypatch, passes):
    """implicit_gemm="auto": the passes the measured table gives the kernel run on it, the others
    on cuDNN fp32; values, gradients and layouts as cuDNN's either way; no pass: cuDNN's own node."""
    monkeypatch.setattr(torch_hpc.conv, "_measured_wins", lambda cin, cout, stride: passes)
    calls = []
    for name in ("_implicit_op", "_input_grad_by_convs", "_weight_grad_by_conv"):
        real = getattr(torch_hpc.conv, name)
        monkeypatch.setattr(torch_hpc.conv, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    g = torch.Generator(device="cuda").manual_seed(14)
    x = torch.randn(3, 64, 9, 9, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 64, 3, 3, device="cuda", generator=g) / 24
    x.requires_grad_(), w.requires_grad_()
    with torch_hpc.backends.conv.flags(implicit_gemm="auto"):
        out = torch_hpc.conv2d(x, w, None, 1, 1)
    gx, gw = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    assert _graph_has(out.grad_fn, "ImplicitConv2d") == any(passes)
    assert ("_implicit_op" in calls[:1]) == passes[0]
    assert ("_input_grad_by_convs" in calls) == passes[1] and ("_weight_grad_by_conv" in calls) == passes[2]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref = F.conv2d(x, w, None, 1, 1)
        ref_gx, ref_gw = torch.autograd.grad(ref, (x, w), torch.ones_like(ref))
    assert out.stride() == ref.stride() and gx.stride() == ref_gx.stride()
    for got, want in ((out, ref), (gx, ref_gx), (gw, ref_gw)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@requires_sm90
def test_cuda_implicit_gemm_conv1d_runs_as_height_one():
    """F.conv1d under the route: the 2-D kernel with height 1, values and both gradients within
    twice cuDNN fp32's error, torch's output layout."""
    g = torch.Generator(device="cuda").manual_seed(12)
    x = torch.randn(6, 64, 300, device="cuda", generator=g, requires_grad=True)
    w = (torch.randn(128, 64, 5, device="cuda", generator=g) / 18).requires_grad_()
    kw = {"stride": 2, "padding": 2, "dilation": 1}
    with torch_hpc.backends.conv.flags(implicit_gemm=True):
        out = torch_hpc.conv1d(x, w, None, **kw)
    grad = torch.randn(out.shape, device="cuda", generator=g)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    assert _graph_has(out.grad_fn, "ImplicitConv2d") and out.is_contiguous() and gx.is_contiguous()
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref = F.conv1d(x64, w64, None, **kw)
    refs = (ref, *torch.autograd.grad(ref, (x64, w64), grad.double()))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        base = F.conv1d(x, w, None, **kw)
        bases = (base, *torch.autograd.grad(base, (x, w), grad))
    rel = lambda t, want: ((t.double() - want).norm() / want.norm()).item()  # noqa: E731
    for got, b, want in zip((out, gx, gw), bases, refs):
        assert rel(got, want) <= 2 * max(rel(b, want), 1e-7)


@requires_sm90
def test_cuda_implicit_gemm_op_passes_opcheck():
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(2, 64, 6, 6, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.torch_hpc.conv2d_implicit, (x, w, [2, 1], [1, 0], [1, 2]),
                          test_utils=("test_schema", "test_faketensor"))


@requires_sm90
def test_cuda_images_as_channels_is_the_padded_transpose():
    """The weight gradient's layout op: (N, C, H, W) -> (C, N padded, H, W), channels_last, zeros
    past N, bit-exact; wrong layouts are refused by name."""
    x = torch.randn(5, 96, 7, 9, device="cuda").contiguous(memory_format=torch.channels_last)
    got = torch.ops.torch_hpc.images_as_channels(x, 64)
    want = torch.zeros(96, 64, 7, 9, device="cuda")
    want[:, :5] = x.transpose(0, 1)
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, want)
    torch.library.opcheck(torch.ops.torch_hpc.images_as_channels, (x, 64),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="channels_last"):
        torch.ops.torch_hpc.images_as_channels(x.contiguous(), 64)


@requires_sm90
def test_cuda_implicit_gemm_op_takes_an_input_view_at_any_offset():
    """A channels_last input that starts 4 bytes into its storage (the split reads 8-byte pairs)."""
    g = torch.Generator(device="cuda").manual_seed(15)
    flat = torch.randn(1 + 2 * 6 * 7 * 64, device="cuda", generator=g)
    x = flat[1:].view(2, 6, 7, 64).permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 8 == 4
    w = (torch.randn(64, 64, 3, 3, device="cuda", generator=g) / 24).contiguous(memory_format=torch.channels_last)
    got = torch.ops.torch_hpc.conv2d_implicit(x, w, [1, 1], [1, 1], [1, 1])
    ref = F.conv2d(x.double(), w.double(), None, padding=1)
    assert _contract_ratio(got, ref, x, w, 2, {"padding": 1}) <= contract_constant(64 * 9)
