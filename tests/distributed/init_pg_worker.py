"""Run under a launcher (or none): torch.distributed.init_process_group(backend) as a user of
torch's own "mpi" backend writes it, with no environment variables set by hand, or after
torch_hpc.distributed.init(); reports rank, size and an all_reduce."""
import argparse
import json

import torch
import torch.distributed as dist

import torch_hpc

p = argparse.ArgumentParser()
p.add_argument("--backend", default="hpc_mpi")
p.add_argument("--via-init", action="store_true", help="torch_hpc.distributed.init() instead")
args = p.parse_args()
if args.via_init:
    torch_hpc.distributed.init(backend=args.backend)
else:
    dist.init_process_group(args.backend)
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print("RESULT " + json.dumps({"rank": dist.get_rank(), "size": dist.get_world_size(), "sum": t.item(),
                              "backend": dist.get_backend()}), flush=True)
dist.barrier()
dist.destroy_process_group()
