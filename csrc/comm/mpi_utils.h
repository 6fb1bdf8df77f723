// MPI helpers of the hpc_mpi backend: error checks that become exceptions naming the operation,
// and the maps from torch dtypes / reduce ops to MPI's.
#pragma once

#include <mpi.h>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Types.hpp>

#include <stdexcept>
#include <string>

namespace torch_hpc {
namespace comm {

[[noreturn]] void throw_mpi_error(int rc, const std::string& op, const char* call);

#define TORCH_HPC_MPI_CHECK(op, call)                        \
  do {                                                       \
    const int torch_hpc_rc_ = (call);                        \
    if (torch_hpc_rc_ != MPI_SUCCESS)                        \
      ::torch_hpc::comm::throw_mpi_error(torch_hpc_rc_, op, #call); \
  } while (0)

// The MPI type that moves the bytes of a dtype (fp16/bf16 as 16-bit integers).
MPI_Datatype mpi_transfer_type(at::ScalarType dtype, const std::string& op);

// How a reduction runs: the dtype MPI reduces in (fp16/bf16 are upcast to fp32), the MPI op,
// and whether the result is divided by the group size afterwards (AVG).
struct Reduction {
  at::ScalarType compute_dtype;
  MPI_Datatype type;
  MPI_Op op;
  bool average;
};
Reduction mpi_reduction(at::ScalarType dtype, const c10d::ReduceOp& reduce_op, const std::string& op);

// int counts for MPI calls; larger tensors are an error naming the operation.
int mpi_count(int64_t numel, const std::string& op);

}  // namespace comm
}  // namespace torch_hpc
