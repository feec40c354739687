"""Test helper: run generate_images.py's command line and record every per-seed random draw.

Usage (one or more command lines, separated by ``--``)::

    python tests/scripts/gen_record.py RECORD_PREFIX -- --net=a.pkl --outdir=out1 ... [-- ...]
    torchrun --standalone --nproc_per_node=2 tests/scripts/gen_record.py RECORD_PREFIX -- ...

Each process saves ``RECORD_PREFIX.rank{r}.pt``: a list with one dict per command line, mapping
each seed to the list of ``(kind, tensor)`` rows its generator produced (noise, class, churn
noise, in draw order). The sampler itself is untouched: the recording generator is a subclass
of ``StackedRandomGenerator`` that keeps a copy of every row it hands out.
"""

import os
import sys
from collections.abc import Sequence

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import generate_images as gi  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from training import sampling  # noqa: E402


class RecordingGenerator(gi.StackedRandomGenerator):
    """StackedRandomGenerator that records each image's draws, keyed by seed (seeds must be unique)."""

    records: dict[int, list[tuple[str, torch.Tensor]]] = {}

    def __init__(self, device, seeds: Sequence[int]):
        super().__init__(device, seeds)
        self.seeds = [int(seed) for seed in seeds]

    def _record(self, kind: str, out: torch.Tensor) -> torch.Tensor:
        for seed, row in zip(self.seeds, out):
            RecordingGenerator.records.setdefault(seed, []).append((kind, row.detach().cpu().clone()))
        return out

    def randn(self, size, **kwargs):
        return self._record("randn", super().randn(size, **kwargs))

    def randint(self, *args, size, **kwargs):
        return self._record("randint", super().randint(*args, size=size, **kwargs))


def split_command_lines(argv: Sequence[str]) -> list[list[str]]:
    runs: list[list[str]] = []
    for arg in argv:
        if arg == "--":
            runs.append([])
        else:
            runs[-1].append(arg)
    return [run for run in runs if run]


def run_recorded(args: Sequence[str]) -> dict[int, list[tuple[str, torch.Tensor]]]:
    """Run one generate_images.py command line in this process and return the draws per seed."""
    RecordingGenerator.records = {}
    original = sampling.StackedRandomGenerator
    sampling.StackedRandomGenerator = RecordingGenerator  # the library's, which generate_images() uses
    try:
        gi.cmdline.main(list(args), standalone_mode=False)
    finally:
        sampling.StackedRandomGenerator = original
    return RecordingGenerator.records


def main(argv: Sequence[str]) -> None:
    prefix, runs = argv[0], split_command_lines(argv[1:])
    records = [run_recorded(args) for args in runs]
    torch.save(records, f"{prefix}.rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
