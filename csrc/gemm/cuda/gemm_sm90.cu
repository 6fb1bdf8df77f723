// sm90 GEMM stage, Hopper (sm_90a) only: the producer TMA-loads the four fp16 planes of each
// k-block and, with A split in block mode, the block factors of A's rows (B one exponent per
// column);
// the consumers, the pipeline and the epilogue are sm90_pipeline.cuh's. A persistent grid.
// Torch-free: see kernels.h.
#include "sm90_pipeline.cuh"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

using namespace sm90;  // NOLINT: the shared pipeline


#if !defined(__CUDA_ARCH__) || defined(TORCH_HPC_SM90A_DEVICE)
struct PlaneMaps {
  const CUtensorMap *a_hi, *a_lo, *b_hi, *b_lo, *a_factor;
};

// Producer (one thread): for each tile of this CTA, every k-block's four planes and, where the
// tile takes the block loop (the consumers' test, sm90_pipeline.cuh), A's factors by TMA into
// the next free stage.
__device__ __forceinline__ void producer_load(const SharedStages& sm, const PlaneMaps& maps,
                                              const GemmParams& p, int k_blocks, int tiles_m, int tiles_n,
                                              int total_tiles) {
  PipeState pipe;
  for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    const TileCoord tc = tile_coord(tile, tiles_m, tiles_n);
    const int m0 = tc.row_tile * kBM, n0 = tc.col_tile * kBN;
    const bool factors = p.a_factor != nullptr &&
                         (p.a_block_tiles == nullptr || p.a_block_tiles[int64_t(tc.batch) * tiles_m + tc.row_tile] != 0);
    for (int kb = 0; kb < k_blocks; ++kb) {
      const int stage = pipe.stage;
      ptx::mbar_wait(&sm.empty[stage], pipe.phase ^ 1);
      ptx::mbar_arrive_expect_tx(&sm.full[stage], 4 * kPlaneBytes + (factors ? kFactorBytes : 0));
      uint8_t* dst = stage_tiles(sm, stage);
      const int k0 = kb * kBK;
      ptx::tma_load_3d(dst, maps.a_hi, &sm.full[stage], k0, m0, tc.batch);
      ptx::tma_load_3d(dst + kPlaneBytes, maps.a_lo, &sm.full[stage], k0, m0, tc.batch);
      ptx::tma_load_3d(dst + 2 * kPlaneBytes, maps.b_hi, &sm.full[stage], k0, n0, tc.batch);
      ptx::tma_load_3d(dst + 3 * kPlaneBytes, maps.b_lo, &sm.full[stage], k0, n0, tc.batch);
      if (factors) ptx::tma_load_3d(a_factors(sm, stage), maps.a_factor, &sm.full[stage], m0, kb, tc.batch);
      pipe.advance();
    }
  }
}

#endif

__global__ void __launch_bounds__(kThreads, 1)
    gemm_sm90_kernel(const __grid_constant__ CUtensorMap map_a_hi,
                     const __grid_constant__ CUtensorMap map_a_lo,
                     const __grid_constant__ CUtensorMap map_b_hi,
                     const __grid_constant__ CUtensorMap map_b_lo,
                     const __grid_constant__ CUtensorMap map_a_factor, GemmParams p, int tiles_m,
                     int tiles_n, int total_tiles) {
#if defined(TORCH_HPC_SM90A_DEVICE)
  extern __shared__ uint8_t smem_raw[];
  const SharedStages sm = setup_stages(smem_raw, 1);
  const int warpgroup = threadIdx.x / 128;
  const int k_blocks = static_cast<int>(p.k_pad / kBK);
  if (warpgroup == 0) {
    ptx::setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == 0)
      producer_load(sm, PlaneMaps{&map_a_hi, &map_a_lo, &map_b_hi, &map_b_lo, &map_a_factor}, p, k_blocks,
                    tiles_m, tiles_n, total_tiles);
  } else {
    ptx::setmaxnreg_inc<kConsumerRegs>();
    consumer_tiles<false>(sm, p, warpgroup, k_blocks, 0, tiles_m, tiles_n, total_tiles);
  }
#endif
}

}  // namespace

bool sm90_kernel_built() {
#if defined(TORCH_HPC_SM90A)
  return true;
#else
  return false;
#endif
}

cudaError_t launch_gemm_sm90(const GemmParams& p, int sm_count, cudaStream_t stream) {
  const int64_t tiles_m = p.m_pad / kBM, tiles_n = p.n_pad / kBN;
  const int64_t total = p.batch * tiles_m * tiles_n;
  if (total > INT32_MAX || p.k_pad % kBK != 0) return cudaErrorInvalidValue;
  CUtensorMap maps[5] = {};
  if (!plane_map(&maps[0], p.a_hi, p.batch, p.m_pad, p.k_pad) ||
      !plane_map(&maps[1], p.a_lo, p.batch, p.m_pad, p.k_pad) ||
      !plane_map(&maps[2], p.b_hi, p.batch, p.n_pad, p.k_pad) ||
      !plane_map(&maps[3], p.b_lo, p.batch, p.n_pad, p.k_pad) ||
      (p.a_factor != nullptr && !factor_map(&maps[4], p.a_factor, p.batch, p.m_pad, p.k_pad / kBK)))
    return cudaErrorInvalidValue;
  cudaError_t err = raise_smem_limit(reinterpret_cast<const void*>(gemm_sm90_kernel), kSmemBytes);
  if (err != cudaSuccess) return err;
  const int grid = static_cast<int>(total < sm_count ? total : sm_count);
  gemm_sm90_kernel<<<grid, kThreads, kSmemBytes, stream>>>(
      maps[0], maps[1], maps[2], maps[3], maps[4], p, static_cast<int>(tiles_m), static_cast<int>(tiles_n),
      static_cast<int>(total));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
