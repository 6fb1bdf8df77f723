// fp32_emulation()'s dispatcher-level routing (emulation_mode.cpp): the functions torch_hpc._C
// gives Python to open and close a context on the current thread and read its counts.
#pragma once
#ifdef TORCH_HPC_PYTHON_MODULE
#include <Python.h>

namespace torch_hpc {

extern PyMethodDef kModeMethods[];

}  // namespace torch_hpc
#endif
