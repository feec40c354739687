"""Run train_edm2.py's command line with the loss made deterministic (tests/scripts/train_helpers.py's
``DeterministicLoss``), plain SGD without learning-rate ramp-up, and no data-loader worker processes
(used by tests/test_multinode.py).

With per-sample losses that depend only on the images, a run's result no longer depends on how
many processes share each batch: one process and several, on one node or on several, train the
same network up to the order of floating-point sums. SGD's step scales with the gradient, so a
wrongly averaged gradient shows; without the ramp-up a few steps move the weights visibly.

    python tests/scripts/train_deterministic.py --outdir=... --data=... --preset=cpu-16 ...
    torchrun --nnodes=2 --node-rank=0 ... tests/scripts/train_deterministic.py --outdir=... ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import dnnlib  # noqa: E402
import train_edm2  # noqa: E402

_setup_training_config = train_edm2.setup_training_config


def setup_training_config(*args, **kwargs) -> dnnlib.EasyDict:
    c = _setup_training_config(*args, **kwargs)
    c.loss_kwargs = dnnlib.EasyDict(class_name="tests.scripts.train_helpers.DeterministicLoss")
    c.optimizer_kwargs = dnnlib.EasyDict(class_name="torch.optim.SGD")
    c.lr_kwargs.rampup_Mimg = 0
    c.data_loader_kwargs = dnnlib.EasyDict(class_name="torch.utils.data.DataLoader", num_workers=0)
    return c


if __name__ == "__main__":
    train_edm2.setup_training_config = setup_training_config
    train_edm2.cmdline()
