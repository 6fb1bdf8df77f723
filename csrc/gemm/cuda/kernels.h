// Torch-free interface of the CUDA stages (split.cu, gemm_sm80.cu, gemm_sm90.cu, exact.cu,
// dispatch.cu, conv_sm90.cu, conv_exact.cu, conv_layout.cu), so that they compile and can be disassembled with nvcc alone.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "../tiles.h"

namespace torch_hpc {
namespace gemm {
namespace cuda {

// Splits x[b, r, k] (any strides, in elements) into K-contiguous, zero-padded fp16 planes
// hi/lo[b, rows_pad, k_pad], plus exponent[b, rows_pad] and fallback[b, rows_pad]; row_max and
// row_min[b, rows_pad] are scratch (the row statistics). With `scale` set, block mode
// (../split.h): one exponent per 64 values of a row, their factors in scale[b, k_pad / 64,
// rows_pad], the base exponent shared by each `base_rows` consecutive rows (row_max then holds
// the groups' largest values).
struct SplitParams {
  const float* x;
  int64_t batch, rows, k;
  int64_t stride_b, stride_r, stride_k;
  uint16_t* hi;
  uint16_t* lo;
  int32_t* exponent;
  int32_t* fallback;
  uint32_t* row_max;
  uint32_t* row_min;
  int64_t rows_pad, k_pad;
  float* scale;       // block mode: the blocks' factors; null: one exponent per row
  int64_t base_rows;  // block mode: rows per base exponent (1: each row its own; 0: absolute
                      // factors, no base, one pass: x contiguous [rows, k], k a multiple of 64)
  int max_shift;      // block mode: largest base - block exponent kept (kMaxBlockShift or less)
  // block mode with base_rows 1: a row that fits one exponent takes its row's for every block
  // (factors 1), and block_tiles [batch, rows_pad / 128] is set to 1 for every 128-row tile that
  // holds a row that does not (null: every row takes block exponents)
  int32_t* block_tiles;
};

// C[b, m, n] = sum_k A[b, m, k] B[b, k, n] from the split planes of A (rows = M) and of
// B^T (rows = N); rows flagged as fallback in either are recomputed from a/b_orig in fp64.
// The sm90 kernel takes A in block mode (a_factor [batch, k_pad / 64, m_pad]) or with one
// exponent per row (a_factor null), the sm80 kernel one exponent per row.
struct GemmParams {
  const uint16_t *a_hi, *a_lo, *b_hi, *b_lo;
  const int32_t *a_exponent, *b_exponent, *a_fallback, *b_fallback;
  const float* a_factor;
  // per 128-row tile of A [batch, m_pad / 128]: 1 where a row needs its block factors, 0 where
  // every row fits one exponent (all factors 1: the row loop); null: every tile takes factors
  const int32_t* a_block_tiles;
  int64_t m_pad, n_pad, k_pad;  // plane shapes (per batch)
  const float* a_orig;          // original A and B for the exact fallback path
  int64_t a_stride_b, a_stride_m, a_stride_k;
  const float* b_orig;
  int64_t b_stride_b, b_stride_k, b_stride_n;
  float* c;
  int64_t c_stride_b, c_stride_m, c_stride_n;
  int64_t batch, m, n, k;
  // scratch of the exact path: lists of flagged rows [batch, m_pad] and columns [batch, n_pad],
  // their lengths [batch, 2]
  int32_t *fallback_rows, *fallback_cols, *fallback_counts;
  // outputs the exact path recomputed, accumulated on the device (null: not counted)
  unsigned long long* exact_outputs;
};

// Implicit-GEMM convolution (channels_last, groups 1, channels a multiple of 64):
//   y[m, k] = sum over (r, s, c) of x[image, ih, iw, c] w[k, r, s, c]
// for output pixels m = (image, oh, ow), ih = oh stride_h - pad_h + r dilation_h (iw alike), x
// and w read from their split planes, both in block mode: x's rows are pixels (image, h, w) with
// k = channels, w's rows output channels (k = kernel_h kernel_w channels), both with absolute
// factors (no base). `gemm` carries the product's shape and output: a_exponent per output pixel
// (0), b_* the weight's planes, exponents (0) and fallback flags, c = y
// [m, cout] (channels_last). batch > 1 splits K: slice b sums k-blocks b ceil(kb / batch) .. of
// every output into c + b c_stride_b (exponents replicated per slice, a_exponent [batch, m_pad],
// b_exponent [batch, n_pad]); no slice may be empty.
struct ConvParams {
  GemmParams gemm;
  const uint16_t *x_hi, *x_lo;  // [x_rows_pad, channels]
  const float* x_factor;        // [channels / 64, x_rows_pad]
  int64_t x_rows_pad;
  const int32_t* x_fallback;    // per pixel: 1 where one of its blocks falls back (factor 0)
  const float* w_factor;        // [k_pad / 64, n_pad]
  const float* x;               // originals for the exact path: x NHWC, w [cout, r, s, c], contiguous
  const float* w;
  int images, in_h, in_w, channels, out_h, out_w, kernel_h, kernel_w;
  int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  // exact path scratch: the flagged weight rows [n] and their count
  int32_t *w_list, *w_count;
};

// sm80: mma.sync (any GPU of compute capability >= 8.0); sm90: wgmma + TMA (exactly 9.0, and
// only when the build included sm_90a).
enum class GemmKernel { sm80, sm90 };

// dispatch.cu: the product on `kernel` followed by the exact path for fallback rows/columns.
cudaError_t launch_gemm(const GemmParams& p, GemmKernel kernel, cudaStream_t stream);
// Raises `kernel`'s dynamic shared-memory limit to `bytes` on the current device, once per
// device (thread-safe).
cudaError_t raise_smem_limit(const void* kernel, size_t bytes);

// The stages.
cudaError_t launch_split(const SplitParams& p, cudaStream_t stream);                  // split.cu
cudaError_t launch_gemm_sm80(const GemmParams& p, cudaStream_t stream);               // gemm_sm80.cu
bool sm90_kernel_built();                                                              // gemm_sm90.cu
cudaError_t launch_gemm_sm90(const GemmParams& p, int sm_count, cudaStream_t stream);
cudaError_t launch_exact(const GemmParams& p, int sm_count, cudaStream_t stream);     // exact.cu
cudaError_t launch_conv_sm90(const ConvParams& p, int sm_count, cudaStream_t stream); // conv_sm90.cu
cudaError_t launch_conv_exact(const ConvParams& p, int sm_count, cudaStream_t stream); // conv_exact.cu
// x [n][pixels][c] -> out [c][pixels][n_pad], zeros for n >= n (the weight gradient's operands)
cudaError_t launch_images_as_channels(const float* x, float* out, int64_t n, int64_t n_pad,  // conv_layout.cu
                                      int64_t pixels, int64_t c, cudaStream_t stream);

// Grid y/z limit: batches beyond it are launched in slices.
constexpr int64_t kMaxGridYZ = 65535;

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
