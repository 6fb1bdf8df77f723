"""monitored_barrier for any backend (torch's own refuses every backend but gloo): like
dist.monitored_barrier, rank 0 of the group waits for the others and raises naming the ranks
that did not arrive in time. It goes through the default group's store, not through MPI, so a
missing rank leaves no MPI operation behind."""
import collections
import datetime
import time

import torch.distributed as dist

_rounds = collections.Counter()  # per group: how many monitored barriers this rank entered


def monitored_barrier(group=None, timeout: datetime.timedelta | None = None,
                      wait_all_ranks: bool = False) -> None:
    """Blocks until every rank of `group` (default: the world) has called it. Rank 0 raises a
    RuntimeError naming the first rank that did not arrive within `timeout` (wait_all_ranks:
    every such rank); the other ranks raise if rank 0 does not release them in time."""
    group = group or dist.group.WORLD
    if timeout is None:
        timeout = dist.distributed_c10d._get_default_timeout(dist.get_backend(group))
    store = dist.distributed_c10d._get_default_store()
    ranks = dist.get_process_group_ranks(group)
    me = dist.get_rank(group)
    name = dist.distributed_c10d._get_process_group_name(group)
    _rounds[name] += 1
    prefix = f"torch_hpc/monitored_barrier/{name}/{_rounds[name]}"
    deadline = time.monotonic() + timeout.total_seconds()
    if me != 0:
        store.set(f"{prefix}/arrived/{me}", "1")
        if not _arrived(store, f"{prefix}/released", deadline):
            raise RuntimeError(f"torch_hpc monitored_barrier: rank {ranks[me]} was not released by "
                               f"rank {ranks[0]} within {timeout}")
        return
    missing = []
    for local in range(1, len(ranks)):
        key = f"{prefix}/arrived/{local}"
        if not _arrived(store, key, deadline):
            missing.append(ranks[local])
            if not wait_all_ranks:
                break
    if missing:
        which = f"Ranks {missing}" if len(missing) > 1 else f"Rank {missing[0]}"
        raise RuntimeError(f"torch_hpc monitored_barrier: {which} failed to pass the monitored "
                           f"barrier within {timeout} (group ranks {ranks})")
    store.set(f"{prefix}/released", "1")


def _arrived(store, key, deadline) -> bool:
    while True:
        if store.check([key]):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)

