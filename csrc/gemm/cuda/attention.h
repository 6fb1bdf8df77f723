// Torch-free interface of the fused attention stages (attention_split.cu, attention_fwd.cu,
// attention_bwd.cu): softmax(scale q k^T + mask) v with every product emulated by three fp16
// tensor-core products, flash-style (no score matrix in memory).
//
// Operands are split per tile of 64 rows (attention_split.cu): a tile t of x [len, dim] is
// 2^e_t (hi + 2^-11 lo) with e_t = floor(log2 max|x_tile|) - 14, so one power-of-two factor per
// tile serves both contractions it takes part in (over dim for q k^T, over len for p v). The
// probabilities are split in registers, scaled by 2^14 (they lie in [0, 1]).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace torch_hpc {
namespace gemm {
namespace cuda {

constexpr int kAttnTile = 64;      // rows per factor tile, keys per tile, backward query tile
constexpr int kAttnQueryBlock = 128;  // forward: queries per CTA

// x[b, h, l, d] (strides in elements) -> hi/lo planes [b * h, len_pad, dim_pad] (zeros past
// len and dim) and factor [b * h, len_pad / 64] (the tiles' powers of two). Non-finite values
// go to hi as they are (lo 0) and are left out of the tile maximum.
struct AttentionSplitParams {
  const float* x;
  int64_t batch, heads, len, dim;
  int64_t stride_b, stride_h, stride_l, stride_d;
  uint16_t *hi, *lo;
  float* factor;
  int64_t len_pad, dim_pad;
};

// The split planes of one operand of [batch * heads] matrices.
struct AttentionPlanes {
  const uint16_t *hi, *lo;
  const float* factor;
  int64_t len_pad;
};

// Shapes, masks and scale shared by the forward and backward kernels. Query head h reads
// key/value head h / group. mask (null: none): added to the scores, read at
// mask[b * mask_sb + h * mask_sh + i * mask_si + j * mask_sj] (broadcast dimensions: stride 0).
struct AttentionShape {
  int64_t batch, heads, group;  // heads of q; k/v have heads / group
  int64_t q_len, kv_len, dim, value_dim;
  int dim_pad;  // 64 or 128, for q, k and v alike
  bool causal;  // key j attends query i only when j <= i (top-left aligned, as torch)
  float scale;  // softmax scale
  const float* mask;
  int64_t mask_sb, mask_sh, mask_si, mask_sj;
};

// out [batch, heads, q_len, value_dim] (contiguous) and lse2 [batch * heads, q planes' len_pad]:
// each row's log2 of sum exp (in log2 units: log2(sum_j 2^(s_ij log2 e))), +inf for a row with
// no unmasked key (whose output is 0, as torch's).
struct AttentionForwardParams {
  AttentionShape shape;
  AttentionPlanes q, k, v;
  float* out;
  float* lse2;
};

// Gradients of the forward above. dout planes split like q (len_pad of q), delta [batch *
// heads, q len_pad] = rowsum(dout * out) (0 past q_len). dq_accum [batch * heads, q len_pad,
// dim_pad] fp32, zeroed by the caller, receives scale * dS k (atomics); dk/dv [batch, heads,
// kv_len, dim/value_dim] contiguous, one per query head (the caller sums groups).
struct AttentionBackwardParams {
  AttentionShape shape;
  AttentionPlanes q, k, v, dout;
  const float* lse2;
  const float* delta;
  float* dq_accum;
  float *dk, *dv;
};

cudaError_t launch_attention_split(const AttentionSplitParams& p, cudaStream_t stream);
// Shared memory the kernels take at dim_pad (the caller checks the device's limit).
size_t attention_forward_smem_bytes(int dim_pad);
size_t attention_backward_smem_bytes(int dim_pad);
cudaError_t launch_attention_forward(const AttentionForwardParams& p, cudaStream_t stream);
cudaError_t launch_attention_backward(const AttentionBackwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
