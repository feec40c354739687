"""Run by tests/test_distributed.py under ``torchrun --standalone --nproc_per_node=2`` on the CPU.

Checks process-group set-up, an all-reduce, DDP helpers and checkpoint writing with assertions,
and writes the training_stats results to ``RESULTDIR/rank<r>.json`` for the test to compare with
numpy. Usage: dist_check.py OUTDIR RESULTDIR
"""

import json
import os
import sys

import numpy as np
import torch

from torch_utils import distributed as dist
from torch_utils import misc, training_stats


def samples(rank: int, interval: int) -> np.ndarray:
    """The values rank ``rank`` reports in interval ``interval`` (tests/test_distributed.py mirrors this)."""
    rng = np.random.RandomState(100 * interval + rank)
    return rng.randn(7 + 3 * rank) * (rank + 1) + rank


def main(outdir: str, resultdir: str) -> None:
    results = []
    assert dist.is_distributed()
    dist.init()
    dist.init()  # a second call is a no-op
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2 and rank == int(os.environ["RANK"]), (rank, world)
    assert torch.distributed.get_backend() == "gloo"

    # All-reduce.
    t = torch.tensor([rank + 1.0, 10.0 * rank])
    torch.distributed.all_reduce(t)
    assert t.tolist() == [3.0, 10.0], t

    dist.print0("PRINT0 from rank", rank, flush=True)

    # training_stats: rank 0 reports Progress first, rank 1 has a name of its own.
    training_stats.report0("Progress/value", 42.0)
    values = samples(rank, 0)
    training_stats.report("Loss/a", torch.tensor(values[:4], dtype=torch.float32))
    training_stats.report("Loss/a", torch.tensor(np.append(values[4:], [np.nan, np.inf]), dtype=torch.float32))
    training_stats.report("Loss/scalar", float(rank + 1))
    if rank == 1:
        training_stats.report("Only/rank1", 5.0)
    collector = training_stats.Collector(regex="Loss/.*|Only/.*|Progress/.*", keep_previous=False)
    collector.update()
    training_stats.default_collector.update()
    results.append(
        dict(
            rank=rank,
            interval=0,
            names=collector.names(),
            stats=collector.as_dict(),
            default_names=training_stats.default_collector.names(),
        )
    )

    # Second interval: only rank 1 reports Loss/a.
    if rank == 1:
        training_stats.report("Loss/a", torch.tensor(samples(rank, 1)))
    collector.update()
    results.append(dict(rank=rank, interval=1, names=collector.names(), stats=collector.as_dict()))
    with open(os.path.join(resultdir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)

    # DDP: no gradient sync inside ddp_sync(sync=False), averaged gradients otherwise.
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1, bias=False)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    x = torch.full([1, 3], float(rank + 1))
    with misc.ddp_sync(ddp, sync=False):
        ddp(x).sum().backward()
    assert torch.equal(net.weight.grad, x), "gradient was synchronised inside ddp_sync(sync=False)"
    net.zero_grad()
    with misc.ddp_sync(ddp, sync=True):
        ddp(x).sum().backward()
    assert torch.allclose(net.weight.grad, torch.full([1, 3], 1.5)), net.weight.grad

    # check_ddp_consistency.
    misc.check_ddp_consistency(net)
    if rank == 1:
        with torch.no_grad():
            net.weight[0, 0] += 1
    try:
        misc.check_ddp_consistency(net)
        raised = False
    except RuntimeError as err:
        raised = "Linear.weight" in str(err)
    assert raised == (rank == 1), "rank 1 must see its weight differ from rank 0's"
    misc.check_ddp_consistency(net, ignore_regex=r"Linear\.weight")

    # Checkpoints: every rank calls save, only rank 0 writes.
    state = dict(cur_nimg=1024 * (rank + 1))
    ckpt = dist.CheckpointIO(state=state, net=net)
    ckpt.save(os.path.join(outdir, "training-state-0000001.pt"), verbose=False)
    torch.distributed.barrier()
    assert sorted(os.listdir(outdir)) == ["training-state-0000001.pt"], os.listdir(outdir)
    state["cur_nimg"] = -1
    assert ckpt.load_latest(outdir, verbose=False) == os.path.join(outdir, "training-state-0000001.pt")
    assert state["cur_nimg"] == 1024, state  # rank 0's value

    torch.distributed.barrier()
    print(f"DONE rank {rank}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
