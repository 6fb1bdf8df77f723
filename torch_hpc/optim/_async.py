"""mode="async": each step adds this rank's parameter change into a global copy held in MPI
one-sided windows and reads the current global copy back, on the exchange's own thread, while
the next forward/backward computes. No rank waits for another (unless staleness bounds it)."""
import torch
import torch.distributed as dist

from torch_hpc.distributed import rma

from ._flat import flatten, unflatten_into


class AsyncExchange:
    """The exchange of one DistributedOptimizer in async mode (see DistributedOptimizer)."""

    def __init__(self, state_tensors, device, *, op, staleness, buffer_numel, group,
                 progress_thread=None, progress_interval_us=None):
        self._state_tensors = state_tensors
        self._device = device
        self._buffer_numel, self._group = buffer_numel, group
        self._has_buffers = buffer_numel > 0
        self._staleness = staleness
        numel = sum(t.numel() for t in state_tensors)
        if numel == 0:
            raise ValueError("torch_hpc DistributedOptimizer: the optimizer has no parameters")
        self._exchange = rma.exchange(numel, progress_thread=progress_thread,
                                      progress_interval_us=progress_interval_us)
        self._scale = 1.0 / self._exchange.size if op == "average" else 1.0
        pin = device.type == "cuda"
        self._delta = torch.empty(numel, pin_memory=pin)
        self._received = torch.empty(numel, pin_memory=pin)
        self._written = False
        self._pending = False
        self._local_step = 0
        self._base = None
        self.skipped_updates = 0

    @property
    def max_staleness_seen(self) -> int:
        return self._exchange.max_lead

    # -- the step --------------------------------------------------------------------------------
    def before_step(self):
        if not self._written:  # collective: the first step of every rank
            self._write_global(self._first_values())
        self._adopt()

    def after_step(self):
        after = flatten(self._state_tensors)
        if after.device == self._delta.device:
            torch.sub(after, self._base, out=self._delta)
        else:
            self._delta.copy_(after - self._base)  # device to host: synchronous for CUDA
        self._base = after
        self._local_step += 1
        self._exchange.start(self._delta, self._scale, self._received, self._local_step,
                             -1 if self._staleness is None else self._staleness)
        self._pending = True
        if self._staleness == 0:  # no overlap: the next step starts from everyone's update
            self._adopt()

    def reset(self):
        pass

    def synchronize(self):
        """Collective: drains the exchange, waits for every rank and loads the global copy."""
        if not self._written:
            self._write_global(self._first_values())
        self._adopt()
        self._exchange.finish()
        self._exchange.barrier()
        self._exchange.read(self._received)
        self._load(self._received)
        self._write_global(self._received)  # same values; counters restart at 0 on every rank

    def _first_values(self):
        """The model's values, buffers averaged over ranks (the forward passes before the first
        step changed each rank's differently; every rank writes only its own shard)."""
        values = flatten(self._state_tensors)
        if self._has_buffers:
            buffers = values[values.numel() - self._buffer_numel:]
            dist.all_reduce(buffers, group=self._group)
            buffers.div_(self._exchange.size)
        return values

    def _write_global(self, values):
        self._exchange.write(values.detach().float().cpu().contiguous())
        self._written = True
        self._local_step = 0
        self._base = values.detach().float().to(self._device)

    def _load(self, flat):
        unflatten_into(flat.to(self._device, non_blocking=True), self._state_tensors)

    def _adopt(self):
        """Loads the global copy read by the exchange in flight. Buffers changed by forward
        passes since the last step keep their change (it goes out with the next delta)."""
        if not self._pending:
            return
        self._pending = False
        if not self._exchange.wait():
            self.skipped_updates += 1
        received = self._received.to(self._device, non_blocking=True)
        if self._has_buffers:  # (flatten returns a new tensor: updated in place)
            self._load(flatten(self._state_tensors).sub_(self._base).add_(received))
        else:
            self._load(received)
        self._base = received

    def stats(self):
        return self._exchange.stats()

    # -- the global values (checkpoints, evaluation copies) --------------------------------------
    def checkpoint_values(self):
        """Collective: the global copy, after synchronize()."""
        self.synchronize()
        return flatten(self._state_tensors)

    def peek_values(self):
        """The global copy as the windows hold it now (not collective)."""
        if not self._written:
            return flatten(self._state_tensors)
        peek = torch.empty(self._delta.numel())
        self._exchange.read(peek)
        return peek.to(self._device)

    def load(self, flat):
        """Collective: every rank writes its shard of `flat` into the global copy."""
        if self._pending:
            self._pending = False
            self._exchange.wait()
        self._load(flat)
        self._write_global(flat)

    def close(self):
        """Collective: frees the MPI windows."""
        self._adopt()
        rma.close(self._exchange)
