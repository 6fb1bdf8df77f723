#include "mpi_utils.h"

#include <c10/util/Exception.h>

#include <climits>

namespace torch_hpc {
namespace comm {

void throw_mpi_error(int rc, const std::string& op, const char* call) {
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) snprintf(text, sizeof(text), "code %d", rc);
  throw std::runtime_error("torch_hpc hpc_mpi: " + op + " failed in " + call + ": " + text);
}

MPI_Datatype mpi_transfer_type(at::ScalarType dtype, const std::string& op) {
  switch (dtype) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kHalf:
    case at::kBFloat16: return MPI_UINT16_T;
    case at::kChar: return MPI_INT8_T;
    case at::kByte: return MPI_UINT8_T;
    case at::kShort: return MPI_INT16_T;
    case at::kInt: return MPI_INT32_T;
    case at::kLong: return MPI_INT64_T;
    case at::kBool: return MPI_C_BOOL;
    default:
      TORCH_CHECK_TYPE(false, "torch_hpc hpc_mpi: ", op, " does not support dtype ", dtype,
                       " (supported: float32, float64, float16, bfloat16, int8, uint8, int16, "
                       "int32, int64, bool)");
  }
}

Reduction mpi_reduction(at::ScalarType dtype, const c10d::ReduceOp& reduce_op, const std::string& op) {
  using R = c10d::ReduceOp::RedOpType;
  const R kind = reduce_op.op_;
  const bool floating = at::isFloatingType(dtype);
  const bool is_bool = dtype == at::kBool;
  Reduction r{dtype, mpi_transfer_type(dtype, op), MPI_OP_NULL, false};
  if (dtype == at::kHalf || dtype == at::kBFloat16) {  // MPI has no 16-bit float: reduce in fp32
    r.compute_dtype = at::kFloat;
    r.type = MPI_FLOAT;
  }
  switch (kind) {
    case R::SUM: r.op = is_bool ? MPI_LOR : MPI_SUM; break;
    case R::AVG:
      TORCH_CHECK_VALUE(floating, "torch_hpc hpc_mpi: ", op,
                        ": ReduceOp.AVG needs a floating-point dtype, got ", dtype);
      r.op = MPI_SUM;
      r.average = true;
      break;
    case R::PRODUCT: r.op = is_bool ? MPI_LAND : MPI_PROD; break;
    case R::MIN: r.op = is_bool ? MPI_LAND : MPI_MIN; break;
    case R::MAX: r.op = is_bool ? MPI_LOR : MPI_MAX; break;
    case R::BAND:
    case R::BOR:
    case R::BXOR:
      TORCH_CHECK_VALUE(!floating, "torch_hpc hpc_mpi: ", op, ": bitwise reductions need an "
                        "integer or bool dtype, got ", dtype);
      if (is_bool)
        r.op = kind == R::BAND ? MPI_LAND : kind == R::BOR ? MPI_LOR : MPI_LXOR;
      else
        r.op = kind == R::BAND ? MPI_BAND : kind == R::BOR ? MPI_BOR : MPI_BXOR;
      break;
    default:
      TORCH_CHECK_VALUE(false, "torch_hpc hpc_mpi: ", op, " does not support ReduceOp ",
                        static_cast<int>(kind), " (supported: SUM, AVG, PRODUCT, MIN, MAX, BAND, "
                        "BOR, BXOR)");
  }
  return r;
}

int mpi_count(int64_t numel, const std::string& op) {
  TORCH_CHECK_VALUE(numel <= INT_MAX, "torch_hpc hpc_mpi: ", op, ": ", numel,
                    " elements exceed MPI's int count; split the tensor");
  return static_cast<int>(numel);
}

}  // namespace comm
}  // namespace torch_hpc
