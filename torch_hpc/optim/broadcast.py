"""Horovod's start-of-training helpers: give every rank root_rank's parameters, buffers and
optimizer state."""
import collections

import torch
import torch.distributed as dist

from ._flat import flatten, unflatten_into


def default_group(process_group):
    """`process_group`, else the world group (initialising hpc_mpi if nothing is yet)."""
    if process_group is not None:
        return process_group
    if not dist.is_initialized():
        from torch_hpc.distributed import init
        init("hpc_mpi")
    return dist.group.WORLD


def named(tensors, prefix):
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
    group = default_group(process_group)
    tensors = [t for _, t in named(params, "tensor") if isinstance(t, torch.Tensor)]
    by_kind = collections.defaultdict(list)
    for t in tensors:
        by_kind[(t.device, t.dtype)].append(t)
    with torch.no_grad():
        for kind in sorted(by_kind, key=str):
            flat = flatten(by_kind[kind], dtype=None)
            dist.broadcast(flat, src=root_rank, group=group)
            unflatten_into(flat, by_kind[kind])


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def broadcast_optimizer_state(optimizer, root_rank: int = 0, process_group=None) -> None:
    """Gives every rank root_rank's optimizer state (moments, step counts, hyperparameters).
    A DistributedOptimizer passes on the optimizer it wraps."""
    group = default_group(process_group)
    inner = getattr(optimizer, "optimizer", optimizer)
    payload = [_to_cpu(inner.state_dict()) if dist.get_rank(group) == root_rank else None]
    dist.broadcast_object_list(payload, src=root_rank, group=group)
    if dist.get_rank(group) != root_rank:
        inner.load_state_dict(payload[0])
