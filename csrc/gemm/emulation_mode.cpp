// fp32_emulation()'s routing, below Python: a thread-local dispatch key above autograd (where
// autocast's keys sit) carries kernels for torch's matrix products (mm, bmm, addmm, baddbmm,
// matmul, linear, conv1d/2d/3d) and scaled_dot_product_attention that call torch_hpc's ops,
// and falls through for every other op, at no cost per call. The key travels with PyTorch's thread-local state, so backward() inside
// the mode routes the products of torch's own backward formulas too. PyTorch reserves no key for
// out-of-tree modes; this takes TESTING_ONLY_GenericMode, which nothing in PyTorch itself
// registers, and registers on it only when a mode is first entered.
#ifdef TORCH_HPC_PYTHON_MODULE
#include "emulation_mode.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <vector>

#include "ops.h"
#include "torch_path.h"

namespace torch_hpc {
namespace {

constexpr c10::DispatchKey kModeKey = gemm::kEmulationModeKey;

// The order of the names Python's fp32_emulation.calls uses (precision.py).
enum Route { kMm, kBmm, kMatmul, kAddmm, kBaddbmm, kLinear, kConv1d, kConv2d, kConv3d, kSdpa, kRoutes };

struct Context {
  bool enabled;
  bool cpu;
  bool key_before;  // whether the key was included when the context was entered
  std::array<int64_t, kRoutes> calls{};
};

// The open contexts of this thread, innermost last. A thread that has the key through
// PyTorch's propagated state but no context (autograd's device threads) routes CUDA tensors.
thread_local std::vector<Context> contexts;

// torch_hpc's autograd is C++ autograd::Functions, which functorch transforms (vmap, grad) and
// forward-mode AD do not take: such tensors get torch's own op.
const c10::DispatchKeySet kFunctorch({c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::FuncTorchBatched,
                                      c10::DispatchKey::BatchedNestedTensor});

bool routes(const at::Tensor& t, bool cpu) {
  if (!t.defined() || t.scalar_type() != at::kFloat || t.layout() != at::kStrided) return false;
  if (t.key_set().has_any(kFunctorch) || t._fw_grad(/*level=*/0).defined()) return false;
  const c10::DeviceType device = t.device().type();
  if (device != c10::DeviceType::CUDA && !(cpu && device == c10::DeviceType::CPU)) return false;
  return !at::autocast::is_autocast_enabled(device);
}

// Whether the innermost context routes these operands; counts the call when it does.
template <typename... T>
bool take(Route route, const T&... operands) {
  Context* context = contexts.empty() ? nullptr : &contexts.back();
  if (context != nullptr && !context->enabled) return false;
  const bool cpu = context != nullptr && context->cpu;
  if (!(routes(operands, cpu) && ...)) return false;
  if (context != nullptr) ++context->calls[route];
  return true;
}

void uncount(Route route) {
  if (!contexts.empty()) --contexts.back().calls[route];
}

// Runs the torch_hpc call; bad arguments (torch_hpc's ValueError) give torch's own call, which
// raises torch's own error, so code that catches torch's exceptions sees no difference.
template <typename Emulated, typename Torch>
at::Tensor route_or_torch(Route route, bool taken, Emulated emulated, Torch torch_call) {
  const c10::impl::ExcludeDispatchKeyGuard outside_the_mode(kModeKey);
  if (!taken) return torch_call();
  try {
    return emulated();
  } catch (const c10::ValueError&) {
    uncount(route);
    return torch_call();
  }
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  return route_or_torch(kMm, take(kMm, a, b), [&] { return call_mm(a, b); },
                        [&] { return at::mm(a, b); });
}

at::Tensor bmm(const at::Tensor& a, const at::Tensor& b) {
  return route_or_torch(kBmm, take(kBmm, a, b), [&] { return call_bmm(a, b); },
                        [&] { return at::bmm(a, b); });
}

at::Tensor matmul(const at::Tensor& a, const at::Tensor& b) {
  return route_or_torch(kMatmul, take(kMatmul, a, b), [&] { return call_matmul(a, b); },
                        [&] { return at::matmul(a, b); });
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  const bool taken = has_bias ? take(kLinear, input, weight, *bias) : take(kLinear, input, weight);
  return route_or_torch(kLinear, taken, [&] { return call_linear(input, weight, bias); },
                        [&] { return at::linear(input, weight, bias); });
}

bool equals(const at::Scalar& s, int64_t v) {
  if (s.isBoolean()) return static_cast<int64_t>(s.toBool()) == v;
  if (s.isIntegral(false)) return s.toLong() == v;
  return s.isFloatingPoint() && s.toDouble() == static_cast<double>(v);
}

// addmm/baddbmm: alpha * product + beta * input, as torch computes them (beta = 0 ignores the
// input, its NaN and inf included).
at::Tensor scaled_sum(at::Tensor product, const at::Tensor& input, const at::Scalar& beta,
                      const at::Scalar& alpha) {
  TORCH_CHECK_VALUE(at::is_expandable_to(input.sym_sizes(), product.sym_sizes()),
                    "'input' does not broadcast to the product");
  if (!equals(alpha, 1)) product = product * alpha;
  if (equals(beta, 0)) return product;
  return product + (equals(beta, 1) ? input : input * beta);
}

bool real(const at::Scalar& s) { return !s.isComplex() && !s.isSymbolic(); }

at::Tensor addmm(const at::Tensor& input, const at::Tensor& m1, const at::Tensor& m2,
                 const at::Scalar& beta, const at::Scalar& alpha) {
  const bool taken = real(beta) && real(alpha) && take(kAddmm, input, m1, m2);
  return route_or_torch(
      kAddmm, taken,
      [&] { return scaled_sum(call_mm(m1, m2), input, beta, alpha); },
      [&] { return at::addmm(input, m1, m2, beta, alpha); });
}

at::Tensor baddbmm(const at::Tensor& input, const at::Tensor& b1, const at::Tensor& b2,
                   const at::Scalar& beta, const at::Scalar& alpha) {
  const bool taken = real(beta) && real(alpha) && take(kBaddbmm, input, b1, b2);
  return route_or_torch(
      kBaddbmm, taken,
      [&] { return scaled_sum(call_bmm(b1, b2), input, beta, alpha); },
      [&] { return at::baddbmm(input, b1, b2, beta, alpha); });
}

// Convolutions run torch_hpc.conv's route (Python: its choice between cuDNN with TF32 off and
// the emulated products); `traced` tells it that a compiler is tracing (fake or functional
// tensors, a dispatch mode), where it keeps its custom ops in the graph.
bool traced(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() ||
         t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                                  c10::DispatchKey::FuncTorchBatched,
                                                  c10::DispatchKey::FuncTorchGradWrapper}));
}

template <int N, typename Padding>
at::Tensor conv_in_python(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          c10::SymIntArrayRef stride, const Padding& padding, c10::SymIntArrayRef dilation,
                          const c10::SymInt& groups) {
  const bool is_traced = c10::impl::dispatch_mode_enabled() || traced(input) || traced(weight);
  pybind11::gil_scoped_acquire gil;
  static pybind11::object* const route =
      new pybind11::object(pybind11::module_::import("torch_hpc.conv").attr("_routed"));
  pybind11::object out;
  try {
    out = (*route)(N, input, weight, bias, stride, padding, dilation, groups, is_traced);
  } catch (pybind11::error_already_set& e) {
    if (e.matches(PyExc_ValueError)) throw c10::ValueError({__func__, __FILE__, __LINE__}, e.what());
    throw;
  }
  return pybind11::cast<at::Tensor>(out);
}

template <int N, typename Padding>
at::Tensor conv(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                c10::SymIntArrayRef stride, Padding padding, c10::SymIntArrayRef dilation, c10::SymInt groups) {
  constexpr Route route = N == 1 ? kConv1d : N == 2 ? kConv2d : kConv3d;
  const bool has_bias = bias.has_value() && bias->defined();
  const bool taken = has_bias ? take(route, input, weight, *bias) : take(route, input, weight);
  return route_or_torch(
      route, taken, [&] { return conv_in_python<N>(input, weight, bias, stride, padding, dilation, groups); },
      [&] {
        if constexpr (N == 1) return at::conv1d_symint(input, weight, bias, stride, padding, dilation, groups);
        else if constexpr (N == 2) return at::conv2d_symint(input, weight, bias, stride, padding, dilation, groups);
        else return at::conv3d_symint(input, weight, bias, stride, padding, dilation, groups);
      });
}

// Attention: torch_hpc's composite takes the fused kernel where it applies and torch's call
// elsewhere; only calls whose three operands the mode routes are counted.
at::Tensor sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
                double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa) {
  return route_or_torch(
      kSdpa, take(kSdpa, q, k, v),
      [&] { return call_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa); },
      [&] { return at::scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa); });
}

void register_kernels() {
  static std::once_flag once;
  std::call_once(once, [] {
    // Never destroyed: the registrations last as long as the process.
    auto* fallthrough = new torch::Library(torch::Library::IMPL, "_", kModeKey, __FILE__, __LINE__);
    fallthrough->fallback(torch::CppFunction::makeFallthrough());
    auto* aten = new torch::Library(torch::Library::IMPL, "aten", kModeKey, __FILE__, __LINE__);
    aten->impl("mm", TORCH_FN(mm));
    aten->impl("bmm", TORCH_FN(bmm));
    aten->impl("matmul", TORCH_FN(matmul));
    aten->impl("linear", TORCH_FN(linear));
    aten->impl("addmm", TORCH_FN(addmm));
    aten->impl("baddbmm", TORCH_FN(baddbmm));
    aten->impl("conv1d", TORCH_FN((conv<1, c10::SymIntArrayRef>)));
    aten->impl("conv2d", TORCH_FN((conv<2, c10::SymIntArrayRef>)));
    aten->impl("conv3d", TORCH_FN((conv<3, c10::SymIntArrayRef>)));
    aten->impl("conv1d.padding", TORCH_FN((conv<1, c10::string_view>)));
    aten->impl("conv2d.padding", TORCH_FN((conv<2, c10::string_view>)));
    aten->impl("conv3d.padding", TORCH_FN((conv<3, c10::string_view>)));
    aten->impl("scaled_dot_product_attention", TORCH_FN(sdpa));
  });
}

// _emulation_enter(enabled, cpu)
PyObject* enter(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 2 && PyBool_Check(args[0]) && PyBool_Check(args[1]),
              "_emulation_enter(enabled: bool, cpu: bool)");
  const bool enabled = args[0] == Py_True;
  if (enabled) register_kernels();
  contexts.push_back({enabled, args[1] == Py_True, c10::impl::tls_is_dispatch_key_included(kModeKey)});
  c10::impl::tls_set_dispatch_key_included(kModeKey, enabled);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* counts(const Context& context) {
  PyObject* list = PyList_New(kRoutes);
  for (int i = 0; list != nullptr && i < kRoutes; ++i)
    PyList_SET_ITEM(list, i, PyLong_FromLongLong(context.calls[i]));
  return list;
}

// _emulation_exit() -> the closed context's counts
PyObject* leave(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(!contexts.empty(), "torch_hpc: fp32_emulation exited more often than entered");
  const Context context = contexts.back();
  contexts.pop_back();
  c10::impl::tls_set_dispatch_key_included(kModeKey, context.key_before);
  return counts(context);
  END_HANDLE_TH_ERRORS
}

// _emulation_counts(depth) -> counts of the open context at that depth (0: outermost)
PyObject* live_counts(PyObject*, PyObject* arg) {
  HANDLE_TH_ERRORS
  const Py_ssize_t depth = PyLong_AsSsize_t(arg);
  if (depth == -1 && PyErr_Occurred()) return nullptr;
  TORCH_CHECK(depth >= 0 && static_cast<size_t>(depth) < contexts.size(), "torch_hpc: no open context at depth ", depth);
  return counts(contexts[depth]);
  END_HANDLE_TH_ERRORS
}

// _emulation_state() -> (depth, enabled, key): open contexts on this thread, whether the
// innermost routes, whether the routing key is on
PyObject* state(PyObject*, PyObject*) {
  return Py_BuildValue("(nOO)", static_cast<Py_ssize_t>(contexts.size()),
                       !contexts.empty() && contexts.back().enabled ? Py_True : Py_False,
                       c10::impl::tls_is_dispatch_key_included(kModeKey) ? Py_True : Py_False);
}

}  // namespace

#define TORCH_HPC_FASTCALL(name, fn) \
  {name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn)), METH_FASTCALL, nullptr}

PyMethodDef kModeMethods[] = {TORCH_HPC_FASTCALL("_emulation_enter", enter),
                              {"_emulation_exit", leave, METH_NOARGS, nullptr},
                              {"_emulation_counts", live_counts, METH_O, nullptr},
                              {"_emulation_state", state, METH_NOARGS, nullptr},
                              {nullptr, nullptr, 0, nullptr}};

}  // namespace torch_hpc
#endif
