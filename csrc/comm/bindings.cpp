// torch_hpc._comm: the hpc_mpi backend for Python (loaded only when the backend is created, so
// `import torch_hpc` never needs libmpi).
#include <torch/extension.h>

#include <mutex>
#include <vector>

#include "backend.h"
#include "mpi_utils.h"
#include "rma_exchange.h"

namespace torch_hpc {
namespace comm {
namespace {

std::mutex registry_mutex;
std::vector<c10::weak_intrusive_ptr<BackendHPCMPI>> registry;

c10::intrusive_ptr<c10d::Backend> create_backend(int64_t comm_handle, int rank, int size,
                                                 double timeout_seconds, bool inline_blocking,
                                                 int64_t spin_us, int64_t allreduce_chunk_bytes) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  TORCH_CHECK(initialized, "torch_hpc hpc_mpi: MPI is not initialised (use torch_hpc.distributed.init)");
  const MPI_Comm parent = MPI_Comm_f2c(static_cast<MPI_Fint>(comm_handle));
  BackendOptions options;
  options.inline_blocking = inline_blocking;
  options.spin = std::chrono::microseconds(spin_us);
  options.allreduce_chunk_bytes = allreduce_chunk_bytes;
  auto backend = c10::make_intrusive<BackendHPCMPI>(
      parent, rank, size, std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000.0)),
      options);
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
        py::arg("size"), py::arg("timeout_seconds"), py::arg("inline_blocking"), py::arg("spin_us"),
        py::arg("allreduce_chunk_bytes"), py::call_guard<py::gil_scoped_release>(),
        "An hpc_mpi backend over a duplicate of the MPI communicator (Fortran handle).");
  m.def("shutdown_all", &tc::shutdown_all, py::call_guard<py::gil_scoped_release>());
  m.def("library_version", &tc::library_version);

  using tc::RmaExchange;
  py::class_<RmaExchange, std::shared_ptr<RmaExchange>>(
      m, "RmaExchange", "A global fp32 vector sharded over MPI windows, and its asynchronous exchange.")
      .def(py::init([](int64_t comm_handle, int64_t numel, bool progress_thread, int64_t interval_us) {
             return std::make_shared<RmaExchange>(MPI_Comm_f2c(static_cast<MPI_Fint>(comm_handle)),
                                                  numel, progress_thread, interval_us);
           }),
           py::arg("comm_handle"), py::arg("numel"), py::arg("progress_thread") = true,
           py::arg("progress_interval_us") = 500, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("rank", &RmaExchange::rank)
      .def_property_readonly("size", &RmaExchange::size)
      .def_property_readonly("numel", &RmaExchange::numel)
      .def_property_readonly("max_lead", &RmaExchange::max_lead)
      .def_property_readonly("skipped", &RmaExchange::skipped)
      .def_property_readonly("exchanges", &RmaExchange::exchanges)
      .def("stats", [](const RmaExchange& x) {
             const RmaExchange::Stats s = x.stats();
             py::dict d;
             d["exchanges"] = s.exchanges;
             d["bytes_sent"] = s.bytes_sent;
             d["bytes_received"] = s.bytes_received;
             d["exchange_seconds"] = s.exchange_seconds;
             d["wait_seconds"] = s.wait_seconds;
             return d;
           })
      .def("shard", [](const RmaExchange& x, int owner) {
             return std::make_pair(x.shard_begin(owner), x.shard_end(owner));
           })
      .def("write", &RmaExchange::write, py::call_guard<py::gil_scoped_release>())
      .def("read", [](RmaExchange& x, at::Tensor out) { x.wait(); x.read(out); },
           py::call_guard<py::gil_scoped_release>())
      .def("start", &RmaExchange::start, py::arg("delta"), py::arg("scale"), py::arg("out"),
           py::arg("step"), py::arg("staleness") = -1, py::call_guard<py::gil_scoped_release>())
      .def("wait", &RmaExchange::wait, py::call_guard<py::gil_scoped_release>())
      .def("finish", &RmaExchange::finish, py::call_guard<py::gil_scoped_release>())
      .def("counters", &RmaExchange::counters, py::call_guard<py::gil_scoped_release>())
      .def("barrier", &RmaExchange::barrier, py::call_guard<py::gil_scoped_release>())
      .def("close", &RmaExchange::close, py::call_guard<py::gil_scoped_release>());
}
