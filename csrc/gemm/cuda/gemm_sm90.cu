// Hopper (sm_90a) kernel of the 3xfp16 emulated fp32 GEMM: TMA loads of the four fp16 planes
// into 128B-swizzled shared memory, one producer warpgroup and two consumer warpgroups
// (64x128 of the 128x128 tile each) issuing wgmma, a persistent grid. Per kPromote = 32 k each
// consumer computes
//   fresh = A_hi B_hi (tensor core);  acc += fresh (fp32, outside the tensor core)
//   corr += A_hi B_lo + A_lo B_hi (tensor core, whole K)
// and writes 2^(e_row + e_col) (acc + 2^-11 corr). Torch-free: see kernels.h.
#include "kernels.h"

#include <cuda.h>
#include <cudaTypedefs.h>

#include <mutex>

#include "../split.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TORCH_HPC_SM90A_DEVICE 1
#endif

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64;  // kBK fp16 = 128 B = one swizzle row
constexpr int kStages = 3;
constexpr int kPlaneBytes = kBM * kBK * 2;      // 16 KiB, a_hi / a_lo / b_hi / b_lo
constexpr int kStageBytes = 4 * kPlaneBytes;
constexpr int kThreads = 384;                   // warpgroup 0 loads, 1 and 2 compute
// k-products summed in the tensor core before each fp32 promotion. Measured on an H100: 64
// runs at the same speed but lost to plain fp32 on a K = 128 weight gradient (3.3e-7 vs 3.0e-7).
constexpr int kPromote = 32;
constexpr size_t kSmemBytes = size_t(kStages) * kStageBytes + 1024 + 2 * kStages * 8;

static_assert(kBK * 2 == 128, "one k-block row must be one 128-byte swizzle row");
static_assert(kTileK % kBK == 0, "planes are padded to whole k-blocks");
static_assert(kTileRows % kBM == 0 && kTileRows % kBN == 0, "planes are padded to whole tiles");

// Device code exists only in the host pass and the sm_90a pass.
#if !defined(__CUDA_ARCH__) || defined(TORCH_HPC_SM90A_DEVICE)
constexpr int kConsumerWarps = 8;
constexpr int kAccRegs = 64;                    // m64n128 fp32 fragment per thread
constexpr int kGroupM = 8;                      // tile rows swept together (L2 reuse)
constexpr int kProducerRegs = 40, kConsumerRegs = 232;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_u32(bar);
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  }
}

__device__ __forceinline__ void tma_load_tile(void* dst, const CUtensorMap* map, uint64_t* bar,
                                              int k0, int row0, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(k0), "r"(row0), "r"(batch)
      : "memory");
}

// Shared-memory matrix descriptor of a K-major tile written by TMA with 128-byte swizzling:
// rows of 128 B, 8-row groups 1024 B apart (stride byte offset), tile base 1024-B aligned.
__device__ __forceinline__ uint64_t smem_desc_sw128(const void* tile) {
  const uint64_t addr = smem_u32(tile);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses to accumulator registers across wgmma issue/wait.
__device__ __forceinline__ void fence_regs(float (&r)[kAccRegs]) {
#pragma unroll
  for (int i = 0; i < kAccRegs; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// D (64x128 fp32, the m64n128 fragment) {=, +=} A (64x16, K-major smem) * B (16x128, K-major
// smem); accumulate = 0 overwrites D.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[kAccRegs], uint64_t desc_a,
                                                 uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

struct TileCoord {
  int batch, row_tile, col_tile;
};

// Grouped order: kGroupM tile rows advance together across the columns, so the CTAs resident
// at one time share A and B panels in L2.
__device__ __forceinline__ TileCoord tile_coord(int tile, int tiles_m, int tiles_n) {
  const int per_batch = tiles_m * tiles_n;
  const int batch = tile / per_batch;
  const int t = tile - batch * per_batch;
  const int per_group = kGroupM * tiles_n;
  const int first_m = (t / per_group) * kGroupM;
  const int group_rows = min(tiles_m - first_m, kGroupM);
  const int in_group = t - (t / per_group) * per_group;
  return {batch, first_m + in_group % group_rows, in_group / group_rows};
}
#endif

template <int Promote>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_sm90_kernel(const __grid_constant__ CUtensorMap map_a_hi,
                     const __grid_constant__ CUtensorMap map_a_lo,
                     const __grid_constant__ CUtensorMap map_b_hi,
                     const __grid_constant__ CUtensorMap map_b_lo, GemmParams p, int tiles_m,
                     int tiles_n, int total_tiles) {
#if defined(TORCH_HPC_SM90A_DEVICE)
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                             ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int warpgroup = threadIdx.x / 128;
  const int k_blocks = static_cast<int>(p.k_pad / kBK);

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    if (threadIdx.x == 0) {
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
        const TileCoord tc = tile_coord(tile, tiles_m, tiles_n);
        const int m0 = tc.row_tile * kBM, n0 = tc.col_tile * kBN;
        for (int kb = 0; kb < k_blocks; ++kb) {
          mbar_wait(&empty[stage], phase ^ 1);
          mbar_arrive_expect_tx(&full[stage], kStageBytes);
          uint8_t* dst = smem + stage * kStageBytes;
          const int k0 = kb * kBK;
          tma_load_tile(dst, &map_a_hi, &full[stage], k0, m0, tc.batch);
          tma_load_tile(dst + kPlaneBytes, &map_a_lo, &full[stage], k0, m0, tc.batch);
          tma_load_tile(dst + 2 * kPlaneBytes, &map_b_hi, &full[stage], k0, n0, tc.batch);
          tma_load_tile(dst + 3 * kPlaneBytes, &map_b_lo, &full[stage], k0, n0, tc.batch);
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
    const int consumer = warpgroup - 1;  // rows consumer*64 .. +63 of the tile
    const int t = threadIdx.x - 128 * warpgroup;
    const int warp = t / 32, lane = t % 32;
    const bool release_lane = lane == 0;
    int stage = 0;
    uint32_t phase = 0;
    float acc[kAccRegs], fresh[kAccRegs], corr[kAccRegs];

    for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
      const TileCoord tc = tile_coord(tile, tiles_m, tiles_n);
#pragma unroll
      for (int i = 0; i < kAccRegs; ++i) acc[i] = 0.0f;
      int prev_stage = -1;
      for (int kb = 0; kb < k_blocks; ++kb) {
        mbar_wait(&full[stage], phase);
        const uint8_t* st = smem + stage * kStageBytes + consumer * 64 * 128;
        const uint64_t a_hi = smem_desc_sw128(st);
        const uint64_t a_lo = smem_desc_sw128(st + kPlaneBytes);
        const uint8_t* sb = smem + stage * kStageBytes;
        const uint64_t b_hi = smem_desc_sw128(sb + 2 * kPlaneBytes);
        const uint64_t b_lo = smem_desc_sw128(sb + 3 * kPlaneBytes);
        // Each k-block runs as kBK / Promote chunks: fresh = hi*hi of the chunk, then the
        // chunk's correction products; once fresh is done (the corrections still running) it
        // is added into acc. The first wait also retires the previous stage's corrections.
#pragma unroll 1
        for (int chunk = 0; chunk < kBK / Promote; ++chunk) {
          fence_regs(fresh);
          fence_regs(corr);
          wgmma_fence();
          const int k0 = chunk * (Promote / 16);
#pragma unroll
          for (int kk = 0; kk < Promote / 16; ++kk)  // +16 k = +32 B = +2 in the descriptor
            wgmma_m64n128k16(fresh, a_hi + 2 * (k0 + kk), b_hi + 2 * (k0 + kk), kk > 0);
          wgmma_commit();
#pragma unroll
          for (int kk = 0; kk < Promote / 16; ++kk) {
            wgmma_m64n128k16(corr, a_hi + 2 * (k0 + kk), b_lo + 2 * (k0 + kk), kb > 0 || k0 + kk > 0);
            wgmma_m64n128k16(corr, a_lo + 2 * (k0 + kk), b_hi + 2 * (k0 + kk), 1);
          }
          wgmma_commit();
          fence_regs(fresh);
          wgmma_wait<1>();
          fence_regs(fresh);
#pragma unroll
          for (int i = 0; i < kAccRegs; ++i) acc[i] += fresh[i];
          if (chunk == 0 && prev_stage >= 0 && release_lane) mbar_arrive(&empty[prev_stage]);
        }
        prev_stage = stage;
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
      fence_regs(corr);
      wgmma_wait<0>();
      fence_regs(corr);
      if (prev_stage >= 0 && release_lane) mbar_arrive(&empty[prev_stage]);

      // Epilogue: fragment element 4j + {0,1,2,3} is (row, 8j + 2(lane%4) + {0,1,0,1}) with
      // row = 16 warp + lane/4 (+8 for elements 2, 3).
      const int64_t b = tc.batch;
      const int64_t row0 = int64_t(tc.row_tile) * kBM + consumer * 64 + warp * 16 + lane / 4;
      const int64_t col_base = int64_t(tc.col_tile) * kBN + 2 * (lane % 4);
      const int32_t* ea = p.a_exponent + b * p.m_pad;
      const int32_t* eb = p.b_exponent + b * p.n_pad;
      float* c = p.c + b * p.c_stride_b;
      constexpr float kLoScale = 1.0f / float(1 << kLoShift);
      const bool pairs = p.c_stride_n == 1 && p.c_stride_m % 2 == 0 && p.c_stride_b % 2 == 0 &&
                         (reinterpret_cast<uintptr_t>(p.c) & 7) == 0;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = row0 + 8 * half;
        if (row >= p.m) continue;
        const int e_row = ea[row];
        float* c_row = c + row * p.c_stride_m;
#pragma unroll
        for (int j = 0; j < kAccRegs / 4; ++j) {
          const int64_t col = col_base + 8 * j;
          if (col >= p.n) continue;
          const int r = 4 * j + 2 * half;
          const float v0 = ldexpf(acc[r] + corr[r] * kLoScale, e_row + eb[col]);
          const float v1 = ldexpf(acc[r + 1] + corr[r + 1] * kLoScale, e_row + eb[col + 1]);
          if (pairs && col + 1 < p.n) {
            *reinterpret_cast<float2*>(c_row + col) = make_float2(v0, v1);
          } else {
            c_row[col * p.c_stride_n] = v0;
            if (col + 1 < p.n) c_row[(col + 1) * p.c_stride_n] = v1;
          }
        }
      }
    }
  }
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &status) == cudaSuccess &&
        status == cudaDriverEntryPointSuccess)
      encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  });
  return encode;
}

// [batch, rows_pad, k_pad] fp16 plane -> tensor map with 128-row x 64-k boxes, 128B swizzle.
bool plane_map(CUtensorMap* map, const uint16_t* plane, int64_t batch, int64_t rows_pad,
               int64_t k_pad) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[3] = {cuuint64_t(k_pad), cuuint64_t(rows_pad), cuuint64_t(batch)};
  const cuuint64_t strides[2] = {cuuint64_t(k_pad) * 2, cuuint64_t(rows_pad * k_pad) * 2};
  const cuuint32_t box[3] = {kBK, kBM, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3, const_cast<uint16_t*>(plane), dims,
                strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace

bool sm90_kernel_built() {
#if defined(TORCH_HPC_SM90A)
  return true;
#else
  return false;
#endif
}

namespace {

template <int Promote>
cudaError_t launch_sm90(const CUtensorMap (&maps)[4], const GemmParams& p, int grid, int tiles_m,
                        int tiles_n, int total, cudaStream_t stream) {
  // The shared-memory limit is raised once per device (the attribute is per device context).
  constexpr int kMaxDevices = 64;
  static std::mutex mutex;
  static bool raised[kMaxDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device >= kMaxDevices) return cudaErrorInvalidDevice;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (!raised[device]) {
      err = cudaFuncSetAttribute(gemm_sm90_kernel<Promote>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(kSmemBytes));
      if (err != cudaSuccess) return err;
      raised[device] = true;
    }
  }
  gemm_sm90_kernel<Promote><<<grid, kThreads, kSmemBytes, stream>>>(
      maps[0], maps[1], maps[2], maps[3], p, tiles_m, tiles_n, total);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemm_sm90(const GemmParams& p, int sm_count, cudaStream_t stream) {
  const int64_t tiles_m = p.m_pad / kBM, tiles_n = p.n_pad / kBN;
  const int64_t total = p.batch * tiles_m * tiles_n;
  if (total > INT32_MAX || p.k_pad % kBK != 0) return cudaErrorInvalidValue;
  CUtensorMap maps[4];
  if (!plane_map(&maps[0], p.a_hi, p.batch, p.m_pad, p.k_pad) ||
      !plane_map(&maps[1], p.a_lo, p.batch, p.m_pad, p.k_pad) ||
      !plane_map(&maps[2], p.b_hi, p.batch, p.n_pad, p.k_pad) ||
      !plane_map(&maps[3], p.b_lo, p.batch, p.n_pad, p.k_pad))
    return cudaErrorInvalidValue;
  const int grid = static_cast<int>(total < sm_count ? total : sm_count);
  constexpr auto launch = launch_sm90<kPromote>;
  return launch(maps, p, grid, static_cast<int>(tiles_m), static_cast<int>(tiles_n),
                static_cast<int>(total), stream);
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
