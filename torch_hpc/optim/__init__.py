"""torch_hpc.optim: data-parallel optimizers over MPI (synchronous allreduce or asynchronous
one-sided exchange) around any torch.optim optimizer."""
from .distributed import DistributedOptimizer, broadcast_optimizer_state, broadcast_parameters

__all__ = ["DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state"]
