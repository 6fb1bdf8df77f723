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

void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, const char* op) {
  const std::pair<const char*, const at::Tensor*> operands[] = {{"query", &q}, {"key", &k}, {"value", &v}};
  for (const auto& [name, t] : operands) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat, "torch_hpc.", op, ": expected argument '", name,
                      "' to have dtype torch.float32, got ", dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->dim() == 4, "torch_hpc.", op, ": expected argument '", name,
                      "' to be 4-D (batch, heads, length, dim), got shape ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == q.device(), "torch_hpc.", op, ": expected argument '", name,
                      "' on ", q.device(), ", got ", t->device());
  }
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == v.size(1) &&
                        k.size(1) > 0 && q.size(1) % k.size(1) == 0 && k.size(2) == v.size(2) &&
                        k.size(3) == q.size(3),
                    "torch_hpc.", op, ": expected 'key' (B, H / G, S, E) and 'value' (B, H / G, S, Ev) for "
                    "'query' (B, H, L, E), got query ", q.sizes(), ", key ", k.sizes(), ", value ", v.sizes());
  TORCH_CHECK_VALUE(q.size(2) > 0 && k.size(2) > 0 && q.size(0) * q.size(1) > 0, "torch_hpc.", op,
                    ": expected nonempty batch, heads and lengths, got query ", q.sizes(), " and key ", k.sizes());
  TORCH_CHECK_VALUE(q.size(3) > 0 && q.size(3) <= kMaxAttentionDim && v.size(3) > 0 && v.size(3) <= kMaxAttentionDim,
                    "torch_hpc.", op, ": expected head dimensions from 1 to ", kMaxAttentionDim,
                    ", got ", q.size(3), " (query, key) and ", v.size(3), " (value)");
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_VALUE(m.scalar_type() == at::kFloat && m.dim() == 4 && m.device() == q.device(), "torch_hpc.", op,
                      ": expected argument 'mask' to be a 4-D torch.float32 tensor on ", q.device(), ", got ",
                      dtype_name(m.scalar_type()), " of shape ", m.sizes(), " on ", m.device());
    const int64_t full[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
    for (int d = 0; d < 4; ++d)
      TORCH_CHECK_VALUE(m.size(d) == 1 || m.size(d) == full[d], "torch_hpc.", op, ": argument 'mask' of shape ",
                        m.sizes(), " does not broadcast to ", c10::IntArrayRef(full));
  }
}

}  // namespace gemm
}  // namespace torch_hpc
