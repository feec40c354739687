"""Run by tests/test_distributed.py under ``torchrun --standalone --nproc_per_node=2``: how a process
group ends. Usage: dist_exit.py MODE

``collectives``: a few all-reduces of temporary tensors, then a barrier, then exit at once; the
moment at which Gloo's worker threads are still releasing the last collective's tensors.
``rank1-fails``: rank 1 raises right after set-up while rank 0 waits in a barrier. Exit must not wait
for the other ranks, so rank 0 never gets past its barrier.
"""

import sys

import torch

from torch_utils import distributed as dist


def main(mode: str) -> None:
    dist.init()
    rank = dist.get_rank()
    if mode == "collectives":
        total = torch.zeros([])
        for step in range(5):
            value = torch.tensor([float(rank + step)])
            torch.distributed.all_reduce(value)
            total += value.sum()
        dist.barrier()
        assert total.item() == sum(2 * step + 1 for step in range(5)), total
        print(f"DONE rank {rank}", flush=True)
    elif mode == "rank1-fails":
        if rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        dist.barrier()
        print("rank 0 passed the barrier", flush=True)
    else:
        raise ValueError(mode)


if __name__ == "__main__":
    main(sys.argv[1])
