"""mode="async": each step adds this rank's parameter change into a global copy held in MPI
one-sided windows and reads the current global copy back, on the exchange's own thread, while
the next forward/backward computes. No rank waits for another (unless staleness bounds it).

CUDA parameters: the change is computed on the GPU into buffers made once, copied into pinned
host memory on a side stream, and the exchange starts from a helper thread once that copy has
landed, so the host goes on queueing the next step meanwhile (no synchronous device-to-host copy
on the training thread, no allocation per step)."""
import queue
import threading

import torch
import torch.distributed as dist

from torch_hpc.distributed import rma

from ._flat import flatten, flatten_into, unflatten_into


class _StartWhenCopied:
    """A daemon thread that waits for a CUDA event, then runs a function: the exchange's start
    once the device-to-host copy of the step's change has landed. join() waits for the last one
    and raises what it raised."""

    def __init__(self):
        self._jobs = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._error = None
        self._thread = None

    def submit(self, event, fn):
        self.join()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="torch_hpc-async-start", daemon=True)
            self._thread.start()
        self._idle.clear()
        self._jobs.put((event, fn))

    def join(self):
        self._idle.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self):
        while True:
            event, fn = self._jobs.get()
            try:
                event.synchronize()  # (releases the GIL)
                fn()
            except BaseException as e:  # handed to the training thread at join()
                self._error = e
            finally:
                self._idle.set()


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
        self._cuda = device.type == "cuda"
        self._delta = torch.empty(numel, pin_memory=self._cuda)
        self._received = torch.empty(numel, pin_memory=self._cuda)
        if self._cuda:  # made once: the flat parameters after a step, their change, the global copy
            self._after = torch.empty(numel, device=device)
            self._base_device = torch.empty(numel, device=device)
            self._delta_device = torch.empty(numel, device=device)
            self._received_device = torch.empty(numel, device=device)
            self._copy_stream = torch.cuda.Stream(device)
            self._copied = torch.cuda.Event(blocking=True)  # the helper thread sleeps, not spins
            self._starter = _StartWhenCopied()
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
        self._local_step += 1
        staleness = -1 if self._staleness is None else self._staleness
        if self._cuda:
            after = flatten_into(self._after, self._state_tensors)
            torch.sub(after, self._base, out=self._delta_device)
            self._base = self._base_device.copy_(after)
            current = torch.cuda.current_stream(self._device)
            self._copy_stream.wait_stream(current)
            with torch.cuda.stream(self._copy_stream):
                self._delta.copy_(self._delta_device, non_blocking=True)
                self._copied.record(self._copy_stream)
            step = self._local_step
            self._starter.submit(self._copied, lambda: self._exchange.start(
                self._delta, self._scale, self._received, step, staleness))
        else:
            after = flatten(self._state_tensors)
            torch.sub(after, self._base, out=self._delta)
            self._base = after
            self._exchange.start(self._delta, self._scale, self._received, self._local_step, staleness)
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
        self._join_start()
        if not self._exchange.wait():
            self.skipped_updates += 1
        received = (self._received_device.copy_(self._received, non_blocking=True) if self._cuda
                    else self._received)
        if self._has_buffers:  # (flatten returns a new tensor: updated in place)
            self._load(flatten(self._state_tensors).sub_(self._base).add_(received))
        else:
            self._load(received)
        self._base = received

    def _join_start(self):
        """Waits until the helper thread has started the exchange in flight (CUDA)."""
        if self._cuda:
            self._starter.join()

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
        self._join_start()
        peek = torch.empty(self._delta.numel())
        self._exchange.read(peek)
        return peek.to(self._device)

    def load(self, flat):
        """Collective: every rank writes its shard of `flat` into the global copy."""
        if self._pending:
            self._pending = False
            self._join_start()
            self._exchange.wait()
        self._load(flat)
        self._write_global(flat)

    def close(self):
        """Collective: frees the MPI windows."""
        self._adopt()
        rma.close(self._exchange)
