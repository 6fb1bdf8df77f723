"""torch_hpc.optim: data-parallel optimizers over MPI (synchronous allreduce or asynchronous
one-sided exchange) around any torch.optim optimizer."""
from .broadcast import broadcast_optimizer_state, broadcast_parameters
from .distributed import DistributedOptimizer

__all__ = ["DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state"]
