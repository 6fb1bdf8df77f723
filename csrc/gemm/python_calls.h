// Direct Python entry points of torch_hpc's ops (torch_hpc._C._mm, ...): a C call into the
// dispatcher, without torch.ops' schema-driven argument parsing, which costs more host time
// than a small product's whole kernel. torch_hpc/ops.py uses them outside torch.compile.
#pragma once
#ifdef TORCH_HPC_PYTHON_MODULE
#include <Python.h>

namespace torch_hpc {
// Null-terminated entries for torch_hpc._C's method table.
extern PyMethodDef kCallMethods[];
}  // namespace torch_hpc
#endif
