#include "checks.h"

#include <c10/util/Exception.h>

namespace torch_hpc {
namespace gemm {

std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

void check_matmul_args(const at::Tensor& a, const at::Tensor& b, int64_t dims, const char* op) {
  TORCH_CHECK_VALUE(a.scalar_type() == at::kFloat, "torch_hpc.", op,
                    ": expected argument 'a' to have dtype torch.float32, got ", dtype_name(a.scalar_type()));
  TORCH_CHECK_VALUE(b.scalar_type() == at::kFloat, "torch_hpc.", op,
                    ": expected argument 'b' to have dtype torch.float32, got ", dtype_name(b.scalar_type()));
  TORCH_CHECK_VALUE(a.device() == b.device(), "torch_hpc.", op,
                    ": expected arguments 'a' and 'b' on the same device, got ", a.device(),
                    " and ", b.device());
  TORCH_CHECK_VALUE(a.dim() == dims, "torch_hpc.", op, ": expected argument 'a' to be ", dims,
                    "-D, got a ", a.dim(), "-D tensor of shape ", a.sizes());
  TORCH_CHECK_VALUE(b.dim() == dims, "torch_hpc.", op, ": expected argument 'b' to be ", dims,
                    "-D, got a ", b.dim(), "-D tensor of shape ", b.sizes());
  TORCH_CHECK_VALUE(a.size(dims - 1) == b.size(dims - 2), "torch_hpc.", op,
                    ": inner dimensions differ: 'a' has shape ", a.sizes(), " and 'b' has shape ",
                    b.sizes(), " (a.shape[-1] must equal b.shape[-2])");
  if (dims == 3) {
    TORCH_CHECK_VALUE(a.size(0) == b.size(0), "torch_hpc.", op,
                      ": batch sizes differ: 'a' has shape ", a.sizes(), " and 'b' has shape ",
                      b.sizes());
  }
}

void check_bias_arg(const at::Tensor& bias, const at::Tensor& b, const char* op) {
  TORCH_CHECK_VALUE(bias.scalar_type() == at::kFloat && bias.dim() == 1 &&
                        bias.size(0) == b.size(1) && bias.device() == b.device(),
                    "torch_hpc.", op, ": expected argument 'bias' to be a 1-D torch.float32 "
                    "tensor of ", b.size(1), " elements on ", b.device(), ", got ",
                    dtype_name(bias.scalar_type()), " of shape ", bias.sizes(), " on ", bias.device());
}

void check_split_arg(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat,
                    "torch_hpc.split: expected argument 'x' to have dtype torch.float32, got ",
                    dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() == 2, "torch_hpc.split: expected argument 'x' to be 2-D, got shape ",
                    x.sizes());
}

}  // namespace gemm
}  // namespace torch_hpc
