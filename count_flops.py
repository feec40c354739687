"""Count the parameters, flops and memory of one forward pass of an EDM2 network.

The network runs once on a batch of one -- x zeros [1, C, H, W], σ zeros [1], class labels zeros
[1, label_dim] -- under a dispatch mode that sees every ATen operation after autograd has
decomposed the composite ones (so einsums arrive as the equivalent batched matmuls). Each op is
weighted by these conventions (those of the flop figures in the paper's Table 2):

  convolution (also transposed)   output elements × product of the weight's dims after the first
  matmul / linear                 output elements × inner dimension
  addmm                           output elements × (inner dimension + 1)
  vector norms, average pooling   *input* elements
  silu, sigmoid, softmax          3 per output element
  lerp, clamp, leaky_relu         2 per output element
  gelu                            14 per output element
  group / layer norm              4 per output element
  bilinear upsampling             4 per output element
  other element-wise ops          1 per output element
  shape, copy, dropout, creation  0

Ops outside these classes are listed as unknown and counted 0. Multiply-adds count once. Memory
per sample is the peak of memory allocated during the pass beyond what existed before it (weights
and inputs): the CUDA allocator's peak on a GPU, otherwise the peak of live tensor storage
recorded by the same dispatch mode.

Without a GPU the pass runs by default on PyTorch's meta device: no arithmetic is done and no
weights are allocated for training presets, so even the largest are sized in seconds, yet every op,
its flops and every allocation are the same as in a CPU pass (`--device=cpu` runs that instead).
"""

import contextlib
import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import click
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import dnnlib
from torch_utils import distributed, persistence
from training import cli, presets

# ----------------------------------------------------------------------------
# Training presets: the network each `train_edm2.py --preset` of the paper builds (from the table
# training.presets.config_presets), sized for the 64×64 latents of img512 (4 channels) or the 64×64
# pixels of img64 (3 channels), 1000 classes.

PRESETS: dict[str, dict] = {
    name: dict(
        presets.preset_network_kwargs(name),
        img_resolution=64,
        img_channels=(4 if "-img512-" in name else 3),
        label_dim=1000,
    )
    for name in presets.config_presets
    if not presets.is_cpu_preset(name)
}


def build_preset_network(preset: str, device: Union[str, torch.device] = "meta") -> torch.nn.Module:
    """The network of a training preset, in eval mode; on the meta device no weights are allocated."""
    kwargs = PRESETS[preset]
    with torch.device(device):
        net = dnnlib.util.construct_class_by_name(**kwargs)
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------
# Flop conventions, keyed by ATen op name (in-place variants share their op's weight).

_PER_OUTPUT_ELEMENT = {
    **dict.fromkeys(["silu", "sigmoid", "_softmax", "softmax"], 3),
    **dict.fromkeys(["lerp", "clamp", "clamp_min", "clamp_max", "clip", "leaky_relu"], 2),
    "gelu": 14,
    **dict.fromkeys(["native_group_norm", "group_norm", "native_layer_norm", "layer_norm"], 4),
    **dict.fromkeys(["upsample_bilinear2d", "_upsample_bilinear2d_aa"], 4),
}

_PER_INPUT_ELEMENT = set(
    """
    linalg_vector_norm norm frobenius_norm avg_pool1d avg_pool2d avg_pool3d
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d
    """.split()
)

_CONVOLUTIONS = set(
    """
    convolution _convolution conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d
    cudnn_convolution cudnn_convolution_transpose mkldnn_convolution convolution_overrideable
    _slow_conv2d_forward slow_conv_transpose2d slow_conv3d_forward
    """.split()
)

# Matmuls: index of the multiplicand whose last dimension is the inner (summed) dimension, and
# whether an added term contributes one more op per output element.
_MATMULS = {
    **dict.fromkeys(["mm", "bmm", "matmul", "mv", "dot", "vdot", "linear"], (0, 0)),
    **dict.fromkeys(["addmm", "addbmm", "baddbmm", "addmv"], (1, 1)),
}

# Copies and casts, then dropout, then creation.
_FREE = set(
    """
    _to_copy copy clone cat stack _unsafe_view contiguous lift_fresh lift_fresh_copy constant_pad_nd repeat tile
    index_select resize _reshape_alias view_copy expand_copy permute_copy t_copy transpose_copy unsqueeze_copy
    squeeze_copy slice_copy select_copy split_copy unbind_copy detach_copy alias_copy _local_scalar_dense item set
    native_dropout dropout feature_dropout alpha_dropout bernoulli
    empty empty_like empty_strided new_empty new_empty_strided zeros zeros_like new_zeros ones ones_like new_ones
    full full_like new_full fill zero scalar_tensor arange linspace logspace eye rand rand_like randn randn_like
    randint randint_like randperm normal uniform random exponential multinomial
    """.split()
)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def op_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> Optional[int]:
    """Flops of one ATen call by the conventions above; None for an op they do not cover."""
    name = func.overloadpacket.__name__
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]  # In-place variant (clamp_, add_, copy_, ...).
    outputs = _tensors(out)
    out_numel = outputs[0].numel() if outputs else 0
    if name in _CONVOLUTIONS:
        return out_numel * args[1][0].numel()  # args[1] is the weight
    if name in _MATMULS:
        operand, extra = _MATMULS[name]
        return out_numel * (args[operand].shape[-1] + extra)
    if name in _PER_INPUT_ELEMENT:
        return args[0].numel()
    if name in _PER_OUTPUT_ELEMENT:
        return out_numel * _PER_OUTPUT_ELEMENT[name]
    if name in _FREE or func.is_view:
        return 0
    if torch.Tag.pointwise in func.tags:
        return out_numel
    return None


# ----------------------------------------------------------------------------
# The counting dispatch mode.


class FlopCounterMode(TorchDispatchMode):
    """Counts flops per op and tracks the bytes of tensor storage allocated while active.

    A storage counts from the op that creates it (an output storage shared with no input) until the
    last tensor using it dies; the peak of that live total approximates what an allocator would hold.
    """

    def __init__(self):
        super().__init__()
        self.ops: dict[str, dnnlib.EasyDict] = {}  # op name -> EasyDict(calls, flops)
        self.unknown: dict[str, int] = {}  # op name -> calls
        self.live: dict[int, tuple] = {}  # storage id -> (weak ref, bytes)
        self.live_bytes = 0
        self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._release_dead_storages()
        out = func(*args, **kwargs)

        name = func.overloadpacket.__name__
        flops = op_flops(func, args, kwargs, out)
        if flops is None:
            self.unknown[name] = self.unknown.get(name, 0) + 1
            flops = 0
        entry = self.ops.setdefault(name, dnnlib.EasyDict(calls=0, flops=0))
        entry.calls += 1
        entry.flops += flops

        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs)) if _has_storage(t)}
        for t in _tensors(out):
            if not _has_storage(t):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in inputs and key not in self.live:
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                self.live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out

    def _release_dead_storages(self):
        dead = [key for key, (ref, _) in self.live.items() if ref.expired()]
        for key in dead:
            self.live_bytes -= self.live.pop(key)[1]


def _has_storage(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and not getattr(t, "is_nested", False)


@contextlib.contextmanager
def _exact_math():
    """TF32 and reduced-precision fp16 reductions off, cuDNN benchmark off; restored after."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    flags = [(cudnn, "allow_tf32"), (matmul, "allow_tf32"), (matmul, "allow_fp16_reduced_precision_reduction")]
    flags.append((cudnn, "benchmark"))
    saved = [getattr(obj, name) for obj, name in flags]
    for obj, name in flags:
        setattr(obj, name, False)
    try:
        yield
    finally:
        for (obj, name), value in zip(flags, saved):
            setattr(obj, name, value)


# ----------------------------------------------------------------------------
# The library function.


def count_flops(
    net: torch.nn.Module,
    net_args: Optional[Sequence[Any]] = None,
    net_kwargs: Optional[dict] = None,
    verbose: bool = True,
    device: Union[str, torch.device, None] = None,
) -> dnnlib.EasyDict:
    """Parameters, flops and memory of one forward pass ``net(*net_args, **net_kwargs)``, per sample.

    ``net_args`` default to x zeros [1, C, H, W], σ zeros [1] and class labels zeros [1, label_dim]
    (``net`` then needs ``img_channels``, ``img_resolution`` and ``label_dim``, as a Precond has);
    the first argument's first dimension is the batch size the totals are divided by.
    ``device``: where the pass runs ('cuda', 'cpu' or 'meta'; default: the network's device). The
    network is moved there in place, as ``Module.to`` does (to meta, its weights are dropped), and
    runs in eval mode (restored after) without autograd. ``verbose`` prints ``format_report``.

    Returns an EasyDict with the reference's fields ``total_params``, ``total_flops``,
    ``mem_per_sample`` (bytes), ``op_count`` and ``op_flops`` (op name -> calls / flops), and
    ``params``, ``flops``, ``gflops``, ``memory_bytes`` (the same totals), ``device``, ``ops`` (op
    name -> EasyDict(calls, flops), largest first) and ``unknown`` (op name -> calls).
    """
    device = torch.device(device) if device is not None else next(iter(net.parameters()), torch.empty([])).device
    was_training = net.training
    net.eval()
    if any(t.is_meta for t in [*net.parameters(), *net.buffers()]) and device.type != "meta":
        net = net.to_empty(device=device)  # Sizes only: the values of the weights do not matter here.
    net = net.to(device)
    if net_args is None:
        x = torch.zeros([1, net.img_channels, net.img_resolution, net.img_resolution], device=device)
        labels = torch.zeros([1, net.label_dim], device=device) if net.label_dim else None
        net_args = (x, torch.zeros([1], device=device), labels)
    net_args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in net_args]
    net_kwargs = {k: t.to(device) if isinstance(t, torch.Tensor) else t for k, t in (net_kwargs or {}).items()}
    batch = net_args[0].shape[0]

    counter = FlopCounterMode()
    with _exact_math(), torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
        with counter:
            net(*net_args, **net_kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            memory = torch.cuda.max_memory_allocated(device) - baseline
        else:
            memory = counter.peak_bytes
    net.train(was_training)

    ops = dict(sorted(counter.ops.items(), key=lambda item: (-item[1].flops, item[0])))
    r = dnnlib.EasyDict(
        params=sum(p.numel() for p in net.parameters()),
        device=str(device),
        ops=ops,
        unknown=dict(counter.unknown),
        op_count={name: op.calls for name, op in ops.items()},
        op_flops={name: op.flops // batch for name, op in ops.items()},
    )
    flops = sum(op.flops for op in ops.values())
    r.update(flops=flops // batch, gflops=flops / batch / 1e9, memory_bytes=memory // batch)
    r.update(total_params=r.params, total_flops=r.flops, mem_per_sample=r.memory_bytes)
    if verbose:
        print(format_report(r))
    return r


def format_report(result: dnnlib.EasyDict) -> str:
    """The printed summary: totals, then one row per op."""
    where = "peak CUDA allocation" if result.device.startswith("cuda") else f"peak of live tensors on {result.device}"
    lines = [
        f"Parameters:        {result.params / 1e6:.2f} M ({result.params} parameters)",
        f"Gflops per sample: {result.gflops:.2f} ({result.flops} flops)",
        f"Memory per sample: {result.memory_bytes / 2**20:.2f} MiB ({where})",
        "",
        f"{'Op':<28s}{'Calls':>8s}{'Gflops':>12s}{'Share':>9s}",
        f"{'-' * 27:<28s}{'-' * 7:>8s}{'-' * 11:>12s}{'-' * 8:>9s}",
    ]
    total = max(sum(entry.flops for entry in result.ops.values()), 1)
    for name, entry in result.ops.items():
        note = "  (unknown op, counted 0)" if name in result.unknown else ""
        lines.append(f"{name:<28s}{entry.calls:>8d}{entry.flops / 1e9:>12.4f}{entry.flops / total:>9.2%}{note}")
    if result.unknown:
        lines += ["", "Unknown ops (counted 0): " + ", ".join(sorted(result.unknown))]
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Command line.


# fmt: off
@click.command()
@click.argument("network", metavar="PKL|URL|PRESET")
@click.option("--device", type=click.Choice(["cuda", "cpu", "meta"]), help="Where the pass runs; meta counts as cpu, without the arithmetic  [default: cuda if available, else meta]")
@click.option("--trust-embedded-code", is_flag=True, help="Load pickles by running their embedded code (trusted only)")
# fmt: on
def main(network: str, device: Optional[str], trust_embedded_code: bool) -> None:
    """Count parameters, Gflops and memory per sample of an EDM2 network.

    PKL|URL|PRESET is a network pickle (a snapshot file or URL; its `ema` is counted) or a training
    preset name such as edm2-img512-xs, whose network is built without allocating its weights.

    Examples:

    \b
    # A pre-trained model
    python count_flops.py https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-s-2147483-0.130.pkl

    \b
    # A training preset, before training it
    python count_flops.py edm2-img512-xxl
    """
    with cli.one_line_errors():
        distributed.refuse_torchrun("count_flops.py")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="'--device'")
    device = device or ("cuda" if torch.cuda.is_available() else "meta")
    with cli.one_line_errors():
        if network in PRESETS and not os.path.exists(network):  # An existing file of that name wins.
            net = build_preset_network(network, device=device)
        elif dnnlib.util.is_url(network, allow_file_urls=True) or os.path.isfile(network):
            net = persistence.load_network_pickle(network, trust_embedded_code=trust_embedded_code)["ema"]
        else:
            raise FileNotFoundError(
                f"{network!r} is not a network pickle, a URL or a training preset ({', '.join(PRESETS)})"
            )
        count_flops(net, device=device, verbose=True)


if __name__ == "__main__":
    main()
