"""Miscellaneous torch helpers: cached constants, seeding, the infinite sampler, parameter copying,
DDP helpers and the module summary table.

Reference network pickles execute their embedded source against this module and call
``constant`` / ``const_like``, so those two keep the reference's names and signatures. Module-level
imports are limited to the standard library, numpy, torch and dnnlib for the same reason.
"""

import contextlib
import functools
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional

import numpy as np
import torch

import dnnlib


def default_device() -> torch.device:
    """The device a tool runs on when none is named: CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_constant_cache: dict = {}


def constant(
    value: Any,
    shape: Optional[Sequence[int]] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    memory_format: Optional[torch.memory_format] = None,
) -> torch.Tensor:
    """A constant tensor holding ``value`` (broadcast to ``shape``), created once per distinct request.

    Repeated calls with the same value, shape, dtype, device and memory format return the same
    tensor, so hot loops do not allocate (or copy host-to-device) the same constant again.
    While ``torch.compile`` traces a function the cache is bypassed: the constant becomes part of
    the compiled graph (which folds it once), and the dictionary lookup would break the graph.
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    memory_format = torch.contiguous_format if memory_format is None else memory_format
    if torch.compiler.is_compiling():
        tensor = torch.as_tensor(value, dtype=dtype, device=device)
        if shape is not None:
            tensor = tensor.broadcast_to(tuple(shape))
        return tensor.contiguous(memory_format=memory_format)
    value = np.asarray(value)
    shape = tuple(shape) if shape is not None else None
    device = torch.device("cpu") if device is None else torch.device(device)

    # Tensors made under inference mode cannot enter autograd later, so they are cached apart.
    inference = torch.is_inference_mode_enabled()
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format, inference)
    tensor = _constant_cache.get(key)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape, dtype=dtype, device=device))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor


def const_like(
    ref: torch.Tensor,
    value: Any,
    shape: Optional[Sequence[int]] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    memory_format: Optional[torch.memory_format] = None,
) -> torch.Tensor:
    """``constant(value)`` with ``ref``'s dtype and device unless given."""
    dtype = ref.dtype if dtype is None else dtype
    device = ref.device if device is None else device
    return constant(value, shape=shape, dtype=dtype, device=device, memory_format=memory_format)


def set_random_seed(*args: Any) -> None:
    """Seed torch (every device) and numpy's legacy global generator from ``hash(args) % 2**31``. CPython's
    hash of a tuple of integers is the same in every run, so ``(seed, rank, cur_nimg)`` reproduces a step."""
    seed = hash(args) % (1 << 31)
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed)


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless dataset indices, reshuffled every epoch, strided across processes (as in the reference).

    Global index ``idx`` starts at ``start_idx + rank`` and advances by ``num_replicas``; it yields
    ``perm_e[idx % N]`` where ``e = idx // N`` and ``perm_e`` is a legacy
    ``np.random.RandomState(hash((seed, e)) % 2**31)`` shuffle of ``0..N-1``. Resuming with
    ``start_idx = cur_nimg`` therefore continues the same sequence.
    """

    def __init__(
        self,
        dataset: Any,
        rank: int = 0,
        num_replicas: int = 1,
        seed: int = 0,
        start_idx: int = 0,
        shuffle: bool = True,
    ):
        if len(dataset) <= 0:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        if num_replicas <= 0 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for {num_replicas} replicas")
        super().__init__()  # torch >= 2.11 rejects the dataset argument of the base class
        self.dataset = dataset
        self.rank = rank
        self.num_replicas = num_replicas
        self.seed = seed
        self.start_idx = start_idx
        self.shuffle = shuffle

    def __iter__(self) -> Iterator[int]:
        size = len(self.dataset)
        idx, epoch, order = self.start_idx + self.rank, None, None
        while True:
            if idx // size != epoch:
                epoch = idx // size
                order = np.arange(size)
                if self.shuffle:
                    np.random.RandomState(hash((self.seed, epoch)) % (1 << 31)).shuffle(order)
            yield int(order[idx % size])
            idx += self.num_replicas


def params_and_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """All parameters, then all buffers, in registration order."""
    return list(module.parameters()) + list(module.buffers())


def named_params_and_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """All named parameters, then all named buffers, in registration order."""
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(
    src_module: torch.nn.Module, dst_module: torch.nn.Module, require_all: bool = False
) -> None:
    """Copy same-named parameters and buffers into ``dst_module`` (keeping its dtypes and devices);
    with ``require_all``, every destination tensor must have a source."""
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name in src_tensors:
            tensor.copy_(src_tensors[name])
        elif require_all:
            raise KeyError(f"copy_params_and_buffers: '{name}' is missing from the source module")


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce inside the block unless ``sync`` (gradient accumulation)."""
    skip = isinstance(module, torch.nn.parallel.DistributedDataParallel) and not sync
    with module.no_sync() if skip else contextlib.nullcontext():
        yield


def check_ddp_consistency(module: torch.nn.Module, ignore_regex: Optional[str] = None) -> None:
    """Raise if any parameter or buffer differs from rank 0's (NaNs compare equal to NaNs), except
    those whose ``TypeName.path`` matches ``ignore_regex``. A no-op outside ``torch.distributed``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + "." + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = torch.nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        if not torch.equal(tensor, other):
            raise RuntimeError(f"DDP consistency check failed: {fullname} differs from rank 0")


def print_module_summary(
    module: torch.nn.Module, inputs: Sequence[Any], max_nesting: int = 3, skip_redundant: bool = True
) -> Any:
    """Run ``module(*inputs)`` once and print a table of its submodules (up to ``max_nesting``
    levels deep) with their parameter and buffer counts and output shapes. Returns the outputs.
    ``skip_redundant`` leaves out rows that own no tensors and show no output not shown before."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError("print_module_summary expects a torch.nn.Module")
    if not isinstance(inputs, (tuple, list)):
        raise TypeError("inputs must be a tuple or list")

    entries: list[dnnlib.EasyDict] = []
    nesting = [0]

    def pre_hook(_mod: torch.nn.Module, _inputs: Any) -> None:
        nesting[0] += 1

    def post_hook(mod: torch.nn.Module, _inputs: Any, outputs: Any) -> None:
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            outputs = [t for t in outputs if isinstance(t, torch.Tensor)]
            entries.append(dnnlib.EasyDict(mod=mod, outputs=outputs))

    hooks = [mod.register_forward_pre_hook(pre_hook) for mod in module.modules()]
    hooks += [mod.register_forward_hook(post_hook) for mod in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    # Each tensor is counted once, by the first (innermost) module that ran and owns it.
    seen: set = set()
    for entry in entries:
        entry.unique_params = [t for t in entry.mod.parameters() if id(t) not in seen]
        entry.unique_buffers = [t for t in entry.mod.buffers() if id(t) not in seen]
        entry.unique_outputs = [t for t in entry.outputs if id(t) not in seen]
        seen |= {id(t) for t in entry.unique_params + entry.unique_buffers + entry.unique_outputs}
    if skip_redundant:
        entries = [e for e in entries if e.unique_params or e.unique_buffers or e.unique_outputs]

    names = {mod: name for name, mod in module.named_modules()}
    rows = [[type(module).__name__, "Parameters", "Buffers", "Output shape", "Datatype"], ["---"] * 5]
    totals = [0, 0]
    for entry in entries:
        name = "<top-level>" if entry.mod is module else names.get(entry.mod, "?")
        sizes = [sum(t.numel() for t in entry.unique_params), sum(t.numel() for t in entry.unique_buffers)]
        totals = [total + size for total, size in zip(totals, sizes)]
        shapes = [str(list(t.shape)) for t in entry.outputs] or ["-"]
        dtypes = [str(t.dtype).split(".")[-1] for t in entry.outputs] or ["-"]
        for idx in range(len(shapes)):
            counts = [str(size or "-") for size in sizes] if idx == 0 else ["-", "-"]
            rows.append([name + (f":{idx}" if len(shapes) >= 2 else ""), *counts, shapes[idx], dtypes[idx]])
    rows += [["---"] * 5, ["Total", *map(str, totals), "-", "-"]]

    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print()
    return outputs


# Helpers of the reference's misc module that user scripts call.


class suppress_tracer_warnings(warnings.catch_warnings):
    """Context manager that hides ``torch.jit.TracerWarning`` (e.g. around shape checks while tracing)."""

    def __enter__(self) -> "suppress_tracer_warnings":
        super().__enter__()
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        return self


def assert_shape(tensor: torch.Tensor, ref_shape: Sequence[Optional[int]]) -> None:
    """Raise AssertionError unless ``tensor`` has ``ref_shape``; None entries match any size."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f"Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}")
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is not None and int(size) != int(ref_size):
            raise AssertionError(f"Wrong size for dimension {idx}: got {int(size)}, expected {int(ref_size)}")


def tile_images(x: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """Tile a batch [N, C, H, W] with N = w * h into one image [C, h * H, w * W], row by row."""
    assert x.ndim == 4, "tile_images expects NCHW"
    n, c, height, width = x.shape
    assert n == w * h, f"tile_images: {n} images do not fill a {w}x{h} grid"
    return x.reshape(h, w, c, height, width).permute(2, 0, 3, 1, 4).reshape(c, h * height, w * width)


def profiled_function(fn: Callable) -> Callable:
    """Decorator: each call of ``fn`` is a named range (its function name) in the torch profiler."""

    @functools.wraps(fn)
    def decorator(*args: Any, **kwargs: Any) -> Any:
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)

    return decorator


# ----------------------------------------------------------------------------
# Precision of training and sampling (train_edm2.py, generate_images.py, calculate_metrics.py gen).
# fp16 is the networks' own use_fp16 (float16 on CUDA only); bf16 runs them in float32 under
# bfloat16 autocast; TF32 rounds the inputs of float32 CUDA matmuls and convolutions to 10 bits.

PRECISIONS = ("fp32", "fp16", "bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Precision(str):
    """A resolved precision: its name (fp32, fp16 or bf16; compares and serialises as that string), whether
    float32 matmuls may use TF32, and the device type it runs on. ``use_fp16`` is the networks' own float16
    switch that it implies; ``scope()`` applies it around sampling or a forward pass."""

    tf32: bool
    device_type: str

    def __new__(cls, name: str, tf32: bool = False, device_type: str = "cuda") -> "Precision":
        obj = super().__new__(cls, name)
        obj.tf32, obj.device_type = bool(tf32), device_type
        return obj

    @property
    def use_fp16(self) -> bool:
        return self == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self, self.device_type)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """bfloat16 autocast for bf16, and TF32 allowed when asked for; the previous TF32 flags come back after."""
        old_tf32 = set_tf32(True) if self.tf32 else None
        try:
            with self.autocast():
                yield
        finally:
            if old_tf32 is not None:
                set_tf32(*old_tf32)


def resolve_precision(
    precision: Optional[str],
    use_fp16: Optional[bool],
    device: "str | torch.device",
    tf32: bool = False,
    cpu_bf16: bool = False,
) -> Precision:
    """The one place where a precision is decided: ``precision``, or for None the one that the networks'
    ``use_fp16`` gives on ``device`` (float16 on CUDA only). Raises ValueError for an unknown name, for fp16,
    bf16 or TF32 that the device cannot run, and for an fp16 that contradicts ``use_fp16`` on CUDA (None: no
    such constraint). ``cpu_bf16`` allows bf16 on a CPU with native bfloat16 (for sampling). A ``Precision``
    passes through unchanged: it was resolved already."""
    if isinstance(precision, Precision):
        return precision
    device = torch.device(device)
    if precision is None:
        precision = "fp16" if use_fp16 and device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f'unknown precision "{precision}"; choose from {", ".join(PRECISIONS)}')
    bf16_on_cpu = precision == "bf16" and device.type == "cpu" and cpu_bf16 and cpu_has_bf16()
    for what, needs_cuda in [(f"precision {precision}", precision != "fp32" and not bf16_on_cpu), ("tf32", tf32)]:
        if needs_cuda and device.type != "cuda":
            extra = " or a CPU with native bfloat16 (AVX512-BF16, AMX)" if precision == "bf16" and cpu_bf16 else ""
            raise ValueError(f"{what} needs a CUDA device{extra}, not {device.type}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision bf16: this CUDA device does not support bfloat16")
    if use_fp16 is not None and device.type == "cuda" and (precision == "fp16") != use_fp16:
        raise ValueError(f"precision {precision} contradicts network_kwargs.use_fp16={use_fp16} on {device.type}")
    return Precision(precision, tf32, device.type)


def autocast(precision: Optional[str], device_type: str = "cuda") -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device_type`` for precision bf16; nothing for the others."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def set_tf32(matmul: bool, cudnn: Optional[bool] = None) -> tuple[bool, bool]:
    """Allow TF32 in CUDA float32 matmuls and (``cudnn`` None = the same) cuDNN convolutions, or
    not; returns the previous ``(matmul, cudnn)`` flags."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = matmul if cudnn is None else cudnn
    return old


# ----------------------------------------------------------------------------
# torch.compile with a fallback to eager.


class CompiledNetwork:
    """A network run through ``torch.compile(fullgraph=True)``, falling back to the eager network
    (with one printed line) if compiling fails, e.g. without a C compiler. Attributes are the
    network's. The network itself is not modified, and it is compiled lazily on the first call.
    Keyword arguments go to ``torch.compile``, e.g. ``fullgraph=False`` to allow graph breaks."""

    def __init__(self, net: torch.nn.Module, **compile_kwargs: Any):
        self.net = net
        self.fn: Callable = torch.compile(net, **{"fullgraph": True, **compile_kwargs})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["net"], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fn is not self.net:
            try:
                return self.fn(*args, **kwargs)
            except Exception as err:  # compiler missing, unsupported platform or op, ...
                print(f"torch.compile failed, running eagerly instead: {dnnlib.util.one_line(err)}", flush=True)
                self.fn = self.net
        return self.net(*args, **kwargs)
