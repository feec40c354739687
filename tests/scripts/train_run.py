"""Run ``training_loop(**kwargs)`` with the keyword arguments from a JSON file, in one process or
as one of several under torchrun (used by tests/test_training.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/scripts/train_run.py kwargs.json
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from torch_utils import distributed as dist  # noqa: E402
from training.training_loop import training_loop  # noqa: E402


def main() -> None:
    with open(sys.argv[1]) as f:
        kwargs = json.load(f)
    torch.set_num_threads(1)
    dist.init()
    training_loop(**kwargs)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
