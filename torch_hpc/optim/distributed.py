"""DistributedOptimizer: synchronous (bucketed allreduce) or asynchronous (MPI RMA) data
parallelism around any torch.optim optimizer. Horovod's API, torch_hpc's transport."""
import collections

import torch
import torch.distributed as dist

_FORMAT = 1


def _default_group(process_group):
    if process_group is not None:
        return process_group
    if not dist.is_initialized():
        from torch_hpc.distributed import init
        init("hpc_mpi")
    return dist.group.WORLD


def _named(tensors, prefix):
    """(name, tensor) pairs from a dict, an iterable of pairs or of tensors."""
    if tensors is None:
        return []
    if isinstance(tensors, dict):
        return list(tensors.items())
    items = list(tensors)
    if items and isinstance(items[0], torch.Tensor):
        return [(f"{prefix}{i}", t) for i, t in enumerate(items)]
    return [(str(n), t) for n, t in items]


def broadcast_parameters(params, root_rank: int = 0, process_group=None) -> None:
    """Copies root_rank's values into every rank's tensors, in place: a state_dict, an iterable
    of (name, tensor) pairs (model.named_parameters()) or of tensors. One broadcast per
    (device, dtype)."""
    group = _default_group(process_group)
    tensors = [t for _, t in _named(params, "tensor") if isinstance(t, torch.Tensor)]
    by_kind = collections.defaultdict(list)
    for t in tensors:
        by_kind[(t.device, t.dtype)].append(t)
    with torch.no_grad():
        for kind in sorted(by_kind, key=str):
            group_tensors = by_kind[kind]
            flat = torch.cat([t.detach().reshape(-1) for t in group_tensors])
            dist.broadcast(flat, src=root_rank, group=group)
            offset = 0
            for t in group_tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def broadcast_optimizer_state(optimizer, root_rank: int = 0, process_group=None) -> None:
    """Gives every rank root_rank's optimizer state (moments, step counts, hyperparameters)."""
    group = _default_group(process_group)
    inner = optimizer.optimizer if isinstance(optimizer, DistributedOptimizer) else optimizer
    payload = [_to_cpu(inner.state_dict()) if dist.get_rank(group) == root_rank else None]
    dist.broadcast_object_list(payload, src=root_rank, group=group)
    if dist.get_rank(group) != root_rank:
        inner.load_state_dict(payload[0])


class _Bucket:
    __slots__ = ("params", "ready", "work", "flat")

    def __init__(self, params):
        self.params = params
        self.ready = 0
        self.work = None
        self.flat = None


class DistributedOptimizer(torch.optim.Optimizer):
    """Wraps `optimizer` (any torch.optim optimizer) for data-parallel training.

    mode="sync": gradients are averaged (op="sum": summed) across ranks with bucketed allreduce
    launched from post-accumulate-grad hooks, so communication overlaps the backward pass;
    `backward_passes_per_step` accumulates gradients locally first; `compression` ("fp16" or
    "bf16") halves the bytes on the wire. Call `synchronize()` before anything that reads the
    averaged `.grad` (gradient clipping, GradScaler.unscale_); step() does it otherwise.

    mode="async": no rank waits for another. Each step runs the wrapped optimizer locally, adds
    its parameter change divided by the world size (op="sum": undivided) into a global copy of
    the parameters held in MPI one-sided windows, and reads the current global copy back; the
    exchange runs on a background thread while the next forward/backward computes, and the
    model adopts the global copy at the next step. `staleness=s` bounds how many steps a rank
    may run ahead of the slowest (0: synchronous SGD, no overlap; None: unbounded). A delta
    holding inf/NaN is not sent (counted in `skipped_updates`). `synchronize()` is collective:
    it drains the exchange, waits for every rank, and loads the same global parameters into
    every rank's model. With GradScaler each rank skips its own inf steps.

    Floating-point buffers given as `named_buffers` (e.g. BatchNorm running statistics) are
    averaged across ranks: in sync mode by an allreduce at every step, in async mode by
    exchanging their changes like parameters. Integer buffers (num_batches_tracked) stay local.
    """

    def __init__(self, optimizer, named_parameters=None, mode: str = "sync", staleness=None,
                 backward_passes_per_step: int = 1, op: str = "average", compression=None,
                 named_buffers=None, process_group=None, bucket_cap_mb: float = 25.0):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"torch_hpc DistributedOptimizer: optimizer must be a torch.optim."
                            f"Optimizer, got {type(optimizer).__name__}")
        if mode not in ("sync", "async"):
            raise ValueError(f"torch_hpc DistributedOptimizer: mode must be 'sync' or 'async', got {mode!r}")
        if op not in ("average", "sum"):
            raise ValueError(f"torch_hpc DistributedOptimizer: op must be 'average' or 'sum', got {op!r}")
        if staleness is not None and (mode != "async" or int(staleness) < 0):
            raise ValueError("torch_hpc DistributedOptimizer: staleness must be None or an integer "
                             f">= 0, and only with mode='async' (got {staleness!r} with mode={mode!r})")
        if int(backward_passes_per_step) < 1:
            raise ValueError("torch_hpc DistributedOptimizer: backward_passes_per_step must be >= 1, "
                             f"got {backward_passes_per_step!r}")
        if compression not in (None, "none", "fp16", "bf16"):
            raise ValueError("torch_hpc DistributedOptimizer: compression must be None, 'fp16' or "
                             f"'bf16', got {compression!r}")
        self.optimizer = optimizer
        self.mode, self.op = mode, op
        self.staleness = None if staleness is None else int(staleness)
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.compression = None if compression == "none" else compression
        # torch.optim.Optimizer's attributes, shared with the wrapped optimizer (LR schedulers and
        # GradScaler read and write them).
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self._optimizer_step_pre_hooks = collections.OrderedDict()
        self._optimizer_step_post_hooks = collections.OrderedDict()
        self._optimizer_state_dict_pre_hooks = collections.OrderedDict()
        self._optimizer_state_dict_post_hooks = collections.OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = collections.OrderedDict()
        self._optimizer_load_state_dict_post_hooks = collections.OrderedDict()

        params = [p for g in optimizer.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("torch_hpc DistributedOptimizer: a parameter appears twice in the "
                             "optimizer's param_groups")
        names = {id(t): n for n, t in _named(named_parameters, "param")} if named_parameters is not None \
            else {id(p): f"param{i}" for i, p in enumerate(params)}
        missing = [i for i, p in enumerate(params) if id(p) not in names]
        if missing:
            raise ValueError(f"torch_hpc DistributedOptimizer: optimizer parameters {missing[:5]} "
                             "are not in named_parameters (pass model.named_parameters() of the "
                             "model the optimizer trains)")
        self._params = params
        self._buffers = [(n, b) for n, b in _named(named_buffers, "buffer")
                         if torch.is_floating_point(b)]
        self._state_tensors = params + [b for _, b in self._buffers]
        self._names = [names[id(p)] for p in params] + [f"buffer:{n}" for n, _ in self._buffers]
        devices = {t.device for t in self._state_tensors}
        if len(devices) > 1:
            raise ValueError("torch_hpc DistributedOptimizer: all parameters and buffers must be on "
                             f"one device, found {sorted(map(str, devices))}")
        self._device = devices.pop() if devices else torch.device("cpu")
        self._numel = sum(t.numel() for t in self._state_tensors)
        self._group = _default_group(process_group)
        self._world = dist.get_world_size(self._group)
        self._steps = 0
        self.skipped_updates = 0
        if mode == "sync":
            self._init_sync(bucket_cap_mb)
        else:
            self._init_async()

    # -- torch.optim.Optimizer surface ---------------------------------------------------------
    def __repr__(self):
        return f"DistributedOptimizer(mode={self.mode!r}, staleness={self.staleness}, {self.optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        if self.mode == "sync":
            self._reset_buckets()

    def add_param_group(self, param_group):
        raise RuntimeError("torch_hpc DistributedOptimizer: add parameter groups to the wrapped "
                           "optimizer before wrapping it")

    @torch.no_grad()
    def step(self, closure=None):
        if self.mode == "sync":
            return self._sync_step(closure)
        return self._async_step(closure)

    def synchronize(self) -> None:
        """sync: finishes the gradient allreduce and writes averaged gradients into .grad.
        async (collective): drains this rank's exchange, waits for every rank, and loads the
        global parameters (the same on every rank) into the model."""
        if self.mode == "sync":
            self._finish_gradients()
        else:
            self._async_synchronize()

    # -- sync mode -----------------------------------------------------------------------------
    def _init_sync(self, bucket_cap_mb):
        cap = max(1, int(bucket_cap_mb * 2 ** 20))
        self._buckets, current, size = [], [], 0
        for p in reversed([p for p in self._params if p.requires_grad]):
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > cap or p.dtype != current[0].dtype):
                self._buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self._buckets.append(_Bucket(current))
        self._bucket_of, self._passes = {}, {}
        for i, b in enumerate(self._buckets):
            for p in b.params:
                self._bucket_of[p] = i
        self._next_launch = 0
        self._synced = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready)
                       for b in self._buckets for p in b.params]

    def _reset_buckets(self):
        for b in self._buckets:
            b.ready, b.work, b.flat = 0, None, None
        self._passes.clear()
        self._next_launch = 0
        self._synced = False

    def _grad_ready(self, p):
        if self._synced:  # a step was skipped (e.g. GradScaler found inf): start afresh
            self._reset_buckets()
        count = self._passes.get(p, 0) + 1
        self._passes[p] = count
        if count < self.backward_passes_per_step:
            return
        if count > self.backward_passes_per_step:
            raise RuntimeError(
                "torch_hpc DistributedOptimizer: a gradient was accumulated more times than "
                f"backward_passes_per_step={self.backward_passes_per_step} before step(); call "
                "step() (or zero_grad()) after each group of backward passes, or raise "
                "backward_passes_per_step")
        bucket = self._buckets[self._bucket_of[p]]
        bucket.ready += 1
        # Buckets launch in index order on every rank, whatever order their gradients come in.
        while self._next_launch < len(self._buckets) and \
                self._buckets[self._next_launch].ready == len(self._buckets[self._next_launch].params):
            self._launch(self._buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, bucket):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        flat = torch.cat([g.detach().reshape(-1) for g in grads])
        wire = flat
        if self.compression:
            wire = flat.to(torch.float16 if self.compression == "fp16" else torch.bfloat16)
        if self.op == "average":
            wire.div_(self._world)  # before the sum: keeps fp16 in range
        bucket.flat = wire
        bucket.work = dist.all_reduce(wire, group=self._group, async_op=True)

    def _finish_gradients(self):
        if self._synced:
            return
        while self._next_launch < len(self._buckets):  # gradients that never arrived count as 0
            self._launch(self._buckets[self._next_launch])
            self._next_launch += 1
        for b in self._buckets:
            b.work.wait()
            offset = 0
            for p in b.params:
                values = b.flat[offset:offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = values.to(p.dtype).clone()
                else:
                    p.grad.copy_(values)
                offset += p.numel()
            b.work, b.flat = None, None
        self._average_buffers()
        self._synced = True

    def _average_buffers(self):
        if not self._buffers:
            return
        buffers = [b for _, b in self._buffers]
        flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
        dist.all_reduce(flat, group=self._group)
        flat.div_(self._world)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()

    def _sync_step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._finish_gradients()
        self.optimizer.step()
        self._reset_buckets()
        self._steps += 1
        return loss

    # -- async mode ----------------------------------------------------------------------------
    def _init_async(self):
        from torch_hpc.distributed import rma
        if self._numel == 0:
            raise ValueError("torch_hpc DistributedOptimizer: the optimizer has no parameters")
        self._exchange = rma.exchange(self._numel)
        pin = self._device.type == "cuda"
        self._delta = torch.empty(self._numel, pin_memory=pin)
        self._received = torch.empty(self._numel, pin_memory=pin)
        self._written = False
        self._pending = False
        self._local_step = 0

    def _flatten(self):
        return torch.cat([t.detach().reshape(-1).float() for t in self._state_tensors])

    def _load_flat(self, flat):
        flat = flat.to(self._device, non_blocking=True)
        offset = 0
        for t in self._state_tensors:
            t.detach().copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def _write_global(self, values):
        self._exchange.write(values.detach().float().cpu().contiguous())
        self._written = True
        self._local_step = 0
        self._base = values.detach().float().to(self._device)

    def _adopt(self):
        """Loads the global copy read by the exchange in flight. Buffers changed by forward
        passes since the last step keep their change (it goes out with the next delta)."""
        if not self._pending:
            return
        self._pending = False
        if not self._exchange.wait():
            self.skipped_updates += 1
        received = self._received.to(self._device, non_blocking=True)
        if self._buffers:
            self._load_flat(received + (self._flatten() - self._base))
        else:
            self._load_flat(received)
        self._base = received

    def _async_step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._written:  # collective: the first step of every rank
            self._write_global(self._flatten())
        self._adopt()
        self.optimizer.step()
        after = self._flatten()
        self._delta.copy_(after - self._base)  # device to host: synchronous for CUDA
        self._base = after
        self._local_step += 1
        self._steps += 1
        scale = 1.0 / self._exchange.size if self.op == "average" else 1.0
        self._exchange.start(self._delta, scale, self._received, self._local_step,
                             -1 if self.staleness is None else self.staleness)
        self._pending = True
        if self.staleness == 0:  # no overlap: the next step starts from everyone's update
            self._adopt()
        return loss

    def _async_synchronize(self):
        if not self._written:
            self._write_global(self._flatten())
        self._adopt()
        self._exchange.finish()
        self._exchange.barrier()
        self._exchange.read(self._received)
        self._load_flat(self._received)
        self._write_global(self._received)  # same values; counters restart at 0 on every rank

    @torch.no_grad()
    def copy_global_to(self, tensors) -> None:
        """Copies the current global parameters (async: read from the windows, not collective;
        sync: the model's) into `tensors`, shaped like the parameters then the float buffers
        (e.g. an evaluation copy of the model)."""
        tensors = list(tensors)
        if [tuple(t.shape) for t in tensors] != [tuple(t.shape) for t in self._state_tensors]:
            raise ValueError("torch_hpc DistributedOptimizer.copy_global_to: expected tensors shaped "
                             f"{[tuple(t.shape) for t in self._state_tensors]}")
        if self.mode == "async" and self._written:
            peek = torch.empty(self._numel)
            self._exchange.read(peek)
            flat = peek.to(self._device)
        else:
            flat = self._flatten()
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    @property
    def max_staleness_seen(self) -> int:
        """async: the most steps this rank was ahead of the slowest rank when it passed a
        staleness gate (with staleness=s this never exceeds s)."""
        return self._exchange.max_lead if self.mode == "async" else 0

    def close(self) -> None:
        """async (collective): frees the MPI windows. Called at exit otherwise."""
        if self.mode == "async":
            from torch_hpc.distributed import rma
            self._adopt()
            rma.close(self._exchange)
        else:
            for h in self._hooks:
                h.remove()
            self._hooks = []

    # -- checkpoints ---------------------------------------------------------------------------
    def _meta(self):
        return {"format": _FORMAT, "mode": self.mode, "world_size": self._world,
                "names": list(self._names), "shapes": [list(t.shape) for t in self._state_tensors],
                "steps": self._steps}

    def state_dict(self):
        """Both modes: the model's (async: global, after a collective synchronize()) parameters
        and averaged buffers, flattened, plus this rank's wrapped-optimizer state. Loadable with
        torch.load(..., weights_only=True) and at any world size."""
        if self.mode == "async":
            self._async_synchronize()
        return {"torch_hpc": self._meta(), "parameters": self._flatten().cpu(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict):
        """Refuses a checkpoint of another model; one from another world size is resharded.
        async: collective (every rank writes its shard of the global copy)."""
        if not isinstance(state_dict, dict) or "torch_hpc" not in state_dict:
            raise ValueError("torch_hpc DistributedOptimizer: not a DistributedOptimizer state_dict "
                             "(expected keys 'torch_hpc', 'parameters', 'optimizer')")
        meta = state_dict["torch_hpc"]
        if meta.get("format") != _FORMAT:
            raise ValueError(f"torch_hpc DistributedOptimizer: checkpoint format {meta.get('format')} "
                             f"is not {_FORMAT}")
        mine = self._meta()
        if meta["names"] != mine["names"] or meta["shapes"] != mine["shapes"]:
            diff = next((f"{a}{sa} in the checkpoint vs {b}{sb} here" for a, sa, b, sb in
                         zip(meta["names"], meta["shapes"], mine["names"], mine["shapes"])
                         if (a, sa) != (b, sb)),
                        f"{len(meta['names'])} tensors in the checkpoint vs {len(mine['names'])} here")
            raise ValueError("torch_hpc DistributedOptimizer: the checkpoint is of a different model "
                             f"({diff})")
        flat = state_dict["parameters"]
        if not isinstance(flat, torch.Tensor) or flat.numel() != self._numel:
            raise ValueError("torch_hpc DistributedOptimizer: the checkpoint's parameters hold "
                             f"{getattr(flat, 'numel', lambda: '?')()} values, the model {self._numel}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._steps = int(meta.get("steps", 0))
        with torch.no_grad():
            if self.mode == "async":
                if self._pending:
                    self._pending = False
                    self._exchange.wait()
                self._load_flat(flat)
                self._write_global(flat)
            else:
                self._load_flat(flat)
