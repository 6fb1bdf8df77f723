// torch_hpc._C: importing it loads this library (which registers the ops, ops.cpp) and gives
// Python the GEMM switches (torch_hpc.backends.gemm), the tile padding (the fake impls') and
// the ops' direct entry points (python_calls.cpp) and fp32_emulation's contexts (emulation_mode.cpp).
#ifdef TORCH_HPC_PYTHON_MODULE
#include <Python.h>

#include <cstring>

#include "emulation_mode.h"
#include "python_calls.h"
#include "settings.h"
#include "tiles.h"

namespace {

using torch_hpc::gemm::KernelChoice;

constexpr const char* kKernelNames[] = {"auto", "sm80", "sm90"};

PyObject* get_sgemm_fallback(PyObject*, PyObject*) {
  return PyBool_FromLong(torch_hpc::gemm::sgemm_fallback());
}

PyObject* set_sgemm_fallback(PyObject*, PyObject* arg) {
  if (!PyBool_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "torch_hpc.backends.gemm.sgemm_fallback: expected a bool");
    return nullptr;
  }
  torch_hpc::gemm::set_sgemm_fallback(arg == Py_True);
  Py_RETURN_NONE;
}

PyObject* get_kernel(PyObject*, PyObject*) {
  return PyUnicode_FromString(kKernelNames[static_cast<int>(torch_hpc::gemm::kernel_choice())]);
}

PyObject* set_kernel(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  for (int i = 0; name != nullptr && i < 3; ++i) {
    if (std::strcmp(name, kKernelNames[i]) == 0) {
      torch_hpc::gemm::set_kernel_choice(static_cast<KernelChoice>(i));
      Py_RETURN_NONE;
    }
  }
  PyErr_SetString(PyExc_ValueError,
                  "torch_hpc.backends.gemm.kernel: expected 'auto', 'sm80' or 'sm90'");
  return nullptr;
}

PyObject* get_block_exponents(PyObject*, PyObject*) {
  return PyBool_FromLong(torch_hpc::gemm::block_exponents());
}

PyObject* set_block_exponents(PyObject*, PyObject* arg) {
  if (!PyBool_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "torch_hpc.backends.gemm.block_exponents: expected a bool");
    return nullptr;
  }
  torch_hpc::gemm::set_block_exponents(arg == Py_True);
  Py_RETURN_NONE;
}

// torch_hpc.backends.attention.fused: False, "auto" or True
PyObject* get_fused_attention(PyObject*, PyObject*) {
  switch (torch_hpc::gemm::fused_attention()) {
    case torch_hpc::gemm::FusedAttention::kOff: Py_RETURN_FALSE;
    case torch_hpc::gemm::FusedAttention::kOn: Py_RETURN_TRUE;
    default: return PyUnicode_FromString("auto");
  }
}

PyObject* set_fused_attention(PyObject*, PyObject* arg) {
  using torch_hpc::gemm::FusedAttention;
  if (arg == Py_False || arg == Py_True) {
    torch_hpc::gemm::set_fused_attention(arg == Py_True ? FusedAttention::kOn : FusedAttention::kOff);
    Py_RETURN_NONE;
  }
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (name != nullptr && std::strcmp(name, "auto") == 0) {
    torch_hpc::gemm::set_fused_attention(FusedAttention::kAuto);
    Py_RETURN_NONE;
  }
  PyErr_SetString(PyExc_ValueError, "torch_hpc.backends.attention.fused: expected False, True or 'auto'");
  return nullptr;
}

PyMethodDef methods[] = {
    {"_get_sgemm_fallback", get_sgemm_fallback, METH_NOARGS, nullptr},
    {"_set_sgemm_fallback", set_sgemm_fallback, METH_O, nullptr},
    {"_get_gemm_kernel", get_kernel, METH_NOARGS, nullptr},
    {"_set_gemm_kernel", set_kernel, METH_O, nullptr},
    {"_get_block_exponents", get_block_exponents, METH_NOARGS, nullptr},
    {"_set_block_exponents", set_block_exponents, METH_O, nullptr},
    {"_get_fused_attention", get_fused_attention, METH_NOARGS, nullptr},
    {"_set_fused_attention", set_fused_attention, METH_O, nullptr},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && (PyModule_AddFunctions(m, torch_hpc::kCallMethods) < 0 ||
                       PyModule_AddFunctions(m, torch_hpc::kModeMethods) < 0 ||
                       PyModule_AddIntConstant(m, "TILE_ROWS", torch_hpc::gemm::kTileRows) < 0 ||
                       PyModule_AddIntConstant(m, "TILE_K", torch_hpc::gemm::kTileK) < 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
#endif
