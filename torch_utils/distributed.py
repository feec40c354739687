"""Multi-process helpers: process-group set-up, rank queries, rank-0 printing, training
checkpoints, and hooks through which a cluster manager can stop or suspend a run.

Launch several processes with ``torchrun --nproc_per_node=N script.py``; without torchrun every
function works as a single process. The reference always uses NCCL and ``torch.cuda.set_device``;
here NCCL is used only with CUDA and Gloo otherwise, so multi-process runs work on CPUs too.
"""

import atexit
import gc
import os
import re
import socket
from typing import Any, Optional

import numpy as np
import torch

import dnnlib


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


_shutdown_registered = False


def init() -> None:
    """Initialise ``torch.distributed`` from torchrun's environment, or as rank 0 of 1 on localhost
    and a free port. Uses NCCL when CUDA is available and Gloo otherwise. Calling it again is a no-op.
    The process group is destroyed at exit (``shutdown``), so the scripts need no teardown of their own."""
    global _shutdown_registered
    if torch.distributed.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    for name, value in [("MASTER_ADDR", "localhost"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")]:
        os.environ.setdefault(name, value)
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda and torch.distributed.is_nccl_available() else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(backend=backend, init_method="env://")
    if not _shutdown_registered:
        atexit.register(shutdown)
        _shutdown_registered = True


def shutdown() -> None:
    """Destroy the process group, if any; a no-op otherwise. ``init`` registers it to run at exit.

    Why: Gloo's worker threads release the last reference to a finished collective's tensors
    (which takes the GIL) a moment after the caller has its result. A process that exits right after
    its last collective can reach interpreter finalization first; Python then ends the thread that
    asks for the GIL from inside a destructor that may not throw, and C++ aborts the process
    ("terminate called without an active exception", exit code -6) after all its work was done.
    Destroying the group first joins those threads. There is deliberately no barrier here: at exit we
    cannot tell success from an error on this rank, and a barrier after an error would wait for (or
    be matched by an unrelated collective of) ranks that are still working; a script that needs every
    rank to reach its end calls ``barrier()`` itself. Unreachable objects that still hold the group
    (e.g. a DistributedDataParallel wrapper in a reference cycle) are collected first, so that the
    destruction really is the last reference and joins the threads."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process was launched as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)


def barrier() -> None:
    """Wait for every process of the group (a no-op without a group or with one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and get_world_size() > 1:
        torch.distributed.barrier()


def rank_batches(
    num_items: int, max_batch_size: int, rank: Optional[int] = None, world_size: Optional[int] = None
) -> list[np.ndarray]:
    """Split ``range(num_items)`` into batches of at most ``max_batch_size``; return this rank's.
    Every rank gets as many batches (at least one; some may be empty), so that collectives in a
    per-batch loop line up across ranks. Batch ``i`` of the whole split goes to rank ``i % world_size``."""
    if max_batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {max_batch_size}")
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    num_batches = max((num_items - 1) // (max_batch_size * world_size) + 1, 1) * world_size
    return np.array_split(np.arange(num_items), num_batches)[rank::world_size]


class SingleProcessOnly(RuntimeError):
    """Raised by ``refuse_torchrun`` for a tool that runs as one process only."""


def refuse_torchrun(tool: str) -> None:
    """Fail when launched as one of several processes (torchrun) for a tool that runs as one. Only
    rank 0 raises ``SingleProcessOnly``; the others exit quietly with status 1, so the message shows once."""
    if is_distributed():
        if int(os.environ.get("RANK", "0")) != 0:
            raise SystemExit(1)
        raise SingleProcessOnly(f"{tool} runs as a single process; run it with python, not torchrun")


# Hooks for a cluster manager. Outside one, runs never stop or suspend early.

_suspend_requested = False
_progress = (0, 0)


def should_stop() -> bool:
    """Whether the run should end now (the default environment never asks)."""
    return False


def should_suspend() -> bool:
    """Whether the run should checkpoint and exit, to be resumed later (never, by default)."""
    return False


def request_suspend() -> None:
    """Tell the environment that this invocation ended early on purpose (e.g. ``--slice``)."""
    global _suspend_requested
    _suspend_requested = True


def suspend_requested() -> bool:
    """Whether ``request_suspend()`` was called in this process."""
    return _suspend_requested


def update_progress(cur: int, total: int) -> None:
    """Report progress (e.g. kimg done of kimg total) to the environment."""
    global _progress
    _progress = (int(cur), int(total))


def _plain(obj: Any) -> Any:
    """EasyDicts become plain dicts (recursively), so checkpoints load with weights_only=True anywhere."""
    if isinstance(obj, dnnlib.EasyDict) or type(obj) is dict:
        return {key: _plain(value) for key, value in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_plain(value) for value in obj)
    return obj


def _reference_checkpoint_globals() -> list:
    """The globals that reference checkpoints use besides tensors and plain types, all data: the
    ``dnnlib.util.EasyDict`` of ``state`` (read as a dict) and Adam's ``lr`` as a numpy float64
    (the reference's learning-rate schedule divides by ``np.sqrt``), i.e. numpy's scalar
    constructor (under ``numpy.core`` in NumPy 1, ``numpy._core`` in NumPy 2) and the float64 dtype."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    return [
        (dict, "dnnlib.util.EasyDict"),
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        type(np.dtype(np.float64)),
    ]


def _load_checkpoint_data(pt_path: str) -> dict:
    """``torch.load(weights_only=True)`` with exactly the reference's data globals allowed (never
    anything that can run code); a failure becomes a one-line ValueError naming the file."""
    try:
        with torch.serialization.safe_globals(_reference_checkpoint_globals()):
            data = torch.load(pt_path, map_location=torch.device("cpu"), weights_only=True)
    except OSError:
        raise
    except Exception as err:  # the unpickler's errors come as several types with multi-line messages
        text = str(err)
        match = re.search(r"(?i)unsupported (?:global: )?GLOBAL ([\w.]+)", text)
        lines = [line.strip() for line in text.splitlines() if line.strip() and "Weights only load failed" not in line]
        why = lines[0].split(". ")[0] if lines else type(err).__name__
        if match:
            why = f"it holds {match.group(1)}, which a checkpoint may not contain (only tensors, state dicts and plain data load)"
        raise ValueError(f"cannot read the checkpoint {pt_path}: {why}") from None
    if not isinstance(data, dict):
        raise ValueError(f"cannot read the checkpoint {pt_path}: it holds a {type(data).__name__}, not a dict")
    return data


class CheckpointIO:
    """Saves and restores named training objects (as their ``state_dict()``, their attribute dict, or
    themselves). EasyDicts are written as plain dicts, so the files load with ``weights_only=True``
    anywhere; loading allows exactly the data globals of reference checkpoints, so those resume too."""

    def __init__(self, **objs: Any):
        self._objs = objs

    def state(self) -> dict:
        """The dictionary that ``save`` writes."""
        data = {}
        for name, obj in self._objs.items():
            if not isinstance(obj, (dict, list, tuple, str, int, float, bool, torch.Tensor, type(None))):
                if callable(getattr(obj, "state_dict", None)):
                    obj = obj.state_dict()
                elif hasattr(obj, "__dict__"):
                    obj = dict(obj.__dict__)
            data[name] = obj
        return _plain(data)

    def save(self, pt_path: str, verbose: bool = True) -> None:
        """Write the checkpoint (rank 0 only) under a temporary name, then rename it into place."""
        data = self.state()
        if get_rank() != 0:
            return
        if verbose:
            print(f"Saving {pt_path} ... ", end="", flush=True)
        with dnnlib.util.atomic_write(pt_path, "wb") as f:
            torch.save(data, f)
        if verbose:
            print("done")

    def load(self, pt_path: str, verbose: bool = True) -> None:
        """Restore every object from ``pt_path``; ValueError (one line) if it is not a readable checkpoint."""
        if verbose:
            print0(f"Loading {pt_path} ... ", end="", flush=True)
        data = _load_checkpoint_data(pt_path)
        for name, obj in self._objs.items():
            if obj is None:  # an optional object that this run does not have (e.g. no EMA)
                continue
            if name not in data:
                raise ValueError(f"{pt_path}: not a checkpoint of this run (it has no entry '{name}')")
            value = data[name]
            if isinstance(obj, dict):
                obj.clear()
                obj.update(value)
            elif callable(getattr(obj, "load_state_dict", None)):
                obj.load_state_dict(value)
            elif isinstance(obj, list):
                obj[:] = value
            elif isinstance(obj, torch.Tensor):
                with torch.no_grad():
                    obj.copy_(value)
            elif hasattr(obj, "__dict__"):
                obj.__dict__.clear()
                obj.__dict__.update(value)
            else:
                raise TypeError(f"Cannot restore '{name}' of type {type(obj).__name__} in place")
        if verbose:
            print0("done")

    def load_latest(
        self, run_dir: str, pattern: str = r"training-state-(\d+).pt", verbose: bool = True
    ) -> Optional[str]:
        """Load the highest-numbered file in ``run_dir`` whose whole name matches ``pattern``; return
        its path, or None when there is none."""
        if not os.path.isdir(run_dir):
            return None
        found = [
            (int(m.group(1)), e.path)
            for e in os.scandir(run_dir)
            if (m := re.fullmatch(pattern, e.name)) and e.is_file()
        ]
        if not found:
            return None
        path = max(found, key=lambda item: item[0])[1]
        self.load(path, verbose=verbose)
        return path
