// Plane padding shared by the split, both GEMM kernels and the op code (no CUDA, no torch).
#pragma once

namespace torch_hpc {
namespace gemm {

constexpr int kTileRows = 128;  // rows of A / columns of B are padded to this
constexpr int kTileK = 64;      // K is padded to this

}  // namespace gemm
}  // namespace torch_hpc
