#ifdef TORCH_HPC_PYTHON_MODULE
#include "python_calls.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

namespace torch_hpc {
namespace {

// Plain tensors only: torch.Tensor, or a subclass whose __torch_function__ is torch's disabled
// one (nn.Parameter, FakeTensor). Anything else (a subclass with its own __torch_function__, a
// proxy, a number) or an active TorchFunctionMode gets NotImplemented, and ops.py calls the
// torch.ops overload instead, which honours them.
bool plain(PyObject* obj) {
  if (THPVariable_CheckExact(obj)) return true;
  if (!THPVariable_Check(obj)) return false;
  static PyObject* const disabled = [] {
    PyObject* module = PyImport_ImportModule("torch._C");
    PyObject* impl = module == nullptr ? nullptr : PyObject_GetAttrString(module, "_disabled_torch_function_impl");
    Py_XDECREF(module);
    if (impl == nullptr) PyErr_Clear();
    return impl;
  }();
  PyObject* impl = PyObject_GetAttrString(reinterpret_cast<PyObject*>(Py_TYPE(obj)), "__torch_function__");
  if (impl == nullptr) {
    PyErr_Clear();
    return false;
  }
  const bool disabled_impl = impl == disabled;
  Py_DECREF(impl);
  return disabled_impl;
}

bool plain(PyObject* const* args, Py_ssize_t n) {
  if (at::impl::torch_function_mode_enabled()) return false;
  for (Py_ssize_t i = 0; i < n; ++i)
    if (!plain(args[i])) return false;
  return true;
}

PyObject* not_implemented() { Py_RETURN_NOTIMPLEMENTED; }

template <at::Tensor (*Call)(const at::Tensor&, const at::Tensor&)>
PyObject* product(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2 || !plain(args, 2)) return not_implemented();
  const at::Tensor& a = THPVariable_Unpack(args[0]);
  const at::Tensor& b = THPVariable_Unpack(args[1]);
  at::Tensor out;
  {
    const pybind11::gil_scoped_release no_gil;
    out = Call(a, b);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// linear(input, weight, bias=None), positional
PyObject* linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs < 2 || nargs > 3 || !plain(args, 2)) return not_implemented();
  std::optional<at::Tensor> bias;
  if (nargs == 3 && args[2] != Py_None) {
    if (!plain(args[2])) return not_implemented();
    bias = THPVariable_Unpack(args[2]);
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const at::Tensor& weight = THPVariable_Unpack(args[1]);
  at::Tensor out;
  {
    const pybind11::gil_scoped_release no_gil;
    out = call_linear(input, weight, bias);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// emulates(like, batch, m, n, k) -> bool
PyObject* emulates(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5 || !plain(args, 1)) return not_implemented();
  int64_t sizes[4];
  for (int i = 0; i < 4; ++i) {
    if (!PyLong_CheckExact(args[i + 1])) return not_implemented();
    sizes[i] = PyLong_AsLongLong(args[i + 1]);
    if (sizes[i] == -1 && PyErr_Occurred()) return nullptr;
  }
  return PyBool_FromLong(call_emulates(THPVariable_Unpack(args[0]), sizes[0], sizes[1], sizes[2], sizes[3]));
  END_HANDLE_TH_ERRORS
}

}  // namespace

#define TORCH_HPC_FASTCALL(name, fn) \
  {name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn)), METH_FASTCALL, nullptr}

PyMethodDef kCallMethods[] = {TORCH_HPC_FASTCALL("_mm", product<&call_mm>),
                              TORCH_HPC_FASTCALL("_bmm", product<&call_bmm>),
                              TORCH_HPC_FASTCALL("_matmul", product<&call_matmul>),
                              TORCH_HPC_FASTCALL("_linear", linear),
                              TORCH_HPC_FASTCALL("_emulates", emulates),
                              {nullptr, nullptr, 0, nullptr}};

}  // namespace torch_hpc
#endif
