// Exact stage: outputs whose row of A or column of B fell back in the split are recomputed
// from the original fp32 values in fp64. Torch-free: see kernels.h.
#include "kernels.h"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

// Exact path: outputs whose row of A or column of B fell back are recomputed as fp64 dot
// products of the original fp32 values (exact products summed in k order, one final rounding
// to fp32), so inf/NaN follow IEEE fp64 and finite results beyond fp32 become +-inf. Random
// data has such rows too (one entry of N(0,1) in ~10^8 lies 28 binades below its row's
// maximum), so the work is found on the GPU without a host round trip: collect_fallback lists
// the flagged rows and columns, and fallback_kernel's blocks sweep 32 listed rows x 32 columns
// (then 32 rows x 32 listed columns) as tiled fp64 products.
constexpr int kFallbackTile = 32;

__global__ void __launch_bounds__(256) collect_fallback_kernel(GemmParams p, int64_t batch_offset) {
  const int64_t b = batch_offset + blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < p.m && p.a_fallback[b * p.m_pad + i]) {
    p.fallback_rows[b * p.m_pad + atomicAdd(&p.fallback_counts[2 * b], 1)] = static_cast<int32_t>(i);
    if (p.exact_outputs != nullptr) atomicAdd(p.exact_outputs, static_cast<unsigned long long>(p.n));
  }
  if (i < p.n && p.b_fallback[b * p.n_pad + i]) {
    p.fallback_cols[b * p.n_pad + atomicAdd(&p.fallback_counts[2 * b + 1], 1)] = static_cast<int32_t>(i);
    if (p.exact_outputs != nullptr) atomicAdd(p.exact_outputs, static_cast<unsigned long long>(p.m));
  }
}

__global__ void __launch_bounds__(1024) fallback_kernel(GemmParams p, int64_t batch_offset) {
  constexpr int T = kFallbackTile;
  __shared__ float sa[T][T + 1], sb[T][T + 1];
  __shared__ int32_t rows[T], cols[T];
  const int64_t b = batch_offset + blockIdx.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t n_rows = p.fallback_counts[2 * b], n_cols = p.fallback_counts[2 * b + 1];
  const int64_t col_tiles = (p.n + T - 1) / T, row_tiles = (p.m + T - 1) / T;
  const int64_t row_items = (n_rows + T - 1) / T * col_tiles;
  const int64_t items = row_items + (n_cols + T - 1) / T * row_tiles;
  const float* a = p.a_orig + b * p.a_stride_b;
  const float* bm = p.b_orig + b * p.b_stride_b;
  const int32_t* a_flag = p.a_fallback + b * p.m_pad;
  const bool a_k_fast = p.a_stride_k == 1, b_n_fast = p.b_stride_n == 1;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const bool listed_rows = item < row_items;
    if (ty == 0) {
      if (listed_rows) {
        const int64_t g = item / col_tiles, tile = item % col_tiles;
        rows[tx] = g * T + tx < n_rows ? p.fallback_rows[b * p.m_pad + g * T + tx] : -1;
        cols[tx] = tile * T + tx < p.n ? static_cast<int32_t>(tile * T + tx) : -1;
      } else {
        const int64_t g = (item - row_items) / row_tiles, tile = (item - row_items) % row_tiles;
        const int32_t row = tile * T + tx < p.m ? static_cast<int32_t>(tile * T + tx) : -1;
        // rows that fell back themselves were done by the listed-row items
        rows[tx] = row >= 0 && !a_flag[row] ? row : -1;
        cols[tx] = g * T + tx < n_cols ? p.fallback_cols[b * p.n_pad + g * T + tx] : -1;
      }
    }
    __syncthreads();
    double s = 0.0;
    for (int64_t k0 = 0; k0 < p.k; k0 += T) {
      {  // sa[r][kk] = A[rows[r], k0 + kk], read along whichever of A's strides is unit
        const int r = a_k_fast ? ty : tx, kk = a_k_fast ? tx : ty;
        const int64_t k = k0 + kk;
        sa[r][kk] = rows[r] >= 0 && k < p.k ? a[rows[r] * p.a_stride_m + k * p.a_stride_k] : 0.0f;
      }
      {  // sb[kk][c] = B[k0 + kk, cols[c]]
        const int c = b_n_fast ? tx : ty, kk = b_n_fast ? ty : tx;
        const int64_t k = k0 + kk;
        sb[kk][c] = cols[c] >= 0 && k < p.k ? bm[k * p.b_stride_k + cols[c] * p.b_stride_n] : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < T; ++kk)
        if (k0 + kk < p.k) s = fma(static_cast<double>(sa[ty][kk]), static_cast<double>(sb[kk][tx]), s);
      __syncthreads();
    }
    if (rows[ty] >= 0 && cols[tx] >= 0)
      p.c[b * p.c_stride_b + rows[ty] * p.c_stride_m + cols[tx] * p.c_stride_n] = static_cast<float>(s);
    __syncthreads();
  }
}

}  // namespace

cudaError_t launch_exact(const GemmParams& p, int sm_count, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(p.fallback_counts, 0, size_t(2 * p.batch) * sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  const int64_t list_len = p.m_pad > p.n_pad ? p.m_pad : p.n_pad;
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridYZ) {
    const int64_t nb = p.batch - b0 < kMaxGridYZ ? p.batch - b0 : kMaxGridYZ;
    collect_fallback_kernel<<<dim3(static_cast<unsigned>((list_len + 255) / 256),
                                   static_cast<unsigned>(nb)), 256, 0, stream>>>(p, b0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    // Two blocks of 1024 threads per SM, spread over the batch; blocks without work exit.
    const int64_t per_batch = (2 * int64_t(sm_count) + nb - 1) / nb;
    fallback_kernel<<<dim3(static_cast<unsigned>(per_batch), static_cast<unsigned>(nb)),
                      dim3(kFallbackTile, kFallbackTile), 0, stream>>>(p, b0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
