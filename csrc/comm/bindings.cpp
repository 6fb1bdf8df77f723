// torch_hpc._comm: the hpc_mpi backend for Python (loaded only when the backend is created, so
// `import torch_hpc` never needs libmpi).
#include <torch/extension.h>

#include <mutex>
#include <vector>

#include "backend.h"
#include "mpi_utils.h"

namespace torch_hpc {
namespace comm {
namespace {

std::mutex registry_mutex;
std::vector<c10::weak_intrusive_ptr<BackendHPCMPI>> registry;

c10::intrusive_ptr<c10d::Backend> create_backend(int64_t comm_handle, int rank, int size,
                                                 double timeout_seconds) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  TORCH_CHECK(initialized, "torch_hpc hpc_mpi: MPI is not initialised (use torch_hpc.distributed.init)");
  const MPI_Comm parent = MPI_Comm_f2c(static_cast<MPI_Fint>(comm_handle));
  auto backend = c10::make_intrusive<BackendHPCMPI>(
      parent, rank, size,
      std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000.0)));
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.emplace_back(backend);
  return backend;
}

// Drains and stops every live backend: called before MPI_Finalize at interpreter exit.
void shutdown_all() {
  std::vector<c10::intrusive_ptr<BackendHPCMPI>> live;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    for (auto& weak : registry)
      if (auto strong = weak.lock()) live.push_back(strong);
    registry.clear();
  }
  for (auto& b : live) b->shutdown();
}

std::string library_version() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING] = {0};
  int len = 0;
  MPI_Get_library_version(text, &len);
  return std::string(text, len);
}

}  // namespace
}  // namespace comm
}  // namespace torch_hpc

PYBIND11_MODULE(_comm, m) {
  namespace tc = torch_hpc::comm;
  m.def("create_backend", &tc::create_backend, py::arg("comm_handle"), py::arg("rank"),
        py::arg("size"), py::arg("timeout_seconds"), py::call_guard<py::gil_scoped_release>(),
        "An hpc_mpi backend over a duplicate of the MPI communicator (Fortran handle).");
  m.def("shutdown_all", &tc::shutdown_all, py::call_guard<py::gil_scoped_release>());
  m.def("library_version", &tc::library_version);
}
