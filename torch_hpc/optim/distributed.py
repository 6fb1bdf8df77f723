"""DistributedOptimizer: data parallelism around any torch.optim optimizer, Horovod's API over
torch_hpc's transport. The exchange itself is one object per mode: _sync.SyncAllreduce or
_async.AsyncExchange."""
import torch
import torch.distributed as dist

from ._async import AsyncExchange
from ._flat import unflatten_into
from ._sync import SyncAllreduce
from .broadcast import default_group, named

_FORMAT = 1
_PREFIX = "torch_hpc DistributedOptimizer: "


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

    async only: `progress_thread` / `progress_interval_us` set the thread that keeps other
    ranks' one-sided operations on this rank's shard moving while it computes (None: defaults,
    see torch_hpc.distributed.rma.exchange).
    """

    def __init__(self, optimizer, named_parameters=None, mode: str = "sync", staleness=None,
                 backward_passes_per_step: int = 1, op: str = "average", compression=None,
                 named_buffers=None, process_group=None, bucket_cap_mb: float = 25.0,
                 progress_thread: bool | None = None, progress_interval_us: int | None = None):
        _check_arguments(optimizer, mode, op, staleness, backward_passes_per_step, compression)
        self.optimizer = optimizer
        self.mode, self.op = mode, op
        self.staleness = None if staleness is None else int(staleness)
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.compression = None if compression == "none" else compression
        # torch.optim.Optimizer's attributes, shared with the wrapped optimizer (LR schedulers and
        # GradScaler read and write them; hook registries are found through __getattr__).
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state

        params = [p for g in optimizer.param_groups for p in g["params"]]
        names = _parameter_names(params, named_parameters)
        buffers = [(n, b) for n, b in named(named_buffers, "buffer") if torch.is_floating_point(b)]
        self._state_tensors = params + [b for _, b in buffers]
        self._names = [names[id(p)] for p in params] + [f"buffer:{n}" for n, _ in buffers]
        devices = {t.device for t in self._state_tensors}
        if len(devices) > 1:
            raise ValueError(f"{_PREFIX}all parameters and buffers must be on one device, found "
                             f"{sorted(map(str, devices))}")
        device = devices.pop() if devices else torch.device("cpu")
        self._numel = sum(t.numel() for t in self._state_tensors)
        group = default_group(process_group)
        self._world = dist.get_world_size(group)
        self._steps = 0
        if mode == "sync":
            self._exchange = SyncAllreduce(
                params, [b for _, b in buffers], group, op=op, compression=self.compression,
                backward_passes_per_step=self.backward_passes_per_step, bucket_cap_mb=bucket_cap_mb)
        else:
            self._exchange = AsyncExchange(self._state_tensors, device, op=op,
                                           staleness=self.staleness, group=group,
                                           buffer_numel=sum(b.numel() for _, b in buffers),
                                           progress_thread=progress_thread,
                                           progress_interval_us=progress_interval_us)

    def __getattr__(self, name):
        # torch.optim.Optimizer's hook registries (_optimizer_step_pre_hooks, ...) are the
        # wrapped optimizer's: hooks registered here run around its step and state_dict.
        if name.startswith("_optimizer_") and "optimizer" in self.__dict__:
            return getattr(self.__dict__["optimizer"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- torch.optim.Optimizer surface ---------------------------------------------------------
    def __repr__(self):
        return f"DistributedOptimizer(mode={self.mode!r}, staleness={self.staleness}, {self.optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._exchange.reset()

    def add_param_group(self, param_group):
        raise RuntimeError(f"{_PREFIX}add parameter groups to the wrapped optimizer before "
                           "wrapping it")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._exchange.before_step()
        self.optimizer.step()
        self._exchange.after_step()
        self._steps += 1
        return loss

    def synchronize(self) -> None:
        """sync: finishes the gradient allreduce and writes averaged gradients into .grad.
        async (collective): drains this rank's exchange, waits for every rank, and loads the
        global parameters (the same on every rank) into the model."""
        self._exchange.synchronize()

    @torch.no_grad()
    def copy_global_to(self, tensors) -> None:
        """Copies the current global parameters (async: read from the windows, not collective;
        sync: the model's) into `tensors`, shaped like the parameters then the float buffers
        (e.g. an evaluation copy of the model)."""
        tensors = list(tensors)
        if [tuple(t.shape) for t in tensors] != [tuple(t.shape) for t in self._state_tensors]:
            raise ValueError("torch_hpc DistributedOptimizer.copy_global_to: expected tensors shaped "
                             f"{[tuple(t.shape) for t in self._state_tensors]}")
        unflatten_into(self._exchange.peek_values(), tensors)

    def exchange_stats(self) -> dict:
        """What the exchange has cost this rank so far: `exchanges` (steps exchanged),
        `bytes_sent`/`bytes_received` (async: through the RMA windows, the whole parameter vector
        each way per step whatever the world size, since every rank owns a shard; sync: the
        gradient buckets handed to allreduce), `exchange_seconds` (async: time the exchange
        thread spent; sync: None) and `wait_seconds` (time step() blocked on the exchange)."""
        return self._exchange.stats()

    @property
    def skipped_updates(self) -> int:
        """async: steps whose delta held inf/NaN and was not sent."""
        return self._exchange.skipped_updates

    @property
    def max_staleness_seen(self) -> int:
        """async: the most steps this rank was ahead of the slowest rank when it passed a
        staleness gate (with staleness=s this never exceeds s)."""
        return self._exchange.max_staleness_seen

    def close(self) -> None:
        """async (collective): frees the MPI windows (called at exit otherwise). sync: removes
        the gradient hooks."""
        self._exchange.close()

    # -- checkpoints ---------------------------------------------------------------------------
    def _meta(self):
        return {"format": _FORMAT, "mode": self.mode, "world_size": self._world,
                "names": list(self._names), "shapes": [list(t.shape) for t in self._state_tensors],
                "steps": self._steps}

    def state_dict(self):
        """Both modes: the model's (async: global, after a collective synchronize()) parameters
        and averaged buffers, flattened, plus this rank's wrapped-optimizer state. Loadable with
        torch.load(..., weights_only=True) and at any world size."""
        flat = self._exchange.checkpoint_values()
        return {"torch_hpc": self._meta(), "parameters": flat.cpu(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict):
        """Refuses a checkpoint of another model; one from another world size is resharded.
        async: collective (every rank writes its shard of the global copy)."""
        flat = _checked_checkpoint(state_dict, self._meta(), self._numel)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._steps = int(state_dict["torch_hpc"].get("steps", 0))
        with torch.no_grad():
            self._exchange.load(flat)


def _check_arguments(optimizer, mode, op, staleness, backward_passes_per_step, compression):
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{_PREFIX}optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if mode not in ("sync", "async"):
        raise ValueError(f"{_PREFIX}mode must be 'sync' or 'async', got {mode!r}")
    if op not in ("average", "sum"):
        raise ValueError(f"{_PREFIX}op must be 'average' or 'sum', got {op!r}")
    if staleness is not None and (mode != "async" or int(staleness) < 0):
        raise ValueError(f"{_PREFIX}staleness must be None or an integer >= 0, and only with "
                         f"mode='async' (got {staleness!r} with mode={mode!r})")
    if int(backward_passes_per_step) < 1:
        raise ValueError(f"{_PREFIX}backward_passes_per_step must be >= 1, got "
                         f"{backward_passes_per_step!r}")
    if compression not in (None, "none", "fp16", "bf16"):
        raise ValueError(f"{_PREFIX}compression must be None, 'fp16' or 'bf16', got {compression!r}")


def _parameter_names(params, named_parameters):
    if len({id(p) for p in params}) != len(params):
        raise ValueError(f"{_PREFIX}a parameter appears twice in the optimizer's param_groups")
    if named_parameters is None:
        return {id(p): f"param{i}" for i, p in enumerate(params)}
    names = {id(t): n for n, t in named(named_parameters, "param")}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"{_PREFIX}optimizer parameters {missing[:5]} are not in named_parameters "
                         "(pass model.named_parameters() of the model the optimizer trains)")
    return names


def _checked_checkpoint(state_dict, mine, numel):
    """The flat parameters of a DistributedOptimizer checkpoint of this model, or a ValueError."""
    if not isinstance(state_dict, dict) or "torch_hpc" not in state_dict:
        raise ValueError(f"{_PREFIX}not a DistributedOptimizer state_dict (expected keys "
                         "'torch_hpc', 'parameters', 'optimizer')")
    meta = state_dict["torch_hpc"]
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{_PREFIX}checkpoint format {meta.get('format')} is not {_FORMAT}")
    if meta["names"] != mine["names"] or meta["shapes"] != mine["shapes"]:
        diff = next((f"{a}{sa} in the checkpoint vs {b}{sb} here" for a, sa, b, sb in
                     zip(meta["names"], meta["shapes"], mine["names"], mine["shapes"])
                     if (a, sa) != (b, sb)),
                    f"{len(meta['names'])} tensors in the checkpoint vs {len(mine['names'])} here")
        raise ValueError(f"{_PREFIX}the checkpoint is of a different model ({diff})")
    flat = state_dict["parameters"]
    if not isinstance(flat, torch.Tensor) or flat.numel() != numel:
        raise ValueError(f"{_PREFIX}the checkpoint's parameters hold "
                         f"{getattr(flat, 'numel', lambda: '?')()} values, the model {numel}")
    return flat
