// Implicit-GEMM convolution, Hopper (sm_90a) only: the GEMM's consumers and epilogue
// (sm90_pipeline.cuh) over A = the input's patches, never stored: the producer warpgroup
// gathers them from the input's split planes with cp.async (zero-filled where a patch reaches
// into the padding), and B = the weight's planes by TMA. Each k-block is 64 channels of one
// filter tap, so every row of an A tile is 128 contiguous bytes of one input pixel. Both
// operands are split in block mode: a gatherer writes its row's factor (its pixel's, for the
// k-block's 64 channels) beside the rows, TMA brings the weight rows' factors; the input's
// factors are absolute (row exponents 0), so the epilogue is the GEMM's. Layers with fewer tiles than
// SMs split K (gemm.batch slices of k_slice k-blocks, partial outputs summed by the host).
// Torch-free: see kernels.h.
#include "sm90_pipeline.cuh"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

using namespace sm90;  // NOLINT: the shared pipeline

constexpr int kProducerThreads = 128;
static_assert(kBM == kProducerThreads, "one producer thread per A row");
static_assert(kBK * 2 == 128, "an A row of a k-block is eight 16-byte chunks");

#if !defined(__CUDA_ARCH__) || defined(TORCH_HPC_SM90A_DEVICE)
struct WeightMaps {
  const CUtensorMap *hi, *lo, *factor;
};

// Producer warpgroup: thread t gathers row t of every A tile and its factor, thread 0 also
// issues the TMA of the B planes and factors. A stage is full when the TMA bytes and all 128 threads have arrived; a thread's copies
// of a stage are waited for (cp.async groups) one stage later, fenced for the tensor core's
// async proxy, and only then announced, so that two stages of copies stay in flight.
__device__ __forceinline__ void conv_producer(const SharedStages& sm, const ConvParams& p,
                                              const WeightMaps& maps, int k_blocks, int k_slice,
                                              int tiles_m, int tiles_n, int total_tiles) {
  const int t = threadIdx.x;
  const int64_t pixels = int64_t(p.out_h) * p.out_w;
  PipeState pipe;
  int announce = -1;  // stage whose copies this thread issued last and has not announced yet
  for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    const TileCoord tc = tile_coord(tile, tiles_m, tiles_n);
    const int64_t m = int64_t(tc.row_tile) * kBM + t;
    const bool row_valid = m < p.gemm.m;
    int64_t image = 0;
    int oh = 0, ow = 0;
    if (row_valid) {
      image = m / pixels;
      const int64_t pixel = m - image * pixels;
      oh = static_cast<int>(pixel / p.out_w);
      ow = static_cast<int>(pixel - int64_t(oh) * p.out_w);
    }
    const int64_t image_row = image * p.in_h * p.in_w;  // the image's first pixel row of x's planes
    const int h0 = oh * p.stride_h - p.pad_h, w0 = ow * p.stride_w - p.pad_w;
    const KRange ks = k_range(tc.batch, k_blocks, k_slice);
    for (int kb = ks.first; kb < ks.end; ++kb) {
      const int stage = pipe.stage;
      ptx::mbar_wait(&sm.empty[stage], pipe.phase ^ 1);
      uint8_t* dst = sm.tiles + stage * kStageBytes;
      const int k0 = kb * kBK;
      if (t == 0) {
        ptx::mbar_arrive_expect_tx(&sm.full[stage], 2 * kPlaneBytes + kFactorBytes);
        ptx::tma_load_3d(dst + 2 * kPlaneBytes, maps.hi, &sm.full[stage], k0, tc.col_tile * kBN, 0);
        ptx::tma_load_3d(dst + 3 * kPlaneBytes, maps.lo, &sm.full[stage], k0, tc.col_tile * kBN, 0);
        ptx::tma_load_3d(b_factors(sm, stage), maps.factor, &sm.full[stage], tc.col_tile * kBN, kb, 0);
      }
      const int tap = k0 / p.channels, c0 = k0 - tap * p.channels;
      const int r = tap / p.kernel_w, s = tap - r * p.kernel_w;
      const int ih = h0 + r * p.dilation_h, iw = w0 + s * p.dilation_w;
      const bool valid = row_valid && ih >= 0 && ih < p.in_h && iw >= 0 && iw < p.in_w;
      const int64_t pixel_row = valid ? image_row + int64_t(ih) * p.in_w + iw : 0;
      const int64_t offset = pixel_row * p.channels + c0;
      a_factors(sm, stage)[t] = valid ? p.x_factor[int64_t(c0 / kBK) * p.x_rows_pad + pixel_row] : 0.0f;
      uint8_t* row_hi = dst + t * 128;
      uint8_t* row_lo = dst + kPlaneBytes + t * 128;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int chunk = (j ^ (t & 7)) << 4;  // the 128-byte swizzle TMA would apply
        ptx::cp_async16_zfill(row_hi + chunk, p.x_hi + offset + 8 * j, valid);
        ptx::cp_async16_zfill(row_lo + chunk, p.x_lo + offset + 8 * j, valid);
      }
      ptx::cp_async_commit();
      if (announce >= 0) {
        ptx::cp_async_wait<1>();
        ptx::fence_proxy_async_shared();
        ptx::mbar_arrive(&sm.full[announce]);
      }
      announce = stage;
      pipe.advance();
    }
  }
  if (announce >= 0) {
    ptx::cp_async_wait<0>();
    ptx::fence_proxy_async_shared();
    ptx::mbar_arrive(&sm.full[announce]);
  }
}
#endif

__global__ void __launch_bounds__(kThreads, 1)
    conv_sm90_kernel(const __grid_constant__ CUtensorMap map_w_hi,
                     const __grid_constant__ CUtensorMap map_w_lo,
                     const __grid_constant__ CUtensorMap map_w_factor, ConvParams p, int k_slice,
                     int tiles_m, int tiles_n, int total_tiles) {
#if defined(TORCH_HPC_SM90A_DEVICE)
  extern __shared__ uint8_t smem_raw[];
  const SharedStages sm = setup_stages(smem_raw, 1 + kProducerThreads);
  const int warpgroup = threadIdx.x / 128;
  const int k_blocks = static_cast<int>(p.gemm.k_pad / kBK);
  if (warpgroup == 0) {
    ptx::setmaxnreg_dec<kProducerRegs>();
    conv_producer(sm, p, WeightMaps{&map_w_hi, &map_w_lo, &map_w_factor}, k_blocks, k_slice, tiles_m,
                  tiles_n, total_tiles);
  } else {
    ptx::setmaxnreg_inc<kConsumerRegs>();
    consumer_tiles<true>(sm, p.gemm, warpgroup, k_blocks, k_slice, tiles_m, tiles_n, total_tiles);
  }
#endif
}

}  // namespace

cudaError_t launch_conv_sm90(const ConvParams& p, int sm_count, cudaStream_t stream) {
  const GemmParams& g = p.gemm;
  const int64_t tiles_m = g.m_pad / kBM, tiles_n = g.n_pad / kBN;
  const int64_t total = g.batch * tiles_m * tiles_n, k_blocks = g.k_pad / kBK;
  const int64_t k_slice = g.batch > 1 ? (k_blocks + g.batch - 1) / g.batch : 0;
  if (!sm90_kernel_built() || g.batch < 1 || total > INT32_MAX || g.k_pad % kBK != 0 ||
      p.x_factor == nullptr || p.w_factor == nullptr ||
      p.channels % kBK != 0 || g.k_pad != int64_t(p.kernel_h) * p.kernel_w * p.channels ||
      (g.batch > 1 && (g.batch - 1) * k_slice >= k_blocks))  // an empty slice
    return cudaErrorInvalidValue;
  CUtensorMap maps[3];
  if (!plane_map(&maps[0], g.b_hi, 1, g.n_pad, g.k_pad) || !plane_map(&maps[1], g.b_lo, 1, g.n_pad, g.k_pad) ||
      !factor_map(&maps[2], p.w_factor, 1, g.n_pad, k_blocks))
    return cudaErrorInvalidValue;
  cudaError_t err = raise_smem_limit(reinterpret_cast<const void*>(conv_sm90_kernel), kSmemBytes);
  if (err != cudaSuccess) return err;
  const int grid = static_cast<int>(total < sm_count ? total : sm_count);
  conv_sm90_kernel<<<grid, kThreads, kSmemBytes, stream>>>(
      maps[0], maps[1], maps[2], p, static_cast<int>(k_slice), static_cast<int>(tiles_m),
      static_cast<int>(tiles_n), static_cast<int>(total));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
