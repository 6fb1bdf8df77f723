// The fp32 -> (fp16 hi, fp16 lo, row exponent) split shared by the CPU and CUDA kernels.
//
// A row x (K values, one row of A or one column of B) is scaled by 2^-e, e = floor(log2 max|x|) - 14,
// so its largest entry lies in [2^14, 2^15). Then
//   hi = fp16_rn(x * 2^-e),  lo = fp16_rn((x * 2^-e - hi) * 2^11),  x == 2^e * (hi + 2^-11 * lo) + O(2^-22 x)
// A row falls back to the exact path when it holds inf/NaN or when an entry sits more than
// kSplitWindow binades below the row maximum (its scaled value would leave fp16's normal range).
//
// Block mode (A of the sm90 GEMM): each kScaleBlock values of a row (one k-block) get their own
// exponent e_b by the same rule, so the window holds per block, not per row. The row keeps a
// base exponent e (the largest e_b; the split kernels can also share one base among a group of
// rows) applied at the end; the block's partial products are multiplied by its factor
// 2^(e_b - e) when the kernel promotes them into the fp32 accumulator. A row falls back when one
// of its blocks does, or when a nonzero block lies more than `max_shift` binades below the base
// (its factor would leave fp32's normal range). Absolute block mode (below; both operands of the
// convolution) drops the base: each factor is the block's own power of two.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define TORCH_HPC_HD __host__ __device__ __forceinline__
#else
#define TORCH_HPC_HD inline
#endif

namespace torch_hpc {
namespace gemm {

constexpr int kHiTopExponent = 14;   // scaled row maximum lies in [2^14, 2^15)
constexpr int kLoShift = 11;         // lo carries the residual times 2^11
constexpr int kSplitWindow = 28;     // entries below 2^(emax - 28) would be subnormal after scaling
constexpr int kScaleBlock = 64;      // values sharing one exponent in block mode (one k-block)
// Largest base - e_b kept in block mode (the GEMM's A): with one factor per product, the
// smallest scaled product of the window, 2^-28, times 2^-96 stays a normal fp32.
constexpr int kMaxBlockShift = 96;
constexpr uint32_t kAbsInfBits = 0x7f800000u;
constexpr uint32_t kNoNonzero = 0xffffffffu;

TORCH_HPC_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

TORCH_HPC_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// floor(log2(v)) for the absolute-value bits of a finite nonzero float (subnormals included).
TORCH_HPC_HD int floor_log2_abs_bits(uint32_t abs_bits) {
  const int biased = static_cast<int>(abs_bits >> 23);
  if (biased != 0) return biased - 127;
#if defined(__CUDA_ARCH__)
  return (31 - __clz(abs_bits)) - 149;
#else
  return (31 - __builtin_clz(abs_bits)) - 149;
#endif
}

// IEEE binary32 -> binary16, round to nearest even (bit-identical to __float2half_rn).
TORCH_HPC_HD uint16_t f32_to_f16_rn(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > kAbsInfBits) return static_cast<uint16_t>(sign | 0x7e00u);
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 -> inf
  const int e = static_cast<int>(ax >> 23) - 127;
  if (e < -14) {  // binary16 subnormal (or zero)
    const int shift = -(e + 1);
    if (shift > 24) return static_cast<uint16_t>(sign);
    const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  const uint32_t rebased = ax - (112u << 23);
  uint32_t q = rebased >> 13;
  const uint32_t rem = rebased & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
#endif
}

TORCH_HPC_HD float f16_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return bits_float(float_bits(v) | sign);
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

TORCH_HPC_HD float scale_by_pow2(float x, int e) {
#if defined(__CUDA_ARCH__)
  return ldexpf(x, e);
#else
  return std::ldexp(x, e);
#endif
}

// Running statistics of one row: largest |x| and smallest nonzero |x|, as ordered bit patterns.
struct RowStats {
  uint32_t max_abs = 0;
  uint32_t min_nonzero_abs = kNoNonzero;

  TORCH_HPC_HD void add(float v) {
    const uint32_t a = float_bits(v) & 0x7fffffffu;
    max_abs = a > max_abs ? a : max_abs;
    if (a != 0 && a < min_nonzero_abs) min_nonzero_abs = a;
  }
  TORCH_HPC_HD void merge(uint32_t other_max, uint32_t other_min) {
    max_abs = other_max > max_abs ? other_max : max_abs;
    min_nonzero_abs = other_min < min_nonzero_abs ? other_min : min_nonzero_abs;
  }
};

struct RowScale {
  int exponent;   // row value = 2^exponent * (hi + 2^-11 lo)
  bool fallback;  // inf/NaN or too wide a range for the split: computed by the exact path
};

TORCH_HPC_HD RowScale row_scale(uint32_t max_abs, uint32_t min_nonzero_abs) {
  if (max_abs >= kAbsInfBits) return {0, true};
  if (max_abs == 0) return {0, false};
  const int emax = floor_log2_abs_bits(max_abs);
  const int emin = floor_log2_abs_bits(min_nonzero_abs);
  return {emax - kHiTopExponent, emin < emax - kSplitWindow};
}

// Block mode: the factor 2^(block_exponent - base_exponent) of a block, 0 when the block falls
// back (its own window, inf/NaN, or more than max_shift binades below the base).
TORCH_HPC_HD float block_factor(RowScale block, int base_exponent, int max_shift) {
  if (block.fallback) return 0.0f;
  const int shift = block.exponent - base_exponent;
  if (shift > 0 || shift < -max_shift) return 0.0f;
  return bits_float(static_cast<uint32_t>(127 + shift) << 23);
}

// Absolute block mode (both operands of the convolution, each split in one pass): each block's
// factor is 2^e_b itself, with no base (row exponents 0), so the kernel's accumulator holds the
// true sums. Blocks whose exponent leaves [kMinAbsoluteExponent, kMaxAbsoluteExponent] fall
// back, so that the product of two factors is an exact fp32 power of two (2^-148 .. 2^126): a
// k-block's scaled products (below 2^36) times it are then the true partial sum, which
// overflows only where fp32's own sum would.
constexpr int kMinAbsoluteExponent = -74;
constexpr int kMaxAbsoluteExponent = 63;

TORCH_HPC_HD float absolute_block_factor(RowScale block) {
  if (block.fallback || block.exponent < kMinAbsoluteExponent || block.exponent > kMaxAbsoluteExponent)
    return 0.0f;
  return bits_float(static_cast<uint32_t>(127 + block.exponent) << 23);
}

// The base exponent of a row (or group of rows) in block mode from the largest finite |x| among
// its blocks that did not fall back (0 when there is none).
TORCH_HPC_HD int base_exponent(uint32_t finite_max_abs) {
  return finite_max_abs == 0 ? 0 : floor_log2_abs_bits(finite_max_abs) - kHiTopExponent;
}

// Splits one value of a row. Fallback rows get zeros: the exact path overwrites their outputs.
TORCH_HPC_HD void split_value(float x, RowScale s, uint16_t& hi, uint16_t& lo) {
  if (s.fallback) {
    hi = 0;
    lo = 0;
    return;
  }
  const float scaled = scale_by_pow2(x, -s.exponent);
  hi = f32_to_f16_rn(scaled);
  const float residual = scaled - f16_to_f32(hi);
  lo = f32_to_f16_rn(residual * static_cast<float>(1 << kLoShift));
}

}  // namespace gemm
}  // namespace torch_hpc
