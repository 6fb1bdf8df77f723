// CPU implementation of the emulated fp32 GEMM: the same split as the CUDA kernels (split.h,
// bit-identical; A's rows in block mode where the sm90 kernel takes them so), the same three products
// hi*hi + 2^-11 (hi*lo + lo*hi). Products of fp16
// parts are exact in fp64, and the CPU accumulates them in fp64 (the GPU promotes fp32
// tensor-core partial sums every k-tile instead). Fallback rows/columns: fp64 dot products.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../checks.h"
#include "../settings.h"
#include "../split.h"

namespace torch_hpc {
namespace gemm {
namespace {

// Iterations per task so that each holds about at::internal::GRAIN_SIZE elementary operations:
// a tiny product runs on the calling thread (an OpenMP region costs more than its work).
int64_t grain(int64_t work_per_iteration) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_iteration));
}

// Split planes of a batch of row sets: hi/lo [batch, rows, k], exponent/fallback [batch, rows];
// in block mode also scale [batch, k_blocks, rows] (split.h).
struct Planes {
  at::Tensor hi, lo, exponent, fallback, scale;
};

// x viewed as [batch, rows, k] through the given strides; blocks: block mode (A's rows).
Planes split_cpu(const float* x, int64_t batch, int64_t rows, int64_t k, int64_t sb, int64_t sr,
                 int64_t sk, const at::TensorOptions& opts, bool blocks) {
  const int64_t k_blocks = (k + kScaleBlock - 1) / kScaleBlock;
  Planes p{at::empty({batch, rows, k}, opts.dtype(at::kHalf)),
           at::empty({batch, rows, k}, opts.dtype(at::kHalf)),
           at::empty({batch, rows}, opts.dtype(at::kInt)),
           at::empty({batch, rows}, opts.dtype(at::kInt)),
           blocks ? at::empty({batch, k_blocks, rows}, opts) : at::Tensor()};
  auto* hi = reinterpret_cast<uint16_t*>(p.hi.data_ptr<at::Half>());
  auto* lo = reinterpret_cast<uint16_t*>(p.lo.data_ptr<at::Half>());
  int32_t* ex = p.exponent.data_ptr<int32_t>();
  int32_t* fb = p.fallback.data_ptr<int32_t>();
  float* factors = blocks ? p.scale.data_ptr<float>() : nullptr;
  at::parallel_for(0, batch * rows, grain(2 * k), [&](int64_t begin, int64_t end) {
    std::vector<RowScale> block(k_blocks);
    std::vector<uint32_t> block_max(k_blocks);
    for (int64_t br = begin; br < end; ++br) {
      const float* row = x + (br / rows) * sb + (br % rows) * sr;
      if (!blocks) {
        RowStats stats;
        for (int64_t i = 0; i < k; ++i) stats.add(row[i * sk]);
        const RowScale s = row_scale(stats.max_abs, stats.min_nonzero_abs);
        ex[br] = s.exponent;
        fb[br] = s.fallback ? 1 : 0;
        for (int64_t i = 0; i < k; ++i) split_value(row[i * sk], s, hi[br * k + i], lo[br * k + i]);
        continue;
      }
      uint32_t finite_max = 0;
      bool fallback = false;
      RowStats whole;
      for (int64_t j = 0; j < k_blocks; ++j) {
        RowStats stats;
        for (int64_t i = j * kScaleBlock; i < std::min(k, (j + 1) * kScaleBlock); ++i) stats.add(row[i * sk]);
        block[j] = row_scale(stats.max_abs, stats.min_nonzero_abs);
        block_max[j] = stats.max_abs;
        whole.merge(stats.max_abs, stats.min_nonzero_abs);
        if (block[j].fallback) fallback = true;
        else finite_max = std::max(finite_max, stats.max_abs);
      }
      const int64_t b = br / rows, r = br % rows;
      const RowScale one = row_scale(whole.max_abs, whole.min_nonzero_abs);
      if (!one.fallback) {  // the row fits one exponent: every block keeps it (factors 1)
        for (int64_t j = 0; j < k_blocks; ++j) {
          block[j] = one;
          factors[(b * k_blocks + j) * rows + r] = 1.0f;
        }
        finite_max = whole.max_abs;
      }
      const int base = base_exponent(finite_max);
      for (int64_t j = 0; j < k_blocks && one.fallback; ++j) {
        const float f = block_factor(block[j], base, kMaxBlockShift);
        if (f == 0.0f && block_max[j] != 0) fallback = block[j].fallback = true;
        factors[(b * k_blocks + j) * rows + r] = f;
      }
      ex[br] = base;
      fb[br] = fallback ? 1 : 0;
      for (int64_t i = 0; i < k; ++i)
        split_value(row[i * sk], block[i / kScaleBlock], hi[br * k + i], lo[br * k + i]);
    }
  });
  return p;
}

double exact_dot(const float* a, int64_t sa, const float* b, int64_t sb, int64_t k) {
  double s = 0.0;
  for (int64_t i = 0; i < k; ++i) s += static_cast<double>(a[i * sa]) * static_cast<double>(b[i * sb]);
  return s;
}

// Outputs the exact path recomputed and outputs computed, on the CPU (torch_hpc.exact_path_stats).
std::atomic<int64_t> exact_outputs{0}, outputs_computed{0};

constexpr int kRowBlock = 4;
constexpr int64_t kColBlock = 256;

// One batch: c[m, n] from the planes of A (rows m) and of B^T (rows n).
void gemm_cpu_batch(const Planes& pa, const Planes& pb, int64_t bi, int64_t m, int64_t n, int64_t k,
                    const float* a, int64_t a_sm, int64_t a_sk, const float* b, int64_t b_sk,
                    int64_t b_sn, float* c, int64_t c_sm, int64_t c_sn) {
  const double lo_scale = 1.0 / double(1 << kLoShift);
  const auto* ahi = reinterpret_cast<const uint16_t*>(pa.hi.data_ptr<at::Half>()) + bi * m * k;
  const auto* alo = reinterpret_cast<const uint16_t*>(pa.lo.data_ptr<at::Half>()) + bi * m * k;
  const auto* bhi = reinterpret_cast<const uint16_t*>(pb.hi.data_ptr<at::Half>()) + bi * n * k;
  const auto* blo = reinterpret_cast<const uint16_t*>(pb.lo.data_ptr<at::Half>()) + bi * n * k;
  const int32_t* ea = pa.exponent.data_ptr<int32_t>() + bi * m;
  const int32_t* eb = pb.exponent.data_ptr<int32_t>() + bi * n;
  const int32_t* fa = pa.fallback.data_ptr<int32_t>() + bi * m;
  const int64_t k_blocks = (k + kScaleBlock - 1) / kScaleBlock;
  const float* a_factor = pa.scale.defined() ? pa.scale.data_ptr<float>() + bi * k_blocks * m : nullptr;
  const int32_t* fb = pb.fallback.data_ptr<int32_t>() + bi * n;

  // B as [k, n] in fp64: b_sum = hi + 2^-11 lo (exact) and b_hi.
  std::vector<double> b_sum(k * n), b_hi(k * n);
  at::parallel_for(0, n, grain(2 * k), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      for (int64_t i = 0; i < k; ++i) {
        const double h = f16_to_f32(bhi[j * k + i]);
        b_hi[i * n + j] = h;
        b_sum[i * n + j] = h + lo_scale * f16_to_f32(blo[j * k + i]);
      }
  });

  const int64_t row_blocks = (m + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, row_blocks, grain(4 * kRowBlock * n * k), [&](int64_t begin, int64_t end) {
    double acc[kRowBlock][kColBlock];
    for (int64_t rb = begin; rb < end; ++rb) {
      const int64_t i0 = rb * kRowBlock;
      const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, m - i0));
      for (int64_t j0 = 0; j0 < n; j0 += kColBlock) {
        const int64_t cols = std::min<int64_t>(kColBlock, n - j0);
        for (int r = 0; r < kRowBlock; ++r) std::fill(acc[r], acc[r] + cols, 0.0);
        for (int64_t i = 0; i < k; ++i) {
          double ah[kRowBlock] = {}, al[kRowBlock] = {};
          for (int r = 0; r < rows; ++r) {
            const double f = a_factor ? a_factor[(i / kScaleBlock) * m + i0 + r] : 1.0;  // a power of two
            ah[r] = f * f16_to_f32(ahi[(i0 + r) * k + i]);
            al[r] = f * lo_scale * f16_to_f32(alo[(i0 + r) * k + i]);
          }
          const double* bs = b_sum.data() + i * n + j0;
          const double* bh = b_hi.data() + i * n + j0;
          // Products of fp16 parts are exact in fp64; each sum is rounded once.
          for (int64_t j = 0; j < cols; ++j) {
            acc[0][j] += ah[0] * bs[j] + al[0] * bh[j];
            acc[1][j] += ah[1] * bs[j] + al[1] * bh[j];
            acc[2][j] += ah[2] * bs[j] + al[2] * bh[j];
            acc[3][j] += ah[3] * bs[j] + al[3] * bh[j];
          }
        }
        for (int r = 0; r < rows; ++r)
          for (int64_t j = 0; j < cols; ++j)
            c[(i0 + r) * c_sm + (j0 + j) * c_sn] =
                static_cast<float>(std::ldexp(acc[r][j], ea[i0 + r] + eb[j0 + j]));
      }
    }
  });

  int64_t exact = 0;
  for (int64_t i = 0; i < m; ++i) exact += fa[i] ? n : 0;
  for (int64_t j = 0; j < n; ++j) exact += fb[j] ? m : 0;
  exact_outputs.fetch_add(exact, std::memory_order_relaxed);
  outputs_computed.fetch_add(m * n, std::memory_order_relaxed);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      if (fa[i] || fb[j])
        c[i * c_sm + j * c_sn] =
            static_cast<float>(exact_dot(a + i * a_sm, a_sk, b + j * b_sn, b_sk, k));
    }
  }
}

at::Tensor bmm_cpu_impl(const at::Tensor& a, const at::Tensor& b) {
  const int64_t batch = a.size(0), m = a.size(1), k = a.size(2), n = b.size(2);
  at::Tensor c = at::empty({batch, m, n}, a.options());
  if (c.numel() == 0) return c;
  if (k == 0) return c.zero_();
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  // A in block mode where torch_hpc.backends.gemm.block_exponents says so, B per column, as the
  // sm90 kernel splits them
  const Planes pa = split_cpu(ap, batch, m, k, a.stride(0), a.stride(1), a.stride(2), a.options(),
                              block_exponents());
  const Planes pb = split_cpu(bp, batch, n, k, b.stride(0), b.stride(2), b.stride(1), b.options(), false);
  float* cp = c.data_ptr<float>();
  for (int64_t bi = 0; bi < batch; ++bi)
    gemm_cpu_batch(pa, pb, bi, m, n, k, ap + bi * a.stride(0), a.stride(1), a.stride(2),
                   bp + bi * b.stride(0), b.stride(1), b.stride(2), cp + bi * c.stride(0),
                   c.stride(1), c.stride(2));
  return c;
}

at::Tensor mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_matmul_args(a, b, 2, "mm");
  return bmm_cpu_impl(a.unsqueeze(0), b.unsqueeze(0)).squeeze(0);
}

at::Tensor bmm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_matmul_args(a, b, 3, "bmm");
  return bmm_cpu_impl(a, b);
}

at::Tensor mm_bias_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  check_matmul_args(a, b, 2, "mm_bias");
  check_bias_arg(bias, b, "mm_bias");
  return bmm_cpu_impl(a.unsqueeze(0), b.unsqueeze(0)).squeeze(0).add_(bias);
}

bool emulates_cpu(const at::Tensor&, int64_t, int64_t, int64_t, int64_t) { return true; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> split_cpu_op(const at::Tensor& x) {
  check_split_arg(x);
  const Planes p = split_cpu(x.data_ptr<float>(), 1, x.size(0), x.size(1), 0, x.stride(0),
                             x.stride(1), x.options(), false);
  return {p.hi.squeeze(0), p.lo.squeeze(0), p.exponent.squeeze(0), p.fallback.squeeze(0).to(at::kBool)};
}

std::vector<int64_t> exact_path_counts_cpu(const at::Tensor&, bool reset) {
  if (reset) return {exact_outputs.exchange(0), outputs_computed.exchange(0)};
  return {exact_outputs.load(), outputs_computed.load()};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_hpc, CPU, m) {
  m.impl("mm", &mm_cpu);
  m.impl("bmm", &bmm_cpu);
  m.impl("mm_bias", &mm_bias_cpu);
  m.impl("emulates", &emulates_cpu);
  m.impl("split", &split_cpu_op);
  m.impl("exact_path_counts", &exact_path_counts_cpu);
}

}  // namespace gemm
}  // namespace torch_hpc
