// CUDA implementation of torch_hpc::attention / attention_forward / attention_backward: the
// operands' split planes from PyTorch's caching allocator, the fused kernels on the current
// stream, no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../checks.h"
#include "../torch_path.h"
#include "attention.h"

namespace torch_hpc {
namespace gemm {
namespace {

struct Split {
  at::Tensor hi, lo, factor;
  int64_t len_pad;
  cuda::AttentionPlanes planes() const {
    return {reinterpret_cast<const uint16_t*>(hi.data_ptr<at::Half>()),
            reinterpret_cast<const uint16_t*>(lo.data_ptr<at::Half>()), factor.data_ptr<float>(), len_pad};
  }
};

int dim_pad_for(const at::Tensor& q, const at::Tensor& v) {
  return std::max(q.size(3), v.size(3)) <= 64 ? 64 : 128;
}

// x [B, H, L, D] (any strides) as planes of len_pad rows and dim_pad columns.
Split split(const at::Tensor& x, int64_t len_pad, int dim_pad, cudaStream_t stream) {
  const int64_t bh = x.size(0) * x.size(1);
  const auto opts = x.options();
  Split s{at::empty({bh, len_pad, dim_pad}, opts.dtype(at::kHalf)), at::empty({bh, len_pad, dim_pad}, opts.dtype(at::kHalf)),
          at::empty({bh, len_pad / cuda::kAttnTile}, opts), len_pad};
  const cuda::AttentionSplitParams p{x.data_ptr<float>(),
                                     x.size(0), x.size(1), x.size(2), x.size(3),
                                     x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                                     reinterpret_cast<uint16_t*>(s.hi.data_ptr<at::Half>()),
                                     reinterpret_cast<uint16_t*>(s.lo.data_ptr<at::Half>()),
                                     s.factor.data_ptr<float>(), len_pad, dim_pad};
  C10_CUDA_CHECK(cuda::launch_attention_split(p, stream));
  return s;
}

cuda::AttentionShape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& mask, bool is_causal, double scale) {
  cuda::AttentionShape s{q.size(0), q.size(1), q.size(1) / k.size(1), q.size(2), k.size(2), q.size(3),
                         v.size(3), dim_pad_for(q, v), is_causal, static_cast<float>(scale),
                         nullptr, 0, 0, 0, 0};
  if (mask.defined()) {
    const at::Tensor m = mask.expand({q.size(0), q.size(1), q.size(2), k.size(2)});
    s.mask = m.data_ptr<float>();
    s.mask_sb = m.stride(0);
    s.mask_sh = m.stride(1);
    s.mask_si = m.stride(2);
    s.mask_sj = m.stride(3);
  }
  return s;
}

size_t smem_needed(int64_t dim) {
  const int pad = dim <= 64 ? 64 : 128;
  return std::max(cuda::attention_forward_smem_bytes(pad), cuda::attention_backward_smem_bytes(pad));
}

bool kernel_fits(int device, int64_t dim) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  return prop->major >= 8 && prop->sharedMemPerBlockOptin >= smem_needed(dim);
}

void check_device(const at::Tensor& q, const at::Tensor& v, const char* op) {
  TORCH_CHECK_VALUE(q.is_cuda(), "torch_hpc.", op, ": expected CUDA tensors, got ", q.device());
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.get_device());
  const size_t need = smem_needed(std::max(q.size(3), v.size(3)));
  TORCH_CHECK_VALUE(kernel_fits(q.get_device(), std::max(q.size(3), v.size(3))), "torch_hpc.", op,
                    ": the fused kernel needs compute capability 8.0 and ", need, " bytes of shared memory per "
                    "block; ", prop->name, " has ", prop->major, ".", prop->minor, " and ",
                    prop->sharedMemPerBlockOptin);
  TORCH_CHECK_VALUE(q.size(0) * q.size(1) <= 65535, "torch_hpc.", op,
                    ": at most 65535 batch x heads, got ", q.size(0) * q.size(1));
}

at::Tensor mask_of(const std::optional<at::Tensor>& mask) {
  return mask.has_value() && mask->defined() ? *mask : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                                          bool is_causal, double scale) {
  check_attention_args(q, k, v, mask, "attention_forward");
  check_device(q, v, "attention_forward");
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int pad = dim_pad_for(q, v);
  const Split sq = split(q, round_up(q.size(2), cuda::kAttnQueryBlock), pad, stream);
  const int64_t kv_pad = round_up(k.size(2), cuda::kAttnTile);
  const Split sk = split(k, kv_pad, pad, stream);
  const Split sv = split(v, kv_pad, pad, stream);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse2 = at::empty({q.size(0), q.size(1), sq.len_pad}, q.options());
  const cuda::AttentionForwardParams p{shape_of(q, k, v, mask_of(mask), is_causal, scale),
                                       sq.planes(), sk.planes(), sv.planes(), out.data_ptr<float>(),
                                       lse2.data_ptr<float>()};
  C10_CUDA_CHECK(cuda::launch_attention_forward(p, stream));
  return {out, lse2};
}

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, bool is_causal, double scale) {
  return std::get<0>(attention_forward_cuda(q, k, v, mask, is_causal, scale));
}

// Sums the per-query-head gradients of a key/value head shared by `group` query heads.
at::Tensor sum_groups(const at::Tensor& g, int64_t group) {
  if (group == 1) return g;
  return g.view({g.size(0), g.size(1) / group, group, g.size(2), g.size(3)}).sum(2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse2, const std::optional<at::Tensor>& mask, bool is_causal, double scale) {
  check_attention_args(q, k, v, mask, "attention_backward");
  check_device(q, v, "attention_backward");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), S = k.size(2);
  TORCH_CHECK_VALUE(grad.scalar_type() == at::kFloat && grad.sizes() == out.sizes() &&
                        out.sizes() == c10::IntArrayRef({B, H, L, v.size(3)}) && grad.device() == q.device(),
                    "torch_hpc.attention_backward: expected 'grad' and 'out' of shape ", out.sizes(), " on ",
                    q.device());
  TORCH_CHECK_VALUE(lse2.scalar_type() == at::kFloat && lse2.dim() == 3 && lse2.size(0) == B && lse2.size(1) == H &&
                        lse2.size(2) == round_up(L, cuda::kAttnQueryBlock) && lse2.is_contiguous(),
                    "torch_hpc.attention_backward: 'lse' is not the forward's, got shape ", lse2.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int pad = dim_pad_for(q, v);
  const int64_t q_pad = lse2.size(2), kv_pad = round_up(S, cuda::kAttnTile);
  const Split sq = split(q, q_pad, pad, stream);
  const Split sk = split(k, kv_pad, pad, stream);
  const Split sv = split(v, kv_pad, pad, stream);
  const Split sd = split(grad, q_pad, pad, stream);
  at::Tensor delta = at::zeros({B * H, q_pad}, q.options());
  delta.narrow(1, 0, L).view({B, H, L}).copy_((grad * out).sum(-1));
  at::Tensor dq_accum = at::zeros({B * H, q_pad, pad}, q.options());
  at::Tensor dk = at::empty({B, H, S, q.size(3)}, q.options());
  at::Tensor dv = at::empty({B, H, S, v.size(3)}, q.options());
  const cuda::AttentionBackwardParams p{shape_of(q, k, v, mask_of(mask), is_causal, scale),
                                        sq.planes(), sk.planes(), sv.planes(), sd.planes(),
                                        lse2.data_ptr<float>(), delta.data_ptr<float>(),
                                        dq_accum.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>()};
  C10_CUDA_CHECK(cuda::launch_attention_backward(p, stream));
  at::Tensor dq = dq_accum.view({B, H, q_pad, pad}).narrow(2, 0, L).narrow(3, 0, q.size(3)).contiguous();
  const int64_t group = H / k.size(1);
  return {dq, sum_groups(dk, group), sum_groups(dv, group)};
}

const bool fits_rule_registered = (register_attention_fits_rule(&kernel_fits), true);

}  // namespace

TORCH_LIBRARY_IMPL(torch_hpc, CUDA, m) {
  m.impl("attention", &attention_cuda);
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace gemm
}  // namespace torch_hpc
