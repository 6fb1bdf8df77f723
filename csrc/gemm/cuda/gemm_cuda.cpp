// CUDA implementation of torch_hpc::mm / bmm / split: workspaces from PyTorch's caching
// allocator, kernels on the current stream, no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include "../checks.h"
#include "../settings.h"
#include "../split.h"
#include "../torch_path.h"
#include "kernels.h"

namespace torch_hpc {
namespace gemm {
namespace {

struct Planes {
  at::Tensor hi, lo, exponent, fallback;
  int64_t rows_pad, k_pad;
  at::Tensor factor;  // block mode: [batch, k_pad / 64, rows_pad] fp32 (../split.h)
  at::Tensor block_tiles;  // block mode, base per row: [batch, rows_pad / 128], 1 where a row needs factors
};

// How split_cuda lays out the exponents (../split.h): one per row, or block mode with a base
// exponent per `base_rows` rows and blocks at most `max_shift` binades below it.
struct SplitMode {
  bool blocks;
  int64_t base_rows;
  int max_shift;
};
constexpr SplitMode kPerRow{false, 1, 0};
constexpr SplitMode kBlocks{true, 1, kMaxBlockShift};

// x viewed as [batch, rows, k] through (sb, sr, sk).
Planes split_cuda(const at::Tensor& x, int64_t batch, int64_t rows, int64_t k, int64_t sb,
                  int64_t sr, int64_t sk, cudaStream_t stream, SplitMode mode = kPerRow) {
  const int64_t rows_pad = round_up(rows, kTileRows);
  const int64_t k_pad = round_up(k, kTileK);
  const auto opts = x.options();
  Planes p{at::empty({batch, rows_pad, k_pad}, opts.dtype(at::kHalf)),
           at::empty({batch, rows_pad, k_pad}, opts.dtype(at::kHalf)),
           at::empty({batch, rows_pad}, opts.dtype(at::kInt)),
           at::empty({batch, rows_pad}, opts.dtype(at::kInt)), rows_pad, k_pad,
           mode.blocks ? at::empty({batch, k_pad / kScaleBlock, rows_pad}, opts) : at::Tensor(),
           mode.blocks && mode.base_rows == 1 ? at::empty({batch, rows_pad / kTileRows}, opts.dtype(at::kInt))
                                              : at::Tensor()};
  const bool absolute = mode.blocks && mode.base_rows == 0;  // one pass, no statistics
  const at::Tensor stats = absolute ? at::Tensor() : at::empty({2, batch, rows_pad}, opts.dtype(at::kInt));
  cuda::SplitParams sp{x.data_ptr<float>(),
                       batch, rows, k, sb, sr, sk,
                       reinterpret_cast<uint16_t*>(p.hi.data_ptr<at::Half>()),
                       reinterpret_cast<uint16_t*>(p.lo.data_ptr<at::Half>()),
                       p.exponent.data_ptr<int32_t>(),
                       p.fallback.data_ptr<int32_t>(),
                       absolute ? nullptr : reinterpret_cast<uint32_t*>(stats[0].data_ptr<int32_t>()),
                       absolute ? nullptr : reinterpret_cast<uint32_t*>(stats[1].data_ptr<int32_t>()),
                       rows_pad, k_pad,
                       mode.blocks ? p.factor.data_ptr<float>() : nullptr,
                       mode.base_rows, mode.max_shift,
                       p.block_tiles.defined() ? p.block_tiles.data_ptr<int32_t>() : nullptr};
  C10_CUDA_CHECK(cuda::launch_split(sp, stream));
  return p;
}

// Outputs the exact path recomputed (a counter on each device, added to by the kernels) and
// outputs computed (host), since the last reset: torch_hpc.exact_path_stats.
constexpr int kMaxDevices = 64;
std::atomic<int64_t> outputs_computed[kMaxDevices];
std::mutex exact_counter_mutex;
at::Tensor exact_counters[kMaxDevices];

unsigned long long* exact_counter(const at::Tensor& like, int64_t outputs) {
  const int device = like.get_device();
  if (device < 0 || device >= kMaxDevices) return nullptr;
  outputs_computed[device].fetch_add(outputs, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(exact_counter_mutex);
  if (!exact_counters[device].defined())
    exact_counters[device] = at::zeros({1}, like.options().dtype(at::kLong));
  return reinterpret_cast<unsigned long long*>(exact_counters[device].data_ptr<int64_t>());
}

// The kernel torch_hpc.backends.gemm.kernel asks for on x's device ("auto": wgmma where it runs).
cuda::GemmKernel gemm_kernel_for(const at::Tensor& x) {
  const KernelChoice choice = kernel_choice();
  if (choice == KernelChoice::kSm80) return cuda::GemmKernel::sm80;
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(x.get_device());  // cached by torch
  const bool sm90 = props->major == 9 && props->minor == 0 && cuda::sm90_kernel_built();
  TORCH_CHECK(sm90 || choice == KernelChoice::kAuto,
              "torch_hpc.backends.gemm.kernel is 'sm90', but the wgmma kernel cannot run on ",
              x.device(), " (it needs compute capability 9.0 and a build with sm_90a in "
              "TORCH_CUDA_ARCH_LIST); set it to 'auto' or 'sm80'");
  return sm90 ? cuda::GemmKernel::sm90 : cuda::GemmKernel::sm80;
}

// Whether cuBLAS SGEMM (TF32 off: fp32 accuracy, fp32 inf/NaN semantics) should compute the
// product instead of the emulation, unless torch_hpc.backends.gemm.sgemm_fallback is off.
// mma.sync kernel: below two 128x128 output tiles per SM (measured on an H100: 2048^3 = 256
// tiles ran at 0.69x SGEMM, M = 64 at 0.14x). wgmma kernel: a time model of the emulation
// (split traffic, then waves of output tiles that cost a fixed part plus one part per 64-deep
// k-step) against SGEMM at its best per-SM rate, with the constants measured on an H200
// (least squares over the 69 shapes of `benchmarks/gemm.py --grid`, 2026-12-01, docs/gemm.md);
// the emulation is kept only where it is predicted clearly faster.
struct Sm90Model {
  static constexpr double kLaunchSeconds = 46e-6;        // split x2, GEMM, exact path: per call
  static constexpr double kTileSeconds = 18.7e-6;        // per wave of output tiles, fixed
  static constexpr double kKStepSeconds = 1.04e-6;       // per wave and 64-deep k-step
  static constexpr double kSplitBytesPerSecond = 1.67e12; // split: fp32 read, fp16 planes written
  static constexpr double kSgemmFlopsPerSm = 386e9;      // cuBLAS SGEMM's best (51 TF/s / 132 SMs)
  static constexpr double kMargin = 0.9;                 // emulate when predicted <= 0.9x SGEMM
};

bool prefer_sgemm(const at::Tensor& a, int64_t batch, int64_t m, int64_t n, int64_t k) {
  if (!sgemm_fallback() || k == 0 || batch * m * n == 0) return false;
  const cuda::GemmKernel kernel = gemm_kernel_for(a);
  const int64_t sms = at::cuda::getDeviceProperties(a.get_device())->multiProcessorCount;
  const int64_t tiles = batch * ((m + kTileRows - 1) / kTileRows) * ((n + kTileRows - 1) / kTileRows);
  if (kernel == cuda::GemmKernel::sm80) return tiles < 2 * sms;
  using M = Sm90Model;
  const double waves = double((tiles + sms - 1) / sms);
  const double k_steps = double((k + kTileK - 1) / kTileK);
  const double split_bytes = 8.0 * double(batch) * double(m + n) * double(k);
  const double emulated = M::kLaunchSeconds + waves * (M::kTileSeconds + k_steps * M::kKStepSeconds) +
                          split_bytes / M::kSplitBytesPerSecond;
  const double sgemm = 2.0 * double(batch) * double(m) * double(n) * double(k) /
                       (double(sms) * M::kSgemmFlopsPerSm);
  return emulated > M::kMargin * sgemm;
}

// cuBLAS SGEMM with TF32 off for it, whatever torch.backends.cuda.matmul.allow_tf32 says:
// a @ b (2-D or 3-D), plus bias (1-D, broadcast over rows) when defined.
at::Tensor sgemm_without_tf32(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias = {}) {
  const auto product = [&] {
    const TorchProductGuard torch_product;
    if (bias.defined()) return at::addmm(bias, a, b);
    // One matrix: cuBLAS's plain GEMM (measured: the strided-batched call picks a kernel at
    // half the speed for M = 64, N = K = 8192).
    if (a.dim() == 3 && a.size(0) == 1) return at::mm(a[0], b[0]).unsqueeze(0);
    return a.dim() == 2 ? at::mm(a, b) : at::bmm(a, b);
  };
  auto& context = at::globalContext();
  if (!context.allowTF32CuBLAS()) return product();  // PyTorch's default: nothing to switch
  static std::mutex mutex;  // the TF32 switch is process-wide
  std::lock_guard<std::mutex> lock(mutex);
  context.setAllowTF32CuBLAS(false);
  at::Tensor c;
  try {
    c = product();
  } catch (...) {
    context.setAllowTF32CuBLAS(true);
    throw;
  }
  context.setAllowTF32CuBLAS(true);
  return c;
}

// b_planes: the split of b's columns made earlier (torch_hpc::split_planes of b^T), or null.
at::Tensor bmm_cuda_impl(const at::Tensor& a, const at::Tensor& b, const Planes* b_planes = nullptr) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t batch = a.size(0), m = a.size(1), k = a.size(2), n = b.size(2);
  const cuda::GemmKernel kernel = gemm_kernel_for(a);
  at::Tensor c = at::empty({batch, m, n}, a.options());
  if (c.numel() == 0) return c;
  if (k == 0) return c.zero_();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool blocks = kernel == cuda::GemmKernel::sm90 && block_exponents();  // A in block mode
  const Planes pa = split_cuda(a, batch, m, k, a.stride(0), a.stride(1), a.stride(2), stream,
                               blocks ? kBlocks : kPerRow);
  const Planes pb = b_planes != nullptr
                        ? *b_planes
                        : split_cuda(b, batch, n, k, b.stride(0), b.stride(2), b.stride(1), stream);
  cuda::GemmParams gp{};
  gp.a_hi = reinterpret_cast<const uint16_t*>(pa.hi.data_ptr<at::Half>());
  gp.a_lo = reinterpret_cast<const uint16_t*>(pa.lo.data_ptr<at::Half>());
  gp.b_hi = reinterpret_cast<const uint16_t*>(pb.hi.data_ptr<at::Half>());
  gp.b_lo = reinterpret_cast<const uint16_t*>(pb.lo.data_ptr<at::Half>());
  gp.a_exponent = pa.exponent.data_ptr<int32_t>();
  gp.b_exponent = pb.exponent.data_ptr<int32_t>();
  gp.a_fallback = pa.fallback.data_ptr<int32_t>();
  gp.a_factor = blocks ? pa.factor.data_ptr<float>() : nullptr;
  gp.a_block_tiles = blocks ? pa.block_tiles.data_ptr<int32_t>() : nullptr;
  gp.b_fallback = pb.fallback.data_ptr<int32_t>();
  gp.m_pad = pa.rows_pad;
  gp.n_pad = pb.rows_pad;
  gp.k_pad = pa.k_pad;
  gp.a_orig = a.data_ptr<float>();
  gp.a_stride_b = a.stride(0);
  gp.a_stride_m = a.stride(1);
  gp.a_stride_k = a.stride(2);
  gp.b_orig = b.data_ptr<float>();
  gp.b_stride_b = b.stride(0);
  gp.b_stride_k = b.stride(1);
  gp.b_stride_n = b.stride(2);
  gp.c = c.data_ptr<float>();
  gp.c_stride_b = c.stride(0);
  gp.c_stride_m = c.stride(1);
  gp.c_stride_n = c.stride(2);
  gp.batch = batch;
  gp.m = m;
  gp.n = n;
  gp.k = k;
  const at::Tensor rows = at::empty({batch, pa.rows_pad}, a.options().dtype(at::kInt));
  const at::Tensor cols = at::empty({batch, pb.rows_pad}, a.options().dtype(at::kInt));
  const at::Tensor counts = at::empty({batch, 2}, a.options().dtype(at::kInt));
  gp.fallback_rows = rows.data_ptr<int32_t>();
  gp.fallback_cols = cols.data_ptr<int32_t>();
  gp.fallback_counts = counts.data_ptr<int32_t>();
  gp.exact_outputs = exact_counter(a, batch * m * n);
  C10_CUDA_CHECK(cuda::launch_gemm(gp, kernel, stream));
  return c;
}

at::Tensor mm_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_matmul_args(a, b, 2, "mm");
  if (prefer_sgemm(a, 1, a.size(0), b.size(1), a.size(1))) return sgemm_without_tf32(a, b);
  return bmm_cuda_impl(a.unsqueeze(0), b.unsqueeze(0)).squeeze(0);
}

at::Tensor bmm_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_matmul_args(a, b, 3, "bmm");
  if (prefer_sgemm(a, a.size(0), a.size(1), b.size(2), a.size(2))) return sgemm_without_tf32(a, b);
  return bmm_cuda_impl(a, b);
}

bool emulates_cuda(const at::Tensor& like, int64_t batch, int64_t m, int64_t n, int64_t k) {
  return !prefer_sgemm(like, batch, m, n, k);
}

// a @ b + bias (torch_hpc::mm_bias, the product of F.linear with a bias): one cuBLAS call with
// the bias fused where SGEMM computes it, else the emulated product and an in-place add.
at::Tensor mm_bias_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  check_matmul_args(a, b, 2, "mm_bias");
  check_bias_arg(bias, b, "mm_bias");
  if (prefer_sgemm(a, 1, a.size(0), b.size(1), a.size(1))) return sgemm_without_tf32(a, b, bias);
  return bmm_cuda_impl(a.unsqueeze(0), b.unsqueeze(0)).squeeze(0).add_(bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> split_cuda_op(const at::Tensor& x) {
  check_split_arg(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), k = x.size(1);
  if (rows == 0 || k == 0) {
    const auto opts = x.options();
    return {at::zeros({rows, k}, opts.dtype(at::kHalf)), at::zeros({rows, k}, opts.dtype(at::kHalf)),
            at::zeros({rows}, opts.dtype(at::kInt)), at::zeros({rows}, opts.dtype(at::kBool))};
  }
  const Planes p = split_cuda(x, 1, rows, k, 0, x.stride(0), x.stride(1),
                              at::cuda::getCurrentCUDAStream());
  return {p.hi[0].narrow(0, 0, rows).narrow(1, 0, k).contiguous(),
          p.lo[0].narrow(0, 0, rows).narrow(1, 0, k).contiguous(),
          p.exponent[0].narrow(0, 0, rows).contiguous(),
          p.fallback[0].narrow(0, 0, rows).to(at::kBool)};
}

// The padded planes of x's rows as the kernels read them: hi, lo [1, rows_pad, k_pad] fp16,
// exponent, fallback [1, rows_pad] int32. For torch_hpc.nn.Linear's weight-split cache.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> split_planes_cuda(const at::Tensor& x) {
  check_split_arg(x);
  TORCH_CHECK_VALUE(x.size(0) > 0 && x.size(1) > 0,
                    "torch_hpc.split_planes: expected argument 'x' without empty dimensions, got "
                    "shape ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const Planes p = split_cuda(x, 1, x.size(0), x.size(1), 0, x.stride(0), x.stride(1),
                              at::cuda::getCurrentCUDAStream());
  return {p.hi, p.lo, p.exponent, p.fallback};
}

// a @ b with b's split given by split_planes(b^T) (made when b held the same values).
at::Tensor mm_planes_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& b_hi,
                          const at::Tensor& b_lo, const at::Tensor& b_exponent,
                          const at::Tensor& b_fallback) {
  check_matmul_args(a, b, 2, "mm_planes");
  const int64_t n = b.size(1), k = b.size(0);
  const int64_t rows_pad = round_up(n, kTileRows), k_pad = round_up(k, kTileK);
  const auto expect = [&](const at::Tensor& t, const char* name, at::ScalarType dtype,
                          at::IntArrayRef shape) {
    TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.sizes() == shape && t.is_contiguous() &&
                          t.device() == b.device(),
                      "torch_hpc.mm_planes: expected argument '", name, "' to be a contiguous ",
                      dtype_name(dtype), " tensor of shape ", shape, " on ", b.device(),
                      " (torch_hpc.split_planes of b.t()), got ", dtype_name(t.scalar_type()), " of shape ",
                      t.sizes(), " on ", t.device());
  };
  expect(b_hi, "b_hi", at::kHalf, {1, rows_pad, k_pad});
  expect(b_lo, "b_lo", at::kHalf, {1, rows_pad, k_pad});
  expect(b_exponent, "b_exponent", at::kInt, {1, rows_pad});
  expect(b_fallback, "b_fallback", at::kInt, {1, rows_pad});
  if (prefer_sgemm(a, 1, a.size(0), n, k)) return sgemm_without_tf32(a, b);
  const Planes planes{b_hi, b_lo, b_exponent, b_fallback, rows_pad, k_pad};
  return bmm_cuda_impl(a.unsqueeze(0), b.unsqueeze(0), &planes).squeeze(0);
}

// K slices for a convolution of `tiles` output tiles and `k_blocks` k-blocks on `sms` SMs: the
// count with the least modelled time, waves x (k-blocks per slice + a tile's fill and epilogue,
// ~2 k-blocks, + writing and summing a partial output, ~5), slices of at least kMinSliceBlocks
// and none empty (the kernel's slice is ceil(k_blocks / slices)).
int64_t k_slices(int64_t tiles, int64_t k_blocks, int sms) {
  constexpr int64_t kMinSliceBlocks = 16, kTileOverhead = 2, kPartialOverhead = 5;
  int64_t best = 1, best_cost = INT64_MAX;
  for (int64_t slices = 1; slices == 1 || slices * kMinSliceBlocks <= k_blocks; ++slices) {
    const int64_t per = (k_blocks + slices - 1) / slices;
    if ((slices - 1) * per >= k_blocks) continue;  // an empty slice
    const int64_t waves = (tiles * slices + sms - 1) / sms;
    const int64_t cost = waves * (per + kTileOverhead + (slices > 1 ? kPartialOverhead : 0));
    if (cost < best_cost) best = slices, best_cost = cost;
  }
  return best;
}

// torch_hpc::conv2d_implicit: F.conv2d(input, weight, None, stride, padding, dilation) for
// channels_last fp32 tensors, groups 1, channel counts multiples of 64, on the sm90 kernel
// (conv_sm90.cu): the input split per pixel and 64 channels, the weight per output channel and
// 64 of (r, s, c), both with absolute factors, the patches gathered by the kernel; the products of
// every 64-value block the split flags are added exactly afterwards (conv_exact.cu).
at::Tensor conv2d_implicit_cuda(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* name = "torch_hpc.conv2d_implicit";
  TORCH_CHECK_VALUE(x.dim() == 4 && w.dim() == 4 && x.scalar_type() == at::kFloat &&
                        w.scalar_type() == at::kFloat && x.is_cuda() && w.device() == x.device(),
                    name, ": expected 'input' (N, C, H, W) and 'weight' (K, C, R, S) torch.float32 on one "
                    "CUDA device, got ", x.sizes(), " ", dtype_name(x.scalar_type()), " on ", x.device(), " and ",
                    w.sizes(), " ", dtype_name(w.scalar_type()), " on ", w.device());
  TORCH_CHECK_VALUE(x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                        w.is_contiguous(at::MemoryFormat::ChannelsLast),
                    name, ": expected 'input' and 'weight' contiguous in channels_last");
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 &&
                        stride[0] > 0 && stride[1] > 0 && padding[0] >= 0 && padding[1] >= 0 &&
                        dilation[0] > 0 && dilation[1] > 0,
                    name, ": expected 2 positive strides and dilations and 2 paddings >= 0");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), wd = x.size(3);
  const int64_t k = w.size(0), r = w.size(2), s = w.size(3);
  TORCH_CHECK_VALUE(w.size(1) == c && c % kTileK == 0 && k % kTileK == 0 && r > 0 && s > 0,
                    name, ": expected weight.shape[1] == input channels, both channel counts "
                    "multiples of ", kTileK, ", got input ", x.sizes(), " and weight ", w.sizes());
  const int64_t oh = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) / stride[0] + 1;
  const int64_t ow = (wd + 2 * padding[1] - dilation[1] * (s - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(oh > 0 && ow > 0, name, ": the padded input is smaller than the dilated kernel");
  TORCH_CHECK_VALUE(std::max({n, c, h, wd, k, r, s, oh, ow}) <= INT32_MAX / 2, name, ": sizes too large");
  const c10::cuda::CUDAGuard guard(x.device());
  // the one-pass split reads 64-value chunks as float2: a view may start anywhere
  const auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone(at::MemoryFormat::ChannelsLast);
  };
  const at::Tensor xa = aligned(x), wa = aligned(w);
  TORCH_CHECK(gemm_kernel_for(x) == cuda::GemmKernel::sm90, name,
              " needs the wgmma kernel (compute capability 9.0, a build with sm_90a)");
  at::Tensor y = at::empty({n, k, oh, ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // both in absolute block mode (one pass each, no base: row and column exponents 0, ../split.h)
  const int64_t pixels_in = h * wd, w_k = r * s * c;
  const SplitMode absolute{true, 0, 0};
  const Planes px = split_cuda(xa, 1, n * pixels_in, c, 0, c, 1, stream, absolute);
  const Planes pw = split_cuda(wa, 1, k, w_k, 0, w_k, 1, stream, absolute);
  const int64_t m = n * oh * ow, m_pad = round_up(m, kTileRows);
  const int sms = at::cuda::getDeviceProperties(x.get_device())->multiProcessorCount;
  const int64_t slices = k_slices(m_pad / kTileRows * (pw.rows_pad / kTileRows), pw.k_pad / kTileK, sms);
  const at::Tensor row_exponent = at::zeros({slices, m_pad}, x.options().dtype(at::kInt));
  const at::Tensor col_exponent = slices > 1 ? pw.exponent.reshape(-1).repeat(slices) : pw.exponent;
  // channels_last y is [m, k] row-major; split K sums its slices' partial outputs into it
  const at::Tensor partial = slices > 1 ? at::empty({slices, m, k}, x.options()) : at::Tensor();
  const at::Tensor w_list = at::empty({k + 1}, x.options().dtype(at::kInt));  // list, then count
  cuda::ConvParams cp{};
  cuda::GemmParams& g = cp.gemm;
  g.b_hi = reinterpret_cast<const uint16_t*>(pw.hi.data_ptr<at::Half>());
  g.b_lo = reinterpret_cast<const uint16_t*>(pw.lo.data_ptr<at::Half>());
  g.a_exponent = row_exponent.data_ptr<int32_t>();
  g.b_exponent = col_exponent.data_ptr<int32_t>();
  g.b_fallback = pw.fallback.data_ptr<int32_t>();
  g.m_pad = m_pad;
  g.n_pad = pw.rows_pad;
  g.k_pad = pw.k_pad;
  g.c = slices > 1 ? partial.data_ptr<float>() : y.data_ptr<float>();
  g.c_stride_b = m * k;
  g.c_stride_m = k;
  g.c_stride_n = 1;
  g.batch = slices;
  g.m = m;
  g.n = k;
  g.k = w_k;
  g.exact_outputs = exact_counter(x, m * k);
  cp.x_hi = reinterpret_cast<const uint16_t*>(px.hi.data_ptr<at::Half>());
  cp.x_lo = reinterpret_cast<const uint16_t*>(px.lo.data_ptr<at::Half>());
  cp.x_factor = px.factor.data_ptr<float>();
  cp.x_rows_pad = px.rows_pad;
  cp.x_fallback = px.fallback.data_ptr<int32_t>();
  cp.w_factor = pw.factor.data_ptr<float>();
  cp.x = xa.data_ptr<float>();
  cp.w = wa.data_ptr<float>();
  cp.images = static_cast<int>(n);
  cp.in_h = static_cast<int>(h);
  cp.in_w = static_cast<int>(wd);
  cp.channels = static_cast<int>(c);
  cp.out_h = static_cast<int>(oh);
  cp.out_w = static_cast<int>(ow);
  cp.kernel_h = static_cast<int>(r);
  cp.kernel_w = static_cast<int>(s);
  cp.stride_h = static_cast<int>(stride[0]);
  cp.stride_w = static_cast<int>(stride[1]);
  cp.pad_h = static_cast<int>(padding[0]);
  cp.pad_w = static_cast<int>(padding[1]);
  cp.dilation_h = static_cast<int>(dilation[0]);
  cp.dilation_w = static_cast<int>(dilation[1]);
  cp.w_list = w_list.data_ptr<int32_t>();
  cp.w_count = cp.w_list + k;
  C10_CUDA_CHECK(cuda::launch_conv_sm90(cp, sms, stream));
  if (slices > 1) {
    at::Tensor y_rows = y.permute({0, 2, 3, 1}).view({m, k});
    at::sum_out(y_rows, partial, at::IntArrayRef{0});
    g.c = y.data_ptr<float>();
  }
  C10_CUDA_CHECK(cuda::launch_conv_exact(cp, sms, stream));
  return y;
}

// torch_hpc::exact_path_counts: [outputs the exact path recomputed, outputs computed] on
// like's device since the last reset (reading the device counter waits for the stream).
std::vector<int64_t> exact_path_counts_cuda(const at::Tensor& like, bool reset) {
  const int device = like.get_device();
  TORCH_CHECK_VALUE(device >= 0 && device < kMaxDevices, "torch_hpc.exact_path_stats: device index ",
                    device, " out of range");
  const c10::cuda::CUDAGuard guard(like.device());
  int64_t exact = 0;
  {
    std::lock_guard<std::mutex> lock(exact_counter_mutex);
    if (exact_counters[device].defined()) {
      exact = exact_counters[device].item<int64_t>();
      if (reset) exact_counters[device].zero_();
    }
  }
  const int64_t total = reset ? outputs_computed[device].exchange(0) : outputs_computed[device].load();
  return {exact, total};
}

// torch_hpc::images_as_channels: x (N, C, H, W) channels_last as (C, N padded to `multiple`, H, W)
// channels_last, zeros past N: the implicit-GEMM route's weight gradient (torch_hpc/conv.py).
at::Tensor images_as_channels_cuda(const at::Tensor& x, int64_t multiple) {
  constexpr const char* name = "torch_hpc.images_as_channels";
  TORCH_CHECK_VALUE(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_cuda() &&
                        x.is_contiguous(at::MemoryFormat::ChannelsLast) && multiple > 0,
                    name, ": expected a 4-D torch.float32 CUDA tensor in channels_last and multiple > 0, got ",
                    x.sizes(), " ", dtype_name(x.scalar_type()), " on ", x.device(), ", multiple ", multiple);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t n_pad = round_up(n, multiple);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({c, n_pad, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  C10_CUDA_CHECK(cuda::launch_images_as_channels(x.data_ptr<float>(), out.data_ptr<float>(), n, n_pad, h * w, c,
                                                 at::cuda::getCurrentCUDAStream()));
  return out;
}

const bool sgemm_rule_registered = (register_cuda_sgemm_rule(&prefer_sgemm), true);

}  // namespace

TORCH_LIBRARY_IMPL(torch_hpc, CUDA, m) {
  m.impl("mm", &mm_cuda);
  m.impl("bmm", &bmm_cuda);
  m.impl("mm_bias", &mm_bias_cuda);
  m.impl("emulates", &emulates_cuda);
  m.impl("split", &split_cuda_op);
  m.impl("split_planes", &split_planes_cuda);
  m.impl("mm_planes", &mm_planes_cuda);
  m.impl("conv2d_implicit", &conv2d_implicit_cuda);
  m.impl("images_as_channels", &images_as_channels_cuda);
  m.impl("exact_path_counts", &exact_path_counts_cuda);
}

}  // namespace gemm
}  // namespace torch_hpc
