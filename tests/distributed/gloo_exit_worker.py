"""Run under a launcher: a gloo DDP job whose last act is all_gather_object. DDP keeps the
process group (and gloo's worker threads) alive into interpreter shutdown; the worker thread
that frees the gathered tensors must not be caught there (torch aborts the process)."""
import json

import torch
import torch.distributed as dist

import torch_hpc

launch = torch_hpc.distributed.init("gloo")
net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
gathered = [None] * launch.world_size
dist.all_gather_object(gathered, {"rank": launch.rank})
print("RESULT " + json.dumps({"rank": launch.rank, "gathered": gathered}), flush=True)
dist.destroy_process_group()
