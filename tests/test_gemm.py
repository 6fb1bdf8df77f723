"""Accuracy and semantics of torch_hpc.mm / bmm / matmul / linear against fp64 references."""
import math

import pytest
import torch

import torch_hpc
from helpers import (DEVICES, contract_constant, elementwise_bound_ratio, fp32_reference_product,
                     generator, ref64, rel_error, requires_cuda)

SHAPES = [(1, 1, 1), (1, 7, 1), (3, 5, 2), (17, 33, 65), (64, 64, 64), (128, 257, 96),
          (129, 31, 130), (300, 1000, 200), (33, 4099, 7), (1024, 1024, 1024)]


def poison_allocator(device, nbytes):
    """Fills the caching allocator's free blocks with NaN so an unwritten output shows."""
    if device == "cuda":
        torch.full((nbytes // 4 + 1024,), float("nan"), device=device)
        torch.cuda.synchronize()


def _check_product(c, a, b, seed, label=""):
    ref = ref64(a, b)
    k = a.shape[-1]
    assert c.shape == ref.shape and c.dtype == torch.float32
    assert torch.isfinite(c).all(), f"{label} non-finite output (seed {seed})"
    ratio = elementwise_bound_ratio(c, a, b, ref)
    assert ratio <= contract_constant(k), (
        f"{label} |C-C64| <= c|A||B| violated: c={ratio:.3g} > {contract_constant(k):.3g} "
        f"(K={k}, seed {seed})")
    return ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_mm_accuracy_vs_fp64_and_fp32(device, m, k, n):
    seed = hash((m, k, n)) % 10_000
    gen = generator(device, seed)
    a = torch.randn(m, k, device=device, generator=gen)
    b = torch.randn(k, n, device=device, generator=gen)
    poison_allocator(device, 4 * m * n)
    c = torch_hpc.mm(a, b)
    ref = _check_product(c, a, b, seed)
    if k >= 64:
        err, err32 = rel_error(c, ref), rel_error(fp32_reference_product(a, b), ref)
        assert err <= err32, f"emulated error {err:.3g} > fp32 {err32:.3g} (K={k}, seed {seed})"


@pytest.mark.parametrize("device", DEVICES)
def test_transposed_sliced_and_expanded_inputs(device):
    gen = generator(device, 1)
    a_t = torch.randn(70, 50, device=device, generator=gen).t()          # (50, 70), stride (1, 50)
    b_s = torch.randn(140, 90, device=device, generator=gen)[::2, 1::3]  # (70, 30), strided
    assert not a_t.is_contiguous() and not b_s.is_contiguous()
    _check_product(torch_hpc.mm(a_t, b_s), a_t, b_s, 1, "strided")
    col = torch.randn(70, 1, device=device, generator=gen).expand(70, 40)  # stride 0
    _check_product(torch_hpc.mm(a_t, col), a_t, col, 1, "expanded")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_a,shape_b", [
    ((4, 33, 65), (4, 65, 17)),   # bmm
    ((2, 3, 9, 70), (70, 5)),     # folded into M
    ((9, 70), (5, 70, 6)),        # broadcast a
    ((2, 1, 9, 70), (3, 70, 6)),  # broadcast both
    ((70,), (70, 6)), ((9, 70), (70,)), ((70,), (70,)), ((3, 9, 70), (70,)),
])
def test_matmul_semantics(device, shape_a, shape_b):
    gen = generator(device, 2)
    a = torch.randn(*shape_a, device=device, generator=gen)
    b = torch.randn(*shape_b, device=device, generator=gen)
    c = torch_hpc.matmul(a, b)
    ref = torch.matmul(a.double(), b.double())
    assert c.shape == ref.shape
    assert rel_error(c, ref) < 1e-6
    if len(shape_a) == 3 and len(shape_b) == 3:
        torch.testing.assert_close(torch_hpc.bmm(a, b), c, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_dimensions(device):
    z = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    assert torch_hpc.mm(z(0, 5), z(5, 3)).shape == (0, 3)
    assert torch_hpc.mm(z(4, 5), z(5, 0)).shape == (4, 0)
    poison_allocator(device, 4 * 12)
    c = torch_hpc.mm(z(4, 0), z(0, 3))
    assert c.shape == (4, 3) and (c == 0).all()
    assert torch_hpc.bmm(z(0, 4, 5), z(0, 5, 3)).shape == (0, 4, 3)
    assert (torch_hpc.bmm(z(2, 4, 0), z(2, 0, 3)) == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["rows_of_a", "cols_of_b"])
def test_extreme_row_and_column_scales(device, side):
    """Rows of A / columns of B scaled by 2^-120 ... 2^120 are as accurate as rows near 1."""
    seed = 3
    gen = generator(device, seed)
    m, k, n = 96, 256, 80
    a = torch.randn(m, k, device=device, generator=gen)
    b = torch.randn(k, n, device=device, generator=gen)
    if side == "rows_of_a":
        e = torch.randint(-120, 121, (m, 1), device=device, generator=gen)
        a = torch.ldexp(a, e)
    else:
        e = torch.randint(-120, 121, (1, n), device=device, generator=gen)
        b = torch.ldexp(b, e)
    c = torch_hpc.mm(a, b)
    ref = _check_product(c, a, b, seed, side)
    # Row by row the relative error stays at the unscaled level.
    dim = 1 if side == "rows_of_a" else 0
    per_line = (c.double() - ref).norm(dim=dim) / ref.norm(dim=dim)
    assert per_line.max().item() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_too_wide_rows_take_the_exact_path(device):
    a = torch.tensor([[1e30, 1e-30], [1.0, 2.0]], device=device)
    b = torch.tensor([[0.0], [1.0]], device=device)
    c = torch_hpc.mm(a, b)
    assert c[0, 0].item() == pytest.approx(1e-30, rel=1e-7)
    assert c[1, 0].item() == 2.0
    assert torch_hpc.split(a)[3].tolist() == [True, False]

    seed = 4
    gen = generator(device, seed)
    a = torch.randn(64, 200, device=device, generator=gen)
    b = torch.randn(200, 48, device=device, generator=gen)
    a[5, 7] *= 2.0**40    # row 5 spans > 28 binades
    b[3, 11] *= 2.0**-40  # column 11 too
    assert torch_hpc.split(a)[3].nonzero().flatten().tolist() == [5]
    assert torch_hpc.split(b.t())[3].nonzero().flatten().tolist() == [11]
    _check_product(torch_hpc.mm(a, b), a, b, seed, "wide rows")


@pytest.mark.parametrize("device", DEVICES)
def test_blocks_of_a_row_far_apart_keep_the_emulation(device):
    """torch_hpc.backends.gemm.block_exponents (A's rows, 64 k per exponent where a row needs
    it): a row whose first 64 values are 2^40 above the rest, or whose blocks step down by 2^-20
    each, is no exact-path row and stays within the contract (with one exponent per row, all of
    them are); a block more than 96 binades below its row's largest falls back and is exact."""
    seed = 13
    gen = generator(device, seed)
    a = torch.randn(96, 320, device=device, generator=gen)
    b = torch.randn(320, 130, device=device, generator=gen)
    a[:32, :64] *= 2.0**40                                   # a 2^40 block in each of 32 rows
    a[32:64] *= torch.ldexp(torch.ones(320, device=device),  # 2^0, 2^-20, ..., 2^-80 by block
                            -20 * (torch.arange(320, device=device) // 64))
    a[64, 256:] *= 2.0**-110                                 # beyond the 96-binade shift
    assert torch_hpc.split(a)[3][:65].all()                  # one exponent per row: all flagged
    with torch_hpc.backends.gemm.flags(sgemm_fallback=False, block_exponents=False):
        torch_hpc.exact_path_stats(device, reset=True)
        torch_hpc.mm(a, b)
        assert torch_hpc.exact_path_stats(device, reset=True)["exact_outputs"] >= 65 * 130
    with torch_hpc.backends.gemm.flags(sgemm_fallback=False, block_exponents=True):
        torch_hpc.exact_path_stats(device, reset=True)
        c = torch_hpc.mm(a, b)
        stats = torch_hpc.exact_path_stats(device, reset=True)
    assert stats["outputs"] == 96 * 130 and stats["exact_outputs"] == 130, stats  # row 64 alone
    _check_product(c, a, b, seed, "blocks far apart")
    ref = ref64(a, b)
    assert c[64].double().sub(ref[64]).abs().max() <= 2.0**-24 * ref[64].abs().max()  # fp64, rounded


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_gradient_products_stay_off_the_exact_path(device):
    """The language-model head's backward products with a 32000-word vocabulary (logits of std 2:
    rows of the gradient span ~2^33, 9 in 10 rows fall back with one exponent per row) run
    without the exact path with block exponents, within the contract."""
    gen = generator(device, 21)
    tokens, vocab, width = 64, 32000, 96
    logits = 2 * torch.randn(tokens, vocab, device=device, generator=gen)
    target = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    grad = torch.softmax(logits, 1)
    grad[torch.arange(tokens, device=device), target] -= 1
    grad /= tokens
    w = 0.02 * torch.randn(vocab, width, device=device, generator=gen)
    x = torch.randn(tokens, width, device=device, generator=gen)
    assert torch_hpc.split(grad)[3].float().mean() > 0.5
    with torch_hpc.backends.gemm.flags(sgemm_fallback=False, block_exponents=True):
        torch_hpc.exact_path_stats(device, reset=True)
        grad_x = torch_hpc.mm(grad, w)           # dL/dx
        grad_w = torch_hpc.mm(grad.t(), x)       # dL/dW, the gradient's columns as rows of A
        stats = torch_hpc.exact_path_stats(device, reset=True)
    assert stats["exact_outputs"] == 0 and stats["outputs"] == tokens * width + vocab * width, stats
    _check_product(grad_x, grad, w, 21, "dx")
    _check_product(grad_w, grad.t(), x, 21, "dW")


def _ieee_reference(a, b):
    """Elementwise IEEE fp64 products and sums (no BLAS shortcuts), rounded to fp32."""
    return (a.double().unsqueeze(2) * b.double().unsqueeze(0)).sum(1).float()


@pytest.mark.parametrize("device", DEVICES)
def test_inf_nan_patterns_follow_fp64(device):
    seed = 5
    gen = generator(device, seed)
    m, k, n = 40, 70, 36
    a = torch.randn(m, k, device=device, generator=gen)
    b = torch.randn(k, n, device=device, generator=gen)
    a[1, 3] = float("inf")
    a[2, 4] = float("-inf")
    a[3, 5] = float("nan")
    b[3, 7] = 0.0                               # inf * 0 -> NaN in column 7
    b[:, 8] = 0.0
    b[6, 9] = float("inf")
    a[10, :] = 1e30                             # finite, overflows fp32 after the sum
    b[:, 10] = 1e30
    a[11, :] = 1e30
    a[11, 1::2] = -1e30
    b[:, 12] = 1e10                             # row 11 x col 12 cancels to 0 though |A||B| overflows
    c = torch_hpc.mm(a, b)
    ref = _ieee_reference(a, b)
    assert torch.equal(c.isnan(), ref.isnan()), f"NaN pattern differs (seed {seed})"
    assert torch.equal(c.isposinf(), ref.isposinf()), f"+inf pattern differs (seed {seed})"
    assert torch.equal(c.isneginf(), ref.isneginf()), f"-inf pattern differs (seed {seed})"
    assert c[10, 10].item() == float("inf") and c[11, 12].item() == 0.0
    finite = torch.isfinite(ref)
    torch.testing.assert_close(c[finite], ref[finite], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_split_reconstructs_rows(device):
    gen = generator(device, 6)
    x = torch.randn(50, 300, device=device, generator=gen)
    x = torch.ldexp(x, torch.randint(-100, 100, (50, 1), device=device, generator=gen))
    hi, lo, e, fb = torch_hpc.split(x)
    assert hi.dtype == lo.dtype == torch.float16 and not fb.any()
    scaled = torch.ldexp(x, -e[:, None])
    torch.testing.assert_close(hi, scaled.half(), rtol=0, atol=0)  # round-to-nearest-even
    assert (hi.abs().amax(1).float() >= 2**14).all() and (hi.abs().amax(1).float() <= 2**15).all()
    back = torch.ldexp(hi.double() + lo.double() / 2048, e[:, None])
    assert ((back - x.double()).abs() <= 2.0**-22 * x.double().abs()).all()


def test_split_rounding_matches_torch_half_on_ties_and_subnormals():
    """The portable fp32->fp16 rounding equals torch's (IEEE RNE): ties, and lo in fp16's
    subnormal range (values near the bottom of a row's window)."""
    ties = [1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1024.0 + 0.5, 1024.0 + 1.5, -(1.0 + 2.0**-11)]
    near_bottom = [2.0**-14 * (1.0 + j * 2.0**-23) for j in range(0, 4096, 3)]
    spread = torch.rand(2000, generator=generator("cpu", 12)) * 2.0**15
    x = torch.cat([torch.tensor([2.0**14] + ties + near_bottom), spread]).reshape(1, -1)
    hi, lo, e, fb = torch_hpc.split(x)
    assert e.item() == 0 and not fb.item()  # row max 2^14: values are split unscaled
    torch.testing.assert_close(hi, x.half(), rtol=0, atol=0)
    torch.testing.assert_close(lo, ((x - hi.float()) * 2048).half(), rtol=0, atol=0)
    assert (lo[0, 6:6 + len(near_bottom)].float().abs() < 2.0**-14).any()  # subnormals exercised


@requires_cuda
@pytest.mark.parametrize("rows,k,transposed", [(257, 1000, False), (130, 3000, False), (33, 20000, False),
                                              (257, 1000, True), (5, 64, False)])
def test_cpu_and_cuda_split_are_bit_identical(rows, k, transposed):
    """Both CUDA routes (rows held whole in shared memory; two passes for long or strided rows)
    give the CPU's bits, and zero padding up to whole tiles."""
    x = torch.randn(rows, k, generator=generator("cpu", 7))
    x = torch.ldexp(x, torch.randint(-60, 60, (rows, 1)))
    x[3, 3] = float("inf")
    x[4, 4] *= 2.0**50
    if transposed:  # K-strided rows, as B's columns are
        x = x.t().contiguous().t()
    cpu = torch_hpc.split(x)
    gpu = torch_hpc.split(x.cuda())
    for name, u, v in zip(("hi", "lo", "exponent", "fallback"), cpu, gpu):
        assert torch.equal(u.view(torch.int16) if u.is_floating_point() else u,
                           (v.view(torch.int16) if v.is_floating_point() else v).cpu()), name
    hi, lo, exponent, fallback = torch.ops.torch_hpc.split_planes(x.cuda())
    for plane in (hi, lo):
        assert plane[rows:].count_nonzero() == 0 and plane[:, k:].count_nonzero() == 0
    assert exponent[rows:].count_nonzero() == 0 and fallback[rows:].count_nonzero() == 0


@requires_cuda
def test_cuda_is_deterministic_and_graph_capturable():
    gen = generator("cuda", 8)
    a = torch.randn(700, 900, device="cuda", generator=gen)
    b = torch.randn(900, 500, device="cuda", generator=gen)
    first = torch_hpc.mm(a, b)
    assert torch.equal(first, torch_hpc.mm(a, b))
    torch_hpc.mm(a, b)  # warm-up on the side stream below is not needed: no host sync inside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch_hpc.mm(a, b)
    a.copy_(torch.randn(700, 900, device="cuda", generator=gen))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, torch_hpc.mm(a, b))
    assert not torch.equal(captured, first)


@requires_cuda
@pytest.mark.parametrize("n", [4096, 8192])
def test_cuda_large_square_beats_sgemm(n):
    gen = generator("cuda", n)
    a = torch.randn(n, n, device="cuda", generator=gen)
    b = torch.randn(n, n, device="cuda", generator=gen)
    ref = ref64(a, b)
    err = rel_error(torch_hpc.mm(a, b), ref)
    err32 = rel_error(fp32_reference_product(a, b), ref)
    assert err <= err32, f"n={n}: emulated {err:.3g} vs SGEMM {err32:.3g}"


@requires_cuda
@pytest.mark.parametrize("batch,m,k,n", [(1, 128, 64, 128), (1, 300, 1000, 200), (1, 1, 1, 1),
                                         (3, 1000, 200, 1500), (2, 129, 4099, 257)])
def test_cuda_kernels_agree_with_fp64(batch, m, k, n):
    """Both CUDA kernels (mma.sync everywhere; wgmma on compute capability 9.0) meet the accuracy
    contract; 3x1000x1500 has more 128x128 tiles than an H100 has SMs, so each persistent block
    of the wgmma kernel takes several tiles and its pipeline wraps across them."""
    gen = generator("cuda", m + k + n)
    a = torch.randn(batch, m, k, device="cuda", generator=gen)
    b = torch.randn(batch, k, n, device="cuda", generator=gen)
    outputs = {}
    for kernel in ("sm80", "auto"):
        poison_allocator("cuda", 4 * batch * m * n)
        with torch_hpc.backends.gemm.flags(kernel=kernel):
            outputs[kernel] = c = torch_hpc.bmm(a, b)
        for i in range(batch):
            ref = _check_product(c[i], a[i], b[i], i, kernel)
            if k >= 256:  # near K = 64 the split's own floor and fp32's error are alike
                err, err32 = rel_error(c[i], ref), rel_error(fp32_reference_product(a[i], b[i]), ref)
                assert err <= err32, f"{kernel}: emulated {err:.3g} > fp32 {err32:.3g}"
    if torch.cuda.get_device_capability() == (9, 0) and k >= 1000:
        # Different kernels sum in a different order: equal bits would mean one kernel ran twice.
        assert not torch.equal(outputs["sm80"], outputs["auto"])


@requires_cuda
def test_cuda_int64_indexing():
    """A has more than 2^31 elements: offsets must not wrap."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs 40 GiB of free GPU memory")
    m, k, n = 2**16 + 3, 2**15 + 8, 40
    a = torch.empty(m, k, device="cuda").normal_(generator=generator("cuda", 9))
    b = torch.randn(k, n, device="cuda", generator=generator("cuda", 10))
    c = torch_hpc.mm(a, b)
    rows = torch.tensor([0, m // 2, m - 1], device="cuda")
    ref = ref64(a[rows], b)
    assert rel_error(c[rows], ref) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_clear_errors(device):
    f = torch.randn(4, 5, device=device)
    g = torch.randn(5, 3, device=device)
    with pytest.raises(ValueError, match="argument 'a' to have dtype torch.float32, got torch.float64$"):
        torch_hpc.mm(f.double(), g)
    with pytest.raises(ValueError, match="argument 'b' to have dtype torch.float32, got torch.int32$"):
        torch_hpc.mm(f, g.to(torch.int32))
    with pytest.raises(ValueError, match="argument 'a' to have dtype torch.float32, got torch.float64$"):
        torch.ops.torch_hpc.mm.default(f.double(), g)  # the C++ check's message too
    with pytest.raises(ValueError, match="argument 'a' to be 2-D"):
        torch_hpc.mm(f[0], g)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        torch_hpc.mm(f, g.t())
    with pytest.raises(ValueError, match="batch sizes differ"):
        torch_hpc.bmm(f.expand(2, 4, 5), g.expand(3, 5, 3))
    with pytest.raises(ValueError, match="argument 'weight' to be 2-D"):
        torch_hpc.linear(f, g.flatten())
    with pytest.raises(ValueError, match="argument 'input' to have last dimension"):
        torch_hpc.linear(f, torch.randn(3, 6, device=device))
    with pytest.raises(ValueError, match="argument 'bias'"):
        torch_hpc.linear(f, torch.randn(3, 5, device=device), torch.randn(4, device=device))
    with pytest.raises(ValueError, match="mm_bias: expected argument 'bias' to be a 1-D torch.float32"):
        torch.ops.torch_hpc.mm_bias(f, g, torch.randn(3, device=device, dtype=torch.float64))
    if device == "cuda":
        with pytest.raises(ValueError, match="same device"):
            torch_hpc.mm(f, g.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_pass_through_linear_and_matmul(device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 matmul on CPU is slow and not what this checks")
    x = torch.randn(6, 8, device=device, dtype=dtype)
    w = torch.randn(3, 8, device=device, dtype=dtype)
    torch.testing.assert_close(torch_hpc.linear(x, w), torch.nn.functional.linear(x, w))
    torch.testing.assert_close(torch_hpc.matmul(x, w.t()), torch.matmul(x, w.t()))


def test_autocast_goes_to_the_ordinary_op():
    x, w = torch.randn(6, 8), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch_hpc.linear(x, w).dtype == torch.bfloat16
        assert torch_hpc.matmul(x, w.t()).dtype == torch.bfloat16


def test_meta_tensors_give_shapes():
    a, w = torch.empty(2, 3, 4, device="meta"), torch.empty(5, 4, device="meta")
    assert torch_hpc.matmul(a, w.t()).shape == (2, 3, 5)
    assert torch_hpc.linear(a, w, torch.empty(5, device="meta")).shape == (2, 3, 5)


def test_accuracy_does_not_depend_on_magnitude_cpu():
    """Same inputs at 2^-100 and 2^100 give the same result up to the exact power of two."""
    gen = generator("cpu", 11)
    a, b = torch.randn(40, 300, generator=gen), torch.randn(300, 30, generator=gen)
    base = torch_hpc.mm(a, b)
    for s in (-100, 100):
        scaled = torch_hpc.mm(torch.ldexp(a, torch.tensor(s)), b)
        assert torch.equal(torch.ldexp(scaled, torch.tensor(-s)), base)
    assert math.isfinite(base.sum().item())


@requires_cuda
def test_cuda_small_grids_fall_back_to_sgemm_without_tf32():
    g = generator("cuda", 0)
    a = torch.randn(64, 1024, device="cuda", generator=g)
    b = torch.randn(1024, 512, device="cuda", generator=g)
    sgemm = fp32_reference_product(a, b)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch_hpc.backends.gemm.flags(sgemm_fallback=True):
            c = torch_hpc.mm(a, b)
            tf32_left_on = torch.backends.cuda.matmul.allow_tf32
        with torch_hpc.backends.gemm.flags(sgemm_fallback=False):
            emulated = torch_hpc.mm(a, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert torch.equal(c, sgemm) and tf32_left_on  # cuBLAS SGEMM, TF32 off for it and restored
    assert not torch.equal(emulated, sgemm)        # the emulation kernel
    # F.linear's bias is fused into the same cuBLAS call, TF32 off for it too
    bias = torch.randn(512, device="cuda", generator=g)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch_hpc.backends.gemm.flags(sgemm_fallback=True):
            out = torch_hpc.linear(a, b.t(), bias)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    torch.testing.assert_close(out, torch.nn.functional.linear(a, b.t(), bias), rtol=0, atol=0)


_TORCH_NODES = {"MmBackward0", "BmmBackward0", "AddmmBackward0"}


@requires_cuda
@pytest.mark.parametrize("op", ["mm", "bmm", "linear", "linear_no_bias"])
def test_cuda_sgemm_fallback_products_are_torchs_own_op_and_node(op):
    """Where the product and the gradients it needs all run SGEMM with TF32 off, the op is
    torch's own call with torch's autograd node (no torch_hpc node, no extra host work): same
    values and gradients as torch. TF32 on or the fallback off keep the torch_hpc node."""
    g = generator("cuda", 0)
    shapes = {"mm": ((64, 96), (96, 80)), "bmm": ((3, 64, 96), (3, 96, 80)),
              "linear": ((64, 96), (80, 96)), "linear_no_bias": ((64, 96), (80, 96))}[op]
    x, y = (torch.randn(*s, device="cuda", generator=g, requires_grad=True) for s in shapes)
    bias = torch.randn(80, device="cuda", generator=g, requires_grad=True) if op == "linear" else None
    ours = {"mm": torch_hpc.mm, "bmm": torch_hpc.bmm,
            "linear": lambda a, b: torch_hpc.linear(a, b, bias),
            "linear_no_bias": torch_hpc.linear}[op]
    theirs = {"mm": torch.mm, "bmm": torch.bmm, "linear": lambda a, b: torch.nn.functional.linear(a, b, bias),
              "linear_no_bias": torch.nn.functional.linear}[op]
    leaves = [t for t in (x, y, bias) if t is not None]

    def run(f):
        out = f(x, y)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        return out, grads, type(out.grad_fn).__name__

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch_hpc.backends.gemm.flags(sgemm_fallback=True):
            out, grads, node = run(ours)
            ref, ref_grads, ref_node = run(theirs)
        with torch_hpc.backends.gemm.flags(sgemm_fallback=False):
            _, emulated_grads, emulated_node = run(ours)
        torch.backends.cuda.matmul.allow_tf32 = True
        with torch_hpc.backends.gemm.flags(sgemm_fallback=True):
            tf32_out, _, tf32_node = run(ours)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert node == ref_node and node in _TORCH_NODES
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert emulated_node not in _TORCH_NODES and tf32_node not in _TORCH_NODES
    assert torch.equal(tf32_out, ref)  # SGEMM with TF32 switched off for it
    for a, b in zip(emulated_grads, ref_grads):
        assert rel_error(a, b) < 1e-5


def test_cpu_products_keep_the_torch_hpc_node():
    x = torch.randn(8, 16, requires_grad=True)
    out = torch_hpc.mm(x, torch.randn(16, 4))
    assert type(out.grad_fn).__name__ not in _TORCH_NODES


@requires_cuda
def test_cuda_forcing_sm90_where_it_cannot_run_is_a_clear_error():
    if torch.cuda.get_device_capability() == (9, 0) and "sm_90a" in torch_hpc.build_info()["cuda_archs"]:
        pytest.skip("the wgmma kernel runs here")
    a = torch.randn(256, 256, device="cuda")
    with torch_hpc.backends.gemm.flags(kernel="sm90", sgemm_fallback=False):
        with pytest.raises(RuntimeError, match="backends.gemm.kernel is 'sm90'"):
            torch_hpc.mm(a, a)


@requires_cuda
def test_cuda_promotion_keeps_error_growth_sublinear_in_k():
    """Promotion into the fp32 accumulator every k-block: from K = 1024 to 16384 the normwise
    error grows like a random walk (about 4x), not linearly (16x)."""
    errors = {}
    for k in (1024, 4096, 16384):
        g = generator("cuda", k)
        a = torch.randn(256, k, device="cuda", generator=g)
        b = torch.randn(k, 256, device="cuda", generator=g)
        errors[k] = rel_error(torch_hpc.mm(a, b), ref64(a, b))
    assert errors[16384] < 8 * errors[1024], errors
    assert errors[16384] < 1e-6, errors
