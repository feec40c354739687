"""Named training statistics, accumulated cheaply where they are reported and reduced across
processes when a collector reads them (once per status tick).

``report(name, value)`` adds samples (a scalar or a tensor of samples) to a running count, sum
and sum of squares in float64; non-finite samples are left out of these, but counted apart, so
that an interval whose samples were all non-finite (e.g. a diverged loss) reads as NaN, as in the
reference, rather than keeping the previous interval's value. ``Collector.update()`` gathers
what every process reported since its previous update (an all-reduce when distributed) and
exposes the number of samples, mean and standard deviation of each name.
"""

import re
from typing import Any

import numpy as np
import torch

import dnnlib

_reduce_dtype = torch.float64  # accumulate in double so long ticks do not lose precision
_counters: dict[str, dict[torch.device, torch.Tensor]] = {}  # name -> device -> [count, sum, sumsq, all] not yet synced
_cumulative: dict[str, torch.Tensor] = {}  # name -> [count, sum, sumsq, all] over all processes since start (CPU)
_names: list[str] = []  # every known name, in first-reported order (rank 0's order once synced)


def report(name: str, value: Any) -> Any:
    """Add the samples in ``value`` (a number, a sequence or a tensor) to ``name``; return ``value``.
    Accumulation stays on the value's device, so reporting a CUDA tensor does not synchronise."""
    if name not in _counters:  # _counters and _names always hold the same names
        _counters[name] = {}
        _names.append(name)
    elems = torch.as_tensor(value).detach().flatten().to(_reduce_dtype)
    finite = torch.isfinite(elems)
    elems = torch.where(finite, elems, torch.zeros_like(elems))
    num_finite = finite.sum().to(_reduce_dtype)
    moments = torch.stack([num_finite, elems.sum(), elems.square().sum(), torch.ones_like(elems).sum()])
    counters = _counters[name]
    if elems.device not in counters:
        counters[elems.device] = torch.zeros_like(moments)
    counters[elems.device].add_(moments)
    return value


def report0(name: str, value: Any) -> Any:
    """``report`` on rank 0; other ranks register the name with no samples (keeping the
    processes' name lists equal)."""
    report(name, value if _rank() == 0 else [])
    return value


def _dist_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _dist_active() else 0


def _sync_device() -> torch.device:
    # NCCL reduces only CUDA tensors; Gloo works on the CPU.
    if _dist_active() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync_names() -> None:
    """Make every process know every reported name, in rank 0's order (a collective call)."""
    global _names
    if not _dist_active() or torch.distributed.get_world_size() == 1:
        return
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(_names))
    merged: list[str] = []
    for names in gathered:
        merged += [name for name in names if name not in merged]
    for name in merged:
        _counters.setdefault(name, {})
    _names = merged


def _sync(names: list[str]) -> list[torch.Tensor]:
    """Fold the unsynced samples of ``names`` from all processes into ``_cumulative`` (collective)."""
    if len(names) == 0:
        return []
    device = _sync_device()
    deltas = torch.zeros([len(names), 4], dtype=_reduce_dtype, device=device)
    for idx, name in enumerate(names):
        for counter in _counters.get(name, {}).values():
            deltas[idx].add_(counter.to(device))
            counter.zero_()
    if _dist_active() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(deltas)
    for name, delta in zip(names, deltas.cpu()):
        _cumulative[name] = delta + _cumulative.get(name, 0)
    return [_cumulative[name] for name in names]


class Collector:
    """Reads the statistics whose names fully match ``regex``, per interval between updates (which
    every process must call together). With ``keep_previous``, names without samples in the latest
    interval keep their previous values, else they read as empty (num 0, mean and std NaN)."""

    def __init__(self, regex: str = ".*", keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative: dict[str, torch.Tensor] = {}
        self._moments: dict[str, torch.Tensor] = {}

    def names(self) -> list[str]:
        """Matching names known to this process, in first-reported order."""
        return [name for name in _names if self._regex.fullmatch(name)]

    def update(self) -> None:
        """Take in everything reported since the previous update, from every process."""
        _sync_names()
        if not self._keep_previous:
            self._moments.clear()
        names = self.names()
        for name, cumulative in zip(names, _sync(names)):
            delta = cumulative - self._cumulative.get(name, 0)
            self._cumulative[name] = cumulative
            if float(delta[3]) != 0:  # any samples, finite or not
                self._moments[name] = delta

    def _get(self, name: str) -> torch.Tensor:
        return self._moments.get(name, torch.zeros([4], dtype=_reduce_dtype))

    def num(self, name: str) -> int:
        """Number of finite samples of ``name`` in the latest interval."""
        return int(self._get(name)[0])

    def mean(self, name: str) -> float:
        """Mean of ``name``'s samples (NaN when there are none)."""
        count, total = self._get(name).tolist()[:2]
        return total / count if count else float("nan")

    def std(self, name: str) -> float:
        """Population standard deviation of ``name``'s samples (NaN when there are none)."""
        count, _, total_sq, _ = self._get(name).tolist()
        mean = self.mean(name)
        if not np.isfinite(mean):
            return float("nan")
        return 0.0 if count == 1 else float(np.sqrt(max(total_sq / count - mean**2, 0.0)))

    def as_dict(self) -> dnnlib.EasyDict:
        """``{name: EasyDict(num, mean, std)}`` for every matching name."""
        return dnnlib.EasyDict(
            {
                name: dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
                for name in self.names()
            }
        )

    def __getitem__(self, name: str) -> float:
        """The mean of ``name``."""
        return self.mean(name)


default_collector = Collector()  # the collector that the training loop reads


def reset() -> None:
    """Forget every name and sample and start ``default_collector`` afresh (e.g. between two
    training runs in one process, so the second run's first status line has no stale values)."""
    _counters.clear()
    _cumulative.clear()
    _names.clear()
    default_collector.__init__()
