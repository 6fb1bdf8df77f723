// Layout stage of the implicit-GEMM route's weight gradient: a channels_last batch x[n, c, h, w]
// ([n][h w][c] in memory) as images of its channels, out[c, n, h, w] channels_last ([c][h w][n_pad]
// in memory), the batch zero-padded to n_pad. Per pixel a tiled 2-D transpose through shared
// memory, so both the reads (along c) and the writes (along n) are whole 128-byte rows.
// Torch-free: see kernels.h.
#include "kernels.h"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

constexpr int kTile = 32, kRowsPerPass = 8;

__global__ void __launch_bounds__(kTile * kRowsPerPass)
    images_as_channels_kernel(const float* __restrict__ x, float* __restrict__ out, int64_t n,
                              int64_t n_pad, int64_t pixels, int64_t c) {
  __shared__ float tile[kTile][kTile + 1];
  const int64_t pixel = blockIdx.x;
  const int64_t c0 = int64_t(blockIdx.y) * kTile, n0 = int64_t(blockIdx.z) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
  for (int i = 0; i < kTile; i += kRowsPerPass) {
    const int64_t img = n0 + ty + i, ch = c0 + tx;
    tile[ty + i][tx] = img < n && ch < c ? x[(img * pixels + pixel) * c + ch] : 0.0f;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kTile; i += kRowsPerPass) {
    const int64_t ch = c0 + ty + i, img = n0 + tx;
    if (ch < c && img < n_pad) out[(ch * pixels + pixel) * n_pad + img] = tile[tx][ty + i];
  }
}

}  // namespace

cudaError_t launch_images_as_channels(const float* x, float* out, int64_t n, int64_t n_pad,
                                      int64_t pixels, int64_t c, cudaStream_t stream) {
  if (pixels == 0 || c == 0 || n_pad == 0) return cudaSuccess;
  const int64_t c_tiles = (c + kTile - 1) / kTile, n_tiles = (n_pad + kTile - 1) / kTile;
  if (pixels > INT32_MAX || c_tiles > kMaxGridYZ || n_tiles > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  images_as_channels_kernel<<<dim3(static_cast<unsigned>(pixels), static_cast<unsigned>(c_tiles),
                                   static_cast<unsigned>(n_tiles)),
                              dim3(kTile, kRowsPerPass), 0, stream>>>(x, out, n, n_pad, pixels, c);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
